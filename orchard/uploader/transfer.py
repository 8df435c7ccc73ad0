"""Object transfers to MinIO: retried, resumable, and skipped when the object is already there.

Every object carries the sha256 of its content as user metadata (`x-amz-meta-sha256`). What is
already stored is learned by listing one key prefix (= one `<dataset>/<split>/<label>/` folder)
at a time with MinIO's metadata-in-listing extension, which costs one request per few
thousand objects instead of one HEAD per object. Objects without the metadata in the listing
(other S3 servers, objects written by other tools) are HEADed. Small payloads are sent from
memory with one PUT; large files are streamed by the SDK's `fput_object` in multipart parts
(5 MiB each, at most 3 in flight), so memory stays bounded whatever the file size.
"""

from __future__ import annotations

import io
import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from minio import Minio
from minio.error import S3Error

from orchard.core.lake import utc_timestamp
from orchard.core.objects import SHA_META, meta_sha256
from orchard.core.retry import S3_READ, S3_WRITE, retried, s3_transient
from orchard.uploader.inspection import Inspected

log = logging.getLogger(__name__)

PREFIXES_CACHED = 4  # items arrive sorted by key, so only the current label folder is hot


# What is worth retrying, and how (orchard.core.retry; bounded in attempts and in time: with write
# quorum lost MinIO answers 503 SlowDownWrite to every PUT, and a file must fail in seconds; PUTs:
# `retried_put`).
is_transient = s3_transient
s3_read_retry = retried(S3_READ, s3_transient, log)


@dataclass(frozen=True)
class Remote:
    """An object already in the bucket."""

    key: str
    sha256: str | None
    etag: str
    size: int
    last_modified: str | None


@dataclass(frozen=True)
class Stored:
    """Result of a PUT: what the document records about the object."""

    etag: str
    uploaded_at: str


def _time(moment: datetime | None) -> str | None:
    return utc_timestamp(moment) if moment else None


class RemoteIndex:
    """What is already stored under a prefix, listed once per label folder (LRU-cached)."""

    def __init__(self, client: Minio, bucket: str) -> None:
        self.client = client
        self.bucket = bucket
        self._prefixes: OrderedDict[str, dict[str, Remote | None]] = OrderedDict()

    def get(self, key: str) -> Remote | None:
        """The stored object at `key` (with its sha256 if it has one), or None."""
        prefix = key.rsplit("/", 1)[0] + "/"
        if prefix not in self._prefixes:
            self._prefixes[prefix] = self._list(prefix)
            while len(self._prefixes) > PREFIXES_CACHED:
                self._prefixes.popitem(last=False)
        remote = self._prefixes[prefix].get(key)
        if remote is not None and remote.sha256 is None:  # the listing had no user metadata
            remote = self._head(key)
            self._prefixes[prefix][key] = remote
        return remote

    @s3_read_retry
    def _list(self, prefix: str) -> dict[str, Remote | None]:
        objects = self.client.list_objects(self.bucket, prefix=prefix, recursive=False, include_user_meta=True)
        found: dict[str, Remote | None] = {}
        for obj in objects:
            if obj.is_dir:
                continue
            found[obj.object_name] = Remote(
                obj.object_name,
                meta_sha256(obj.metadata),
                (obj.etag or "").strip('"'),
                obj.size or 0,
                _time(obj.last_modified),
            )
        return found

    @s3_read_retry
    def _head(self, key: str) -> Remote | None:
        """HEAD one object; sha256 "" when it has none (written by another tool: re-uploaded)."""
        try:
            stat = self.client.stat_object(self.bucket, key)
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchObject"):  # deleted since the listing
                return None
            raise
        return Remote(
            key,
            meta_sha256(stat.metadata) or "",
            (stat.etag or "").strip('"'),
            stat.size or 0,
            _time(stat.last_modified),
        )


def put(client: Minio, bucket: str, info: Inspected) -> Stored:
    """Store `info`'s content at its key with its sha256 as metadata (one attempt: see `retried_put`)."""
    key = info.item.key
    metadata: dict[str, str | list[str] | tuple[str]] = {SHA_META: info.sha256}
    if info.data is not None:
        result = client.put_object(
            bucket, key, io.BytesIO(info.data), len(info.data), content_type=info.content_type, metadata=metadata
        )
    else:
        result = client.fput_object(bucket, key, str(info.item.path), content_type=info.content_type, metadata=metadata)
    return Stored(etag=(result.etag or "").strip('"'), uploaded_at=utc_timestamp())


def retried_put(
    retry_on: Callable[[BaseException], bool] = is_transient,
) -> Callable[[Minio, str, Inspected], Stored]:
    """`put` under the S3_WRITE policy, retrying the errors `retry_on` accepts (default: every transient one;
    the uploader also stops retrying once MinIO has lost write quorum)."""
    return retried(S3_WRITE, retry_on, log)(put)


def bucket_exists(client: Minio, bucket: str) -> bool:
    """Whether the bucket exists (no retries beyond the client's own: a pre-flight check fails fast)."""
    return client.bucket_exists(bucket)
