"""Clients of the stack's services, built from settings (the same in native and compose)."""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import urlparse

import certifi
import urllib3
from elasticsearch import Elasticsearch
from minio import Minio

from orchard.core.retry import ES_TRANSPORT_RETRIES, S3_TRANSPORT_RETRIES, S3A_RETRY_LIMIT, S3A_SDK_RETRIES
from orchard.core.settings import Settings

CONNECT_TIMEOUT_SECONDS = 10
READ_TIMEOUT_SECONDS = 30  # no byte for this long: give up (multipart parts are 5 MiB)
ES_REQUEST_TIMEOUT_SECONDS = 30  # executors use 60 (spark_app.context.es_of)


def s3_http_client(pool_size: int = 32) -> urllib3.PoolManager:
    """The urllib3 pool of the MinIO client: bounded timeouts, no retries of its own.

    Why not the SDK's default: it waits up to 5 minutes to connect and retries 503 five times
    itself, so a cluster without write quorum looked like a hang. Retries belong to the callers'
    logged, time-capped policies (orchard.core.retry); retrying here as well would multiply them
    (the load balancer in front of MinIO already moves a request off a dead node). A response
    that does not start within READ_TIMEOUT_SECONDS fails: with write quorum lost MinIO can hold
    a PUT open for minutes. Redirects are still followed.
    """
    return urllib3.PoolManager(
        maxsize=pool_size,
        cert_reqs="CERT_REQUIRED",
        ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where(),
        timeout=urllib3.Timeout(connect=CONNECT_TIMEOUT_SECONDS, read=READ_TIMEOUT_SECONDS),
        retries=urllib3.Retry(
            total=None,
            connect=S3_TRANSPORT_RETRIES,
            read=S3_TRANSPORT_RETRIES,
            status=S3_TRANSPORT_RETRIES,
            other=S3_TRANSPORT_RETRIES,
            redirect=3,
            respect_retry_after_header=False,  # MinIO's 503s say "Retry-After: 120"
        ),
    )


def s3_client(s: Settings, **kwargs: Any) -> Minio:
    """A MinIO SDK client for the S3 endpoint (requires the S3 credentials); kwargs go to Minio()."""
    access_key, secret_key = s.secret("s3_access_key"), s.secret("s3_secret_key")
    url = urlparse(s.s3_url)
    kwargs.setdefault("http_client", s3_http_client())
    return Minio(
        url.netloc,
        access_key=access_key,
        secret_key=secret_key,
        secure=url.scheme == "https",
        region=s.s3_region,
        **kwargs,
    )


def es_client(s: Settings, **kwargs: Any) -> Elasticsearch:
    """An Elasticsearch client over every configured node (it fails over between them).

    A plain call is retried on another node (ES_TRANSPORT_RETRIES, no backoff); calls that a
    policy of orchard.core.retry wraps turn that off (retry.without_transport_retries).
    """
    options: dict[str, Any] = {
        "request_timeout": ES_REQUEST_TIMEOUT_SECONDS,
        "retry_on_timeout": True,
        "max_retries": ES_TRANSPORT_RETRIES,
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
        "spark.hadoop.fs.s3a.attempts.maximum": str(S3A_SDK_RETRIES),
        "spark.hadoop.fs.s3a.retry.limit": str(S3A_RETRY_LIMIT),
    }
