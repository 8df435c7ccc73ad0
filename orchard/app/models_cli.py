"""`orchard models list`: every registered model version, newest first, to compare them."""

from __future__ import annotations

import json

import click

from orchard.app.cli import settings_from
from orchard.core.errors import ExitStatus
from orchard.core.tables import format_table
from orchard.spark_app.registry import list_versions, promote

COLUMNS = (
    "version",
    "family",
    "base",
    "dataset",
    "test_accuracy",
    "training_seconds",
    "images_per_second",
    "trained_on_version",
)


@click.group()
def models() -> None:
    """Registered model versions (the models index and bucket)."""


@models.command("list")
@click.option("--dataset", default=None, help="Only versions trained on this dataset.")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 10_000))
@click.option("--json", "as_json", is_flag=True, help="A JSON list, newest first (for scripts).")
@click.pass_context
def list_models(ctx, dataset, limit, as_json) -> int:
    """Model versions, newest first: family, base, dataset, test accuracy, training time, images/s."""
    versions = list_versions(settings_from(ctx), dataset, limit)
    if as_json:
        click.echo(json.dumps(versions))
    elif versions:
        click.echo(format_table(COLUMNS, ([cell(name, v[name]) for name in COLUMNS] for v in versions)))
    else:
        click.echo("no model versions" + (f" for dataset {dataset}" if dataset else "") + " (orchard train)")
    return ExitStatus.OK


def cell(name: str, value) -> str:
    """One table cell: "-" for none, accuracies to 3 decimals, inference rates to 1."""
    if value is None:
        return "-"
    if name == "test_accuracy":
        return f"{value:.3f}"
    return f"{value:.1f}" if name == "images_per_second" else str(value)


@models.command("promote")
@click.argument("version")
@click.option("--json", "as_json", is_flag=True, help="The alias as JSON.")
@click.pass_context
def promote_model(ctx, version, as_json) -> int:
    """Make VERSION the model `orchard serve` answers with (picked up within seconds, no restart)."""
    body = promote(settings_from(ctx), version)
    click.echo(json.dumps(body) if as_json else f"{body['version']} serves (promoted {body['promoted_at']})")
    return ExitStatus.OK
