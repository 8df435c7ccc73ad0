"""`orchard predict FILE...`: top-k labels of local image files with a registered model version
or a pretrained ImageNet base, in this process (no Spark; orchard.spark_app.local_prediction)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import click

from orchard.app.cli import settings_from
from orchard.core.errors import ExitStatus, ItemsFailed
from orchard.spark_app.local_prediction import FilePrediction, predict_files

log = logging.getLogger(__name__)


@click.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--model",
    "version",
    required=True,
    help="Model version id (see the models index), or imagenet:efficientnet-lite0 (ImageNet's 1000 classes).",
)
@click.option("--top", default=5, show_default=True, type=click.IntRange(1, 100), help="Labels per file.")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(1))
@click.option("--json", "as_json", is_flag=True, help="One JSON object per file and line.")
@click.pass_context
def predict(ctx, files, version, top, batch_size, as_json) -> int:
    """Predict local image files with a model version: top labels and probabilities per file."""
    s = settings_from(ctx)
    errors = 0
    for prediction in predict_files(s, version, files, batch_size, top):
        click.echo(json.dumps(prediction.as_dict()) if as_json else as_line(prediction))
        if prediction.error is not None:
            errors += 1
            log.error("%s: %s", prediction.file, prediction.error)
    if errors:
        raise ItemsFailed(f"{errors} of {len(files)} files could not be predicted")
    return ExitStatus.OK


def as_line(prediction: FilePrediction) -> str:
    """`FILE: label 0.93, label 0.04, ...` (or `FILE: error: reason`)."""
    if prediction.error is not None:
        return f"{prediction.file}: error: {prediction.error}"
    return f"{prediction.file}: " + ", ".join(f"{label} {p:.3f}" for label, p in prediction.top)
