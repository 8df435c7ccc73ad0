"""Clients of the stack's services, built from settings (the same in native and compose)."""

from __future__ import annotations

from urllib.parse import urlparse

from orchard.core.settings import Settings

# Elasticsearch statuses worth resending a write for: a full write queue (429) or a shard moving
# after a node loss (502-504). Shared by the uploader and the Spark app's bulk writers.
ES_RETRY_STATUS = (429, 502, 503, 504)
READ_TIMEOUT_SECONDS = 30  # no byte for this long: give up (multipart parts are 5 MiB)


def s3_http_client(pool_size: int = 32):
    """The urllib3 pool of the MinIO client: bounded timeouts and transport-level retries.

    Why not the SDK's default: it waits up to 5 minutes to connect and retries 503 five times
    itself, so a cluster without write quorum looked like a hang; 503s (SlowDown*, quorum lost)
    are left to the callers' logged, time-capped retries instead. A response that does not start
    within READ_TIMEOUT_SECONDS is not retried here either: with write quorum lost MinIO can hold
    a PUT open for minutes, and each urllib3 retry would wait that long again.
    """
    import os

    import certifi
    import urllib3

    return urllib3.PoolManager(
        maxsize=pool_size,
        cert_reqs="CERT_REQUIRED",
        ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where(),
        timeout=urllib3.Timeout(connect=10, read=READ_TIMEOUT_SECONDS),
        retries=urllib3.Retry(
            total=3, connect=3, read=0, status=3, backoff_factor=0.2, status_forcelist=[500, 502, 504]
        ),
    )


def s3_client(s: Settings, **kwargs):
    """A MinIO SDK client for the S3 endpoint (requires the S3 credentials); kwargs go to Minio()."""
    from minio import Minio

    s.require("s3_access_key", "s3_secret_key")
    url = urlparse(s.s3_url)
    kwargs.setdefault("http_client", s3_http_client())
    return Minio(
        url.netloc,
        access_key=s.s3_access_key.get_secret_value(),
        secret_key=s.s3_secret_key.get_secret_value(),
        secure=url.scheme == "https",
        region=s.s3_region,
        **kwargs,
    )


def es_client(s: Settings, **kwargs):
    """An Elasticsearch client over every configured node (it fails over between them)."""
    from elasticsearch import Elasticsearch

    options = {
        "request_timeout": 30,
        "retry_on_timeout": True,
        "max_retries": 5,
    }
    if s.es_username and s.es_password:
        options["basic_auth"] = (s.es_username, s.es_password.get_secret_value())
    if s.es_ca_cert:
        options["ca_certs"] = str(s.es_ca_cert)
    options.update(kwargs)
    return Elasticsearch(s.es_urls, **options)


def s3a_conf(s: Settings) -> dict[str, str]:
    """The non-secret s3a settings that point Hadoop at the S3 endpoint (MinIO or AWS)."""
    endpoint = s.s3_url
    return {
        "spark.hadoop.fs.s3a.impl": "org.apache.hadoop.fs.s3a.S3AFileSystem",
        "spark.hadoop.fs.s3a.endpoint": endpoint,
        "spark.hadoop.fs.s3a.endpoint.region": s.s3_region,
        "spark.hadoop.fs.s3a.path.style.access": "true",
        "spark.hadoop.fs.s3a.connection.ssl.enabled": str(endpoint.startswith("https")).lower(),
        "spark.hadoop.fs.s3a.aws.credentials.provider": "org.apache.hadoop.fs.s3a.SimpleAWSCredentialsProvider",
        "spark.hadoop.fs.s3a.attempts.maximum": "10",
        "spark.hadoop.fs.s3a.retry.limit": "10",
    }
