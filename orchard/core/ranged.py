"""A seekable, read-only file over one object in the bucket, read by HTTP range requests: windowed
raster readers (orchard.core.rasters.read_tiff_window) fetch only the headers and tiles they need
of an object of any size, never the whole of it.

Reads of less than a block fetch the whole block (1 MiB by default) and serve the next reads from
it: a TIFF's header and tile tables are parsed in many small reads. Every range request is retried
as any S3 read (orchard.core.retry.S3_READ).
"""

from __future__ import annotations

import io
import logging

from orchard.core.objects import read_object
from orchard.core.retry import S3_READ, retrying, s3_transient

log = logging.getLogger(__name__)

BLOCK_BYTES = 1024 * 1024


class RangedObject(io.RawIOBase):
    """One object as a seekable binary file; `fetched` and `requests` count what was read from S3."""

    def __init__(self, client, bucket: str, key: str, block: int = BLOCK_BYTES) -> None:
        super().__init__()
        self.client, self.bucket, self.key, self.block = client, bucket, key, block
        self.size = int(retrying(S3_READ, s3_transient, log)(client.stat_object, bucket, key).size)
        self.position, self.fetched, self.requests = 0, 0, 0
        self._cached_at, self._cached = -1, b""

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        """Move to `offset` from the start, the current position or the end; returns the position."""
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.size}[whence]
        if base + offset < 0:
            raise ValueError(f"negative seek position {base + offset}")
        self.position = base + offset
        return self.position

    def readinto(self, buffer) -> int:
        """Fill `buffer` from the current position (less only at the end of the object); returns the count."""
        view = memoryview(buffer).cast("B")
        wanted = max(0, min(len(view), self.size - self.position))
        done = 0
        while done < wanted:
            chunk = self._bytes_at(self.position + done, wanted - done)
            view[done : done + len(chunk)] = chunk
            done += len(chunk)
        self.position += done
        return done

    def _bytes_at(self, offset: int, length: int) -> bytes:
        """Up to `length` bytes at `offset`: from the cached block, one range of a long read, or a new block."""
        if self._cached_at <= offset < self._cached_at + len(self._cached):
            start = offset - self._cached_at
            return self._cached[start : start + length]
        if length >= self.block:
            return self._fetch(offset, length)
        self._cached_at, self._cached = offset, self._fetch(offset, min(self.block, self.size - offset))
        return self._cached[:length]

    def _fetch(self, offset: int, length: int) -> bytes:
        """One range request, retried as an S3 read."""
        data = read_object(self.client, self.bucket, self.key, offset, length)
        self.fetched += len(data)
        self.requests += 1
        return data
