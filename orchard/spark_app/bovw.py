"""`orchard train --family bovw`: the classic path, without deep learning or pretrained weights.

OpenCV SIFT or ORB descriptors of each image's strongest keypoints (executors,
orchard.spark_app.descriptors) -> a vocabulary of visual words learnt with Spark ML `KMeans` on a
bounded sample of descriptors (the images sampled, never the descriptors collected) -> per image, a
histogram of its descriptors' nearest words (executors) -> Spark ML `IDF`, `Normalizer` (L2), `PCA`,
`StandardScaler` and `MultilayerPerceptronClassifier`, fitted on the train split.

Only the vocabulary (words x width floats), the fitted stages' small matrices and counts reach the
driver, so its memory does not grow with the number of images or descriptors. The fitted pipeline
becomes one Keras model (orchard.spark_app.model.build_bovw: the same arithmetic, checked against
Spark's own test accuracy) saved as a version like the CNNs', so `orchard infer`, `features` and
`predict` use BoVW versions unchanged; the Spark ML pipeline is saved beside it (`spark_pipeline/`).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, cast

import numpy as np

from orchard.core.errors import ConfigError
from orchard.core.lake import TEST, TRAIN
from orchard.core.settings import Settings
from orchard.spark_app import descriptors, registry
from orchard.spark_app.infer import PredictSpec, inputs
from orchard.spark_app.table import image_pairs, stage_frame, stage_images, synced_snapshot
from orchard.spark_app.train import (
    discover_classes,
    evaluate_splits,
    model_card,
    register_trained,
    registry_document,
    save_version,
)

log = logging.getLogger(__name__)

IMAGE_SIZE = (256, 256)  # images are resized to this (grey) before keypoints are detected
EMBEDDING_WIDTH = 128  # the index's `embedding` width (the CNNs'): the PCA output is zero-padded to it
PIPELINE_DIR = "spark_pipeline"  # the fitted Spark ML stages, beside the version's Keras file
# A word learnt from fewer descriptors than this is noise: with a small sample, --words is lowered
# to (descriptors sampled / this), said in the log and recorded (`bovw.words` vs `words_asked`).
DESCRIPTORS_PER_WORD = 10
HISTOGRAM_SCHEMA = "id string, split string, label string, label_index double, counts array<double>, error string"


@dataclass(frozen=True)
class BovwPlan:
    """What `orchard train --family bovw` was asked for."""

    dataset: str
    descriptor: str = "sift"
    words: int = 256  # visual words (KMeans k)
    keypoints: int = 50  # strongest keypoints per image (the reference project's 50)
    train_split: str = TRAIN
    test_split: str = TEST
    components: int = 64  # PCA components (at most the words and train images - 1: component_count)
    hidden: int = 128  # units of the perceptron's hidden layer
    iterations: int = 200  # the perceptron's maximum L-BFGS iterations
    sample: int = 200_000  # descriptors the vocabulary is learnt from, at most (bounds KMeans' input)
    images_per_partition: int = 1024
    seed: int = 0

    @property
    def splits(self) -> dict[str, str]:
        """{"train": train split, "test": test split}."""
        return {"train": self.train_split, "test": self.test_split}

    @property
    def preprocessing(self) -> str:
        """The card's preprocessing name (`sift-50`)."""
        return descriptors.preprocessing_name(self.descriptor, self.keypoints)


def check_plan(plan: BovwPlan) -> None:
    """ConfigError for settings the pipeline cannot fit."""
    if plan.descriptor not in descriptors.KINDS:
        raise ConfigError(f"unknown --descriptor {plan.descriptor!r}; choose one of {', '.join(descriptors.KINDS)}")
    if plan.words < 2 or plan.keypoints < 1 or plan.components < 2:
        raise ConfigError("--words needs >= 2, --keypoints >= 1, components >= 2")


def descriptor_spec(s: Settings, plan: BovwPlan, classes: list[str], table_version: int) -> PredictSpec:
    """What executors need to turn images into descriptor inputs (orchard.spark_app.infer.inputs)."""
    return PredictSpec(s, "", tuple(classes), plan.preprocessing, IMAGE_SIZE, 3, table_version=table_version)


def descriptor_vectors(outputs: Iterable) -> Iterator[tuple]:
    """mapPartitions body: one (DenseVector,) row per descriptor of each usable image."""
    from pyspark.ml.linalg import Vectors

    for (_ref, _error), x in outputs:
        if x is not None:
            for row in descriptors.real_rows(x):
                yield (Vectors.dense(row.astype(np.float64)),)


def learn_vocabulary(spark, pairs, spec: PredictSpec, plan: BovwPlan, train_images: int) -> tuple[np.ndarray, int]:
    """(centres as float32 words x width, descriptors used): Spark ML KMeans on the descriptors of a
    sample of train images sized so that at most ~`plan.sample` descriptors are drawn."""
    from pyspark.ml.clustering import KMeans

    fraction = min(1.0, plan.sample / max(1, train_images * plan.keypoints))
    sampled = pairs.sample(False, fraction, plan.seed) if fraction < 1.0 else pairs
    frame = spark.createDataFrame(inputs(sampled, spec).mapPartitions(descriptor_vectors), ["features"]).persist()
    try:
        drawn = frame.count()
        if drawn < 2 * DESCRIPTORS_PER_WORD:
            raise ConfigError(
                f"{plan.dataset}/{plan.train_split}: {drawn} {plan.descriptor} descriptors in the train images, "
                f"too few for a vocabulary (more images or more --keypoints; flat images have none)"
            )
        words = vocabulary_size(plan.words, drawn)
        log.info("learning %d visual words from %d descriptors (%.0f%% of train images)", words, drawn, fraction * 100)
        fitted = KMeans(k=words, seed=plan.seed, maxIter=30, initSteps=2).fit(frame)
        centres = np.asarray(fitted.clusterCenters(), dtype=np.float32)
    finally:
        frame.unpersist()
    return centres, drawn


def vocabulary_size(asked: int, descriptors_sampled: int) -> int:
    """The number of words to learn: `asked`, lowered to keep DESCRIPTORS_PER_WORD descriptors per word."""
    words = min(asked, max(2, descriptors_sampled // DESCRIPTORS_PER_WORD))
    if words < asked:
        log.warning(
            "--words %d lowered to %d: %d descriptors sampled, at least %d per word (more images or --keypoints "
            "allow more words)",
            asked,
            words,
            descriptors_sampled,
            DESCRIPTORS_PER_WORD,
        )
    return words


def histogram_rows(spec: PredictSpec, centres, outputs: Iterable) -> Iterator[tuple]:
    """mapPartitions body: (id, split, label, label index or -1, word counts or None, error) per image."""
    index = {label: float(i) for i, label in enumerate(spec.classes)}
    words = centres.value
    for (ref, error), x in outputs:
        counts = None if x is None else descriptors.word_counts(x, words).tolist()
        yield ref.id, ref.split, ref.label, index.get(ref.label, -1.0), counts, error


def histograms(spark, pairs, spec: PredictSpec, centres: np.ndarray):
    """DataFrame (HISTOGRAM_SCHEMA) of every image's word counts, persisted (the fit passes over it
    several times); `counts` is null and `error` set for images without keypoints."""
    shipped = spark.sparkContext.broadcast(centres)
    rows = inputs(pairs, spec).mapPartitions(partial(histogram_rows, spec, shipped))
    return spark.createDataFrame(rows, HISTOGRAM_SCHEMA).persist()


def fit_pipeline(frame, plan: BovwPlan, classes: list[str]):
    """The fitted Spark ML PipelineModel (IDF, Normalizer, PCA with `plan.components`, StandardScaler,
    perceptron) on the usable, labelled train rows of `frame`."""
    from pyspark.ml import Pipeline
    from pyspark.ml.classification import MultilayerPerceptronClassifier
    from pyspark.ml.feature import IDF, PCA, Normalizer, StandardScaler

    k = plan.components
    stages: list = [
        IDF(inputCol="counts_vector", outputCol="tfidf"),
        Normalizer(p=2.0, inputCol="tfidf", outputCol="normalised"),
        PCA(k=k, inputCol="normalised", outputCol="components"),
        StandardScaler(withMean=True, withStd=True, inputCol="components", outputCol="scaled"),
        MultilayerPerceptronClassifier(
            layers=[k, plan.hidden, len(classes)],
            featuresCol="scaled",
            labelCol="label_index",
            maxIter=plan.iterations,
            seed=plan.seed,
        ),
    ]
    train = usable(frame).where(frame.split == plan.train_split)
    log.info("fitting IDF, L2 norm, PCA (k=%d), scaler and a %s perceptron", k, [k, plan.hidden, len(classes)])
    return Pipeline(stages=stages).fit(train)


def component_count(plan: BovwPlan, train_rows: int) -> int:
    """PCA components to keep: `plan.components`, at most the words, the index width and
    train rows - 1: past the data's rank a component's variance is rounding noise, which the scaler
    would blow up to unit variance."""
    if train_rows < 2:
        raise ConfigError(
            f"{plan.dataset}/{plan.train_split}: {train_rows} usable train images; training needs 2 or more"
        )
    return max(1, min(plan.components, plan.words, EMBEDDING_WIDTH, train_rows - 1))


def usable(frame):
    """Rows with word counts and a known label, `counts` as an ML vector column `counts_vector`."""
    from pyspark.ml.functions import array_to_vector

    rows = frame.where(frame.counts.isNotNull() & (frame.label_index >= 0))
    return rows.withColumn("counts_vector", array_to_vector(rows.counts))


def spark_accuracy(pipeline, frame, split: str) -> float | None:
    """Test accuracy of the Spark ML pipeline itself on a split (the Keras form must agree)."""
    from pyspark.sql import functions as F

    scored = pipeline.transform(usable(frame).where(frame.split == split))
    row = scored.agg(F.avg((F.col("prediction") == F.col("label_index")).cast("double")).alias("a")).first()
    return None if row is None or row.a is None else float(row.a)


def keras_weights(pipeline, keypoints: int, centres: np.ndarray) -> dict:
    """build_bovw's arguments from the fitted stages (small matrices: words x k at most)."""
    from pyspark.ml.feature import IDFModel, PCAModel, StandardScalerModel

    idf_model, _, pca_model, scaler, mlp = pipeline.stages
    projection = cast(PCAModel, pca_model).pc.toArray()  # words x k (Spark's PCA does not centre)
    std = cast(StandardScalerModel, scaler).std.toArray()
    factor = np.divide(1.0, std, out=np.zeros_like(std), where=std != 0)  # Spark scales a constant to 0
    shift = -cast(StandardScalerModel, scaler).mean.toArray() * factor
    words, k = projection.shape
    kernel = np.zeros((words, EMBEDDING_WIDTH))
    kernel[:, :k] = projection * factor
    bias = np.zeros(EMBEDDING_WIDTH)
    bias[:k] = shift
    return {
        "keypoints": keypoints,
        "centers": centres,
        "idf": cast(IDFModel, idf_model).idf.toArray(),
        "embedding": (kernel, bias),
        "dense": perceptron_layers(mlp.getLayers(), mlp.weights.toArray(), EMBEDDING_WIDTH),
    }


def perceptron_layers(sizes: list[int], flat: np.ndarray, padded_input: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(kernel in x out, bias) per layer of Spark ML's perceptron weight vector: per layer, the
    out x in matrix column-major (= in x out row-major), then the bias. The first kernel gets zero
    rows for the embedding's padding."""
    layers, offset = [], 0
    for n_in, n_out in itertools.pairwise(sizes):
        kernel = flat[offset : offset + n_in * n_out].reshape(n_in, n_out)
        offset += n_in * n_out
        layers.append((kernel, flat[offset : offset + n_out]))
        offset += n_out
    if offset != len(flat):
        raise ValueError(f"perceptron weights: {len(flat)} values, layers {sizes} use {offset}")
    first, bias = layers[0]
    layers[0] = (np.vstack([first, np.zeros((padded_input - first.shape[0], first.shape[1]))]), bias)
    return layers


@dataclass(frozen=True)
class Fitted:
    """A fitted BoVW pipeline and what the run learnt about its data."""

    pipeline: Any  # pyspark.ml.PipelineModel
    plan: BovwPlan  # as run: `words` may be lower than asked (vocabulary_size)
    centres: np.ndarray
    descriptors_sampled: int
    without_keypoints: int
    spark_test_accuracy: float | None


def fit(spark, s: Settings, plan: BovwPlan, classes: list[str], table_version: int) -> Fitted:
    """Vocabulary, histograms of every image of the dataset, then the pipeline on the train split."""
    spec = descriptor_spec(s, plan, classes, table_version)
    df, _, train_images = stage_frame(spark, s, plan.dataset, plan.train_split, table_version)
    train_pairs = image_pairs(spark, df, train_images, plan.images_per_partition)
    centres, drawn = learn_vocabulary(spark, train_pairs, spec, plan, train_images)
    plan = replace(plan, words=len(centres))
    pairs, _ = stage_images(spark, s, plan.dataset, None, plan.images_per_partition, table_version)
    frame = histograms(spark, pairs, spec, centres)
    try:
        without = frame.where(frame.counts.isNull()).count()
        if without:
            log.warning(
                "%d images have no %s keypoints: not used (their documents get the error)", without, plan.descriptor
            )
        plan = replace(
            plan, components=component_count(plan, usable(frame).where(frame.split == plan.train_split).count())
        )
        pipeline = fit_pipeline(frame, plan, classes)
        accuracy = spark_accuracy(pipeline, frame, plan.test_split)
    finally:
        frame.unpersist()
    return Fitted(pipeline, plan, centres, drawn, without, accuracy)


def run_bovw(spark, s: Settings, plan: BovwPlan, as_of: int | None = None) -> dict:
    """Train, save, evaluate and register a BoVW version; returns its summary (the registry document,
    version, model_uri) with the `bovw` facts: descriptor, words, keypoints, components, descriptors
    sampled, images without keypoints, the Spark pipeline's own test accuracy."""
    from orchard.spark_app import model as keras_model  # noqa: PLC0415

    check_plan(plan)
    began = time.monotonic()
    version_read = as_of if as_of is not None else synced_snapshot(spark, s, plan.dataset)[0].version
    classes = discover_classes(spark, s, plan.dataset, plan.train_split, version_read)
    if len(classes) < 2:
        raise ConfigError(f"{plan.dataset}/{plan.train_split}: found {len(classes)} labels; training needs 2 or more")
    fitted = fit(spark, s, plan, classes, version_read)
    net = keras_model.build_bovw(**keras_weights(fitted.pipeline, plan.keypoints, fitted.centres))
    version = registry.new_version(registry.FAMILY_BOVW, keras_model.weights_digest(net))
    card = save_version(s, net, bovw_card(version, classes, net, fitted.plan, version_read))
    fitted.pipeline.write().overwrite().save(registry.uri(s, version, PIPELINE_DIR))
    wrapped = keras_model.wrap(net)
    scores = evaluate_splits(
        spark, s, plan.dataset, wrapped, card, plan.splits, 64, plan.images_per_partition, version_read
    )
    losses = objective_history(fitted.pipeline)
    history = [{"iteration": i, "loss": round(float(v), 6)} for i, v in enumerate(losses)]
    iterations = len(losses) or plan.iterations  # recorded as the version's epochs: passes of the optimiser
    doc = registry_document(plan.dataset, plan.splits, card, net, iterations, scores, history, registry.FAMILY_BOVW)
    facts = bovw_facts(plan, fitted)
    return register_trained(s, card, {**doc, "trained_on_version": version_read, "bovw": facts}, began, {})


def objective_history(pipeline) -> list[float]:
    """The perceptron's loss per L-BFGS iteration (empty if Spark kept no training summary)."""
    mlp = pipeline.stages[-1]
    return list(mlp.summary().objectiveHistory) if mlp.hasSummary else []


def bovw_facts(plan: BovwPlan, fitted: Fitted) -> dict:
    """The registry document's `bovw` object."""
    return {
        "descriptor": plan.descriptor,
        "words": fitted.plan.words,
        "words_asked": plan.words,
        "keypoints": plan.keypoints,
        "components": fitted.plan.components,
        "hidden": plan.hidden,
        "descriptors_sampled": fitted.descriptors_sampled,
        "images_without_keypoints": fitted.without_keypoints,
        "spark_test_accuracy": fitted.spark_test_accuracy,
    }


def bovw_card(version: str, classes: list[str], net, plan: BovwPlan, table_version: int) -> dict:
    """labels.json of a BoVW version: images decoded at IMAGE_SIZE, then `<descriptor>-<keypoints>`."""
    return model_card(
        version,
        classes,
        net,
        plan.preprocessing,
        architecture=f"bovw-{plan.descriptor}-{plan.words}w",
        input_size=list(IMAGE_SIZE),
        channels=3,
        family=registry.FAMILY_BOVW,
        trained_on_version=table_version,
    )
