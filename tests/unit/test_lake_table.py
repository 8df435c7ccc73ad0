"""Pure pieces of the images table: schema, image keys, header inspection, history rows, and the
additive mapping update of `orchard setup`."""

from __future__ import annotations

import io

from PIL import Image

from orchard.core import lake
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
    assert lake.is_image_key("ds/train/apple/a b ü.JPG")
    assert lake.is_image_key("ds/train/apple/x.tiff")
    assert not lake.is_image_key("ds/train/apple/x.npy")
    assert not lake.is_image_key("ds/train/apple/README")
    assert not lake.is_image_key("ds/train/apple.d/noext")


def test_table_uri_defaults_to_the_lake_bucket():
    assert Settings(lake_bucket="acme-lake").images_table_uri == "s3a://acme-lake/images"
    assert Settings(lake_uri="s3a://x/y/z").images_table_uri == "s3a://x/y/z"


def png(size=(7, 5), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, format="PNG")
    return buf.getvalue()


def test_image_header_reads_format_size_and_bands():
    assert table.image_header(png()) == {"format": "png", "width": 7, "height": 5, "channels": 3}
    assert table.image_header(png(mode="L"))["channels"] == 1


def test_unparseable_bytes_have_an_empty_header_not_an_error():
    assert set(table.image_header(b"\xff\xd8\xff not a jpeg").values()) == {None}


def test_history_entry_takes_rows_added_from_each_operation():
    merge = {
        "version": 3,
        "timestamp": "t",
        "operation": "MERGE",
        "operationMetrics": {"numTargetRowsInserted": "12", "numTargetFilesAdded": "1"},
    }
    write = {
        "version": 1,
        "timestamp": "t",
        "operation": "WRITE",
        "operationMetrics": {"numOutputRows": "5", "numFiles": "2"},
    }
    create = {"version": 0, "timestamp": "t", "operation": "CREATE TABLE", "operationMetrics": None}
    assert table.history_entry(merge)["rows_added"] == 12
    assert table.history_entry(write)["rows_added"] == 5 and table.history_entry(write)["files_added"] == 2
    assert table.history_entry(create)["rows_added"] == 0


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
