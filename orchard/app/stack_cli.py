"""`orchard stack up | down | status | logs`."""

from __future__ import annotations

import json
import subprocess

import click

from orchard.app.cli import settings_from
from orchard.core import tables
from orchard.core.errors import ExitStatus
from orchard.core.settings import with_credentials_file
from orchard.spark_app import class_archive
from orchard.stack import launcher
from orchard.stack.setup import setup_stack


@click.group()
def stack() -> None:
    """Run the native stack: 4 MinIO + load balancer, 3 Elasticsearch, Spark master + workers."""


def print_table(rows: list[launcher.ServiceStatus]) -> None:
    """The status rows as an aligned table on stdout."""
    header = ("SERVICE", "PID", "PORT", "HEALTH", "RSS_MB")
    lines = [(r.service, str(r.pid or "-"), str(r.port), r.health, f"{r.rss_mb:.0f}") for r in rows]
    lines.append(("total", "", "", "", f"{sum(r.rss_mb for r in rows):.0f}"))
    click.echo(tables.format_table(header, lines))


@stack.command()
@click.option("--es-heap", default=None, help="Heap of each Elasticsearch node [ORCHARD_ES_HEAP, 1g].")
@click.option("--workers", "spark_workers", type=int, default=None, help="Spark workers [ORCHARD_SPARK_WORKERS, 2].")
@click.option(
    "--worker-memory",
    "spark_worker_memory",
    default=None,
    help="Memory of each Spark worker [ORCHARD_SPARK_WORKER_MEMORY, 4g].",
)
@click.option(
    "--timeout",
    "health_timeout",
    type=float,
    default=None,
    help="Seconds to wait for health [ORCHARD_HEALTH_TIMEOUT, 300].",
)
@click.pass_context
def up(ctx: click.Context, **flags) -> int:
    """Start every stopped service and wait until the whole stack is healthy."""
    settings = settings_from(ctx, **flags)
    print_table(launcher.up(settings))
    # Once per JDK and jar set (1-2 min): every later Spark application starts seconds faster.
    class_archive.ensure(with_credentials_file(settings))  # the keys `up` may have just generated
    return ExitStatus.OK


@stack.command()
@click.option("--purge", is_flag=True, help="Also delete data, logs and generated config.")
@click.pass_context
def down(ctx: click.Context, purge: bool) -> int:
    """Stop the processes `up` started (data is kept unless --purge)."""
    stopped = launcher.down(settings_from(ctx), purge=purge)
    click.echo(f"stopped {len(stopped)} process(es)")
    return ExitStatus.OK


@stack.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> int:
    """Service, pid, port and health of every process; exit 4 if any is not healthy."""
    rows = launcher.status(settings_from(ctx))
    if as_json:
        click.echo(json.dumps(launcher.status_dicts(rows), indent=2))
    else:
        print_table(rows)
    healthy = all(r.health == "healthy" for r in rows)
    return ExitStatus.OK if healthy else ExitStatus.UNAVAILABLE


@stack.command()
@click.argument("service")
@click.option("-n", "--lines", default=50, show_default=True, help="Lines to show.")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines.")
@click.pass_context
def logs(ctx: click.Context, service: str, lines: int, follow: bool) -> int:
    """Tail the log of SERVICE (e.g. minio1, es02, spark-worker-1, minio-lb)."""
    path = launcher.log_path(settings_from(ctx), service)
    argv = ["tail", "-n", str(lines), *(["-F"] if follow else []), str(path)]
    return subprocess.call(argv)


@click.command()
@click.pass_context
def setup(ctx: click.Context) -> int:
    """Create the buckets, index templates and indices of a running stack (native or compose)."""
    setup_stack(settings_from(ctx))
    click.echo("setup done")
    return ExitStatus.OK
