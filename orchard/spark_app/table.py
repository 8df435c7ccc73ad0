"""The Delta Lake table of images: created, brought up to date from the bucket, read, and cared for.

The table (schema: orchard.core.lake.Column / TABLE_SCHEMA, partitioned by dataset) is derived
from the images bucket and can be rebuilt from it at any time (docs/lake.md):

- `sync` lists the image objects of the bucket (Spark's file listing, no content read), keeps the
  keys the table does not have yet, fetches those objects in the executors (sha256, header:
  format, size, bands; the bytes themselves up to `Settings.lake_inline_max_bytes`) and MERGEs them
  by key (one row per object; identical bytes under two keys share an `id`): idempotent (a re-run
  adds nothing), and atomic (one Delta commit: a sync killed before it leaves the table at its
  previous version). Objects it cannot use are counted with a reason.
- `stage_images` is what every Spark stage reads: one dataset (and split) at a pinned version, the
  version and files answered by the log on the driver (orchard.core.table_log), then `scan`ned
  (`read_images`: the same rows as a DataFrame, for tools and tests).
- `optimize`, `vacuum`, `history`: table care through Delta's own SQL.

Only counts, versions and at most MAX_EXAMPLES failure examples reach the driver.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import TYPE_CHECKING, BinaryIO, cast

import pandas as pd
from minio.error import S3Error

from orchard.core import table_log
from orchard.core.clients import s3_client
from orchard.core.errors import DatasetNotFound, TableNotFound
from orchard.core.formats import is_image_key
from orchard.core.lake import (
    COLUMN_NAMES,
    DATA_SCHEMA,
    PARTITION_COLUMNS,
    READ_SCHEMA,
    TABLE_COLUMNS,
    TABLE_SCHEMA,
    Column,
    dataset_uri,
    in_layout,
    parse_key,
    s3a_uri,
)
from orchard.core.objects import read_object, read_sha256
from orchard.core.ranged import RangedObject
from orchard.core.settings import Settings
from orchard.core.table_log import TableSnapshot
from orchard.core.table_write import image_header, image_row, referenced_row
from orchard.spark_app.context import s3_of
from orchard.spark_app.images import table_pair
from orchard.spark_app.tiles import JOB_COLUMNS, band_jobs, is_tiled

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

log = logging.getLogger(__name__)

MAX_EXAMPLES = 20
# The columns a stage reads, in the order `table_pair` takes them.
PAIR_COLUMNS = (Column.ID, Column.KEY, Column.DATASET, Column.SPLIT, Column.LABEL, Column.CONTENT)
LENGTH = "length"  # the listing's object size column
ERROR = "error"  # the fetch step's extra column: why an object did not become a row
# Rows of the fetch step: the table's columns plus the error column.
FETCH_SCHEMA = f"{READ_SCHEMA}, {ERROR} STRING"


@dataclass(frozen=True)
class SyncResult:
    """What one sync did: objects listed, rows added, objects it could not use, the version it left."""

    listed: int
    added: int
    failed: int
    version: int
    reasons: dict[str, int] = field(default_factory=dict)
    examples: list[tuple[str, str]] = field(default_factory=list)  # (key, reason)
    updated: int = 0  # rows replaced: their object was overwritten with other bytes
    removed: int = 0  # rows deleted: their object is gone from the bucket
    checked: str = "keys"  # "keys": listed and compared key by key; "counts": check_synced only

    def as_dict(self) -> dict:
        """The summary `orchard lake sync` prints."""
        return {
            "listed": self.listed,
            "added": self.added,
            "updated": self.updated,
            "removed": self.removed,
            "skipped": self.listed - self.added - self.updated - self.failed,
            "failed": self.failed,
            "table_version": self.version,
            "checked": self.checked,
            "failure_reasons": self.reasons,
            "failure_examples": [list(e) for e in self.examples],
        }


# --- the table ----------------------------------------------------------------------------------


def ensure_table(spark: SparkSession, s: Settings) -> None:
    """Create the images table at its location unless one is there (re-runnable)."""
    partitions = ", ".join(PARTITION_COLUMNS)
    spark.sql(
        f"CREATE TABLE IF NOT EXISTS delta.`{s.images_table_uri}` ({TABLE_SCHEMA}) "
        f"USING delta PARTITIONED BY ({partitions})"
    )
    have = set(spark.read.format("delta").load(s.images_table_uri).columns)
    missing = [f"{name} {kind}" for name, kind in TABLE_COLUMNS if name not in have]
    if missing:  # a table made by an earlier release: add the columns since (null in old rows)
        spark.sql(f"ALTER TABLE delta.`{s.images_table_uri}` ADD COLUMNS ({', '.join(missing)})")


def read_images(
    spark: SparkSession, s: Settings, dataset: str, split: str | None = None, version: int | None = None
) -> DataFrame:
    """The table's rows of a dataset (split) at `version` (default: the latest)."""
    return scan(spark, table_log.read_snapshot(s, version), dataset, split)


def scan(spark: SparkSession, snapshot: TableSnapshot, dataset: str, split: str | None = None) -> DataFrame:
    """A dataset's (split's) rows of a snapshot: its Parquet files when they are the table
    (`TableSnapshot.plain`, see orchard.core.table_log), else Delta's reader at that version."""
    from pyspark.sql import functions as F

    if not snapshot.plain:
        reader = spark.read.format("delta").option("versionAsOf", snapshot.version)
        df = reader.load(snapshot.uri).where(_dataset_is(dataset))
    elif files := snapshot.files_of(dataset):
        # The schema given, not inferred: no footer read on the driver, and files written before a
        # column was added read it as null, as Delta's reader does.
        data = spark.read.schema(DATA_SCHEMA).parquet(*files)
        df = data.withColumn(Column.DATASET, F.lit(dataset)).select(*COLUMN_NAMES)
    else:
        df = spark.createDataFrame([], READ_SCHEMA)
    return df.where(f"{Column.SPLIT} = '{quoted(split)}'") if split else df


def quoted(value: str) -> str:
    """`value` safe inside a single-quoted Spark SQL string literal."""
    return value.replace("\\", "\\\\").replace("'", "\\'")


def stage_images(
    spark: SparkSession,
    s: Settings,
    dataset: str,
    split: str | None = None,
    images_per_partition: int = 1024,
    as_of: int | None = None,
    tiles: bool = False,
):
    """What a Spark stage reads: (RDD of (ImageRef, content), the table version read); with `tiles`,
    rasters above tile_min_pixels come as jobs reading strips of their tiles (orchard.spark_app.tiles)."""
    if not tiles:
        df, version, rows = stage_frame(spark, s, dataset, split, as_of)
        return image_pairs(spark, df, rows, images_per_partition), version
    df, version, rows = stage_frame(spark, s, dataset, split, as_of, PAIR_COLUMNS + JOB_COLUMNS[5:])
    tiled = is_tiled(s)
    # One small job first: most datasets have no raster to tile, and a union of two RDDs would
    # break Python's pipelining (each task would run a second Python worker feeding the first).
    if not df.where(tiled).limit(1).count():
        return image_pairs(spark, df.select(*PAIR_COLUMNS), rows, images_per_partition), version
    images = image_pairs(spark, df.where(~tiled).select(*PAIR_COLUMNS), rows, images_per_partition)
    return images.union(band_jobs(spark, s, df.where(tiled))), version


def stage_frame(
    spark: SparkSession,
    s: Settings,
    dataset: str,
    split: str | None = None,
    as_of: int | None = None,
    columns: tuple[str, ...] = PAIR_COLUMNS,
) -> tuple[DataFrame, int, int]:
    """(rows of `columns`, by default id, key, dataset, split, label, content; table version; row
    count) a stage reads.

    Without `as_of`, a dataset whose objects the table lacks is synced first, so a stage never
    reads a table that lags the bucket; the version read is pinned, so a concurrent writer does not
    change the stage's input halfway. DatasetNotFound if the dataset (split) has no rows."""
    snapshot, rows = synced_snapshot(spark, s, dataset) if as_of is None else (table_log.read_snapshot(s, as_of), None)
    version = snapshot.version
    df = scan(spark, snapshot, dataset, split).select(*columns)
    if rows is None or split:
        rows = df.count()
    if rows == 0:
        what = f"dataset {dataset!r}" + (f" (split {split!r})" if split else "")
        raise DatasetNotFound(
            f"{what} has no images in the table at version {version}: upload it first "
            f"(`orchard upload DIR --dataset {dataset}`) or check --dataset/--split"
        )
    return df, version, rows


def image_pairs(spark: SparkSession, df: DataFrame, rows: int, images_per_partition: int = 1024):
    """RDD of (ImageRef, content) of `rows` rows of PAIR_COLUMNS, one per distinct id."""
    # Table files hold many images: spread them so every core gets tasks, two at least (a lost
    # executor redoes little). Not many more: each task costs ~0.1 s of Python worker set-up here
    # (250 tasks of 64 images took 24.5 s to read 16,000 rows, 16 tasks 4.3 s).
    cores = spark.sparkContext.defaultParallelism
    partitions = max(2 * cores, math.ceil(rows / max(1, images_per_partition)))
    # Hash-partitioned by id: identical bytes under two keys land in one task, which keeps one
    # (one prediction per distinct image); and no sort of whole rows, which a round-robin
    # repartition does first to stay deterministic on retries.
    return df.repartition(partitions, Column.ID).rdd.mapPartitions(distinct_pairs)


def distinct_pairs(rows: Iterable) -> Iterator:
    """mapPartitions body: (ImageRef, content) of each row, the first row of each id only."""
    seen: set[str] = set()
    for row in rows:
        if row[0] not in seen:
            seen.add(row[0])
            yield table_pair(row)


# --- sync ---------------------------------------------------------------------------------------


LISTING_DEPTH = 3  # <dataset>/<split>/<label>/: below it, executors list recursively


def list_objects(spark: SparkSession, s: Settings, dataset: str | None) -> DataFrame:
    """(key, length, etag) of every image object of a dataset (or of the bucket), listed by the executors.

    The driver only walks the first levels of the key layout (datasets, splits, labels: a few
    hundred prefixes at most); each executor task lists whole prefixes (1,000 keys per request),
    so no key list is ever held by the driver."""
    if dataset:
        dataset_uri(s.images_bucket, dataset)  # ValueError for a bad name
    top = f"{dataset}/" if dataset else ""
    prefixes = leaf_prefixes(s3_client(s), s.images_bucket, top, LISTING_DEPTH - (1 if dataset else 0))
    if not prefixes:
        where = s3a_uri(s.images_bucket, top)
        raise DatasetNotFound(f"no objects at {where}: upload the dataset first (`orchard upload DIR`)")
    rdd = spark.sparkContext.parallelize(prefixes, min(len(prefixes), 64)).flatMap(partial(list_prefix, s))
    return spark.createDataFrame(rdd, f"{Column.KEY} STRING, {LENGTH} BIGINT, {Column.ETAG} STRING")


def leaf_prefixes(client, bucket: str, prefix: str, depth: int) -> list[str]:
    """The prefixes `depth` levels below `prefix` (objects lying above that depth are not in the key
    layout and are not listed)."""
    level = [prefix]
    for _ in range(depth):
        below: list[str] = []
        for p in level:
            below.extend(o.object_name for o in client.list_objects(bucket, prefix=p) if o.is_dir)
        level = below
    return level


def list_prefix(s: Settings, prefix: str) -> Iterator[tuple[str, int, str]]:
    """flatMap body: (key, size, etag) of every image object under `prefix` (executors)."""
    for obj in s3_of(s).list_objects(s.images_bucket, prefix=prefix, recursive=True):
        if is_image_key(obj.object_name):
            yield obj.object_name, int(obj.size or 0), str(obj.etag or "")


def fetch_batches(s: Settings, ingested_at: datetime, batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
    """mapInPandas body: the table row (or an error) of each object key (executors)."""
    client = s3_of(s)
    for batch in batches:
        triples = zip(batch[Column.KEY], batch[LENGTH], batch[Column.ETAG], strict=True)
        rows = [{**fetch_row(client, s, key, ingested_at, int(size)), Column.ETAG: etag} for key, size, etag in triples]
        yield pd.DataFrame(rows, columns=[*COLUMN_NAMES, ERROR])


def fetch_row(client, s: Settings, key: str, ingested_at: datetime, size: int) -> dict:
    """The table row of one object (orchard.core.table_write.image_row), or a row with `error` set
    when the key is not in the layout or the object cannot be read. An object larger than the
    inline limit (`size`, as listed) is never whole in memory: hashed as a stream, its header read
    by ranged requests."""
    row: dict = dict.fromkeys(COLUMN_NAMES)
    row.update({Column.KEY: key, Column.INGESTED_AT: ingested_at, Column.DATASET: "", ERROR: None})
    try:
        parse_key(key)
        if size > s.lake_inline_max_bytes:
            return {**referenced_object_row(client, s, key, ingested_at), ERROR: None}
        content = read_object(client, s.images_bucket, key)
    except ValueError as exc:
        return {**row, ERROR: str(exc)[:200]}
    except S3Error as exc:  # e.g. deleted since the listing
        return {**row, ERROR: f"cannot read the object: {exc.code}"}
    return {**image_row(key, content, "", ingested_at, s.lake_inline_max_bytes), ERROR: None}


def referenced_object_row(client, s: Settings, key: str, ingested_at: datetime) -> dict:
    """The row of a large object the table references by key: sha256 of its stream, header by ranges."""
    source = RangedObject(client, s.images_bucket, key)
    digest = read_sha256(client, s.images_bucket, key)
    return referenced_row(key, digest, source.size, image_header(cast(BinaryIO, source)), "", ingested_at)


def known_rows(spark: SparkSession, s: Settings, dataset: str | None) -> DataFrame:
    """(key, etag) of the table's rows (of one dataset)."""
    known = spark.read.format("delta").load(s.images_table_uri)
    if dataset:
        known = known.where(_dataset_is(dataset))
    return known.select(Column.KEY, Column.ETAG)


def new_keys(spark: SparkSession, s: Settings, listed: DataFrame, dataset: str | None) -> DataFrame:
    """(key, length, etag) of the listed objects the table does not have, or has older bytes of
    (the object was overwritten since: another ETag)."""
    return listed.join(known_rows(spark, s, dataset), [Column.KEY, Column.ETAG], "left_anti")


def gone_keys(spark: SparkSession, s: Settings, listed: DataFrame, dataset: str | None) -> DataFrame:
    """(key) of the table's rows whose object is no longer in the bucket."""
    return known_rows(spark, s, dataset).select(Column.KEY).join(listed.select(Column.KEY), Column.KEY, "left_anti")


Counted = tuple[int, datetime | None]  # how many (objects or rows), and when the newest was written


def synced_snapshot(spark: SparkSession, s: Settings, dataset: str) -> tuple[TableSnapshot, int | None]:
    """(the table snapshot to read a dataset at, its rows there if known): the latest one if the
    table is up to date with the dataset's objects (`is_synced`; counted, not kept: the driver's
    memory stays flat), else the one a sync of the dataset leaves."""
    objects, newest = count_image_objects(s3_client(s), s.images_bucket, f"{dataset}/")
    try:
        snapshot = table_log.read_snapshot(s)
    except TableNotFound:
        log.info("no images table yet: syncing %s first", dataset)
    else:
        rows, last = dataset_stats(spark, snapshot, dataset)
        if holds_objects(snapshot, dataset, (objects, newest), (rows, last)):
            return snapshot, rows
        log.info("dataset %s: %d image objects (newest %s), %d rows: syncing first", dataset, objects, newest, rows)
    result = sync(spark, s, dataset)
    log.info("lake sync of %s: %d added, %d failed", dataset, result.added, result.failed)
    if newest is None or result.failed or result.added or result.updated or result.removed:
        return table_log.read_snapshot(s, result.version), None
    # The check said "changed" but the sync found nothing to do: remember why it may say so again.
    return table_log.read_snapshot(s, mark_synced(spark, s, dataset, newest)), None


def dataset_stats(spark: SparkSession, snapshot: TableSnapshot, dataset: str) -> tuple[int, datetime | None]:
    """(rows, newest ingested_at) of a dataset in a snapshot: from the log's file statistics, or
    counted by Spark if a file has none."""
    from pyspark.sql import functions as F

    stats = snapshot.stats_of(dataset)
    if stats is None:
        query = scan(spark, snapshot, dataset).agg(F.count("*"), F.max(Column.INGESTED_AT))
        rows, last = query.collect()[0]  # one row
        stats = rows, last.replace(tzinfo=UTC) if last is not None else None
    return stats


def holds_objects(snapshot: TableSnapshot, dataset: str, objects: Counted, stats: Counted | None) -> bool:
    """True if a dataset's rows in `snapshot` (their count and newest ingested_at, `stats`; None if
    unknown) stand for its image objects (their count and newest LastModified: count_image_objects):
    `is_synced`, with the snapshot's sync mark of the dataset."""
    return stats is not None and is_synced(*objects, *stats, lambda: synced_marks(snapshot).get(dataset))


def is_synced(
    objects: int, newest: datetime | None, rows: int, last: datetime | None, mark: Callable[[], str | None]
) -> bool:
    """True if a dataset's rows stand for its objects: as many rows as image objects, and no
    object written after the rows were (`last`, the newest ingested_at) unless a sync has already
    seen that object (`mark()`: the newest LastModified a sync started from, ISO; it covers objects
    re-put with the same bytes, which a sync leaves alone, and a MinIO clock ahead of Spark's)."""
    if objects != rows:
        return False
    return newest is None or (last is not None and newest <= last) or newest.isoformat() == mark()


SYNC_MARK = "orchard.syncedNewestObject."  # + dataset: a table property, see is_synced


def synced_marks(snapshot: TableSnapshot) -> dict[str, str]:
    """dataset -> the newest LastModified (ISO) of its objects when a stage's sync last ran."""
    marks = snapshot.properties.items()
    return {k[len(SYNC_MARK) :]: v for k, v in marks if k.startswith(SYNC_MARK)}


def mark_synced(spark: SparkSession, s: Settings, dataset: str, newest: datetime) -> int:
    """Record that the table holds a dataset's objects up to `newest` (a metadata-only commit);
    returns the table version after it."""
    key, value = quoted(SYNC_MARK + dataset), quoted(newest.isoformat())
    spark.sql(f"ALTER TABLE delta.`{s.images_table_uri}` SET TBLPROPERTIES ('{key}' = '{value}')")
    return table_log.latest_version(s)


def count_image_objects(client, bucket: str, prefix: str) -> tuple[int, datetime | None]:
    """(how many image objects in the key layout are under `prefix` (what a sync makes rows of),
    when the last of them was written): one listing request per 1,000 keys, nothing kept."""
    count, last = 0, None
    for obj in client.list_objects(bucket, prefix=prefix, recursive=True):
        if is_image_key(obj.object_name) and in_layout(obj.object_name):
            count += 1
            if obj.last_modified is not None and (last is None or obj.last_modified > last):
                last = obj.last_modified
    return count, last


def check_synced(s: Settings, dataset: str | None = None) -> SyncResult | None:
    """The result of a sync with nothing to do, if the check every stage makes (`is_synced`: image
    objects counted in the bucket against the table log's statistics) says the table is up to date
    with the dataset (or the whole bucket); no Spark application. None if it may not be, or the
    check cannot tell: then only a sync's listing can."""
    try:
        snapshot = table_log.read_snapshot(s)
    except TableNotFound:
        return None
    listed = synced_objects(s3_client(s), s.images_bucket, snapshot, dataset)
    if listed is None:
        return None
    where = f"dataset {dataset}" if dataset else "the bucket"
    log.info(
        "images table version %d is up to date with the %d image objects of %s (counts and times; "
        "`--full` compares key by key): nothing to sync",
        snapshot.version,
        listed,
        where,
    )
    return SyncResult(listed, 0, 0, snapshot.version, checked="counts")


def synced_objects(client, bucket: str, snapshot: TableSnapshot, dataset: str | None) -> int | None:
    """How many image objects the dataset (or every dataset of the bucket and of the snapshot) has,
    if `is_synced` holds for each; None if it does not for one, a file has no statistics, or there
    are no objects at all (a sync says why)."""
    names = [dataset] if dataset else sorted(set(bucket_datasets(client, bucket)) | snapshot_datasets(snapshot))
    listed = 0
    for name in names:
        objects = count_image_objects(client, bucket, f"{name}/")
        if not holds_objects(snapshot, name, objects, snapshot.stats_of(name)):
            return None
        listed += objects[0]
    return listed or None


def bucket_datasets(client, bucket: str) -> list[str]:
    """The names of a bucket's first-level prefixes (in the key layout: the datasets)."""
    return [p.rstrip("/") for p in leaf_prefixes(client, bucket, "", 1)]


def snapshot_datasets(snapshot: TableSnapshot) -> set[str]:
    """The datasets a snapshot has rows of."""
    return {f.dataset for f in snapshot.files}


def _dataset_is(dataset: str) -> str:
    """The SQL condition selecting one dataset's partition."""
    return f"{Column.DATASET} = '{quoted(dataset)}'"


def sync(spark: SparkSession, s: Settings, dataset: str | None = None, keys_per_task: int = 256) -> SyncResult:
    """Bring the table up to date with the bucket (one dataset, or all) in one MERGE: new and
    overwritten objects read and upserted by key, rows of deleted objects removed."""
    from pyspark import StorageLevel

    ensure_table(spark, s)
    began = datetime.now(UTC)  # before the listing: an object written after it is newer than its rows
    listing = list_objects(spark, s, dataset).cache()  # keys, sizes and ETags only, in the executors
    todo = new_keys(spark, s, listing, dataset).cache()
    gone = gone_keys(spark, s, listing, dataset).cache()
    try:
        listed, pending, removed = listing.count(), todo.count(), gone.count()
        if pending == 0 and removed == 0:
            return SyncResult(listed, 0, 0, table_log.latest_version(s))
        log.info("lake sync: %d of %d objects are new, reading them (%d rows to remove)", pending, listed, removed)
        keys = todo.select(Column.KEY, LENGTH, Column.ETAG).repartition(max(1, math.ceil(pending / keys_per_task)))
        fetched = keys.mapInPandas(partial(fetch_batches, s, began), FETCH_SCHEMA)
        fetched = fetched.persist(StorageLevel.MEMORY_AND_DISK)
        reasons, examples = failure_counts(fetched)
        metrics = merge_changes(spark, s, good_rows(fetched), gone)
        fetched.unpersist()
    finally:
        for df in (listing, todo, gone):
            df.unpersist()
    failed = sum(reasons.values())
    return SyncResult(
        listed,
        metrics["added"],
        failed,
        table_log.latest_version(s),
        reasons,
        examples,
        metrics["updated"],
        metrics["removed"],
    )


def good_rows(fetched: DataFrame) -> DataFrame:
    """The fetched rows without an error: one per object key (identical bytes under two keys make
    two rows with one id; the stages keep one of them, `distinct_pairs`)."""
    from pyspark.sql import functions as F

    return fetched.where(F.col(ERROR).isNull()).drop(ERROR)


def failure_counts(fetched: DataFrame) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(reason -> count, up to MAX_EXAMPLES (key, reason)) of the objects that did not become rows."""
    from pyspark.sql import functions as F

    bad = fetched.where(F.col(ERROR).isNotNull())
    reasons = {r[ERROR]: int(r["count"]) for r in bad.groupBy(ERROR).count().collect()}  # one row per reason
    examples = [(r[Column.KEY], r[ERROR]) for r in bad.select(Column.KEY, ERROR).limit(MAX_EXAMPLES).collect()]
    for key, reason in examples:
        log.error("%s: %s", key, reason)
    return reasons, examples


def merge_changes(spark: SparkSession, s: Settings, rows: DataFrame, gone: DataFrame) -> dict[str, int]:
    """One MERGE by key: insert new objects' rows, replace overwritten ones', delete `gone` keys'.
    Returns the rows added, updated and removed."""
    from delta.tables import DeltaTable
    from pyspark.sql import functions as F

    source = rows.withColumn("_gone", F.lit(False)).unionByName(_removal_rows(gone, rows))
    values: dict = {c: f"u.{c}" for c in COLUMN_NAMES}  # every column from the source row
    target = DeltaTable.forPath(spark, s.images_table_uri).alias("t")
    merge = (
        target.merge(source.alias("u"), f"t.{Column.KEY} = u.{Column.KEY}")
        .whenMatchedDelete(condition="u._gone")
        .whenMatchedUpdate(condition="NOT u._gone", set=values)
        .whenNotMatchedInsert(condition="NOT u._gone", values=values)
    )
    metrics = merge.execute().collect()[0]  # one row of metrics
    return {
        "added": int(metrics["num_inserted_rows"]),
        "updated": int(metrics["num_updated_rows"]),
        "removed": int(metrics["num_deleted_rows"]),
    }


def _removal_rows(gone: DataFrame, like: DataFrame) -> DataFrame:
    """`gone` keys as rows shaped like `like` (other columns null), marked `_gone`."""
    from pyspark.sql import functions as F

    cols = [
        F.col(Column.KEY) if c == Column.KEY else F.lit(None).cast(like.schema[c].dataType).alias(c)
        for c in like.columns
    ]
    return gone.select(*cols, F.lit(True).alias("_gone"))


# --- table care ----------------------------------------------------------------------------------


def optimize(spark: SparkSession, s: Settings, dataset: str | None = None) -> dict:
    """Compact small files (to Settings.lake_target_file_mb); Delta's metrics of the operation."""
    spark.conf.set("spark.databricks.delta.optimize.maxFileSize", str(s.lake_target_file_mb * 2**20))
    where = f" WHERE {Column.DATASET} = '{quoted(dataset)}'" if dataset else ""
    row = spark.sql(f"OPTIMIZE delta.`{s.images_table_uri}`{where}").first()
    metrics = row["metrics"].asDict(recursive=True) if row else {}
    return {
        "files_added": metrics.get("numFilesAdded", 0),
        "files_removed": metrics.get("numFilesRemoved", 0),
        "table_version": table_log.latest_version(s),
    }


def vacuum(spark: SparkSession, s: Settings, hours: int | None = None) -> dict:
    """Delete files no version within the retention needs (default Settings.lake_retention_hours)."""
    from delta.tables import DeltaTable

    keep = s.lake_retention_hours if hours is None else hours
    if keep < 168:
        # Delta refuses shorter retentions unless this check is off: a job still reading an old
        # snapshot would lose its files. Only an explicit --retain-hours gets here.
        spark.conf.set("spark.databricks.delta.retentionDurationCheck.enabled", "false")
    DeltaTable.forPath(spark, s.images_table_uri).vacuum(float(keep))
    return {"retain_hours": keep, "table_version": table_log.latest_version(s)}
