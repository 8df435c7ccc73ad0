"""`orchard lake sync | optimize | vacuum | history | export`: the lake's Delta tables
(orchard.spark_app.table); and `orchard reindex`, the images index rebuilt from them."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import click

from orchard.app.cli import settings_from
from orchard.app.spark_cli import echo_summary, extra_conf
from orchard.core import table_log
from orchard.core.errors import ExitStatus, ItemsFailed
from orchard.core.settings import Settings
from orchard.core.tables import format_table
from orchard.spark_app import export, table
from orchard.spark_app import reindex as rebuild
from orchard.spark_app.session import spark_session


@click.group()
def lake() -> None:
    """The images table (Delta Lake): derived from the images bucket, read by every Spark stage."""


conf_option = click.option("--conf", "conf", multiple=True, metavar="KEY=VALUE", help="Extra Spark conf (repeatable).")
json_option = click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")


def on_table(ctx: click.Context, app_name: str, conf: tuple[str, ...], job: Callable[[Any, Settings], Any]) -> Any:
    """`job(spark, settings)` in a Spark session named `app_name` (with the --conf flags); its result."""
    s = settings_from(ctx)
    with spark_session(s, app_name, extra_conf(conf)) as spark:
        return job(spark, s)


@lake.command()
@click.option("--dataset", default=None, help="Only this dataset (default: the whole bucket).")
@click.option(
    "--full",
    is_flag=True,
    help="List and compare every key and ETag even when the object counts and times say the table is up to date.",
)
@conf_option
@json_option
@click.pass_context
def sync(ctx, dataset, full, conf, as_json) -> int:
    """Bring the table up to date with the bucket: new, overwritten and deleted objects, in one MERGE
    by key (re-runnable). First the check every stage makes (objects counted against the table's
    statistics, no Spark application): nothing more when it says the table is up to date."""
    quick = None if full else table.check_synced(settings_from(ctx), dataset)
    if quick is not None:
        result = quick.as_dict()
    else:
        app = f"orchard-lake-sync-{dataset or 'all'}"
        result = on_table(ctx, app, conf, lambda spark, s: table.sync(spark, s, dataset).as_dict())
    echo_summary(result, as_json, ["listed", "added", "skipped", "failed", "table_version", "checked"])
    if result["failed"]:
        raise ItemsFailed(f"{result['failed']} objects were not added ({', '.join(result['failure_reasons'])})")
    return ExitStatus.OK


@lake.command()
@click.option("--dataset", default=None, help="Only this dataset's partition (default: all).")
@conf_option
@json_option
@click.pass_context
def optimize(ctx, dataset, conf, as_json) -> int:
    """Compact the table's small files (to ORCHARD_LAKE_TARGET_FILE_MB); readers keep working."""
    result = on_table(ctx, "orchard-lake-optimize", conf, lambda spark, s: table.optimize(spark, s, dataset))
    echo_summary(result, as_json, list(result))
    return ExitStatus.OK


@lake.command()
@click.option(
    "--retain-hours",
    type=click.IntRange(0),
    default=None,
    help="Keep files removed less than this long ago (default ORCHARD_LAKE_RETENTION_HOURS, 168).",
)
@conf_option
@json_option
@click.pass_context
def vacuum(ctx, retain_hours, conf, as_json) -> int:
    """Delete table files no version within the retention period needs."""
    result = on_table(ctx, "orchard-lake-vacuum", conf, lambda spark, s: table.vacuum(spark, s, retain_hours))
    echo_summary(result, as_json, list(result))
    return ExitStatus.OK


@lake.command()
@click.option("--limit", default=20, show_default=True, type=click.IntRange(1, 10000))
@json_option
@click.pass_context
def history(ctx, limit, as_json) -> int:
    """The table's latest versions: version, time, operation, rows and files added (read from the
    Delta log directly: no Spark application)."""
    rows = table_log.history(settings_from(ctx), limit)
    if as_json:
        click.echo(json.dumps(rows))
    else:
        header = ["version", "timestamp", "operation", "rows_added", "files_added"]
        click.echo(format_table(header, [[str(r[h]) for h in header] for r in rows]))
    return ExitStatus.OK


@lake.command("export")
@click.option("--dataset", required=True, help="The dataset to export.")
@click.option("--format", "fmt", type=click.Choice(export.FORMATS), default="parquet", show_default=True)
@click.option("--model", "version", default=None, help="Whose predictions and PCA (default: the serving model).")
@click.option(
    "--output",
    default=None,
    help="Where to write: an s3a:// URI, or a directory every Spark worker shares "
    "(default s3a://<features bucket>/<dataset>/<version>/export_<format>/, overwritten).",
)
@conf_option
@json_option
@click.pass_context
def export_(ctx, dataset, fmt, version, output, conf, as_json) -> int:
    """Labels, predictions and PCA coordinates of a dataset, one row per image (id, key, split,
    label, model_version, predicted_label, confidence, prediction_error, predicted_at, pca_x, pca_y)."""
    app = f"orchard-lake-export-{dataset}"
    result = on_table(ctx, app, conf, lambda spark, s: export.export_dataset(spark, s, dataset, fmt, version, output))
    echo_summary(result, as_json, ["dataset", "model_version", "rows", "predicted", "with_pca", "output"])
    return ExitStatus.OK


@click.command()
@click.option("--dataset", default=None, help="Rebuild only this dataset's documents (the others are copied).")
@click.option("--model", "version", default=None, help="Predictions of this version (default: each image's newest).")
@click.option("--drop-old", is_flag=True, help="Delete the index the alias pointed at (default: kept).")
@conf_option
@json_option
@click.pass_context
def reindex(ctx, dataset, version, drop_old, conf, as_json) -> int:
    """Rebuild the images index from the lake (images, predictions and features tables) into a new
    numbered index, check its count, and move the alias to it atomically (docs/lake.md)."""
    app = f"orchard-reindex-{dataset or 'all'}"
    result = on_table(ctx, app, conf, lambda spark, s: rebuild.reindex(spark, s, dataset, version, drop_old))
    keys = ["index", "previous", "documents", "rebuilt", "copied", "with_prediction", "with_embedding"]
    echo_summary(result, as_json, [*keys, "documents_per_second"])
    return ExitStatus.OK
