"""`orchard train`: the default CNN trained with Elephas on the train split, evaluated on the test split,
saved and registered as a model version.

Labels come from the key layout (`<dataset>/<split>/<label>/<file>`); the class list is the sorted
set of train labels (a handful of strings: the only thing collected besides counts and weights).
Elephas' synchronous mode materialises each worker's partition as one array (its design): fine for
thumbnails (100x100x3 float32 = 120 kB per image), but the train split must fit in the executors.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Iterable, Iterator
from functools import partial
from pathlib import Path

import numpy as np

from orchard.core.errors import ConfigError
from orchard.core.lake import TEST, TRAIN, Column, utc_timestamp
from orchard.core.rasters import DEFAULT_CONVERSION, Conversion
from orchard.core.settings import Settings
from orchard.spark_app import registry
from orchard.spark_app.images import measured_rows
from orchard.spark_app.infer import PredictSpec, evaluate
from orchard.spark_app.preprocess import label_map, one_hot, prepare, preprocessor
from orchard.spark_app.session import executor_count
from orchard.spark_app.table import read_images, stage_images, synced_snapshot

log = logging.getLogger(__name__)

PREPROCESSING = "scale01"  # the default CNN's preprocessing (recorded in its card)


def discover_classes(spark, s: Settings, dataset: str, split: str, version: int) -> list[str]:
    """Sorted distinct labels of a split at a table version (the label column only)."""
    rows = read_images(spark, s, dataset, split, version).select(Column.LABEL).distinct().collect()
    return sorted(row[0] for row in rows if row[0])  # one row per class


def labelled_examples(
    s: Settings,
    classes: tuple[str, ...],
    preprocessing: str,
    size: tuple[int, int],
    rows: Iterable,
    skipped=None,
    include_empty: bool = False,
    excluded=None,
    conversion: Conversion = DEFAULT_CONVERSION,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """mapPartitions body: (preprocessed image, one-hot label) per decodable image of a known class;
    empty images (black, constant, no-data: orchard.core.quality) are left out unless `include_empty`.
    `skipped` and `excluded` (accumulators) count the undecodable or unknown and the empty images;
    `conversion` chooses the bands (as many channels) and scales the values (orchard.core.rasters)."""
    index = label_map(classes)
    prep = preprocessor(preprocessing)
    channels = conversion.channels()
    for ref, array, _error, quality in measured_rows(rows, s, size, channels, not include_empty, conversion):
        if quality is not None and quality.empty:  # measured only when empty images are left out
            if excluded is not None:
                excluded.add(1)
            continue
        x = prepare(prep, array)[0] if array is not None and ref.label in index else None
        if x is None:  # undecodable (array None exactly when error is set), unknown label, or unusable
            if skipped is not None:
                skipped.add(1)
            continue
        yield x, one_hot(index[ref.label], len(classes))


def train_rdd(
    pairs_rdd,
    s: Settings,
    classes: list[str],
    skipped=None,
    include_empty: bool = False,
    excluded=None,
    conversion: Conversion = DEFAULT_CONVERSION,
):
    """RDD of (x, y) for Elephas from an RDD of (ref, content) pairs (empty images left out unless
    `include_empty`; bands and values by `conversion`)."""
    # TensorFlow: loaded only when a model is trained (the caller, fit, has loaded it already).
    from orchard.spark_app.model import DEFAULT_SIZE  # noqa: PLC0415

    body = partial(
        labelled_examples,
        s,
        tuple(classes),
        PREPROCESSING,
        DEFAULT_SIZE,
        skipped=skipped,
        include_empty=include_empty,
        excluded=excluded,
        conversion=conversion,
    )
    return pairs_rdd.mapPartitions(body)


def log_left_out(skipped: int, excluded: int, include_empty: bool) -> None:
    """Warn of undecodable train images; say how many empty ones training left out."""
    if skipped:
        log.warning("%d train images were skipped (undecodable)", skipped)
    if excluded:
        log.info("%d empty train images (black, constant or no-data) left out; --include-empty keeps them", excluded)
    elif not include_empty:
        log.info("no empty train images (black, constant or no-data) to leave out")


def fit(
    spark,
    s: Settings,
    dataset: str,
    split: str,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    images_per_partition: int,
    table_version: int,
    include_empty: bool = False,
    conversion: Conversion = DEFAULT_CONVERSION,
):
    """Train the default CNN with Elephas on the table at `table_version`, empty images left out
    unless `include_empty`, one input channel per band of `conversion`; returns (Elephas model,
    classes, workers, empty images left out)."""
    # TensorFlow: loaded only when a model is trained.
    from orchard.spark_app import model as keras_model  # noqa: PLC0415

    pairs, _ = stage_images(spark, s, dataset, split, images_per_partition, as_of=table_version)
    classes = discover_classes(spark, s, dataset, split, table_version)
    if len(classes) < 2:
        raise ConfigError(
            f"{dataset}/{split}: found {len(classes)} labels at table version {table_version}; "
            "training needs at least 2 (is the split name right?)"
        )
    workers = executor_count(spark)
    skipped, excluded = spark.sparkContext.accumulator(0), spark.sparkContext.accumulator(0)
    shape = (*keras_model.DEFAULT_SIZE, conversion.channels())
    net = keras_model.build_cnn(len(classes), input_shape=shape, learning_rate=learning_rate)
    log.info(
        "training %s (%d parameters) on %s/%s: %d classes, %d epochs, batch %d, %d Elephas workers",
        keras_model.ARCHITECTURE,
        net.count_params(),
        dataset,
        split,
        len(classes),
        epochs,
        batch_size,
        workers,
    )
    examples = train_rdd(pairs, s, classes, skipped, include_empty, excluded, conversion)
    spark_model = keras_model.train_elephas(net, examples, epochs, batch_size, workers)
    log_left_out(skipped.value, excluded.value, include_empty)
    return spark_model, classes, workers, excluded.value


def model_card(version: str, classes: list[str], net, preprocessing: str = PREPROCESSING, **extra) -> dict:
    """labels.json of a version trained here (`extra`: e.g. the base of a transfer version)."""
    # TensorFlow: loaded only when a model is trained (the caller has loaded it already).
    from orchard.spark_app import model as keras_model  # noqa: PLC0415

    return {
        "version": version,
        "classes": classes,
        "label_map": label_map(classes),
        "preprocessing": preprocessing,
        "architecture": keras_model.ARCHITECTURE,
        "model_file": registry.MODEL_FILE,
        **keras_model.describe(net),
        **extra,
    }


def save_version(s: Settings, net, card: dict) -> dict:
    """Upload a trained version's model file and card; returns the card with its `model_uri`."""
    # TensorFlow: loaded only when a model is trained (the caller has loaded it already).
    from orchard.spark_app import model as keras_model  # noqa: PLC0415

    version = card["version"]
    with tempfile.TemporaryDirectory(prefix="orchard-train-") as tmp:
        path = keras_model.save_model(net, Path(tmp) / registry.MODEL_FILE)
        registry.put_file(s, f"{version}/{registry.MODEL_FILE}", path)
    registry.put_json(s, f"{version}/{registry.LABELS_FILE}", card)
    return {**card, "model_uri": registry.uri(s, version, registry.MODEL_FILE)}


def split_metrics(scores: dict[str, dict]) -> dict[str, float]:
    """test/train accuracy and loss of an evaluation's {"train": ..., "test": ...} results."""
    return {
        "test_accuracy": scores["test"]["accuracy"],
        "test_loss": scores["test"]["loss"],
        "train_accuracy": scores["train"]["accuracy"],
        "train_loss": scores["train"]["loss"],
    }


def register_trained(s: Settings, card: dict, doc: dict, began: float, extra_metrics: dict) -> dict:
    """Register a trained, saved version (metrics.json + the models index); returns its summary:
    the registry document plus version and model_uri."""
    doc = {**doc, "training_seconds": round(time.monotonic() - began, 1)}  # data read, fit and evaluation
    metrics = {**doc["metrics"], "chance": 1 / len(card["classes"]), "epochs": doc["history"], **extra_metrics}
    registry.register(s, card["version"], card, {**metrics, "seconds": doc["training_seconds"]}, doc)
    return {**doc, "version": card["version"], "model_uri": card["model_uri"]}


def log_scores(results: dict[str, dict], splits: dict[str, str]) -> None:
    """One log line per evaluated split."""
    for name, split in splits.items():
        log.info(
            "%s split %r: accuracy %.4f, loss %.4f on %d images",
            name,
            split,
            results[name]["accuracy"],
            results[name]["loss"],
            results[name]["images"],
        )


def evaluate_splits(
    spark,
    s: Settings,
    dataset: str,
    spark_model,
    card: dict,
    splits: dict[str, str],
    batch_size: int,
    images_per_partition: int,
    table_version: int,
) -> dict[str, dict]:
    """Streaming evaluation of the trained model on named splits ({"train": "train", "test": "test"}),
    in one pass over the dataset at the table version it was trained on."""
    spec = PredictSpec.from_card(s, card, batch_size, table_version)
    pairs, _ = stage_images(spark, s, dataset, None, images_per_partition, as_of=table_version)
    by_split = evaluate(pairs, spec, spark_model, set(splits.values()))
    results = {name: by_split[split] for name, split in splits.items()}
    log_scores(results, splits)
    return results


def run_training(
    spark,
    s: Settings,
    dataset: str,
    train_split: str = TRAIN,
    test_split: str = TEST,
    epochs: int = 5,
    batch_size: int = 16,
    learning_rate: float = 1e-3,
    images_per_partition: int = 1024,
    as_of: int | None = None,
    include_empty: bool = False,
    conversion: Conversion = DEFAULT_CONVERSION,
) -> dict:
    """Train, save, evaluate and register a model version; returns the registry document.

    The images are the table's at `as_of` (default: the current version, after syncing the dataset
    first if the bucket differs, as every stage does); the version is recorded as the model's `trained_on_version`.
    Empty train images (orchard.core.quality) are left out unless `include_empty`, their number
    recorded as `excluded_empty`; evaluation scores every image. `conversion` (bands, scaling) is
    recorded in the card, which inference and serving apply."""
    # TensorFlow: loaded only when a model is trained.
    from orchard.spark_app import model as keras_model  # noqa: PLC0415

    began = time.monotonic()
    table_version = as_of if as_of is not None else synced_snapshot(spark, s, dataset)[0].version
    spark_model, classes, workers, excluded = fit(
        spark,
        s,
        dataset,
        train_split,
        epochs,
        batch_size,
        learning_rate,
        images_per_partition,
        table_version,
        include_empty,
        conversion,
    )
    net, history = spark_model.master_network, spark_model.epoch_metrics
    version = registry.new_version(registry.FAMILY_CNN, keras_model.weights_digest(net))
    card = model_card(version, classes, net, conversion=conversion.to_card(), trained_on_version=table_version)
    card = save_version(s, net, card)
    splits = {"train": train_split, "test": test_split}
    scores = evaluate_splits(spark, s, dataset, spark_model, card, splits, 64, images_per_partition, table_version)
    doc = {**registry_document(dataset, splits, card, net, epochs, scores, history), "excluded_empty": excluded}
    return register_trained(s, card, {**doc, "trained_on_version": table_version}, began, {"elephas_workers": workers})


def registry_document(
    dataset: str,
    splits: dict[str, str],
    card: dict,
    net,
    epochs: int,
    scores: dict,
    history: list[dict],
    family: str = registry.FAMILY_CNN,
    base: str | None = None,
) -> dict:
    """The models-index document of a trained version (fields of es_mappings/models.json);
    `splits` names the train and test splits ({"train": ..., "test": ...})."""
    if not scores["test"]["images"]:
        raise ConfigError(f"{dataset}/{splits['test']}: no test images to evaluate on")
    return {
        "family": family,
        "base": base,  # None: trained from scratch
        "created_at": utc_timestamp(timespec="seconds", zulu=False),
        "dataset": dataset,
        "train_split": splits["train"],
        "test_split": splits["test"],
        "classes": card["classes"],
        "num_classes": len(card["classes"]),
        "architecture": card["architecture"],
        "params": int(net.count_params()),
        "epochs": epochs,
        "train_images": scores["train"]["images"],
        "test_images": scores["test"]["images"],
        "metrics": {k: round(float(v), 6) for k, v in split_metrics(scores).items()},
        "history": json.loads(json.dumps(history)),
    }
