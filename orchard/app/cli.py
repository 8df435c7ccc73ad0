"""The `orchard` command line: `main(argv) -> int`, with expected errors mapped to exit codes here.

Subcommands live beside the code they drive (orchard.app.stack_cli, orchard.app.upload_cli, orchard.app.spark_cli) and
are imported only when invoked, so `orchard --help` and `orchard stack status` never load
TensorFlow or Spark.
"""

from __future__ import annotations

import importlib
import logging
import sys
from typing import Any

import click

from orchard.core.errors import ExitStatus, OrchardError
from orchard.core.settings import Settings, load_settings

log = logging.getLogger("orchard")

# name -> "module:attribute" of a click command, imported on first use.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "stack": ("orchard.app.stack_cli:stack", "run the native stack: up, down, status, logs"),
    "setup": ("orchard.app.stack_cli:setup", "create buckets, index templates and indices (re-runnable)"),
    "dataset": ("orchard.app.upload_cli:dataset", "generate datasets (synth: a Fruits-360-like tree)"),
    "upload": ("orchard.app.upload_cli:upload", "upload a dataset into MinIO and index it in Elasticsearch"),
    "lake": ("orchard.app.lake_cli:lake", "the lake's Delta tables: sync, optimize, vacuum, history, export"),
    "train": ("orchard.app.spark_cli:train", "train the CNN with Elephas on the Spark cluster"),
    "infer": ("orchard.app.spark_cli:infer", "predict every image and write predictions to Elasticsearch"),
    "features": ("orchard.app.spark_cli:features", "embeddings + PCA to Parquet and Elasticsearch"),
    "reindex": ("orchard.app.lake_cli:reindex", "rebuild the images index from the lake, swap it in atomically"),
    "models": ("orchard.app.models_cli:models", "registered model versions: list, promote (the serving model)"),
    "predict": ("orchard.app.predict_cli:predict", "top labels of local image files with a model version (no Spark)"),
    "serve": ("orchard.app.serve_cli:serve", "the REST API: predictions for posted photos, the lake's images"),
    "search": ("orchard.app.spark_cli:search", "find images by label, prediction or similarity"),
    "demo": ("orchard.app.demo:demo", "the main job end to end, with an HTML report"),
}


class LazyGroup(click.Group):
    """A click group whose subcommands are imported only when they run."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(SUBCOMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in SUBCOMMANDS:
            return None
        target, _ = SUBCOMMANDS[cmd_name]
        module_name, attr = target.split(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.split(".")[0] == "orchard":
                return None
            raise
        return getattr(module, attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, SUBCOMMANDS[name][1]) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


def settings_from(ctx: click.Context, **overrides: Any) -> Settings:
    """Build the run's settings once: global flags, then command flags, win over the env."""
    root = ctx.find_root()
    if root.obj is None or overrides:
        merged = {**(root.meta.get("orchard.overrides") or {}), **overrides}
        root.obj = load_settings(**merged)
    return root.obj


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--home",
    type=click.Path(file_okay=False),
    default=None,
    help="State directory of the native stack [env ORCHARD_HOME].",
)
@click.option("-v", "--verbose", count=True, help="More logging (-vv for debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
@click.version_option(package_name=None, version=__import__("orchard").__version__)
@click.pass_context
def cli(ctx: click.Context, home: str | None, verbose: int, quiet: bool) -> None:
    """Orchard: a distributed image lake on MinIO, Elasticsearch and Spark."""
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    configure_logging(level)
    ctx.meta["orchard.overrides"] = {"home": home}


def configure_logging(level: int) -> None:
    """Log to stderr with timestamps; quiet the chatty HTTP libraries."""
    logging.basicConfig(
        level=level,
        stream=sys.stderr,
        force=True,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("urllib3", "elastic_transport", "py4j", "tensorflow", "absl"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


def main(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit status; expected errors become one line on stderr."""
    try:
        result = cli.main(args=argv, prog_name="orchard", standalone_mode=False)
    except click.exceptions.Exit as exc:
        return int(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        return ExitStatus.USAGE
    except click.exceptions.Abort:
        return ExitStatus.INTERRUPTED
    except KeyboardInterrupt:
        log.error("interrupted")
        return ExitStatus.INTERRUPTED
    except OrchardError as exc:
        log.error("%s", exc)
        return exc.exit_status
    return int(result) if isinstance(result, int) else ExitStatus.OK


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())
