"""The application layer: the CLI, the demo and its report (imports every layer below)."""
