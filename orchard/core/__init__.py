"""The bottom layer: settings, errors, service clients, the lake schema, retries, the toolchain."""
