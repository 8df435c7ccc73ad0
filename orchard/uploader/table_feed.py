"""The images table brought up to date by the upload itself: the rows of the objects a run stored
(or found stored), MERGEd into the Delta table in bounded batches (orchard.core.table_write).

Why here: the bytes are in memory a moment after their PUT; a Spark `lake sync` would list the
dataset and read every new object back. Rows are MERGEd only after their objects and documents are
written, so the table never holds a row whose object is missing. A run killed before a MERGE leaves
the table lagging, never wrong: the next upload finds those objects present and MERGEs their rows,
and every Spark stage syncs first when the table lags the bucket. A table that cannot be written
(after retries) does not fail the upload: it is reported once, and the stages sync.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from orchard.core.errors import ServiceUnavailable, TableNotFound
from orchard.core.lake import Column
from orchard.core.retry import LAKE_COMMIT, retrying
from orchard.core.settings import Settings
from orchard.core.table_write import create_table, image_row, merge_rows, referenced_row
from orchard.uploader.inspection import Inspected

log = logging.getLogger(__name__)

MAX_ROWS = 4096  # per MERGE (one Delta commit): few commits per upload, bounded memory
MAX_BYTES = 64 << 20  # inline content held before a MERGE


@dataclass
class TableUpdate:
    """What the run did to the images table (in the upload report)."""

    inserted: int = 0
    updated: int = 0
    version: int | None = None
    error: str = ""  # why the table was not (fully) updated; the stages sync it then
    skipped: bool = False  # `--no-table`

    def as_dict(self) -> dict:
        """The report's `table` object."""
        return asdict(self)


@dataclass
class TableFeed:
    """Rows waiting for their MERGE (one dataset: an upload writes one). Not thread-safe: fed by the
    uploader's indexing thread, flushed by it and once at the end of the run."""

    settings: Settings
    enabled: bool = True  # False (`orchard upload --no-table`): rows are left to `orchard lake sync`
    update: TableUpdate = field(default_factory=TableUpdate)
    rows: list[dict] = field(default_factory=list)
    held_bytes: int = 0

    def __post_init__(self) -> None:
        self.update.skipped = not self.enabled

    def add(self, rows: list[dict]) -> None:
        """Queue rows; MERGE them once enough are held."""
        if self.update.error:  # the table refused already: the stages sync
            return
        self.rows += rows
        self.held_bytes += sum(len(row[Column.CONTENT] or b"") for row in rows)
        if len(self.rows) >= MAX_ROWS or self.held_bytes >= MAX_BYTES:
            self.flush()

    def flush(self) -> None:
        """MERGE the queued rows in one commit (creating the table first if there is none)."""
        rows, self.rows, self.held_bytes = self.rows, [], 0
        if not rows or self.update.error:
            return
        now = datetime.now(UTC)  # after every PUT of these rows: no object is newer than its row
        stamped = [{**row, Column.INGESTED_AT: now} for row in rows]
        try:
            counts = retrying(LAKE_COMMIT, _transient, log)(self._merge, stamped)
        except ServiceUnavailable as exc:
            self.update.error = str(exc)[:300]
            log.warning("images table not updated (%s): the next Spark stage syncs it first", self.update.error)
            return
        self.update.inserted += counts.inserted
        self.update.updated += counts.updated
        self.update.version = counts.version

    def _merge(self, rows: list[dict]):
        try:
            return merge_rows(self.settings, rows)
        except TableNotFound:  # a stack set up before the table existed: create it once
            create_table(self.settings)
            return merge_rows(self.settings, rows)


def _transient(exc: BaseException) -> bool:
    """A store error or a concurrent commit: worth another MERGE (it re-reads the table)."""
    return isinstance(exc, ServiceUnavailable)


def row_of(info: Inspected, etag: str, inline_max_bytes: int) -> dict:
    """The table row of an item whose object holds its bytes (ingested_at set at the MERGE): from
    its bytes when the table keeps them inline, else from what inspection read (no content)."""
    key = info.item.key
    if info.size > inline_max_bytes:
        header = {Column.FORMAT: info.format.lower(), Column.WIDTH: info.width, Column.HEIGHT: info.height}
        return referenced_row(key, info.sha256, info.size, {**header, Column.CHANNELS: info.channels}, etag, None)
    return image_row(key, content_of(info), etag, None, inline_max_bytes)


def content_of(info: Inspected) -> bytes:
    """The item's bytes: kept by inspection (small files and .npy stack rows), else read again from
    the file (OSError if it cannot be)."""
    return info.data if info.data is not None else Path(info.item.path).read_bytes()
