"""Online prediction: the REST API of `orchard serve` (orchard.serving.api)."""
