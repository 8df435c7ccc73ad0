"""`orchard lake export`: a dataset's labels, one model version's predictions and its PCA coordinates
as Parquet or CSV, for tools outside Orchard (pandas, a notebook, a spreadsheet).

One row per image of the images table (the latest version): id, key, split, label, then the
version's prediction from the predictions table (orchard.spark_app.prediction_table) and the x, y
of its last `orchard features` run (orchard.spark_app.features' `pca` output), null where the
image has none. Written by the executors (overwritten: a re-run writes the same files); the
driver receives only the counts.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from orchard.core.errors import ConfigError
from orchard.core.lake import Column, Prediction, features_uri
from orchard.core.settings import Settings
from orchard.spark_app import prediction_table, registry
from orchard.spark_app.table import read_images

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

log = logging.getLogger(__name__)

FORMATS = ("parquet", "csv")
PREDICTED = {  # predictions table column -> exported column
    Prediction.MODEL_VERSION: "model_version",
    Prediction.LABEL: "predicted_label",
    Prediction.CONFIDENCE: "confidence",
    Prediction.ERROR: "prediction_error",
    Prediction.PREDICTED_AT: "predicted_at",
}


def default_output(s: Settings, dataset: str, version: str, fmt: str) -> str:
    """s3a://<features bucket>/<dataset>/<version>/export_<format>/ (beside the features outputs)."""
    return features_uri(s.features_bucket, dataset, version, f"export_{fmt}")


def export_dataset(
    spark: SparkSession, s: Settings, dataset: str, fmt: str, version: str | None = None, output: str | None = None
) -> dict:
    """Write the dataset's export; returns {dataset, model_version, rows, predicted, with_pca, output}."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format takes {' or '.join(FORMATS)}, got {fmt!r}")
    version = version or registry.serving_version(s)
    if not version:
        raise ConfigError("no model version to export the predictions of: train one, or pass --model VERSION")
    images = read_images(spark, s, dataset).select(Column.ID, Column.KEY, Column.SPLIT, Column.LABEL)
    rows = images.join(predictions_of(spark, s, dataset, version), Column.ID, "left")
    pca = pca_of(spark, s, dataset, version)
    rows = rows.join(pca, Column.ID, "left") if pca is not None else rows
    out = output or default_output(s, dataset, version, fmt)
    writer = rows.write.mode("overwrite")
    (writer.option("header", "true").csv(out) if fmt == "csv" else writer.parquet(out))
    return export_counts(spark, out, fmt, dataset, version, pca is not None)


def predictions_of(spark: SparkSession, s: Settings, dataset: str, version: str) -> DataFrame:
    """id and the PREDICTED columns of `version`'s predictions of the dataset's images."""
    from pyspark.sql import functions as F

    prediction_table.ensure_table(spark, s)
    table = spark.read.format("delta").load(s.predictions_table_uri)
    mine = table.where((F.col(Column.DATASET) == dataset) & (F.col(Prediction.MODEL_VERSION) == version))
    return mine.select(Column.ID, *(F.col(name).alias(alias) for name, alias in PREDICTED.items()))


def pca_of(spark: SparkSession, s: Settings, dataset: str, version: str) -> DataFrame | None:
    """id, pca_x, pca_y of the version's last `orchard features` run on the dataset; None if none ran."""
    from pyspark.sql import functions as F
    from pyspark.sql.utils import AnalysisException

    try:
        pca = spark.read.parquet(features_uri(s.features_bucket, dataset, version, "pca"))
    except AnalysisException:  # no such directory: features never ran with this version
        log.info("no `orchard features` output for %s with %s: the export has no PCA columns", dataset, version)
        return None
    return pca.select(Column.ID, F.col("x").alias("pca_x"), F.col("y").alias("pca_y"))


def export_counts(spark: SparkSession, out: str, fmt: str, dataset: str, version: str, with_pca: bool) -> dict:
    """The export's figures, counted from the written files (one aggregate row reaches the driver)."""
    from pyspark.sql import functions as F

    reader = spark.read.option("header", "true").csv(out) if fmt == "csv" else spark.read.parquet(out)
    counts = reader.agg(F.count("*").alias("rows"), F.count("model_version").alias("predicted")).first()
    return {
        "dataset": dataset,
        "model_version": version,
        "rows": int(counts["rows"]) if counts else 0,
        "predicted": int(counts["predicted"]) if counts else 0,
        "with_pca": with_pca,
        "output": out,
    }
