"""Which S3 and Elasticsearch errors the uploader retries (pure classification, no services)."""

from __future__ import annotations

import urllib3
from elastic_transport import ApiResponseMeta, HttpHeaders, NodeConfig
from elastic_transport import ConnectionError as EsConnectionError
from elasticsearch import ApiError
from minio.error import S3Error, ServerError

from orchard.uploader import index, transfer


def s3_error(code: str) -> S3Error:
    return S3Error(None, code, "message", "resource", "request-id", "host-id")


def es_error(status: int) -> ApiError:
    meta = ApiResponseMeta(
        status=status,
        http_version="1.1",
        headers=HttpHeaders(),
        duration=0.0,
        node=NodeConfig("http", "localhost", 9200),
    )
    return ApiError(message="error", meta=meta, body={})


def test_s3_throttling_and_server_errors_are_retried() -> None:
    for code in ("SlowDown", "InternalError", "ServiceUnavailable", "XMinioServerNotInitialized"):
        assert transfer.is_transient(s3_error(code)), code
    assert transfer.is_transient(ServerError("502 from proxy", 502))
    assert transfer.is_transient(urllib3.exceptions.ProtocolError("connection reset"))
    assert transfer.is_transient(ConnectionResetError())


def test_s3_client_errors_are_not_retried() -> None:
    for code in ("AccessDenied", "NoSuchBucket", "InvalidObjectName"):
        assert not transfer.is_transient(s3_error(code)), code
    assert not transfer.is_transient(FileNotFoundError("gone"))
    assert not transfer.is_transient(ValueError("bad"))


def test_elasticsearch_429_5xx_and_connection_errors_are_retried() -> None:
    for status in (429, 502, 503, 504):
        assert index.is_transient(es_error(status)), status
    assert index.is_transient(EsConnectionError("refused"))
    assert index.is_transient(index.StillThrottled("3 documents still rejected"))
    for status in (400, 404, 409):
        assert not index.is_transient(es_error(status)), status


def test_sha256_metadata_is_found_whatever_the_header_case() -> None:
    assert transfer._meta_sha({"X-Amz-Meta-Sha256": "ab"}) == "ab"
    assert transfer._meta_sha({"x-amz-meta-sha256": "cd", "content-type": "image/jpeg"}) == "cd"
    assert transfer._meta_sha({"content-type": "image/jpeg"}) is None
    assert transfer._meta_sha(None) is None


def test_s3_client_leaves_503_to_the_logged_time_capped_retries() -> None:
    from orchard.core.clients import s3_http_client

    pool = s3_http_client()
    retries, timeout = pool.connection_pool_kw["retries"], pool.connection_pool_kw["timeout"]
    assert 503 not in retries.status_forcelist and 502 in retries.status_forcelist  # a LB hiccup only
    assert retries.total <= 3 and timeout.connect_timeout <= 10  # the SDK default waits 5 min to connect
    assert transfer.is_transient(s3_error("SlowDownWrite"))  # ... and those retries are bounded in time:
    assert transfer.RETRY_SECONDS <= 60


def test_an_upload_stops_after_writes_are_refused_in_a_row(tmp_path) -> None:
    from orchard.core.errors import ServiceUnavailable
    from orchard.core.settings import Settings
    from orchard.uploader.pipeline import ABORT_AFTER_FAILED_WRITES, Uploader, UploadOptions

    up = Uploader(Settings(home=tmp_path), UploadOptions(dataset="d"), s3=None, es=None)
    for _ in range(ABORT_AFTER_FAILED_WRITES - 1):
        up._count_write(s3_error("SlowDownWrite"))
    up._count_write(None)
    assert up.failed_writes_in_a_row == 0
    for _ in range(ABORT_AFTER_FAILED_WRITES):
        up._count_write(s3_error("SlowDownWrite"))
    error = up.writes_refused()
    assert isinstance(error, ServiceUnavailable) and f"last {ABORT_AFTER_FAILED_WRITES} writes" in str(error)
    assert "SlowDownWrite" in str(error) or "message" in str(error)


def test_s3_client_does_not_wait_again_after_a_read_timeout() -> None:
    from orchard.core.clients import READ_TIMEOUT_SECONDS, s3_http_client

    pool = s3_http_client()
    assert pool.connection_pool_kw["retries"].read == 0  # a PUT MinIO holds open is not re-sent here
    assert pool.connection_pool_kw["timeout"].read_timeout == READ_TIMEOUT_SECONDS <= 60
