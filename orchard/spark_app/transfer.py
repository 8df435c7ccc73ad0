"""`orchard train --base efficientnet-lite0`: transfer learning from the ImageNet-pretrained base.

Frozen base (the default): every image's base embedding comes from the embeddings table
(orchard.spark_app.embedding_cache: each image goes through the base once, in the executors, at
224x224), and a new head (the features standardized by the train split's moments, dropout, a
128-d `embedding` layer, softmax) is trained on the stored 1280-d vectors with Elephas, then
evaluated on them: an epoch costs a pass of vectors through a ~165k-parameter head, not of images
through the 4.7M-parameter base. The composed model gives the same outputs on the images, because
the frozen base runs in inference mode.

`--fine-tune N` then unfreezes the base's top N blocks (BatchNorm stays frozen) and trains base +
head on the images themselves for `--fine-tune-epochs` at a tenth of the learning rate, evaluated
on the images.

Empty images (black, constant, no-data: orchard.core.quality) are left out of fine-tuning unless
`--include-empty`, and counted as `excluded_empty`. The frozen head trains on the stored embedding
of every train image: the embeddings table holds no quality (the summary then has no `excluded_empty`).

The registered version is one Keras model taking 224x224 images (base + head): `orchard infer`,
`features`, `predict` use it like any version; its `embedding` is the head's 128-d layer.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import partial

import numpy as np

from orchard.core.errors import ConfigError
from orchard.core.lake import TEST, TRAIN, Column
from orchard.core.settings import Settings
from orchard.spark_app import registry
from orchard.spark_app.embedding_cache import EMBEDDING, BaseEmbeddings, base_embeddings
from orchard.spark_app.images import ImageRef
from orchard.spark_app.infer import PredictSpec, score
from orchard.spark_app.preprocess import label_map, one_hot
from orchard.spark_app.session import executor_count
from orchard.spark_app.table import stage_images, synced_snapshot
from orchard.spark_app.train import (
    discover_classes,
    evaluate_splits,
    labelled_examples,
    log_left_out,
    log_scores,
    model_card,
    register_trained,
    registry_document,
    save_version,
)

log = logging.getLogger(__name__)

BASES = registry.PRETRAINED_BASES


@dataclass(frozen=True)
class TransferPlan:
    """What `orchard train --base` was asked for."""

    dataset: str
    base: str
    train_split: str = TRAIN
    test_split: str = TEST
    epochs: int = 5
    batch_size: int = 16
    learning_rate: float = 1e-3
    fine_tune: int = 0  # top blocks of the base unfrozen after the head is trained (0: frozen base)
    fine_tune_epochs: int = 1
    images_per_partition: int = 1024
    include_empty: bool = False  # fine-tuning on images: keep the empty ones (black, constant, no-data)

    @property
    def splits(self) -> dict[str, str]:
        """{"train": train split, "test": test split}."""
        return {"train": self.train_split, "test": self.test_split}


def labelled_vectors(classes: tuple[str, ...], rows: Iterable) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """mapPartitions body: (embedding, one-hot label) per row of a known class."""
    index = label_map(classes)
    for row in rows:
        if row[Column.LABEL] in index:
            yield np.asarray(row[EMBEDDING], dtype=np.float32), one_hot(index[row[Column.LABEL]], len(classes))


def vector_inputs(dataset: str, rows: Iterable) -> Iterator[tuple[tuple[ImageRef, None], np.ndarray]]:
    """mapPartitions body: ((ref, no error), embedding) per row: the head's inputs, as predict_stream takes them."""
    for row in rows:
        ref = ImageRef(row[Column.ID], row[Column.KEY], dataset, row[Column.SPLIT], row[Column.LABEL])
        yield (ref, None), np.asarray(row[EMBEDDING], dtype=np.float32)


def fit_head(spark, cached: BaseEmbeddings, plan: TransferPlan, classes: list[str]):
    """The new head trained with Elephas on the stored embeddings of the train split; returns the SparkModel."""
    from orchard.spark_app import model as keras_model  # noqa: PLC0415
    from orchard.spark_app import pretrained  # noqa: PLC0415

    train_rows = cached.frame.where(cached.frame[Column.SPLIT] == plan.train_split)
    head = pretrained.build_head(len(classes), plan.learning_rate, moments=feature_moments(train_rows))
    examples = train_rows.rdd.mapPartitions(partial(labelled_vectors, tuple(classes)))
    log.info("training a %d-parameter head on %s embeddings, %d epochs", head.count_params(), plan.base, plan.epochs)
    return keras_model.train_elephas(head, examples, plan.epochs, plan.batch_size, executor_count(spark))


def feature_moments(rows) -> tuple[np.ndarray, np.ndarray]:
    """(mean, variance) of each feature of the embeddings of `rows`, computed by Spark (Summarizer):
    the driver receives two vectors, whatever the number of rows."""
    from pyspark.ml.functions import array_to_vector
    from pyspark.ml.stat import Summarizer

    vectors = rows.where(rows[EMBEDDING].isNotNull()).select(array_to_vector(rows[EMBEDDING]).alias("v"))
    summary = vectors.select(Summarizer.metrics("mean", "variance").summary(vectors["v"]).alias("s")).first()
    if summary is None or summary["s"] is None:
        raise ConfigError("no train image has a base embedding: nothing to train the head on")
    return summary["s"]["mean"].toArray(), summary["s"]["variance"].toArray()


def evaluate_head(cached: BaseEmbeddings, spec: PredictSpec, head_model, plan: TransferPlan) -> dict[str, dict]:
    """Test and train accuracy of the head on the stored embeddings (= the composed model's on the images)."""
    vectors = cached.frame.rdd.mapPartitions(partial(vector_inputs, plan.dataset))
    by_split = score(head_model.predict_stream(vectors, spec.batch_size), spec, set(plan.splits.values()))
    results = {name: by_split[split] for name, split in plan.splits.items()}
    log_scores(results, plan.splits)
    return results


def fine_tune(spark, s: Settings, net, plan: TransferPlan, classes: list[str], table_version: int):
    """Base + head trained on the train split's images with the top `plan.fine_tune` blocks
    unfrozen, empty images left out unless `plan.include_empty`; returns (the SparkModel, empty
    images left out)."""
    from orchard.spark_app import model as keras_model  # noqa: PLC0415
    from orchard.spark_app import pretrained  # noqa: PLC0415

    pretrained.unfreeze_top(net, plan.fine_tune, plan.learning_rate / 10)
    pairs, _ = stage_images(spark, s, plan.dataset, plan.train_split, plan.images_per_partition, as_of=table_version)
    skipped, excluded = spark.sparkContext.accumulator(0), spark.sparkContext.accumulator(0)
    body = partial(
        labelled_examples,
        s,
        tuple(classes),
        "efficientnet",
        pretrained.INPUT_SIZE,
        skipped=skipped,
        include_empty=plan.include_empty,
        excluded=excluded,
    )
    log.info("fine-tuning the top %d blocks of %s, %d epochs", plan.fine_tune, plan.base, plan.fine_tune_epochs)
    workers = executor_count(spark)
    tuned = keras_model.train_elephas(net, pairs.mapPartitions(body), plan.fine_tune_epochs, plan.batch_size, workers)
    log_left_out(skipped.value, excluded.value, plan.include_empty)
    return tuned, excluded.value


def check_plan(plan: TransferPlan) -> None:
    """ConfigError for a base Orchard cannot build or a fine-tune depth the base does not have."""
    from orchard.spark_app import pretrained  # noqa: PLC0415

    if plan.base not in BASES:
        raise ConfigError(f"unknown --base {plan.base!r}; available: {', '.join(BASES)}")
    if not 0 <= plan.fine_tune <= pretrained.BLOCKS:
        raise ConfigError(f"--fine-tune takes 0..{pretrained.BLOCKS} blocks, got {plan.fine_tune}")


def run_transfer(spark, s: Settings, plan: TransferPlan, as_of: int | None = None) -> dict:
    """Train, save, evaluate and register a transfer version; returns its summary (the registry
    document, version, model_uri, and `base_forward_passes`: images embedded by the base in this run)."""
    from orchard.spark_app import model as keras_model  # noqa: PLC0415

    check_plan(plan)
    began = time.monotonic()
    version_read = as_of if as_of is not None else synced_snapshot(spark, s, plan.dataset)[0].version
    cached = base_embeddings(spark, s, plan.dataset, None, 64, plan.images_per_partition, version_read)
    classes = discover_classes(spark, s, plan.dataset, plan.train_split, version_read)
    if len(classes) < 2:
        raise ConfigError(f"{plan.dataset}/{plan.train_split}: found {len(classes)} labels; training needs 2 or more")
    net, head_model, tuned, excluded = train_model(spark, s, plan, cached, classes, version_read)
    version = registry.new_version(registry.FAMILY_TRANSFER, keras_model.weights_digest(net))
    card = save_version(s, net, transfer_card(version, classes, net, plan, version_read))
    if tuned is None:
        scores = evaluate_head(cached, PredictSpec.from_card(s, card, 64, version_read), head_model, plan)
    else:
        scores = evaluate_splits(
            spark, s, plan.dataset, tuned, card, plan.splits, 64, plan.images_per_partition, version_read
        )
    history = head_model.epoch_metrics + [{**m, "fine_tune": True} for m in (tuned.epoch_metrics if tuned else [])]
    doc = registry_document(
        plan.dataset, plan.splits, card, net, plan.epochs, scores, history, registry.FAMILY_TRANSFER, plan.base
    )
    extra = {"base_forward_passes": cached.computed, "fine_tuned_blocks": plan.fine_tune}
    if excluded is not None:  # fine-tuned on the images: empty ones left out (the frozen head reads every embedding)
        doc = {**doc, "excluded_empty": excluded}
    summary = register_trained(s, card, {**doc, "trained_on_version": version_read}, began, extra)
    return {**summary, **extra}


def train_model(spark, s: Settings, plan: TransferPlan, cached: BaseEmbeddings, classes: list[str], version: int):
    """(base + head Keras model, the head's SparkModel, the fine-tuning SparkModel or None, the empty
    images fine-tuning left out or None without fine-tuning)."""
    from orchard.spark_app import pretrained  # noqa: PLC0415

    head_model = fit_head(spark, cached, plan, classes)
    net = pretrained.compose(pretrained.load_lite0(pretrained.models_cache(s)), head_model.master_network)
    if not plan.fine_tune:
        return net, head_model, None, None
    tuned, excluded = fine_tune(spark, s, net, plan, classes, version)
    return net, head_model, tuned, excluded


def transfer_card(version: str, classes: list[str], net, plan: TransferPlan, table_version: int) -> dict:
    """labels.json of a transfer version: 224x224 images in 0..255 (scaled inside the model)."""
    return model_card(
        version,
        classes,
        net,
        "efficientnet",
        architecture=f"{plan.base}+head",
        base=plan.base,
        fine_tuned_blocks=plan.fine_tune,
        trained_on_version=table_version,
    )
