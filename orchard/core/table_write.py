"""Rows of the images table, and the table written without Spark (delta-rs): created by `orchard
setup`, brought up to date by `orchard upload` as it stores objects.

One row builder (`image_row`) for every writer: Spark's `lake sync` (in the executors) and the
uploader make the same row of the same object, so a sync after an upload finds nothing to do.

Why the uploader writes the table itself: a Spark sync lists the whole dataset and starts an
application (minutes, mostly fixed cost) to add rows for objects the uploader had in memory a
moment before. `merge_rows` MERGEs a batch of rows by key in one Delta commit: a row whose key
is new is inserted, a row whose object was overwritten (another ETag) replaced, an identical row
left alone (a re-run commits nothing). The MERGE condition names the batch's dataset and key range,
so delta-rs reads only the data files whose key statistics overlap it (uploads go in key order),
not the whole partition. Commits are atomic with S3 conditional writes (If-None-Match), which
delta-rs uses on S3 and MinIO; Spark's Delta writer does not, hence docs/lake.md's rule of one
writing cluster at a time, which covers the uploader too.
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, BinaryIO

from PIL import Image, UnidentifiedImageError

from orchard.core import rasters, table_log
from orchard.core.errors import ServiceUnavailable, TableNotFound
from orchard.core.formats import MAGIC_BYTES, NPY, TIFF, sniff
from orchard.core.lake import PARTITION_COLUMNS, TABLE_COLUMNS, Column, object_store_uri, parse_key
from orchard.core.settings import Settings

log = logging.getLogger(__name__)

# Spark SQL type of a column (orchard.core.lake.TABLE_COLUMNS) -> its Arrow type, as Delta stores it.
_ARROW_TYPES = {"STRING": "string", "INT": "int32", "BIGINT": "int64", "BINARY": "binary"}


@dataclass(frozen=True)
class MergeCounts:
    """What one MERGE did: rows inserted (new keys), updated (overwritten objects), the table version
    after it (the one it read when there was nothing to commit; None: no rows were given)."""

    inserted: int
    updated: int
    version: int | None


def image_header(content: bytes | BinaryIO) -> dict:
    """Format (lower case), width, height and channels from an image's header (Pillow's; an .npy's
    or a 16-bit/float/many-band TIFF's read by orchard.core.rasters); all None when it cannot be
    parsed. `content`: the bytes, or a seekable file (e.g. a ranged reader: only the header is read)."""
    source = io.BytesIO(content) if isinstance(content, bytes) else content
    try:
        return _array_header(source) or _picture_header(source)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError):
        return {Column.FORMAT: None, Column.WIDTH: None, Column.HEIGHT: None, Column.CHANNELS: None}


def _array_header(source: BinaryIO) -> dict | None:
    """The header of an .npy, or of a TIFF that is an array rather than an 8-bit picture; else None."""
    source.seek(0)
    found = sniff(source.read(MAGIC_BYTES))
    if found is None or found.decoder not in (NPY, TIFF):
        return None
    source.seek(0)
    if found.decoder == NPY:
        header: rasters.RasterHeader | None = rasters.npy_header(source)
    else:
        header = rasters.tiff_array_header(source)
    return None if header is None else _header(found.name, header.width, header.height, header.bands)


def _picture_header(source: BinaryIO) -> dict:
    """Pillow's header of an image (format None if Pillow does not name one)."""
    source.seek(0)
    with Image.open(source) as img:
        return _header((img.format or "").lower() or None, img.size[0], img.size[1], len(img.getbands()))


def _header(fmt: str | None, width: int, height: int, channels: int) -> dict:
    return {Column.FORMAT: fmt, Column.WIDTH: width, Column.HEIGHT: height, Column.CHANNELS: channels}


def image_row(key: str, content: bytes, etag: str, ingested_at: datetime | None, inline_max_bytes: int) -> dict:
    """The table row of one object from its bytes (inline up to `inline_max_bytes`, else read by key).
    ValueError if the key is not in the layout `<dataset>/<split>/<label>/<file>`. Bytes Pillow cannot
    parse still make a row (format null): the table mirrors the bucket, the stages report the image."""
    digest = hashlib.sha256(content).hexdigest()
    row = referenced_row(key, digest, len(content), image_header(content), etag, ingested_at)
    return {**row, Column.CONTENT: content if len(content) <= inline_max_bytes else None}


def referenced_row(key: str, sha256: str, size: int, header: dict, etag: str, ingested_at: datetime | None) -> dict:
    """The table row of one object whose bytes the table does not keep (content null): its id, key
    parts, `header` (format, width, height, channels), size and ETag. ValueError as `image_row`."""
    dataset, split, label = parse_key(key)
    return {
        Column.ID: sha256,
        Column.KEY: key,
        Column.DATASET: dataset,
        Column.SPLIT: split,
        Column.LABEL: label,
        **{name: header.get(name) for name in (Column.FORMAT, Column.WIDTH, Column.HEIGHT, Column.CHANNELS)},
        Column.BYTES: size,
        Column.ETAG: etag,
        Column.INGESTED_AT: ingested_at,
        Column.CONTENT: None,
    }


def arrow_schema() -> Any:
    """The table's schema as an Arrow schema (NOT NULL columns not nullable; times in UTC)."""
    import pyarrow as pa

    def arrow_type(kind: str) -> Any:
        base = kind.removesuffix(" NOT NULL")
        return pa.timestamp("us", tz="UTC") if base == "TIMESTAMP" else getattr(pa, _ARROW_TYPES[base])()

    return pa.schema([pa.field(n, arrow_type(k), nullable="NOT NULL" not in k) for n, k in TABLE_COLUMNS])


def create_table(s: Settings) -> bool:
    """Create the (empty) images table at its location unless one is there; True if created now."""
    from deltalake import write_deltalake

    if table_log.table_exists(s):
        return False
    empty = arrow_schema().empty_table()
    uri, options = object_store_uri(s.images_table_uri), table_log.storage_options(s)
    try:
        write_deltalake(uri, empty, partition_by=list(PARTITION_COLUMNS), mode="ignore", storage_options=options)
    except OSError as exc:
        raise ServiceUnavailable(f"cannot create the images table at {s.images_table_uri}: {exc}") from exc
    log.info("created the images table at %s", s.images_table_uri)
    return True


def merge_rows(s: Settings, rows: Sequence[dict]) -> MergeCounts:
    """MERGE the rows of one dataset into the table by key (see the module docstring); TableNotFound
    (orchard.core.errors) if there is no table, ServiceUnavailable if the store refuses."""
    import pyarrow as pa
    from deltalake.exceptions import DeltaError

    if not rows:
        return MergeCounts(0, 0, None)
    table = table_log.open_table(s, None, with_files=True)
    source = pa.Table.from_pylist(list(rows), schema=arrow_schema())
    try:
        metrics = (
            table.merge(source, merge_condition(rows), source_alias="s", target_alias="t")
            .when_matched_update_all(predicate=f"t.{Column.ETAG} IS NULL OR t.{Column.ETAG} <> s.{Column.ETAG}")
            .when_not_matched_insert_all()
            .execute()
        )
    except (DeltaError, OSError) as exc:
        raise ServiceUnavailable(f"cannot update the images table at {s.images_table_uri}: {exc}") from exc
    inserted, updated = int(metrics["num_target_rows_inserted"]), int(metrics["num_target_rows_updated"])
    return MergeCounts(inserted, updated, int(table.version()))


def delete_rows(s: Settings, dataset: str) -> int:
    """Delete a dataset's rows (its objects were deleted: benches, tests); returns how many. A
    dataset with no rows, or no table, commits nothing."""
    from deltalake.exceptions import DeltaError

    try:
        table = table_log.open_table(s, None)
    except TableNotFound:
        return 0
    try:
        metrics = table.delete(f"{Column.DATASET} = {sql_string(dataset)}")
    except (DeltaError, OSError) as exc:
        raise ServiceUnavailable(f"cannot delete rows of {dataset} from {s.images_table_uri}: {exc}") from exc
    return int(metrics.get("num_deleted_rows", 0))


def merge_condition(rows: Sequence[dict]) -> str:
    """`t.key = s.key` within the rows' dataset and key range (the literals let delta-rs skip the
    data files whose statistics cannot match). ValueError if the rows span several datasets."""
    datasets = {row[Column.DATASET] for row in rows}
    if len(datasets) != 1:
        raise ValueError(f"one MERGE per dataset, got {sorted(datasets)}")
    keys = [row[Column.KEY] for row in rows]
    return (
        f"t.{Column.KEY} = s.{Column.KEY} AND t.{Column.DATASET} = {sql_string(datasets.pop())} "
        f"AND t.{Column.KEY} >= {sql_string(min(keys))} AND t.{Column.KEY} <= {sql_string(max(keys))}"
    )


def sql_string(value: str) -> str:
    """`value` as a SQL string literal (DataFusion: a quote is doubled)."""
    return "'" + value.replace("'", "''") + "'"
