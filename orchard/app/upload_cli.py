"""`orchard dataset synth` and `orchard upload` (wired lazily by orchard.app.cli.SUBCOMMANDS)."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from datetime import UTC, datetime
from pathlib import Path

import click
from PIL import Image
from tqdm import tqdm

from orchard.app.cli import settings_from
from orchard.core.clients import es_client, s3_client
from orchard.core.errors import ExitStatus, OrchardError
from orchard.core.lake import normalise_split
from orchard.core.settings import Settings
from orchard.uploader.discovery import check_dataset, dataset_slug
from orchard.uploader.inspection import DEFAULT_MAX_PIXELS, Limits
from orchard.uploader.pipeline import Uploader, UploadOptions
from orchard.uploader.raster_synth import WRITERS, SceneSpec, write_scene
from orchard.uploader.report import Report, write_report
from orchard.uploader.synth import synthesize

log = logging.getLogger(__name__)


def progress_bar(unit: str, total: int | None = None):
    """A tqdm bar on a terminal, silent otherwise (CI logs stay clean)."""
    return tqdm(total=total, unit=unit, dynamic_ncols=True, disable=not sys.stderr.isatty())


@click.group()
def dataset() -> None:
    """Generate datasets locally (nothing can be downloaded on this machine)."""


def synth_size_options(classes: int, per_class: int, test_per_class: int, min_classes: int = 1, min_images: int = 0):
    """--classes, --per-class and --test-per-class of a synthetic dataset, with these defaults and minimums."""

    def decorate(func):
        for name, default, minimum, help_text in reversed(
            [
                (
                    "--classes",
                    classes,
                    min_classes,
                    "Fruit classes (20 templates, then numbered colour/size variants).",
                ),
                ("--per-class", per_class, min_images, "Train images per class (Training/)."),
                ("--test-per-class", test_per_class, min_images, "Test images per class (Test/)."),
            ]
        ):
            upper = 1000 if name == "--classes" else None
            kind = click.IntRange(minimum, upper)
            func = click.option(name, type=kind, default=default, show_default=True, help=help_text)(func)
        return func

    return decorate


@dataset.command()
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@synth_size_options(classes=10, per_class=50, test_per_class=20)
@click.option(
    "--size", type=click.IntRange(16, 1024), default=100, show_default=True, help="Side of the square images in pixels."
)
@click.option("--seed", type=int, default=0, show_default=True, help="Same seed and options -> byte-identical files.")
@click.option(
    "--workers",
    type=click.IntRange(1, 64),
    default=min(4, os.cpu_count() or 1),
    show_default=True,
    help="Generator processes (the output does not depend on it).",
)
@click.pass_context
def synth(
    ctx: click.Context, out: Path, classes: int, per_class: int, test_per_class: int, size: int, seed: int, workers: int
) -> int:
    """Write a Fruits-360-like dataset to OUT: OUT/Training/<Class>/<i>_<size>.jpg and OUT/Test/...

    JPEGs of one fruit on a white background: per-class shape, colour, texture, stem and size
    range; random rotation, scale, lighting and noise, so classes overlap a little. Existing
    identical files are left untouched.
    """
    total = classes * (per_class + test_per_class)
    with progress_bar("img", total) as bar:
        summary = synthesize(out, classes, per_class, test_per_class, size, seed, workers, progress=bar.update)
    click.echo(
        f"wrote {summary.files} images ({summary.bytes / 1e6:.1f} MB) of {len(summary.classes)} classes to {out}"
    )
    return ExitStatus.OK


@dataset.command()
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--height", type=click.IntRange(1), default=4096, show_default=True, help="Rows (pixels).")
@click.option("--width", type=click.IntRange(1), default=4096, show_default=True, help="Columns (pixels).")
@click.option("--bands", type=click.IntRange(1, 64), default=6, show_default=True, help="Bands (Sentinel-2-like).")
@click.option(
    "--dtype",
    type=click.Choice(["uint16", "float32", "uint8"]),
    default="uint16",
    show_default=True,
    help="Sample type: reflectance x 10000 for integers, 0..1 for float32.",
)
@click.option(
    "--tile", type=click.IntRange(16), default=256, show_default=True, help="TIFF tile side (a multiple of 16)."
)
@click.option("--cell", type=click.IntRange(1), default=512, show_default=True, help="Land-cover cell side (pixels).")
@click.option("--seed", type=int, default=0, show_default=True, help="Same seed and options -> byte-identical files.")
def raster(out: Path, height: int, width: int, bands: int, dtype: str, tile: int, cell: int, seed: int) -> int:
    """Write a satellite-like scene to OUT (.tif: tiled GeoTIFF, BigTIFF over 4 GiB; .npy), streamed:
    memory stays at one tile or strip whatever the size (orchard/uploader/raster_synth.py).

    A grid of land-cover cells (water, forest, crop, urban, bare, and no-data) with per-class
    reflectances per band, a brightness gradient and sensor noise.
    """
    if tile % 16:
        raise click.BadParameter("TIFF tiles are a multiple of 16 pixels", param_hint="--tile")
    if out.suffix.lower() not in WRITERS:
        raise click.BadParameter(f"{out}: write a scene as {', '.join(WRITERS)}", param_hint="OUT")
    spec = SceneSpec(height, width, bands, dtype, tile, cell, seed)
    with progress_bar("row", height) as bar:
        write_scene(spec, out, progress=bar.update)
    click.echo(f"wrote a {height}x{width}x{bands} {dtype} scene ({spec.nbytes / 2**30:.2f} GiB of pixels) to {out}")
    return ExitStatus.OK


@click.command()
@click.argument("source", type=click.Path(exists=True, path_type=Path))
@click.option(
    "--dataset",
    "dataset_name",
    default=None,
    help="Dataset name, the first part of every key [default: SOURCE's name, slugified].",
)
@click.option(
    "--split",
    "default_split",
    default="train",
    show_default=True,
    help="Split of files not under a split folder (train, test, val).",
)
@click.option(
    "--labels",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Labels of .npy stacks, one per row: a 1-D .npy or a text file, one label per line.",
)
@click.option(
    "--workers", type=click.IntRange(1, 64), default=8, show_default=True, help="Parallel inspections and transfers."
)
@click.option(
    "--batch-size",
    type=click.IntRange(1, 100_000),
    default=256,
    show_default=True,
    help="Items planned and indexed together.",
)
@click.option("--strict", is_flag=True, help="Stop at the first failure (nothing after it is written).")
@click.option(
    "--report",
    "report_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Where to write the JSON report [default: $ORCHARD_HOME/reports/upload-<dataset>-<time>.json].",
)
@click.option(
    "--max-pixels",
    type=click.IntRange(0),
    default=None,
    help="Decompression-bomb limit in pixels per image; 0 = none [default: Pillow's, 89.5 Mpx]. Raster "
    "TIFFs and .npy above it are accepted (infer reads them by tiles) unless a TIFF declares over 200x "
    "its bytes in samples.",
)
@click.option(
    "--no-table",
    "table",
    is_flag=True,
    flag_value=False,
    default=True,
    help="Leave the images table to `orchard lake sync` (e.g. when another cluster is its one writer).",
)
@click.pass_context
def upload(
    ctx: click.Context,
    source: Path,
    dataset_name: str | None,
    default_split: str,
    labels: Path | None,
    workers: int,
    batch_size: int,
    strict: bool,
    report_path: Path | None,
    max_pixels: int | None,
    table: bool,
) -> int:
    """Upload SOURCE into the images bucket and index every object in Elasticsearch.

    SOURCE is a class-per-folder tree ([<split>/]<label>/<file>, e.g. Fruits-360's
    Training/<label>/*.jpg), or a folder / file of .npy stacks with --labels. Keys are
    <dataset>/<split>/<label>/<file>. Re-running uploads and rewrites nothing; an interrupted
    run resumes. The run ends with the images table up to date (its rows MERGEd as objects are
    stored), so the next Spark stage reads it without syncing first. Exit status 0 if nothing
    failed, 1 otherwise (see the JSON report).
    """
    name, split = check_upload_args(source, dataset_name, default_split, labels)
    limit = DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels
    allow_large_images(limit)
    s = settings_from(ctx)
    options = UploadOptions(name, split, labels, workers, batch_size, strict, Limits(max_pixels=limit), table)
    report = run_upload(s, options, source, report_path or default_report_path(s.home, name))
    return ExitStatus.FAILURES if report.failed else ExitStatus.OK


def check_upload_args(source: Path, dataset_name: str | None, split: str, labels: Path | None) -> tuple[str, str]:
    """(dataset name, normalised split) or click.BadParameter naming the flag."""
    name = dataset_name or dataset_slug(source.absolute().stem if source.is_file() else source.absolute().name)
    try:
        check_dataset(name)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--dataset") from None
    normal = normalise_split(split)
    if normal is None:
        raise click.BadParameter(f"unknown split {split!r} (train, test or val)", param_hint="--split")
    if source.is_file() and labels is None:
        raise click.BadParameter("a single file is uploaded as an .npy stack: give --labels", param_hint="SOURCE")
    return name, normal


def run_upload(s: Settings, options: UploadOptions, source: Path, report_path: Path) -> Report:
    """Run the upload with a progress bar; print the summary; the report is written even if interrupted."""
    with progress_bar("file") as bar:
        uploader = Uploader(s, options, s3_client(s), es_client(s), progress=bar)
        try:
            report = uploader.run(source)
        except (KeyboardInterrupt, OrchardError):
            if uploader.report is not None:  # keep what was accounted so far
                uploader.report.interrupted = True
                log.error(
                    "partial report (%s): %s", uploader.report.summary(), write_report(uploader.report, report_path)
                )
            raise
    click.echo(report.summary())
    click.echo(f"report: {write_report(report, report_path)}")
    return report


def allow_large_images(max_pixels: int) -> None:
    """Let --max-pixels be the only pixel limit: Pillow's global one would refuse > 2x its default."""
    Image.MAX_IMAGE_PIXELS = None
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
    log.debug("decompression-bomb limit: %s pixels", max_pixels or "none")


def default_report_path(home: Path, dataset_name: str) -> Path:
    """$ORCHARD_HOME/reports/upload-<dataset>-<UTC time>.json"""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    return home / "reports" / f"upload-{dataset_name}-{stamp}.json"
