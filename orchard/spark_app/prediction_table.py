"""The predictions table: every prediction `orchard infer` writes into the index, also kept in the lake.

Delta Lake table at `Settings.predictions_table_uri`, partitioned by dataset, one row per (image id,
model version) with the document's `prediction` fields (orchard.core.lake.PREDICTION_COLUMNS).
Every model version's rows are kept, so the index can be rebuilt from the lake and "which model
said what, when" is one query. Rows go in with a MERGE on (id, model version): a re-run, a retried
task or a Spark stage computed twice adds no duplicate; a row is updated only when its prediction
changed (SAME_PREDICTION, the rule the index's documents follow), so it keeps its first
`predicted_at` as the document does.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from orchard.core.lake import (
    PREDICTION_COLUMNS,
    PREDICTION_KEY,
    PREDICTION_SCHEMA,
    SAME_PREDICTION,
    Column,
    Prediction,
)
from orchard.core.settings import Settings
from orchard.spark_app.images import ImageRef

if TYPE_CHECKING:
    from pyspark import RDD
    from pyspark.sql import SparkSession

log = logging.getLogger(__name__)

COMPARED = (Prediction.LABEL, Prediction.CONFIDENCE, Prediction.ERROR, Prediction.PREDICTED_AT)


def ensure_table(spark: SparkSession, s: Settings) -> None:
    """Create the predictions table at its location unless one is there (re-runnable)."""
    spark.sql(
        f"CREATE TABLE IF NOT EXISTS delta.`{s.predictions_table_uri}` ({PREDICTION_SCHEMA}) "
        f"USING delta PARTITIONED BY ({Column.DATASET})"
    )


def row_of(ref: ImageRef, prediction: dict) -> tuple:
    """The table row of one image's `prediction` object (the document's), in PREDICTION_COLUMNS order."""
    top5 = prediction.get(Prediction.TOP5)
    values = {
        Column.ID: ref.id,
        Column.DATASET: ref.dataset,
        Column.KEY: ref.key,
        **prediction,
        Prediction.TOP5: None if top5 is None else [(t[Prediction.LABEL], t[Prediction.CONFIDENCE]) for t in top5],
    }
    return tuple(values.get(name) for name, _ in PREDICTION_COLUMNS)


def merge_rows(spark: SparkSession, s: Settings, rows: RDD, dataset: str) -> dict:
    """MERGE `rows` (row_of tuples of `dataset`'s images) into the table by (id, model version);
    returns Delta's counts {inserted, updated}. Nothing reaches the driver but those counts; the
    merge reads only the dataset's partition of the table."""
    from delta.tables import DeltaTable
    from pyspark.sql import functions as F

    ensure_table(spark, s)
    new = spark.createDataFrame(rows, PREDICTION_SCHEMA).dropDuplicates(list(PREDICTION_KEY))
    on = F.col(f"t.{Column.DATASET}") == F.lit(dataset)
    for name in PREDICTION_KEY:
        on = on & (F.col(f"t.{name}") == F.col(f"n.{name}"))
    changed = " OR ".join(f"NOT (t.{name} <=> n.{name})" for name in SAME_PREDICTION)
    table = DeltaTable.forPath(spark, s.predictions_table_uri).alias("t")
    merge = table.merge(new.alias("n"), on).whenMatchedUpdateAll(changed).whenNotMatchedInsertAll()
    metrics = merge.execute().collect()[0]  # one row of metrics
    return {"inserted": int(metrics["num_inserted_rows"]), "updated": int(metrics["num_updated_rows"])}
