"""Orchard: a distributed image lake (MinIO + Elasticsearch + Spark/Elephas)."""

__version__ = "0.1.0"
