"""The predictions table: every prediction `orchard infer` writes into the index, also kept in the lake.

Delta Lake table at `Settings.predictions_table_uri`, partitioned by dataset, one row per (image id,
model version) with the document's `prediction` fields (orchard.core.lake.PREDICTION_COLUMNS).
Every model version's rows are kept, so the index can be rebuilt from the lake and "which model
said what, when" is one query. Rows go in with a MERGE on (id, model version): a re-run, a retried
task or a Spark stage computed twice adds no duplicate. Each row is the prediction its document
holds after the run (orchard.spark_app.infer.write_partition), replaced only when that differs
(orchard.core.prediction_rows), so an image's newest row is its document's `prediction`.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

from orchard.core.lake import PREDICTION_COLUMNS, PREDICTION_KEY, PREDICTION_SCHEMA, Column, Prediction
from orchard.core.prediction_rows import changed_predicate, prediction_record, same_key
from orchard.core.settings import Settings
from orchard.spark_app.images import ImageRef
from orchard.spark_app.session import warm_delta

if TYPE_CHECKING:
    from pyspark import RDD
    from pyspark.sql import SparkSession

log = logging.getLogger(__name__)

COMPARED = (Prediction.LABEL, Prediction.CONFIDENCE, Prediction.ERROR, Prediction.PREDICTED_AT)


def ensure_table(spark: SparkSession, s: Settings) -> None:
    """Create the predictions table at its location unless one is there (re-runnable; the service
    may have created it with delta-rs)."""
    from delta.tables import DeltaTable

    if DeltaTable.isDeltaTable(spark, s.predictions_table_uri):
        return
    spark.sql(
        f"CREATE TABLE IF NOT EXISTS delta.`{s.predictions_table_uri}` ({PREDICTION_SCHEMA}) "
        f"USING delta PARTITIONED BY ({Column.DATASET})"
    )


def warm_up(spark: SparkSession, s: Settings) -> threading.Thread:
    """Create the table if needed and load it, in a driver thread started now (orchard.spark_app.session.warm_delta)."""
    return warm_delta(spark, s.predictions_table_uri, lambda: ensure_table(spark, s))


def row_of(ref: ImageRef, prediction: dict) -> tuple:
    """The table row of one image's `prediction` object (the document's), in PREDICTION_COLUMNS order."""
    values = prediction_record(ref.id, ref.dataset, ref.key, prediction)
    top5 = values[Prediction.TOP5]
    values[Prediction.TOP5] = None if top5 is None else [(t[Prediction.LABEL], t[Prediction.CONFIDENCE]) for t in top5]
    return tuple(values[name] for name, _ in PREDICTION_COLUMNS)


def merge_rows(spark: SparkSession, s: Settings, rows: RDD, dataset: str) -> dict:
    """MERGE `rows` (row_of tuples of `dataset`'s images) into the table by (id, model version), a
    stored row replaced when it differs (orchard.core.prediction_rows.changed_predicate); returns
    Delta's counts {inserted, updated}. Nothing reaches the driver but those counts; the merge reads
    only the dataset's partition of the table."""
    from delta.tables import DeltaTable
    from pyspark.sql import functions as F

    ensure_table(spark, s)
    new = spark.createDataFrame(rows, PREDICTION_SCHEMA).dropDuplicates(list(PREDICTION_KEY))
    table = DeltaTable.forPath(spark, s.predictions_table_uri).alias("t")
    # The service's MERGE (delta-rs) with the dataset literal made by Spark (its quoting differs).
    on = F.expr(same_key()) & (F.col(f"t.{Column.DATASET}") == F.lit(dataset))
    merge = table.merge(new.alias("s"), on).whenMatchedUpdateAll(changed_predicate()).whenNotMatchedInsertAll()
    metrics = merge.execute().collect()[0]  # one row of metrics
    return {"inserted": int(metrics["num_inserted_rows"]), "updated": int(metrics["num_updated_rows"])}
