"""Pure pieces of the images table: schema, image keys, header inspection, history rows, and the
additive mapping update of `orchard setup`."""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from datetime import UTC, datetime

import pytest
from PIL import Image

from orchard.core import formats, lake, table_log, table_write
from orchard.core.settings import Settings
from orchard.spark_app import table
from orchard.stack.setup import missing_properties


def test_schema_has_exactly_the_columns_of_column():
    declared = {v for k, v in vars(lake.Column).items() if k.isupper()}
    names = [part.split()[0] for part in lake.TABLE_SCHEMA.split(", ")]
    assert len(names) == len(set(names)) and set(names) == declared
    assert set(lake.PARTITION_COLUMNS) <= declared
    assert table.FETCH_SCHEMA.endswith(f"{table.ERROR} STRING") and "NOT NULL" not in table.FETCH_SCHEMA


def test_image_keys_by_suffix_case_insensitively():
    assert formats.is_image_key("ds/train/apple/a b ü.JPG")
    assert formats.is_image_key("ds/train/apple/x.tiff")
    assert formats.is_image_key("ds/train/apple/x.NPY")  # one image per .npy object
    assert not formats.is_image_key("ds/train/apple/README")
    assert not formats.is_image_key("ds/train/apple/notes.txt")
    assert not formats.is_image_key("ds/train/apple.d/noext")


def test_table_uri_defaults_to_the_lake_bucket():
    assert Settings(lake_bucket="acme-lake").images_table_uri == "s3a://acme-lake/images"
    assert Settings(lake_uri="s3a://x/y/z").images_table_uri == "s3a://x/y/z"


def png(size=(7, 5), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, format="PNG")
    return buf.getvalue()


def test_image_header_reads_format_size_and_bands():
    assert table_write.image_header(png()) == {"format": "png", "width": 7, "height": 5, "channels": 3}
    assert table_write.image_header(png(mode="L"))["channels"] == 1


def test_unparseable_bytes_have_an_empty_header_not_an_error():
    assert set(table_write.image_header(b"\xff\xd8\xff not a jpeg").values()) == {None}


def test_a_row_is_built_from_the_key_and_the_bytes_with_content_inline_up_to_the_threshold():
    when = datetime(2026, 12, 2, 14, 0, tzinfo=UTC)
    content = png()
    row = table_write.image_row("ds/train/red apple/ü 1.png", content, "e1", when, inline_max_bytes=len(content))
    assert row == {
        "id": hashlib.sha256(content).hexdigest(),
        "key": "ds/train/red apple/ü 1.png",
        "dataset": "ds",
        "split": "train",
        "label": "red apple",
        "format": "png",
        "width": 7,
        "height": 5,
        "channels": 3,
        "bytes": len(content),
        "etag": "e1",
        "ingested_at": when,
        "content": content,
    }
    assert list(row) == list(lake.COLUMN_NAMES)  # storage order
    assert table_write.image_row("ds/train/a/x.png", content, "e", when, len(content) - 1)["content"] is None


def test_arrow_schema_types_every_column_as_delta_stores_it():
    schema = table_write.arrow_schema()
    assert schema.names == list(lake.COLUMN_NAMES)
    assert [str(schema.field(n).type) for n in ("width", "bytes", "ingested_at", "content")] == [
        "int32",
        "int64",
        "timestamp[us, tz=UTC]",
        "binary",
    ]
    assert not schema.field("id").nullable and not schema.field("dataset").nullable and schema.field("label").nullable


def test_merge_condition_names_the_dataset_and_key_range_with_quotes_escaped():
    rows = [{"dataset": "d", "key": "d/train/a/b.jpg"}, {"dataset": "d", "key": "d/train/a/it's.jpg"}]
    assert table_write.merge_condition(rows) == (
        "t.key = s.key AND t.dataset = 'd' AND t.key >= 'd/train/a/b.jpg' AND t.key <= 'd/train/a/it''s.jpg'"
    )
    with pytest.raises(ValueError, match="one MERGE per dataset"):
        table_write.merge_condition([*rows, {"dataset": "e", "key": "e/train/a/c.jpg"}])


def test_history_entry_takes_rows_added_from_each_operation():
    merge = {
        "version": 3,
        "timestamp": 1_000,
        "operation": "MERGE",
        "operationMetrics": {"numTargetRowsInserted": "12", "numTargetFilesAdded": "1"},
    }
    write = {
        "version": 1,
        "timestamp": 1_000,
        "operation": "WRITE",
        "operationMetrics": {"numOutputRows": "5", "numFiles": "2"},
    }
    create = {"version": 0, "timestamp": 1_000, "operation": "CREATE TABLE", "operationMetrics": None}
    optimize = {"version": 4, "timestamp": 1_000, "operation": "OPTIMIZE", "operationMetrics": {"numFilesAdded": "3"}}
    entry = table_log.history_entry  # Spark's Delta metric names (the camelCase ones)
    assert entry(merge)["rows_added"] == 12 and entry(merge)["files_added"] == 1
    assert entry(write)["rows_added"] == 5 and entry(write)["files_added"] == 2
    assert entry(create)["rows_added"] == 0 and entry(create)["files_added"] == 0
    assert entry(optimize)["files_added"] == 3 and entry(optimize)["rows_added"] == 0


def test_setup_adds_only_the_fields_an_index_lacks():
    wanted = {
        "embedding": {"type": "dense_vector"},
        "prediction": {"properties": {"label": {"type": "keyword"}, "table_version": {"type": "long"}}},
        "new": {"type": "keyword"},
    }
    existing = {"embedding": {"type": "dense_vector", "dims": 128}, "prediction": {"properties": {"label": {}}}}
    assert missing_properties(wanted, existing) == {
        "prediction": {"properties": {"table_version": {"type": "long"}}},
        "new": {"type": "keyword"},
    }
    assert missing_properties(existing, existing) == {}


# --- is the table up to date with the bucket (the check every stage starts with) ------------------


def at(minute: int) -> datetime:
    return datetime(2026, 1, 1, 12, minute, tzinfo=UTC)


def test_synced_when_rows_match_objects_and_none_is_newer_than_the_rows():
    assert table.is_synced(5, at(1), 5, at(2), lambda: None)
    assert table.is_synced(0, None, 0, None, lambda: None)  # an empty dataset


def test_not_synced_when_the_counts_differ_whatever_the_mark():
    assert not table.is_synced(6, at(1), 5, at(2), lambda: at(1).isoformat())
    assert not table.is_synced(4, at(1), 5, at(2), lambda: at(1).isoformat())  # an object deleted


def test_a_newer_object_needs_a_sync_unless_a_sync_already_started_from_it():
    assert not table.is_synced(5, at(3), 5, at(2), lambda: None)
    assert not table.is_synced(5, at(3), 5, at(2), lambda: at(2).isoformat())  # an older mark
    assert table.is_synced(5, at(3), 5, at(2), lambda: at(3).isoformat())  # same-bytes re-put, clock skew


def test_the_mark_is_read_only_when_needed():
    def unreadable() -> str:
        raise AssertionError("read the table's properties although the counts decided")

    assert table.is_synced(5, at(1), 5, at(2), unreadable)
    assert not table.is_synced(6, at(1), 5, at(2), unreadable)


@dataclass
class Listed:
    object_name: str
    last_modified: datetime | None = None
    is_dir: bool = False


class Listing:
    """A bucket listing (what MinIO's list_objects yields) of fixed objects."""

    def __init__(self, *objects: Listed):
        self.objects = objects

    def list_objects(self, bucket: str, prefix: str = "", recursive: bool = False):
        below = [o for o in self.objects if o.object_name.startswith(prefix)]
        if recursive:
            return below
        # one level: the objects there, and a folder entry per deeper prefix (as S3 delimits)
        rests = [o.object_name[len(prefix) :] for o in below]
        here = [o for o, rest in zip(below, rests, strict=True) if "/" not in rest]
        folders = {prefix + rest.split("/")[0] + "/" for rest in rests if "/" in rest}
        return here + [Listed(f, is_dir=True) for f in sorted(folders)]


def test_counted_objects_are_the_image_keys_a_sync_can_make_rows_of():
    listing = Listing(
        Listed("ds/train/apple/a.jpg", at(1)),
        Listed("ds/train/apple/deeper/b.png", at(4)),
        Listed("ds/train/apple/c.npy", at(3)),  # an image too
        Listed("ds/train/apple/c.txt", at(9)),  # not an image
        Listed("ds/train/top.jpg", at(8)),  # above the layout: never listed by a sync
        Listed("ds/loose.jpg", at(7)),
        Listed("other/train/apple/d.jpg", at(6)),  # another dataset
    )
    assert table.count_image_objects(listing, "images", "ds/") == (3, at(4))
    assert table.count_image_objects(Listing(), "images", "ds/") == (0, None)


def test_stages_read_each_id_once_keeping_the_first_row():
    rows = [
        ("id1", "ds/train/a/x.jpg", "ds", "train", "a", b"x"),
        ("id2", "ds/train/a/y.jpg", "ds", "train", "a", b"y"),
        ("id1", "ds/train/b/copy.jpg", "ds", "train", "b", b"x"),
    ]
    pairs = list(table.distinct_pairs(iter(rows)))
    assert [(ref.id, ref.key, content) for ref, content in pairs] == [
        ("id1", "ds/train/a/x.jpg", b"x"),
        ("id2", "ds/train/a/y.jpg", b"y"),
    ]


def snapshot_of(*files: tuple[str, int | None, datetime | None], marks: dict[str, str] | None = None):
    """A table snapshot whose data files are (dataset, rows, newest ingested_at)."""
    data = tuple(table_log.DataFile(f"s3a://lake/images/{i}.parquet", *f) for i, f in enumerate(files))
    properties = {table.SYNC_MARK + k: v for k, v in (marks or {}).items()}
    return table_log.TableSnapshot("s3a://lake/images", 7, properties, data, plain=True)


BUCKET = Listing(
    Listed("ds/train/apple/a.jpg", at(1)),
    Listed("ds/test/apple/b.jpg", at(2)),
    Listed("other/train/pear/c.jpg", at(3)),
    Listed("README.md", at(9)),  # not a dataset: no image in the layout below it
)


def test_a_sync_is_skipped_when_every_dataset_has_its_rows():
    snapshot = snapshot_of(("ds", 2, at(2)), ("other", 1, at(5)))
    assert table.synced_objects(BUCKET, "images", snapshot, "ds") == 2
    assert table.synced_objects(BUCKET, "images", snapshot, "other") == 1
    assert table.synced_objects(BUCKET, "images", snapshot, None) == 3  # the whole bucket


def test_a_sync_runs_when_one_dataset_lags_or_cannot_be_told():
    lagging = snapshot_of(("ds", 2, at(2)), ("other", 1, at(1)))  # other's object is newer than its row
    assert table.synced_objects(BUCKET, "images", lagging, "ds") == 2
    assert table.synced_objects(BUCKET, "images", lagging, None) is None
    marked = snapshot_of(("ds", 2, at(2)), ("other", 1, at(1)), marks={"other": at(3).isoformat()})
    assert table.synced_objects(BUCKET, "images", marked, None) == 3  # a sync already started from it
    missing = snapshot_of(("ds", 2, at(2)))  # no rows of `other`
    assert table.synced_objects(BUCKET, "images", missing, None) is None
    gone = snapshot_of(("ds", 2, at(2)), ("other", 1, at(5)), ("deleted", 4, at(1)))  # rows, no objects
    assert table.synced_objects(BUCKET, "images", gone, None) is None
    no_stats = snapshot_of(("ds", 1, at(2)), ("ds", None, None), ("other", 1, at(5)))
    assert table.synced_objects(BUCKET, "images", no_stats, "ds") is None


def test_no_objects_and_no_rows_are_left_to_a_sync_to_explain():
    assert table.synced_objects(BUCKET, "images", snapshot_of(), "nothing-here") is None
    assert table.synced_objects(Listing(), "images", snapshot_of(), None) is None
