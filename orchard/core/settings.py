"""Orchard's one settings object: flags > ORCHARD_* environment > credentials file > defaults.

Built once in `main()` by `load_settings()` and passed down; nothing here runs at import time.
Credentials come from ORCHARD_S3_* variables (compose, a real cluster) or, on the native stack, from
the 0600 file `orchard stack up` generates, read only by `with_credentials_file`. Executors get the
driver's Settings object itself (pickled by value: frozen, hashable, secrets as SecretStr).
The same variable names are used by the native launcher and by the compose deployment, so the
uploader and the Spark app never know which one they run in.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from orchard.core.errors import ConfigError

ENV_PREFIX = "ORCHARD_"
CREDENTIALS_FILE = "credentials.env"


def _default_home() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "orchard"


def _default_cache() -> Path:
    return Path.home() / ".cache" / "orchard"


class Settings(BaseSettings):
    """Every knob Orchard has. Field `foo_bar` is read from ORCHARD_FOO_BAR."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="ignore")

    # --- where things live ---------------------------------------------------------------
    home: Path = Field(default_factory=_default_home, description="native stack state: data, logs, pids")
    cache_dir: Path = Field(default_factory=_default_cache, description="what `make deps` installed")

    # --- clients (same names in compose) -------------------------------------------------
    s3_endpoint: str | None = None  # default: the native load balancer
    s3_access_key: SecretStr | None = None
    s3_secret_key: SecretStr | None = None
    s3_region: str = "us-east-1"
    images_bucket: str = "images"
    features_bucket: str = "features"
    models_bucket: str = "models"
    # The Delta Lake table of images (orchard/core/lake.py): default s3a://<lake_bucket>/images.
    lake_bucket: str = "lake"
    lake_uri: str | None = None
    # The Delta table of frozen bases' embeddings (computed once per image and base): default
    # s3a://<lake_bucket>/embeddings.
    embeddings_uri: str | None = None
    # The Delta table of every model version's predictions (orchard infer writes it beside the
    # index): default s3a://<lake_bucket>/predictions.
    predictions_uri: str | None = None
    # The Delta table of every `orchard features` run's embeddings and PCA: default
    # s3a://<lake_bucket>/features.
    features_table: str | None = None
    # Images larger than this are referenced by key in the table (content null), not copied:
    # large rasters stay single objects, the table stays a table of thumbnails-to-photos.
    lake_inline_max_bytes: int = 16 * 2**20
    lake_target_file_mb: int = 128  # `orchard lake optimize` compacts to files of about this size
    # `orchard lake vacuum` keeps removed files this long: longer than any job reading a snapshot.
    lake_retention_hours: int = 168
    # Rasters (TIFF, .npy) of more pixels than this are cut into tiles by `orchard infer`
    # (orchard.spark_app.tiles): one document and prediction per tile_size x tile_size window every
    # tile_stride pixels, read by ranged requests, never the whole raster in an executor's memory.
    tile_min_pixels: int = 25_000_000
    tile_size: int = Field(default=256, ge=16)
    tile_stride: int = Field(default=256, ge=1)
    es_hosts: str | None = None  # comma-separated; default: the 3 native nodes
    es_username: str | None = None
    es_password: SecretStr | None = None
    es_ca_cert: Path | None = None
    images_index: str = "orchard-images"
    models_index: str = "orchard-models"
    spark_master: str | None = None  # default: the native master

    # --- online prediction (`orchard serve`, orchard/serving) -----------------------------
    serve_host: str | None = None  # the service's bind address (default: bind_host, loopback)
    serve_port: int = 8600
    # Required on POST /v1/predict when the service is bound beyond loopback; `orchard stack up`
    # generates one into the credentials file (compose: from .env).
    serve_api_key: SecretStr | None = None
    serve_max_batch: int = 32  # images per model call (concurrent requests gathered into one)
    serve_max_wait_ms: float = 5.0  # how long a model call waits for more requests to join it
    serve_max_request_mb: float = 20.0  # a larger request body is refused (413)
    serve_max_pixels: int = 40_000_000  # a larger image is refused before decoding (decompression bombs)
    # Up to this many embeddings by the serving model, neighbours are searched exactly in the
    # service's memory (float32: 50,000 x 128 dimensions = 26 MB); above, Elasticsearch's kNN. 0: never.
    serve_local_knn_max: int = 50_000
    # numpy's BLAS threads in the service (the in-memory neighbour search's matrix product): idle
    # OpenBLAS threads spin after each product, taking the cores the model and the requests need.
    serve_blas_threads: int = Field(default=1, ge=1)
    serve_reload_seconds: float = 5.0  # how often the serving alias is re-read (`orchard models promote`)
    # The events of new uploads waiting for their prediction (SQLite, orchard.serving.events):
    # default $ORCHARD_HOME/serve/inbox.sqlite3.
    serve_inbox: Path | None = None

    # --- native launcher -----------------------------------------------------------------
    bind_host: str = "127.0.0.1"
    minio_port: int = 9000  # the load balancer: the single S3 endpoint
    minio_node_port: int = 9001  # node i listens on minio_node_port + i (i = 0..3)
    minio_console_port: int = 9101
    minio_nodes: int = 4
    es_http_port: int = 9200  # node i: es_http_port + i
    es_transport_port: int = 9300
    es_nodes: int = 3
    es_heap: str = "1g"
    es_write_queue_size: int | None = None  # tiny values force 429s (chaos tests)
    spark_master_port: int = 7077
    spark_ui_port: int = 8080
    spark_worker_ui_port: int = 8081  # worker i: spark_worker_ui_port + i
    spark_workers: int = 2
    spark_worker_cores: int = 1
    spark_worker_memory: str = "4g"
    health_timeout: float = 300.0  # seconds for the whole stack to become healthy

    # --- derived -------------------------------------------------------------------------
    @property
    def s3_url(self) -> str:
        """The S3 endpoint clients use."""
        return self.s3_endpoint or f"http://{self.bind_host}:{self.minio_port}"

    @property
    def serve_bind_host(self) -> str:
        """The address `orchard serve` binds to."""
        return self.serve_host or self.bind_host

    @property
    def serve_url(self) -> str:
        """Where clients on this machine reach `orchard serve` of the native stack."""
        return f"http://{self.bind_host}:{self.serve_port}"

    @property
    def serve_inbox_path(self) -> Path:
        """Where `orchard serve` keeps the events it has acknowledged and not yet handled."""
        return self.serve_inbox or self.home / "serve" / "inbox.sqlite3"

    @property
    def images_table_uri(self) -> str:
        """Where the Delta table of images lives (s3a URI)."""
        return self.lake_uri or f"s3a://{self.lake_bucket}/images"

    @property
    def embeddings_table_uri(self) -> str:
        """Where the Delta table of pretrained bases' embeddings lives (s3a URI)."""
        return self.embeddings_uri or f"s3a://{self.lake_bucket}/embeddings"

    @property
    def predictions_table_uri(self) -> str:
        """Where the Delta table of every model version's predictions lives (s3a URI)."""
        return self.predictions_uri or f"s3a://{self.lake_bucket}/predictions"

    @property
    def features_table_uri(self) -> str:
        """Where the Delta table of the features runs' embeddings and PCA lives (s3a URI)."""
        return self.features_table or f"s3a://{self.lake_bucket}/features"

    @property
    def es_urls(self) -> list[str]:
        """Elasticsearch node URLs clients use (the client fails over between them)."""
        if self.es_hosts:
            return [h.strip() for h in self.es_hosts.split(",") if h.strip()]
        return [f"http://{self.bind_host}:{self.es_http_port + i}" for i in range(self.es_nodes)]

    @property
    def spark_master_url(self) -> str:
        """The Spark master URL jobs are submitted to."""
        return self.spark_master or f"spark://{self.bind_host}:{self.spark_master_port}"

    @property
    def credentials_file(self) -> Path:
        """The 0600 file `orchard stack up` writes the generated MinIO credentials to."""
        return self.home / CREDENTIALS_FILE

    def require(self, *names: str) -> None:
        """Fail with ConfigError naming the ORCHARD_* variable of the first unset field."""
        for name in names:
            if getattr(self, name) in (None, ""):
                var = ENV_PREFIX + name.upper()
                raise ConfigError(
                    f"{var} is not set: start the native stack with `orchard stack up` "
                    f"(it writes {self.credentials_file}) or export {var}"
                )

    def secret(self, name: str) -> str:
        """The value of the secret field `name` (e.g. "s3_secret_key"); ConfigError as `require` when unset."""
        self.require(name)
        value = getattr(self, name)
        if not isinstance(value, SecretStr):
            raise TypeError(f"{name} is not a secret field of Settings")
        return value.get_secret_value()


def load_settings(**overrides: Any) -> Settings:
    """Build the frozen settings: `overrides` (CLI flags, None = unset) win over the environment.

    The native credentials file of the chosen home is read last, so exported variables win.
    Raises ConfigError with the variable name when a value does not parse.
    """
    return with_credentials_file(_build(**{k: v for k, v in overrides.items() if v is not None}))


def with_credentials_file(s: Settings) -> Settings:
    """`s` completed from its home's credentials file: the fields neither a flag nor an ORCHARD_*
    variable set take the file's values; `s` itself while there is no file.

    The one way the generated MinIO credentials reach settings: `load_settings` ends with it, and
    `orchard stack up`, whose settings were loaded before it generated the file, calls it again.
    Raises ConfigError with the variable name when a value of the file does not parse.
    """
    if not s.credentials_file.is_file():
        return s
    return _build(_env_file=s.credentials_file, **s.model_dump(exclude_unset=True))


def _build(**values: Any) -> Settings:
    """Settings(**values), a ValidationError turned into a ConfigError naming the variable."""
    try:
        return Settings(**values)
    except ValidationError as exc:
        err = exc.errors()[0]
        var = ENV_PREFIX + str(err["loc"][0]).upper()
        raise ConfigError(f"{var}: {err['msg']}") from None
