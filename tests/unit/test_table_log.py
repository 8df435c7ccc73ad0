"""Pure pieces of the driver's view of the images table's Delta log (orchard.core.table_log): URIs
between delta-rs and Spark, file statistics into per-dataset rows, and when a snapshot's Parquet
files alone are the table."""

from __future__ import annotations

from datetime import UTC, datetime

from orchard.core import lake, table_log
from orchard.core.table_log import DataFile, TableSnapshot

T1 = datetime(2026, 12, 1, 10, 0, tzinfo=UTC)
T2 = datetime(2026, 12, 2, 9, 30, tzinfo=UTC)


def snapshot(*files: DataFile) -> TableSnapshot:
    return TableSnapshot("s3a://lake/images", 7, {}, files, plain=True)


def test_uris_switch_between_hadoop_and_object_store_schemes_only():
    assert lake.object_store_uri("s3a://lake/images") == "s3://lake/images"
    assert lake.hadoop_uri("s3://lake/images/dataset=a b/p.parquet") == "s3a://lake/images/dataset=a b/p.parquet"
    assert lake.object_store_uri("file:///tmp/t") == "file:///tmp/t"
    assert lake.hadoop_uri("file:///tmp/t/p.parquet") == "file:///tmp/t/p.parquet"


def test_a_flattened_add_action_becomes_a_data_file():
    action = {
        "path": "s3://lake/images/dataset=fruit/part-0.parquet",
        "num_records": 12,
        f"max.{lake.Column.INGESTED_AT}": datetime(2026, 12, 1, 10, 0),  # naive: UTC by the log's format
        f"partition.{lake.Column.DATASET}": "fruit",
    }
    expected = DataFile("s3a://lake/images/dataset=fruit/part-0.parquet", "fruit", 12, T1)
    assert table_log.data_file(action, "s3a://elsewhere/t") == expected
    relative = {**action, "path": "dataset=fruit/part-0.parquet"}
    assert table_log.data_file(relative, "s3a://lake/images/") == expected
    bare = table_log.data_file({"path": "p.parquet", "num_records": None}, "s3a://lake/images")
    assert (bare.uri, bare.rows, bare.newest, bare.dataset) == ("s3a://lake/images/p.parquet", None, None, "")


def test_dataset_rows_and_newest_row_sum_over_its_files_only():
    snap = snapshot(
        DataFile("s3a://l/i/dataset=a/1.parquet", "a", 10, T1),
        DataFile("s3a://l/i/dataset=a/2.parquet", "a", 5, T2),
        DataFile("s3a://l/i/dataset=b/3.parquet", "b", 99, T2),
    )
    assert snap.stats_of("a") == (15, T2)
    assert snap.files_of("a") == ["s3a://l/i/dataset=a/1.parquet", "s3a://l/i/dataset=a/2.parquet"]
    assert snap.stats_of("missing") == (0, None) and snap.files_of("missing") == []


def test_a_file_without_statistics_makes_the_counts_unknown():
    snap = snapshot(DataFile("s3a://l/i/dataset=a/1.parquet", "a", 10, T1), DataFile("s3a://l/i/x", "a", None, None))
    assert snap.stats_of("a") is None


def test_only_tables_without_reader_features_are_read_as_plain_parquet():
    assert table_log.is_plain(1, None)
    assert not table_log.is_plain(3, ["deletionVectors"])
    assert not table_log.is_plain(2, None)  # column mapping
    assert not table_log.is_plain(1, ["timestampNtz"])


def test_data_files_hold_every_column_but_the_partition_columns():
    data = [part.split()[0] for part in lake.DATA_SCHEMA.split(", ")]
    assert data == [n for n in lake.COLUMN_NAMES if n not in lake.PARTITION_COLUMNS]
    assert "NOT NULL" not in lake.DATA_SCHEMA and "NOT NULL" not in lake.READ_SCHEMA


def test_history_reads_each_commit_from_the_log_newest_first(tmp_path):
    """`orchard lake history` without Spark: delta-rs's own commits (the uploader's writer), counted
    under its snake_case metric names."""
    import pandas as pd
    from deltalake import write_deltalake

    from orchard.core.settings import Settings

    uri = (tmp_path / "images").as_uri()
    write_deltalake(uri, pd.DataFrame({"id": ["a", "b"]}))
    write_deltalake(uri, pd.DataFrame({"id": ["c"]}), mode="append")
    s = Settings(lake_uri=uri, s3_access_key="unused", s3_secret_key="unused")  # a local table
    latest, first = table_log.history(s, limit=5)
    assert (latest["version"], latest["operation"], latest["rows_added"], latest["files_added"]) == (1, "WRITE", 1, 1)
    assert (first["version"], first["rows_added"]) == (0, 2)
    assert datetime.fromisoformat(latest["timestamp"]) >= datetime.fromisoformat(first["timestamp"])
    assert table_log.history(s, limit=1) == [latest]


def test_history_counts_spark_deltas_metric_names():
    """Spark's Delta records MERGE counts as strings under camelCase names."""
    commit = {
        "version": 4,
        "timestamp": 1_796_000_000_000,
        "operation": "MERGE",
        "operationMetrics": {"numTargetRowsInserted": "40", "numTargetFilesAdded": "2", "numOutputRows": "99"},
    }
    entry = table_log.history_entry(commit)
    assert entry == {
        "version": 4,
        "timestamp": datetime.fromtimestamp(1_796_000_000, UTC).isoformat(timespec="milliseconds"),
        "operation": "MERGE",
        "rows_added": 40,
        "files_added": 2,
    }
    assert table_log.history_entry({"version": 0, "operation": "CREATE TABLE"})["rows_added"] == 0
