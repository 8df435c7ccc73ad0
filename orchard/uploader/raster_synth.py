"""A deterministic generator of large multi-band satellite-like scenes (GeoTIFF and .npy), written
as a stream: memory stays at one tile or strip whatever the raster's size (tests need rasters over
2 GiB, and no scene can be downloaded here).

The scene is a grid of land-cover cells (`cell` pixels square), each of one class of LAND_COVER or
no-data (0 in every band, declared as GDAL_NODATA), with per-class reflectances (x 10000, as
Sentinel-2 L2A stores them) per band, a smooth brightness gradient and sensor noise. Every
pixel depends only on (seed, its position): any window computes alone, in any order, and the same
arguments give byte-identical files.

GeoTIFF: tiled, one BigTIFF when over 4 GiB, georeferenced (ModelPixelScale, ModelTiepoint and a
GeoKeyDirectory naming a projected EPSG code) so tiles can carry geographic bounds.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile

from orchard.core.formats import BY_NAME
from orchard.core.rasters import GDAL_NODATA, GEOTIFF_PIXEL_SCALE, GEOTIFF_TIEPOINT

LAND_COVER = ("water", "forest", "crop", "urban", "bare")
NODATA_SHARE = 0.05  # cells that are no-data (a scene's edge, clouds masked out)
# Reflectance x 10000 of Sentinel-2 bands B2, B3, B4, B8, B11, B12 (blue, green, red, NIR, SWIR 1, 2):
# textbook spectral shapes (water dark in NIR, vegetation bright in NIR, ...), not fitted to anything.
SIGNATURES = np.array(
    [
        [600, 500, 300, 200, 100, 80],  # water
        [300, 500, 300, 3500, 1500, 700],  # forest
        [500, 800, 600, 2800, 2200, 1300],  # crop
        [1200, 1200, 1300, 1800, 2200, 2000],  # urban
        [1500, 1800, 2200, 2600, 3200, 2800],  # bare
    ],
    dtype=np.float64,
)
NOISE = 150.0  # sensor noise, reflectance x 10000
NOISE_BLOCK = 256  # noise is drawn per square of this side (a pixel's noise depends on its position only)
GEOTIFF_GEOKEYS = 34735  # GeoKeyDirectoryTag (the pixel scale, tie point and no-data tags: core.rasters)
BIGTIFF_BYTES = 4 * 1024**3 - 64 * 1024**2  # a classic TIFF addresses 4 GiB; keep a margin for tags


@dataclass(frozen=True)
class SceneSpec:
    """What to generate: size in pixels, bands, sample type, tile and cell sizes, seed, and where it lies."""

    height: int
    width: int
    bands: int = 6
    dtype: str = "uint16"
    tile: int = 256
    cell: int = 512
    seed: int = 0
    pixel_size: float = 10.0  # metres, as Sentinel-2's 10 m bands
    origin: tuple[float, float] = (500_000.0, 4_600_000.0)  # easting, northing of the top-left corner
    epsg: int = 32631  # WGS 84 / UTM zone 31N

    @property
    def nbytes(self) -> int:
        return self.height * self.width * self.bands * np.dtype(self.dtype).itemsize

    @property
    def cells(self) -> tuple[int, int]:
        """(rows, columns) of the land-cover grid."""
        return -(-self.height // self.cell), -(-self.width // self.cell)


def cell_seed(spec: SceneSpec, what: str, *position: int) -> int:
    """A seed for one cell or noise block (`what`) from the scene seed and its position (stable across runs)."""
    digest = hashlib.sha256(repr((spec.seed, what, *position)).encode()).digest()
    return int.from_bytes(digest[:8], "little")


def cell_class(spec: SceneSpec, row: int, col: int) -> int:
    """The land-cover class index (into LAND_COVER) of a cell, or -1 for no-data."""
    draw = np.random.default_rng(cell_seed(spec, "cell", row, col)).random(2)
    return -1 if draw[0] < NODATA_SHARE else int(draw[1] * len(LAND_COVER))


def class_map(spec: SceneSpec) -> np.ndarray:
    """(rows, columns) int8 of every cell's class (-1: no-data): the scene's ground truth."""
    rows, cols = spec.cells
    return np.array([[cell_class(spec, r, c) for c in range(cols)] for r in range(rows)], np.int8)


def signatures(bands: int) -> np.ndarray:
    """(classes, bands) reflectances: SIGNATURES, with further bands extrapolated along the slope of
    its last two (clipped to 0..10000)."""
    if bands <= SIGNATURES.shape[1]:
        return SIGNATURES[:, :bands]
    slope = (SIGNATURES[:, -1] - SIGNATURES[:, -2]) / 4
    extra = [SIGNATURES[:, -1] + (i + 1) * slope for i in range(bands - SIGNATURES.shape[1])]
    return np.clip(np.column_stack([SIGNATURES, *extra]), 0, 10000)


def window(spec: SceneSpec, top: int, left: int, height: int, width: int) -> np.ndarray:
    """(height, width, bands) of the scene's pixels in a window (clipped to the scene), computed alone."""
    height, width = min(height, spec.height - top), min(width, spec.width - left)
    rows, cols = np.arange(top, top + height), np.arange(left, left + width)
    first_row, first_col = top // spec.cell, left // spec.cell
    classes = np.array(
        [
            [cell_class(spec, r, c) for c in range(first_col, (left + width - 1) // spec.cell + 1)]
            for r in range(first_row, (top + height - 1) // spec.cell + 1)
        ]
    )
    cover = classes[(rows // spec.cell - first_row)[:, None], (cols // spec.cell - first_col)[None, :]]
    values = signatures(spec.bands)[np.maximum(cover, 0)]
    gradient = 0.85 + 0.3 * (rows[:, None, None] / max(spec.height, 1)) * (cols[None, :, None] / max(spec.width, 1))
    pixels = np.clip(values * gradient + noise(spec, top, left, height, width), 1, 10000)  # 0 is no-data's alone
    pixels[cover < 0] = 0
    return as_type(pixels, spec.dtype)


def noise(spec: SceneSpec, top: int, left: int, height: int, width: int) -> np.ndarray:
    """(height, width, bands) sensor noise of a window, drawn per NOISE_BLOCK square of the scene (so
    a pixel's noise does not depend on the window it is computed in)."""
    out = np.empty((height, width, spec.bands))
    for block_row in range(top // NOISE_BLOCK, (top + height - 1) // NOISE_BLOCK + 1):
        for block_col in range(left // NOISE_BLOCK, (left + width - 1) // NOISE_BLOCK + 1):
            rng = np.random.default_rng(cell_seed(spec, "noise", block_row, block_col))
            block = rng.normal(0, NOISE, (NOISE_BLOCK, NOISE_BLOCK, spec.bands))
            r0, c0 = max(top, block_row * NOISE_BLOCK), max(left, block_col * NOISE_BLOCK)
            r1, c1 = min(top + height, (block_row + 1) * NOISE_BLOCK), min(left + width, (block_col + 1) * NOISE_BLOCK)
            inner = block[r0 - block_row * NOISE_BLOCK : r1 - block_row * NOISE_BLOCK, c0 - block_col * NOISE_BLOCK :]
            out[r0 - top : r1 - top, c0 - left : c1 - left] = inner[:, : c1 - c0]
    return out


def as_type(pixels: np.ndarray, dtype: str) -> np.ndarray:
    """Reflectance x 10000 in the sample type: as is for integers, 0..1 for floats."""
    kind = np.dtype(dtype)
    return (pixels / 10000.0).astype(kind) if kind.kind == "f" else np.rint(pixels).astype(kind)


def tiles(spec: SceneSpec, progress: Callable[[int], object] | None = None) -> Iterator[np.ndarray]:
    """The scene's tiles, row by row, each (tile, tile, bands) (edge tiles padded with no-data)."""
    for top in range(0, spec.height, spec.tile):
        for left in range(0, spec.width, spec.tile):
            block = window(spec, top, left, spec.tile, spec.tile)
            padded = np.zeros((spec.tile, spec.tile, spec.bands), block.dtype)
            padded[: block.shape[0], : block.shape[1]] = block
            yield padded
        if progress is not None:
            progress(min(spec.tile, spec.height - top))


def geotiff_tags(spec: SceneSpec) -> list[tuple]:
    """tifffile extratags: pixel scale, tie point, GeoKeys (projected, pixel is area, EPSG) and no-data."""
    geokeys = (1, 1, 0, 3, 1024, 0, 1, 1, 1025, 0, 1, 1, 3072, 0, 1, spec.epsg)
    return [
        (GEOTIFF_PIXEL_SCALE, 12, 3, (spec.pixel_size, spec.pixel_size, 0.0), True),
        (GEOTIFF_TIEPOINT, 12, 6, (0.0, 0.0, 0.0, *spec.origin, 0.0), True),
        (GEOTIFF_GEOKEYS, 3, len(geokeys), geokeys, True),
        (GDAL_NODATA, 2, 0, "0", True),
    ]


def write_geotiff(spec: SceneSpec, path: Path, progress: Callable[[int], object] | None = None) -> Path:
    """Write the scene as a tiled, georeferenced (Big)TIFF, one tile in memory at a time; returns `path`."""
    tifffile.imwrite(
        path,
        tiles(spec, progress),
        shape=(spec.height, spec.width, spec.bands),
        dtype=spec.dtype,
        tile=(spec.tile, spec.tile),
        photometric="minisblack",
        planarconfig="contig",
        bigtiff=spec.nbytes >= BIGTIFF_BYTES,
        extratags=geotiff_tags(spec),
    )
    return path


def write_npy(spec: SceneSpec, path: Path, progress: Callable[[int], object] | None = None) -> Path:
    """Write the scene as an (H, W, bands) .npy, tile by tile (each tile's rows written in place),
    one tile in memory at a time; returns `path`."""
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(spec.dtype)), "fortran_order": False}
    itemsize = np.dtype(spec.dtype).itemsize
    row_bytes = spec.width * spec.bands * itemsize
    with path.open("wb") as fh:
        np.lib.format.write_array_header_2_0(fh, {**header, "shape": (spec.height, spec.width, spec.bands)})
        data_at = fh.tell()
        fh.truncate(data_at + spec.nbytes)
        fh.flush()
        for top in range(0, spec.height, spec.tile):
            for left in range(0, spec.width, spec.tile):
                block = window(spec, top, left, spec.tile, spec.tile)
                at = data_at + top * row_bytes + left * spec.bands * itemsize
                for i, line in enumerate(block):
                    os.pwrite(fh.fileno(), line.tobytes(), at + i * row_bytes)
            if progress is not None:
                progress(min(spec.tile, spec.height - top))
    return path


WRITERS = {  # suffix -> writer (the suffixes are orchard.core.formats')
    **dict.fromkeys(BY_NAME["tiff"].suffixes, write_geotiff),
    **dict.fromkeys(BY_NAME["npy"].suffixes, write_npy),
}


def write_scene(spec: SceneSpec, path: Path, progress: Callable[[int], object] | None = None) -> Path:
    """Write the scene in the format of `path`'s suffix (WRITERS); ValueError for another suffix."""
    writer = WRITERS.get(path.suffix.lower())
    if writer is None:
        raise ValueError(f"{path}: a scene is written as {', '.join(WRITERS)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    return writer(spec, path, progress)
