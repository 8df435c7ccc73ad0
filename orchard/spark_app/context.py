"""What executors know: settings as a small picklable dict, and clients built once per Python worker.

Closures shipped to executors capture an `ExecutorConfig` (plain values, secrets included), never
the Settings object of the driver, so they work in any deployment whose executors can reach the
same endpoints. Clients are cached per process: Spark reuses Python workers across tasks.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass

from orchard.core.settings import Settings


@dataclass(frozen=True)
class ExecutorConfig:
    """The settings an executor needs to reach MinIO and Elasticsearch (hashable, picklable)."""

    s3_endpoint: str
    s3_access_key: str
    s3_secret_key: str
    s3_region: str
    es_hosts: str
    es_username: str | None
    es_password: str | None
    es_ca_cert: str | None
    images_bucket: str
    features_bucket: str
    models_bucket: str
    images_index: str
    models_index: str

    @classmethod
    def from_settings(cls, s: Settings) -> ExecutorConfig:
        """The executor view of the driver's settings (requires the S3 credentials)."""
        s.require("s3_access_key", "s3_secret_key")
        return cls(
            s3_endpoint=s.s3_url,
            s3_access_key=s.s3_access_key.get_secret_value(),
            s3_secret_key=s.s3_secret_key.get_secret_value(),
            s3_region=s.s3_region,
            es_hosts=",".join(s.es_urls),
            es_username=s.es_username,
            es_password=s.es_password.get_secret_value() if s.es_password else None,
            es_ca_cert=str(s.es_ca_cert) if s.es_ca_cert else None,
            images_bucket=s.images_bucket,
            features_bucket=s.features_bucket,
            models_bucket=s.models_bucket,
            images_index=s.images_index,
            models_index=s.models_index,
        )

    def settings(self) -> Settings:
        """A Settings object built from these values only (executor side)."""
        return Settings(**{k: v for k, v in asdict(self).items() if v is not None})


EXECUTOR_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s [python worker %(process)d] %(message)s"


@functools.lru_cache(maxsize=1)
def configure_worker_logging() -> None:
    """Give this executor Python worker a log format and INFO for Orchard's loggers (once).

    Python workers start with no logging configuration; their stderr lands in the executor's
    stderr file (work/<app>/<executor>/stderr), so warnings such as retries are kept there.
    """
    import logging

    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(EXECUTOR_LOG_FORMAT))
        root.addHandler(handler)
        root.setLevel(logging.WARNING)
    for name in ("orchard",):
        logging.getLogger(name).setLevel(logging.INFO)


@functools.lru_cache(maxsize=4)
def es_of(cfg: ExecutorConfig):
    """The Elasticsearch client of this Python worker for `cfg` (built once)."""
    from orchard.core.clients import es_client

    configure_worker_logging()

    return es_client(cfg.settings(), request_timeout=60)


@functools.lru_cache(maxsize=4)
def s3_of(cfg: ExecutorConfig):
    """The MinIO client of this Python worker for `cfg` (built once)."""
    from orchard.core.clients import s3_client

    return s3_client(cfg.settings())
