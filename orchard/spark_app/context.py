"""What executors know: the driver's Settings object itself, and clients built once per Python worker.

Closures shipped to executors capture the driver's frozen `Settings` (secrets included, as
SecretStr): it pickles by value and unpickles without validation, so an executor never reads its
own environment or any file to learn its settings, and the paths in it (home, cache) are plain
values no executor uses. The S3 endpoint and Elasticsearch nodes are the driver's view (`s3_url`,
`es_urls`): executors must reach the same endpoints. Settings are frozen and hashable, so they key
the per-process client caches below (Spark reuses Python workers across tasks).
"""

from __future__ import annotations

import functools
import logging

from elasticsearch import Elasticsearch
from minio import Minio

from orchard.core.clients import es_client, s3_client
from orchard.core.settings import Settings

EXECUTOR_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s [python worker %(process)d] %(message)s"


@functools.lru_cache(maxsize=1)
def configure_worker_logging() -> None:
    """Give this executor Python worker a log format and INFO for Orchard's loggers (once).

    Python workers start with no logging configuration; their stderr lands in the executor's
    stderr file (work/<app>/<executor>/stderr), so warnings such as retries are kept there.
    """
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(EXECUTOR_LOG_FORMAT))
        root.addHandler(handler)
        root.setLevel(logging.WARNING)
    for name in ("orchard",):
        logging.getLogger(name).setLevel(logging.INFO)


@functools.lru_cache(maxsize=4)
def es_of(s: Settings) -> Elasticsearch:
    """The Elasticsearch client of this Python worker for settings `s` (built once)."""
    configure_worker_logging()

    return es_client(s, request_timeout=60)


@functools.lru_cache(maxsize=4)
def s3_of(s: Settings) -> Minio:
    """The MinIO client of this Python worker for settings `s` (built once; requires the S3 credentials)."""
    return s3_client(s)
