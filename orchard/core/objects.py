"""Reads of one object and bulk operations on objects under a prefix, retried as any S3 read or
write (orchard.core.retry.S3_READ, S3_WRITE).

The prefix removal is shared by the benches and the test suites' cleanup, which must not fail on a
MinIO that briefly answers SlowDown (short of write quorum while a node restarts) and must fail on a
real refusal.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping

from minio import Minio
from minio.deleteobjects import DeleteError, DeleteObject

from orchard.core.retry import S3_READ, S3_TRANSIENT_CODES, S3_WRITE, retrying, s3_transient

log = logging.getLogger(__name__)

SHA_META = "sha256"  # the user metadata `orchard upload` stores with each object: its content's sha256


def meta_sha256(metadata: Mapping[str, str] | None) -> str | None:
    """The sha256 user metadata from a listing, a HEAD response or an event record (the name's
    case and prefix vary: `X-Amz-Meta-Sha256`, `sha256`); None if absent."""
    for name, value in (metadata or {}).items():
        if name.lower() in ("x-amz-meta-sha256", SHA_META):
            return value
    return None


def get_bytes(client: Minio, bucket: str, key: str, offset: int = 0, length: int = 0) -> bytes:
    """The bytes of one object (or of `length` bytes from `offset`), one GET, its connection released;
    S3Error as MinIO answers it (not retried)."""
    response = client.get_object(bucket, key, offset=offset, length=length)
    try:
        return response.read()
    finally:
        response.close()
        response.release_conn()


def read_object(client: Minio, bucket: str, key: str, offset: int = 0, length: int = 0) -> bytes:
    """get_bytes retried with the S3_READ policy (transient errors retried with a bounded backoff)."""
    return retrying(S3_READ, s3_transient, log)(get_bytes, client, bucket, key, offset, length)


def stream_sha256(client: Minio, bucket: str, key: str, chunk: int = 8 * 2**20) -> str:
    """The sha256 of one object read as a stream of `chunk`-byte parts (constant memory, one GET,
    its connection released); S3Error as MinIO answers it (not retried)."""
    digest = hashlib.sha256()
    response = client.get_object(bucket, key)
    try:
        for part in response.stream(chunk):
            digest.update(part)
    finally:
        response.close()
        response.release_conn()
    return digest.hexdigest()


def read_sha256(client: Minio, bucket: str, key: str) -> str:
    """stream_sha256 retried with the S3_READ policy (as read_object)."""
    return retrying(S3_READ, s3_transient, log)(stream_sha256, client, bucket, key)


class DeletesRefused(Exception):
    """Objects MinIO did not delete: its DeleteError per object (`transient` if all may pass later)."""

    def __init__(self, bucket: str, errors: list[DeleteError]) -> None:
        first = errors[0]
        super().__init__(f"{len(errors)} objects of {bucket} not deleted, e.g. {first.name}: {first.code}")
        self.errors = errors
        self.transient = all(e.code in S3_TRANSIENT_CODES for e in errors)


def remove_prefix(client: Minio, bucket: str, prefix: str) -> int:
    """Delete every object under `prefix` of `bucket`, retrying transient refusals and errors;
    returns how many objects the last attempt listed. DeletesRefused if MinIO still refuses."""
    return retrying(S3_WRITE, _retryable, log)(_remove_listed, client, bucket, prefix)


def _retryable(exc: BaseException) -> bool:
    return (isinstance(exc, DeletesRefused) and exc.transient) or s3_transient(exc)


def _remove_listed(client: Minio, bucket: str, prefix: str) -> int:
    """One attempt: list the prefix, delete what is listed (multi-object deletes of 1,000 keys)."""
    names = [DeleteObject(o.object_name) for o in client.list_objects(bucket, prefix=prefix, recursive=True)]
    errors = list(client.remove_objects(bucket, names))
    if errors:
        raise DeletesRefused(bucket, errors)
    return len(names)
