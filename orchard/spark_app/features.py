"""`orchard features`: penultimate-layer embeddings to Parquet, PCA with Spark ML, and the embedding
plus a 2-D projection written into every image document (for kNN search and plots).

Under s3a://<features bucket>/<dataset>/<model version>/ (`imagenet:x` written `imagenet-x`):
  embeddings/  Parquet: id, key, split, label, embedding (array<float>, d values)
  pca/         Parquet: id, key, split, label, pca (array<float>, k values), x, y
  pca_csv/     CSV with a header: id, key, split, label, x, y, pc1 .. pck
PCA: embeddings are centred (StandardScaler withMean, no scaling), then Spark ML PCA with all
components; k is the smallest number whose explained variance reaches the threshold (default 95 %);
x, y are the first two components. Only the d x d covariance and per-partition counts reach the driver.

A registered version's embeddings (its `embedding` layer) go into the documents' `embedding` and
`pca`; a pretrained base used as-is (`--model imagenet:efficientnet-lite0`, no training) is read
from the embeddings table (orchard.spark_app.embedding_cache: each image through the base once)
and goes into the documents' `pretrained` object, so both kinds of search live side by side.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from functools import partial
from typing import cast

import numpy as np

from orchard.core.clients import es_client
from orchard.core.errors import ConfigError
from orchard.core.lake import (
    FEATURE_COMPUTED_AT,
    FEATURE_EMBEDDING,
    FEATURE_PARTITIONS,
    FEATURE_PCA_X,
    FEATURE_PCA_Y,
    FEATURE_SCHEMA,
    FEATURE_VERSION,
    Column,
    Field,
    Pca,
    Pretrained,
    features_uri,
    utc_timestamp,
)
from orchard.core.settings import Settings
from orchard.spark_app.context import es_of
from orchard.spark_app.embedding_cache import base_embeddings
from orchard.spark_app.infer import ImageSource, ModelRun, PredictSpec, inputs, settle
from orchard.spark_app.preprocess import choose_k
from orchard.spark_app.registry import is_pretrained
from orchard.spark_app.session import warm_delta
from orchard.spark_app.sink import Tally, merge_tallies, write_actions
from orchard.spark_app.table import quoted, stage_images

log = logging.getLogger(__name__)

PARTS = ("embeddings", "pca", "pca_csv")  # the directories of one run's outputs
EMBEDDING_SCHEMA = "id string, key string, split string, label string, embedding array<float>"


def embedding_rows(outputs: Iterable, skipped=None) -> Iterator[tuple]:
    """mapPartitions body: (id, key, split, label, embedding) per decodable image's model output."""
    for (ref, _error), vector in outputs:
        if vector is None:
            if skipped is not None:
                skipped.add(1)
            continue
        yield ref.id, ref.key, ref.split, ref.label, [float(v) for v in np.ravel(vector)]


def write_embeddings(spark, pairs_rdd, spec: PredictSpec, spark_model, layer: str | None, out: str) -> int:
    """Embed every image into Parquet at `out` (overwritten); returns the number of images skipped.

    The embeddings come from the Elephas-wrapped model's streaming predict on `layer` (None: the
    `embedding` layer, else the penultimate one).
    """
    skipped = spark.sparkContext.accumulator(0)
    outputs = spark_model.predict_stream(inputs(pairs_rdd, spec), spec.batch_size, layer=layer)
    rows = outputs.mapPartitions(partial(embedding_rows, skipped=skipped))
    spark.createDataFrame(rows, EMBEDDING_SCHEMA).write.mode("overwrite").parquet(out)
    return skipped.value


def fit_pca(embeddings_df):
    """(fitted pipeline, explained variance ratios of all components, dims) of centred embeddings."""
    from pyspark.ml import Pipeline
    from pyspark.ml.feature import PCA, PCAModel, StandardScaler
    from pyspark.ml.functions import array_to_vector
    from pyspark.sql import functions as F

    first = embeddings_df.select(F.size("embedding").alias("d")).first()
    if first is None:
        raise ConfigError("no embeddings to fit PCA on (no decodable images?)")
    dims = int(first.d)
    vectors = embeddings_df.withColumn("features", array_to_vector(F.col("embedding")))
    pipeline = Pipeline(
        stages=[
            StandardScaler(withMean=True, withStd=False, inputCol="features", outputCol="centred"),
            PCA(k=dims, inputCol="centred", outputCol="components"),
        ]
    ).fit(vectors)
    pca_model = cast(PCAModel, pipeline.stages[-1])  # the fitted PCA stage (the pipeline's last)
    explained = pca_model.explainedVariance.toArray().tolist()
    return pipeline, explained, dims


def project(pipeline, embeddings_df, k: int):
    """DataFrame id, key, split, label, embedding, pca (first k components), x, y."""
    from pyspark.ml.functions import array_to_vector, vector_to_array
    from pyspark.sql import functions as F

    components = vector_to_array(F.col("components"))
    return pipeline.transform(embeddings_df.withColumn("features", array_to_vector(F.col("embedding")))).select(
        "id",
        "key",
        "split",
        "label",
        "embedding",
        F.slice(components, 1, k).alias("pca"),
        components[0].alias("x"),
        components[1].alias("y"),
    )


def feature_doc(version: str, row, pretrained: bool) -> dict:
    """The partial document of one row: embedding, model and 2-D PCA, at the top level for a
    registered version, inside `pretrained` for a pretrained base."""
    embedding = list(row.embedding) if any(row.embedding) else None
    pca = {Pca.X: float(row.x), Pca.Y: float(row.y)}
    if pretrained:
        doc = {Pretrained.MODEL: version, Pretrained.PCA: pca, Pretrained.EMBEDDING: embedding}
        return {Field.PRETRAINED: {k: v for k, v in doc.items() if v is not None}}
    doc = {Field.EMBEDDING_MODEL: version, Field.PCA: pca, Field.EMBEDDING: embedding}
    return {k: v for k, v in doc.items() if v is not None}


def feature_actions(
    index: str, version: str, pretrained: bool, rows: Iterable, tally: Tally
) -> Iterator[tuple[dict, str, bool]]:
    """Partial updates (embedding, model, pca) per row; zero vectors skip the embedding and fail."""
    for row in rows:
        if not any(row.embedding):  # cosine similarity is undefined for a zero vector: Elasticsearch would reject it
            tally.fail(row.key, "zero embedding (cosine similarity cannot index it)")
        doc = feature_doc(version, row, pretrained)
        yield {"_op_type": "update", "_index": index, "_id": row.id, "doc": doc, "retry_on_conflict": 3}, row.key, False


def write_partition(s: Settings, version: str, chunk_size: int, rows: Iterable) -> Iterator[Tally]:
    """mapPartitions body: send the partition's feature updates; yields its tally."""
    zero = Tally()
    actions = feature_actions(s.images_index, version, is_pretrained(version), rows, zero)
    sent = write_actions(es_of(s), actions, chunk_size)
    yield sent.merge(zero)


def write_features(projected_df, s: Settings, version: str, chunk_size: int = 200) -> Tally:
    """Write embedding + pca{x,y} into every image document from the executors; returns the counts."""
    return projected_df.rdd.mapPartitions(partial(write_partition, s, version, chunk_size)).fold(Tally(), merge_tallies)


def ensure_features_table(spark, s: Settings) -> None:
    """Create the features table (orchard.core.lake.FEATURE_COLUMNS) unless one is there."""
    spark.sql(
        f"CREATE TABLE IF NOT EXISTS delta.`{s.features_table_uri}` ({FEATURE_SCHEMA}) "
        f"USING delta PARTITIONED BY ({', '.join(FEATURE_PARTITIONS)})"
    )


def keep_in_lake(spark, projected_df, s: Settings, dataset: str, version: str) -> None:
    """Replace the (dataset, version) slice of the features table by this run's embeddings and 2-D
    PCA (one atomic Delta commit: a re-run or a retried job leaves one row per image)."""
    from pyspark.sql import functions as F

    ensure_features_table(spark, s)
    rows = projected_df.select(
        Column.ID,
        F.lit(dataset).alias(Column.DATASET),
        F.lit(version).alias(FEATURE_VERSION),
        Column.KEY,
        FEATURE_EMBEDDING,
        F.col("x").alias(FEATURE_PCA_X),
        F.col("y").alias(FEATURE_PCA_Y),
        F.lit(utc_timestamp()).alias(FEATURE_COMPUTED_AT),
    )
    slice_ = f"{Column.DATASET} = '{quoted(dataset)}' AND {FEATURE_VERSION} = '{quoted(version)}'"
    rows.write.format("delta").mode("overwrite").option("replaceWhere", slice_).save(s.features_table_uri)
    log.info("features of %s by %s kept in %s", dataset, version, s.features_table_uri)


def write_csv(projected_df, k: int, out: str) -> None:
    """The PCA coordinates as CSV files with a header (id, key, split, label, x, y, pc1..pck) at `out`."""
    from pyspark.sql import functions as F

    components = [F.col("pca")[i].alias(f"pc{i + 1}") for i in range(k)]
    columns = ["id", "key", "split", "label", "x", "y"]
    projected_df.select(*columns, *components).write.mode("overwrite").option("header", True).csv(out)


def check_embedding_dims(s: Settings, dims: int) -> None:
    """ConfigError if the images index already maps `embedding` with another number of dims."""
    mapping = es_client(s).indices.get_mapping(index=s.images_index)
    for body in mapping.body.values():
        existing = body["mappings"].get("properties", {}).get(Field.EMBEDDING, {}).get("dims")
        if existing and int(existing) != dims:
            raise ConfigError(
                f"{s.images_index} stores {existing}-d embeddings (dense_vector dims are fixed per index); "
                f"this model gives {dims}-d: use a model with {existing}-d features or another ORCHARD_IMAGES_INDEX"
            )


def run_features(
    spark,
    s: Settings,
    dataset: str,
    version: str,
    split: str | None = None,
    threshold: float = 0.95,
    batch_size: int = 64,
    layer: str | None = None,
    images_per_partition: int = 1024,
    source: ImageSource = stage_images,
) -> dict:
    """Embeddings -> Parquet -> PCA -> Parquet + CSV + documents; returns the run summary."""
    choose_k([1.0], threshold)  # validates the threshold before any work
    began = time.monotonic()
    emb_uri, pca_uri, csv_uri = (features_uri(s.features_bucket, dataset, version, p) for p in PARTS)
    options = (batch_size, layer, images_per_partition, source)
    warm = warm_delta(spark, s.features_table_uri, lambda: ensure_features_table(spark, s))  # overlaps the embedding
    skipped, table_version, computed = embed_into(spark, s, dataset, version, split, options, emb_uri)
    embeddings = spark.read.parquet(emb_uri)
    pipeline, explained, dims = fit_pca(embeddings)
    if not is_pretrained(version):  # the pretrained object maps its own width
        check_embedding_dims(s, dims)
    k = choose_k(explained, threshold)
    projected = project(pipeline, embeddings, k)
    projected.drop("embedding").write.mode("overwrite").parquet(pca_uri)
    write_csv(projected, k, csv_uri)
    tally = write_features(projected, s, version)  # the same deterministic transform, read again
    warm.join()
    keep_in_lake(spark, projected, s, dataset, version)
    settle(s, tally)
    seconds = time.monotonic() - began
    summary = features_summary(version, dims, k, explained, threshold, skipped, tally, emb_uri, pca_uri, seconds)
    pretrained = {"embedded_now": computed} if computed is not None else {}  # base passes in this run
    return {**summary, "csv_uri": csv_uri, **pretrained, "table_version": table_version}


def embed_into(
    spark, s: Settings, dataset: str, version: str, split: str | None, options: tuple, out: str
) -> tuple[int, int | None, int | None]:
    """Write the embeddings of a dataset (split) by `version` as Parquet at `out`; returns (images
    skipped, table version read, images the pretrained base embedded now or None).

    `options`: (batch size, layer, images per partition, image source) of a registered version."""
    batch_size, layer, images_per_partition, source = options
    if is_pretrained(version):
        cached = base_embeddings(spark, s, dataset, split, batch_size, images_per_partition)
        cached.frame.write.mode("overwrite").parquet(out)
        return cached.failed, cached.table_version, cached.computed
    run = ModelRun.start(spark, s, dataset, version, split, batch_size, images_per_partition, source)
    skipped = write_embeddings(spark, run.images, run.spec, run.spark_model, layer, out)
    return skipped, run.spec.table_version, None


def features_summary(
    version: str,
    dims: int,
    k: int,
    explained: list[float],
    threshold: float,
    skipped: int,
    tally: Tally,
    emb_uri: str,
    pca_uri: str,
    seconds: float,
) -> dict:
    """The run's figures as a dict (what `orchard features` prints)."""
    cumulative = np.cumsum(explained)
    return {
        "model_version": version,
        "images": tally.written + tally.failed,
        "skipped_undecodable": skipped,
        "dims": dims,
        "k": k,
        "threshold": threshold,
        "explained_variance_k": round(float(cumulative[k - 1]), 6),
        "explained_variance_2d": round(float(cumulative[min(2, len(cumulative)) - 1]), 6),
        "explained_variance": [round(float(v), 6) for v in explained[:k]],
        "embeddings_uri": emb_uri,
        "pca_uri": pca_uri,
        "updated": tally.updated,
        "unchanged": tally.noop,
        "failed": tally.failed,
        "failure_reasons": tally.reasons,
        "failure_examples": [list(e) for e in tally.examples],
        "seconds": round(seconds, 1),
        "images_per_second": round((tally.written + tally.failed) / seconds, 1) if seconds > 0 else None,
    }
