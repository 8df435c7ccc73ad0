"""The embeddings table: a frozen pretrained base's embedding of every image, computed once.

A frozen base gives an image the same embedding every time, so transfer learning trains its head on
stored embeddings (each epoch then costs a small fraction of a forward pass) and `orchard features
--model imagenet:<base>` reads them; only the images the table lacks go through the base, in the
executors, resized to the base's input size there.

Delta Lake table at `Settings.embeddings_table_uri`, partitioned by `model` (the base and its weights'
digest, `pretrained.base_key()`): id (content sha256, as in the images table), model, embedding
(array<float>; null for an image the base cannot read, with `error` saying why: the id is the
content, so it never becomes readable), computed_at. New rows go in with an insert-only MERGE on
(model, id): a re-run, a retried task or two concurrent runs add no duplicate.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import TYPE_CHECKING

import numpy as np

from orchard.core.lake import Column
from orchard.core.settings import Settings
from orchard.spark_app.infer import PredictSpec, inputs
from orchard.spark_app.table import image_pairs, stage_frame

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

log = logging.getLogger(__name__)

MODEL, EMBEDDING, ERROR, COMPUTED_AT = "model", "embedding", "error", "computed_at"
SCHEMA = (
    f"{Column.ID} STRING NOT NULL, {MODEL} STRING NOT NULL, {EMBEDDING} ARRAY<FLOAT>, "
    f"{ERROR} STRING, {COMPUTED_AT} TIMESTAMP"
)
LABELLED = (Column.ID, Column.KEY, Column.SPLIT, Column.LABEL)  # what the images table adds to a vector


@dataclass(frozen=True)
class BaseEmbeddings:
    """A dataset's embeddings by one base, after the run computed those the table lacked."""

    frame: DataFrame  # id, key, split, label, embedding of every image the base could read
    computed: int  # images that went through the base in this run (0: all were stored)
    failed: int  # images of the dataset the base cannot read (stored with their error)
    table_version: int  # the images table version read


def ensure_table(spark: SparkSession, s: Settings) -> None:
    """Create the embeddings table at its location unless one is there (re-runnable)."""
    spark.sql(
        f"CREATE TABLE IF NOT EXISTS delta.`{s.embeddings_table_uri}` ({SCHEMA}) USING delta PARTITIONED BY ({MODEL})"
    )


def stored(spark: SparkSession, s: Settings, model: str) -> DataFrame:
    """id, embedding, error of every image the table has for `model` (its partition only)."""
    table = spark.read.format("delta").load(s.embeddings_table_uri)
    return table.where(table[MODEL] == model).select(Column.ID, EMBEDDING, ERROR)


def base_embeddings(
    spark: SparkSession,
    s: Settings,
    dataset: str,
    split: str | None = None,
    batch_size: int = 64,
    images_per_partition: int = 1024,
    as_of: int | None = None,
) -> BaseEmbeddings:
    """The pretrained base's embeddings of a dataset (split) at a table version, the missing ones
    computed and stored first."""
    # TensorFlow: loaded only when a pretrained base is used.
    from orchard.spark_app import pretrained  # noqa: PLC0415

    images, version, _ = stage_frame(spark, s, dataset, split, as_of)
    ensure_table(spark, s)
    model = pretrained.base_key()
    missing = images.join(stored(spark, s, model).select(Column.ID), Column.ID, "left_anti")
    todo = missing.count()  # ids only: the content column is not read for it
    computed = embed(spark, s, missing, todo, batch_size, images_per_partition) if todo else 0
    rows = images.select(*LABELLED).join(stored(spark, s, model), Column.ID)
    failed = rows.where(rows[EMBEDDING].isNull()).count()
    frame = rows.where(rows[EMBEDDING].isNotNull()).select(*LABELLED, EMBEDDING)
    log.info("%s embeddings of %s: %d computed now, %d unreadable", model, dataset, computed, failed)
    return BaseEmbeddings(frame, computed, failed, version)


def embed(spark: SparkSession, s: Settings, missing: DataFrame, rows: int, batch_size: int, per_task: int) -> int:
    """Pass `missing` images (PAIR_COLUMNS rows) through the base and MERGE their rows; returns how
    many the base embedded."""
    from delta.tables import DeltaTable

    from orchard.spark_app import pretrained  # noqa: PLC0415
    from orchard.spark_app.versions import load_model  # noqa: PLC0415

    card = pretrained.imagenet_card(pretrained.VERSION)
    spec = PredictSpec.from_card(s, card, batch_size)
    computed = spark.sparkContext.accumulator(0)
    outputs = load_model(s, card).predict_stream(
        inputs(image_pairs(spark, missing, rows, per_task), spec), batch_size, None
    )
    body = partial(table_rows, pretrained.base_key(), datetime.now(UTC), computed)
    new = spark.createDataFrame(outputs.mapPartitions(body), SCHEMA)
    condition = f"t.{MODEL} = n.{MODEL} AND t.{Column.ID} = n.{Column.ID}"
    DeltaTable.forPath(spark, s.embeddings_table_uri).alias("t").merge(
        new.alias("n"), condition
    ).whenNotMatchedInsertAll().execute()
    return computed.value


def table_rows(model: str, computed_at: datetime, computed, outputs: Iterable) -> Iterator[tuple]:
    """mapPartitions body: a table row per base output ((ref, error), vector or None)."""
    for (ref, error), vector in outputs:
        if vector is None:
            yield ref.id, model, None, error, computed_at
            continue
        computed.add(1)
        yield ref.id, model, [float(v) for v in np.ravel(vector)], None, computed_at
