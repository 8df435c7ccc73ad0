"""`orchard reindex`: the images index rebuilt from the lake, then swapped in atomically.

The lake holds everything a document says: the images table (the image's fields), the predictions
table (each image's newest prediction is its document's `prediction`: orchard.core.prediction_rows)
and the features table (the newest `orchard features` run of a dataset is its documents' `embedding`
and `pca`, or `pretrained` for a pretrained base). The job:

1. syncs the images table with the bucket where it lags (objects are the truth; each dataset is
   checked as every stage checks it: nothing to do, a second, when it is up to date);
2. creates the next numbered index (`<alias>-<n+1>`, orchard.core.index_alias) from the templates
   in es_mappings/, with refresh off while it fills;
3. writes one document per distinct image from the executors (bulk `index` actions, retried like
   every other write; the driver receives only counts); with `--dataset`, the other datasets'
   documents, and tile documents (which the lake does not describe), are copied from the current
   index (a scroll and bulk writes: the native distribution has no `_reindex` module);
4. refreshes it and checks its count: the distinct images of the rebuilt datasets plus the copied
   documents. Any failure up to here deletes the new index and leaves the alias where it was;
5. moves the alias in one `_aliases` call; the old index stays (readers of it by name keep
   working) unless `--drop-old`.

It first restores the models index's documents of the versions in the models bucket that the index
lacks (each version keeps a copy of its document, orchard.spark_app.registry).

Documents come back with what the lake knows. Not in the lake, hence not in a rebuilt document:
`quality`, `color_mode` and `source_path` (measured or seen by the uploader, on its machine);
`label_text` is the label; `uploaded_at` is when the image's row was ingested (seconds after its
upload). Tile documents are copied from the current index; after a lost cluster `orchard infer`
rebuilds them.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

from elasticsearch.helpers import scan

from orchard.core import index_alias, table_log
from orchard.core.clients import es_client, s3_client
from orchard.core.errors import ItemsFailed, TableNotFound
from orchard.core.lake import (
    COLUMN_NAMES,
    FEATURE_COMPUTED_AT,
    FEATURE_EMBEDDING,
    FEATURE_PCA_X,
    FEATURE_PCA_Y,
    FEATURE_VERSION,
    PREDICTION_COLUMNS,
    Column,
    Field,
    Pca,
    Prediction,
    Pretrained,
    s3a_uri,
    utc_timestamp,
)
from orchard.core.settings import Settings
from orchard.spark_app import prediction_table, registry, table
from orchard.spark_app.context import es_of
from orchard.spark_app.features import ensure_features_table
from orchard.spark_app.registry import PRETRAINED_PREFIX
from orchard.spark_app.sink import Tally, merge_tallies, write_actions

if TYPE_CHECKING:
    from elasticsearch import Elasticsearch
    from pyspark.sql import DataFrame, SparkSession

log = logging.getLogger(__name__)

# What a document takes from an image's row: every column but the id (the grouping key) and the bytes.
IMAGE_FIELDS = tuple(name for name in COLUMN_NAMES if name not in (Column.ID, Column.CONTENT))
# The names inside a document's `prediction`: the predictions table's columns but the image's.
PREDICTION_NAMES = tuple(name for name, _ in PREDICTION_COLUMNS if name not in (Column.ID, Column.DATASET, Column.KEY))
P, F_, G = "p_", "f_", "g_"  # column prefixes: the prediction, the trained model's features, the base's
CHUNK = 500  # documents per bulk request


@dataclass(frozen=True)
class IndexState:
    """Where the alias points: the indices behind it, and whether the name is a legacy index."""

    alias: str
    current: list[str]
    legacy: bool
    existing: list[str]  # every index whose name starts with the alias (numbered or not)


def read_state(es: Elasticsearch, alias: str) -> IndexState:
    """The alias's indices now (none after a lost cluster), and whether `alias` is itself an index."""
    existing = list(es.indices.get(index=f"{alias}*", expand_wildcards="open,closed", ignore_unavailable=True))
    aliased = es.indices.exists_alias(name=alias)
    behind = list(es.indices.get_alias(name=alias)) if aliased else []
    return IndexState(alias, behind, legacy=alias in existing, existing=existing)


# --- the documents, from the lake -----------------------------------------------------------------


def distinct_images(spark: SparkSession, s: Settings, dataset: str | None) -> DataFrame:
    """One row per image id (the first key in key order when identical bytes were stored twice,
    as the uploader indexes the first), the image's fields; no content is read."""
    from pyspark.sql import functions as F

    rows = spark.read.format("delta").load(s.images_table_uri).select(Column.ID, *IMAGE_FIELDS)
    if dataset:
        rows = rows.where(F.col(Column.DATASET) == dataset)
    first = rows.groupBy(Column.ID).agg(F.min(F.struct(*IMAGE_FIELDS)).alias("r"))
    return first.select(Column.ID, "r.*")


def newest_predictions(spark: SparkSession, s: Settings, dataset: str | None, version: str | None) -> DataFrame:
    """Each image's newest prediction (of `version` only, if given), its columns prefixed P."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    prediction_table.ensure_table(spark, s)
    rows = spark.read.format("delta").load(s.predictions_table_uri)
    if dataset:
        rows = rows.where(F.col(Column.DATASET) == dataset)
    if version:
        rows = rows.where(F.col(Prediction.MODEL_VERSION) == version)
    newest = Window.partitionBy(Column.ID).orderBy(F.col(Prediction.PREDICTED_AT).desc_nulls_last())
    rows = rows.withColumn("n", F.row_number().over(newest)).where("n = 1")
    return rows.select(Column.ID, *(F.col(name).alias(P + name) for name in PREDICTION_NAMES))


def newest_features(spark: SparkSession, s: Settings, dataset: str | None, pretrained: bool, prefix: str) -> DataFrame:
    """Per image, the features of its dataset's newest `orchard features` run by a trained model (or
    by a pretrained base), columns prefixed `prefix`."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    ensure_features_table(spark, s)
    rows = spark.read.format("delta").load(s.features_table_uri)
    if dataset:
        rows = rows.where(F.col(Column.DATASET) == dataset)
    is_base = F.col(FEATURE_VERSION).startswith(PRETRAINED_PREFIX)
    rows = rows.where(is_base if pretrained else ~is_base)
    runs = rows.groupBy(Column.DATASET, FEATURE_VERSION).agg(F.max(FEATURE_COMPUTED_AT).alias("at"))
    newest = Window.partitionBy(Column.DATASET).orderBy(F.col("at").desc())
    last = runs.withColumn("n", F.row_number().over(newest)).where("n = 1").select(Column.DATASET, FEATURE_VERSION)
    kept = rows.join(last, [Column.DATASET, FEATURE_VERSION])
    names = (FEATURE_VERSION, FEATURE_EMBEDDING, FEATURE_PCA_X, FEATURE_PCA_Y)
    return kept.select(Column.ID, *(F.col(name).alias(prefix + name) for name in names))


def lake_documents(spark: SparkSession, s: Settings, dataset: str | None, version: str | None) -> DataFrame:
    """One row per distinct image with everything its document is built from (document_of)."""
    from pyspark.sql import functions as F

    images = distinct_images(spark, s, dataset)
    joined = images.join(newest_predictions(spark, s, dataset, version), Column.ID, "left")
    for pretrained, prefix in ((False, F_), (True, G)):
        joined = joined.join(newest_features(spark, s, dataset, pretrained, prefix), Column.ID, "left")
    return joined.withColumn(Column.INGESTED_AT, F.col(Column.INGESTED_AT).cast("timestamp"))


def prediction_of(row: dict) -> dict | None:
    """The `prediction` object of a joined row (None if the image has no prediction row)."""
    if row.get(P + Prediction.MODEL_VERSION) is None:
        return None
    top5 = row.get(P + Prediction.TOP5)
    prediction = {name: row.get(P + name) for name in PREDICTION_NAMES}
    prediction[Prediction.TOP5] = None if top5 is None else [dict(entry) for entry in top5]
    return prediction


def features_of(row: dict, prefix: str) -> dict:
    """The document fields of a joined row's features (top level for a trained model, `pretrained`
    for a base); {} if it has none. A zero vector's embedding is left out, as `orchard features` does."""
    version = row.get(prefix + FEATURE_VERSION)
    if version is None:
        return {}
    embedding = row.get(prefix + FEATURE_EMBEDDING)
    vector = list(embedding) if embedding is not None and any(embedding) else None
    pca = {Pca.X: row.get(prefix + FEATURE_PCA_X), Pca.Y: row.get(prefix + FEATURE_PCA_Y)}
    if prefix == G:
        doc = {Pretrained.MODEL: version, Pretrained.PCA: pca, Pretrained.EMBEDDING: vector}
        return {Field.PRETRAINED: {k: v for k, v in doc.items() if v is not None}}
    doc = {Field.EMBEDDING_MODEL: version, Field.PCA: pca, Field.EMBEDDING: vector}
    return {k: v for k, v in doc.items() if v is not None}


def document_of(row: dict, bucket: str) -> dict:
    """The image document of one joined row (fields of es_mappings/images.json)."""
    image_id, key = row[Column.ID], row[Column.KEY]
    ingested = row.get(Column.INGESTED_AT)
    doc: dict[str, Any] = {
        Field.ID: image_id,
        Field.DATASET: row[Column.DATASET],
        Field.SPLIT: row[Column.SPLIT],
        Field.LABEL: row[Column.LABEL],
        Field.LABEL_TEXT: row[Column.LABEL],
        Field.BUCKET: bucket,
        Field.KEY: key,
        Field.URI: s3a_uri(bucket, key),
        Field.BYTES: row[Column.BYTES],
        Field.FORMAT: row[Column.FORMAT],
        Field.WIDTH: row[Column.WIDTH],
        Field.HEIGHT: row[Column.HEIGHT],
        Field.CHANNELS: row[Column.CHANNELS],
        Field.SHA256: image_id,
        Field.ETAG: row[Column.ETAG],
        Field.UPLOADED_AT: utc_timestamp(ingested) if ingested is not None else None,
    }
    prediction = prediction_of(row)
    if prediction is not None:
        doc[Field.PREDICTION] = prediction
    return {**doc, **features_of(row, F_), **features_of(row, G)}


def index_actions(index: str, bucket: str, rows: Iterable) -> Iterator[tuple[dict, str, bool]]:
    """Bulk `index` actions (whole documents, id = content sha256) of joined rows."""
    for row in rows:
        values = row.asDict(recursive=True)
        doc = document_of(values, bucket)
        yield {"_op_type": "index", "_index": index, "_id": doc[Field.ID], "_source": doc}, doc[Field.KEY], False


def write_partition(s: Settings, index: str, rows: Iterable) -> Iterator[Tally]:
    """mapPartitions body: index the partition's documents; yields its tally."""
    yield write_actions(es_of(s), index_actions(index, s.images_bucket, rows), CHUNK)


# --- the new index and the swap -------------------------------------------------------------------


@contextlib.contextmanager
def removed_on_failure(es: Elasticsearch, new: str) -> Iterator[None]:
    """Delete the index being built if building it fails (the alias has not moved: readers never
    saw it); the error goes on."""
    try:
        yield
    except BaseException:
        es.options(ignore_status=404).indices.delete(index=new)
        log.warning("%s deleted: it was not completed", new)
        raise


def create_next(es: Elasticsearch, state: IndexState) -> str:
    """Create the next numbered index (the template gives its mappings), refresh off while it fills."""
    name = index_alias.next_index(state.alias, state.existing)
    es.indices.create(index=name, settings={"index": {"refresh_interval": "-1"}})
    log.info("building %s", name)
    return name


def copy_documents(es: Elasticsearch, source: str, target: str, query: dict | None = None) -> int:
    """Copy the documents of `source` (matching `query`) into `target` as they are: a scroll read and
    bulk writes from this process, memory flat (the Elasticsearch distribution Orchard runs has no
    `_reindex` module), written and retried like every bulk write (orchard.spark_app.sink). Returns
    how many were copied; ItemsFailed if any was not."""
    hits = scan(es, index=source, query={"query": query or {"match_all": {}}}, size=CHUNK, scroll="10m")
    actions = (
        ({"_op_type": "index", "_index": target, "_id": h["_id"], "_source": h["_source"]}, h["_id"], False)
        for h in hits
    )
    tally = write_actions(es, actions, CHUNK)
    if tally.failed:
        raise ItemsFailed(f"{tally.failed} documents were not copied into {target} ({', '.join(tally.reasons)})")
    return tally.written


def copy_others(es: Elasticsearch, state: IndexState, new: str, dataset: str | None) -> int:
    """Copy the documents the lake does not rebuild (tile documents; with `dataset`, the other
    datasets' documents) from the current index into `new` (copy_documents); returns how many (0
    when there is no current index: a lost cluster)."""
    if not state.current:
        return 0
    should: list[dict] = [{"exists": {"field": Field.TILE}}]
    if dataset:
        should.append({"bool": {"must_not": {"term": {Field.DATASET: dataset}}}})
    others = {"bool": {"should": should, "minimum_should_match": 1}}
    return copy_documents(es, state.alias, new, others)


def finish(es: Elasticsearch, state: IndexState, new: str, expected: int, drop_old: bool) -> int:
    """Refresh `new`, check it holds `expected` documents, point the alias at it; returns its count.
    ItemsFailed on a shortfall (the alias stays where it was)."""
    es.indices.put_settings(index=new, settings={"index": {"refresh_interval": None}})
    es.indices.refresh(index=new)
    count = int(es.count(index=new)["count"])
    if count != expected:
        raise ItemsFailed(f"{new} holds {count} documents, {expected} expected: the alias is unchanged")
    es.indices.update_aliases(actions=index_alias.swap_actions(state.alias, new, state.current, state.legacy))
    log.info("%s now points at %s (%d documents)", state.alias, new, count)
    if drop_old and state.current:
        es.indices.delete(index=",".join(state.current))
        log.info("dropped %s", ", ".join(state.current))
    return count


def migrate(es: Elasticsearch, state: IndexState, began: float) -> dict:
    """Put an index made before the alias existed behind it: its documents copied as they are into
    `<alias>-1` (copy_documents: predictions made before the lake kept them are not lost),
    counted, then the alias replaces it in one call; returns the summary."""
    new = create_next(es, state)
    expected = int(es.count(index=state.alias)["count"])
    with removed_on_failure(es, new):
        copy_documents(es, state.alias, new)
        count = finish(es, state, new, expected, drop_old=False)
    log.info(
        "%s was an index: now an alias of %s (run `orchard reindex` again to rebuild from the lake)", state.alias, new
    )
    seconds = time.monotonic() - began
    return {
        "index": new,
        "alias": state.alias,
        "previous": [state.alias],
        "migrated": True,
        "documents": count,
        "seconds": round(seconds, 1),
        "documents_per_second": round(count / seconds, 1) if seconds > 0 else None,
    }


def bring_up_to_date(spark: SparkSession, s: Settings, dataset: str | None) -> list[str]:
    """Sync the images table where it lags the bucket, each dataset checked as every stage checks
    it (objects counted against the log's row counts); returns the datasets synced. A dataset only
    the table still has (its objects deleted) takes a whole-bucket sync, which removes its rows."""
    if dataset:
        return [] if table.synced_snapshot(spark, s, dataset)[1] is not None else [dataset]
    in_bucket = table.bucket_datasets(s3_client(s), s.images_bucket)
    if table_datasets(s) - set(in_bucket):
        table.sync(spark, s, None)
        return in_bucket
    return [name for name in in_bucket if table.synced_snapshot(spark, s, name)[1] is None]


def table_datasets(s: Settings) -> set[str]:
    """The datasets the images table has rows of (from its log; none if there is no table)."""
    try:
        return table.snapshot_datasets(table_log.read_snapshot(s))
    except TableNotFound:
        return set()


def write_lake_documents(
    spark: SparkSession, s: Settings, new: str, dataset: str | None, version: str | None
) -> tuple[int, int, int]:
    """Write the documents of the lake's images (of `dataset`) into `new` from the executors;
    returns (images, with a prediction, with an embedding). ItemsFailed if any was not written."""
    from pyspark.sql import functions as F

    docs = lake_documents(spark, s, dataset, version).cache()
    try:
        counted = (F.count("*"), F.count(P + Prediction.MODEL_VERSION), F.count(F_ + FEATURE_VERSION))
        images, predicted, featured = docs.agg(*counted).first() or (0, 0, 0)  # one row
        tally = docs.rdd.mapPartitions(partial(write_partition, s, new)).fold(Tally(), merge_tallies)
    finally:
        docs.unpersist()
    if tally.failed:
        raise ItemsFailed(f"{tally.failed} documents were not written to {new} ({', '.join(tally.reasons)})")
    return int(images), int(predicted), int(featured)


def reindex(
    spark: SparkSession, s: Settings, dataset: str | None = None, version: str | None = None, drop_old: bool = False
) -> dict:
    """Rebuild the images index from the lake (module docstring); returns the run summary."""
    began = time.monotonic()
    models = registry.restore_documents(s)  # the model versions a lost index forgot
    es = es_client(s, request_timeout=120)
    state = read_state(es, s.images_index)
    if state.legacy:
        return migrate(es, state, began)
    synced = bring_up_to_date(spark, s, dataset)
    new = create_next(es, state)
    with removed_on_failure(es, new):
        images, predicted, featured = write_lake_documents(spark, s, new, dataset, version)
        copied = copy_others(es, state, new, dataset)
        count = finish(es, state, new, images + copied, drop_old)
    seconds = time.monotonic() - began
    return {
        "index": new,
        "alias": s.images_index,
        "previous": state.current,
        "dropped_old": bool(drop_old and state.current),
        "documents": count,
        "rebuilt": images,
        "copied": copied,
        "with_prediction": predicted,
        "with_embedding": featured,
        "datasets_synced": synced,
        "models_restored": len(models),
        "seconds": round(seconds, 1),
        "documents_per_second": round(images / seconds, 1) if seconds > 0 else None,
    }
