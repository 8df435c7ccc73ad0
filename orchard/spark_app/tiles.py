"""Large rasters cut into tiles: what `orchard infer` predicts of a TIFF or .npy raster of more than
`tile_min_pixels` pixels.

The driver only selects those rows of the images table (a filter on their width, height and format
columns) and turns each into strips of its tile grid (`BandJob`s: a row of tiles, split so that a
strip stays under `BAND_MAX_PIXELS`), spread over the cluster. Executors read each strip with ranged
requests (orchard.core.rasters.read_raster_window over orchard.core.ranged.RangedObject): an
executor holds one strip at a time, never the raster. Every tile is then an image like any other
(decode, conversion, model) whose document is created by its first prediction: the raster's key
and labels, the tile's grid place, pixel window and geographic bounds (`tile_fields`). After the
writes, each raster's document gets a summary of its tiles' predicted classes (`count_tiles`,
`summary_doc`; reduced by key and written from the executors by orchard.spark_app.infer.write_summaries).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from functools import partial
from typing import Any

from orchard.core.formats import NPY, TIFF
from orchard.core.lake import Column, Field, Prediction, Tile, Tiles
from orchard.core.rasters import tile_bands
from orchard.core.settings import Settings
from orchard.spark_app.images import BandJob, ImageRef, table_ref

BAND_MAX_PIXELS = 8 * 2**20  # a strip of a wide raster is cut into runs of tiles of at most this many pixels
JOB_COLUMNS = (
    Column.ID,
    Column.KEY,
    Column.DATASET,
    Column.SPLIT,
    Column.LABEL,
    Column.FORMAT,
    Column.WIDTH,
    Column.HEIGHT,
)


def is_tiled(s: Settings):
    """A boolean Spark column: the row is a raster to tile (TIFF or .npy of more than tile_min_pixels)."""
    from pyspark.sql import functions as F

    pixels = F.col(Column.WIDTH).cast("long") * F.col(Column.HEIGHT).cast("long")
    tiled = (pixels > s.tile_min_pixels) & F.col(Column.FORMAT).isin(TIFF, NPY)
    return F.coalesce(tiled, F.lit(False))  # a row without width or height is an image, not tiled


def band_jobs(spark, s: Settings, rasters_df):
    """RDD of (raster ref, BandJob): every strip of every raster of `rasters_df` (rows of JOB_COLUMNS),
    spread round-robin over twice the cluster's cores (a raster's strips are read in parallel)."""
    cut = partial(raster_jobs, s.tile_size, s.tile_stride)
    jobs = rasters_df.select(*JOB_COLUMNS).rdd.flatMap(cut)
    return jobs.repartition(2 * spark.sparkContext.defaultParallelism)


def raster_jobs(size: int, stride: int, row) -> Iterator[tuple[ImageRef, BandJob]]:
    """flatMap body: (ref, BandJob) per strip of one raster row."""
    ref = table_ref(row)
    for band in tile_bands(int(row[7]), int(row[6]), size, stride, max(BAND_MAX_PIXELS, size * size)):
        yield ref, BandJob(row[5], band)


def tile_fields(ref: ImageRef) -> dict[str, Any]:
    """The fields a tile's document is created with (beside its prediction)."""
    place = ref.tile
    assert place is not None, "tile_fields of an image that is not a tile"
    window = place.window
    tile: dict[str, Any] = {
        Tile.PARENT: place.parent,
        Tile.ROW: window.row,
        Tile.COL: window.col,
        Tile.TOP: window.top,
        Tile.LEFT: window.left,
        Tile.HEIGHT: window.height,
        Tile.WIDTH: window.width,
    }
    if place.bounds:
        tile[Tile.BOUNDS] = list(place.bounds)
    return {
        Field.ID: ref.id,
        Field.DATASET: ref.dataset,
        Field.SPLIT: ref.split,
        Field.LABEL: ref.label,
        Field.KEY: ref.key,
        Field.WIDTH: window.width,
        Field.HEIGHT: window.height,
        Field.TILE: tile,
    }


TileCount = tuple[int, int, int]  # tiles, last grid row, last grid column


def count_tiles(pairs: Iterable[tuple[ImageRef, dict]], counts: dict[tuple[str, str], TileCount]) -> Iterator:
    """Pass (ref, prediction) pairs through, counting each predicted tile by (raster id, label)."""
    for ref, prediction in pairs:
        label = prediction.get(Prediction.LABEL)
        if ref.tile is not None and label is not None:
            key = (ref.tile.parent, label)
            n, row, col = counts.get(key, (0, 0, 0))
            counts[key] = (n + 1, max(row, ref.tile.window.row), max(col, ref.tile.window.col))
        yield ref, prediction


def add_counts(a: TileCount, b: TileCount) -> TileCount:
    """Reducer of tile counts."""
    return a[0] + b[0], max(a[1], b[1]), max(a[2], b[2])


def summary_doc(version: str, classes: Iterable[tuple[str, TileCount]]) -> dict[str, Any]:
    """A raster's `tiles` object from its (label, count) pairs."""
    ranked = sorted(classes, key=lambda item: (-item[1][0], item[0]))
    return {
        Tiles.COUNT: sum(count[0] for _, count in ranked),
        Tiles.ROWS: max(count[1] for _, count in ranked) + 1,
        Tiles.COLS: max(count[2] for _, count in ranked) + 1,
        Tiles.CLASSES: [{Tiles.LABEL: label, Tiles.COUNT: count[0]} for label, count in ranked],
        Tiles.LABEL: ranked[0][0],
        Tiles.MODEL_VERSION: version,
    }


def summary_action(index: str, version: str, parent: str, classes: Iterable[tuple[str, TileCount]]) -> dict:
    """The bulk partial update that sets a raster's `tiles` summary."""
    return {
        "_op_type": "update",
        "_index": index,
        "_id": parent,
        "retry_on_conflict": 3,
        "doc": {Field.TILES: summary_doc(version, classes)},
    }
