"""Windows of large rasters (orchard.core.rasters: tile_windows, read_tiff_window, geo_bounds): tiles
cover every pixel, a window reads only the TIFF segments it overlaps and equals the same pixels of
the whole raster, and georeferenced windows get their bounds (issue 16, deliverable 4's base)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import tifffile

from orchard.core.rasters import Window, geo_bounds, read_tiff_window, tile_windows
from orchard.uploader import raster_synth as rs

SPEC = rs.SceneSpec(700, 900, bands=6, tile=256, cell=300, seed=3)


class CountingReader(io.FileIO):
    """A file that counts the bytes read from it (what a ranged S3 reader would fetch)."""

    read_bytes = 0

    def read(self, size: int = -1) -> bytes:
        data = super().read(size)
        self.read_bytes += len(data)
        return data


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> tuple[Path, np.ndarray]:
    path = rs.write_scene(SPEC, tmp_path_factory.mktemp("windows") / "scene.tif")
    return path, tifffile.imread(path)


@pytest.mark.parametrize(
    ("length", "size", "stride", "starts"),
    [
        (700, 256, 256, [0, 256, 444]),
        (512, 256, 256, [0, 256]),
        (100, 256, 256, [0]),
        (600, 256, 128, [0, 128, 256, 344]),
    ],
)
def test_tile_starts_end_flush_with_the_edge(length: int, size: int, stride: int, starts: list[int]) -> None:
    windows = tile_windows(length, 10, size, stride)
    assert [w.top for w in windows] == starts
    assert all(w.height == min(size, length) and w.top + w.height <= length for w in windows)


def test_tiles_cover_every_pixel_and_are_numbered_by_grid_position() -> None:
    windows = tile_windows(700, 900, 256, 200)
    covered = np.zeros((700, 900), bool)
    for w in windows:
        covered[w.top : w.top + w.height, w.left : w.left + w.width] = True
    assert covered.all()
    assert {(w.row, w.col) for w in windows} == {(r, c) for r in range(4) for c in range(5)}
    with pytest.raises(ValueError, match="positive"):
        tile_windows(10, 10, 256, 0)


@pytest.mark.parametrize(
    "window",
    [
        Window(0, 0, 0, 0, 256, 256),
        Window(1, 2, 300, 500, 256, 256),
        Window(0, 0, 444, 644, 256, 256),
        Window(0, 0, 10, 20, 30, 40),
    ],
)
def test_a_window_read_equals_the_same_pixels_of_the_whole_raster(scene, window: Window) -> None:
    path, whole = scene
    with path.open("rb") as fh:
        got = read_tiff_window(fh, window)
    expected = whole[window.top : window.top + window.height, window.left : window.left + window.width]
    assert np.array_equal(got, expected)


def test_a_window_reads_only_the_tiles_it_overlaps(scene) -> None:
    path, _ = scene
    with CountingReader(path) as fh:
        read_tiff_window(fh, Window(0, 0, 10, 20, 30, 40))  # inside the first of 12 tiles
    tile_bytes = 256 * 256 * 6 * 2
    assert tile_bytes <= fh.read_bytes < 2 * tile_bytes, fh.read_bytes


def test_striped_tiffs_are_read_by_strips_and_planar_ones_refused(tmp_path: Path) -> None:
    pixels = np.random.default_rng(0).integers(0, 4000, (300, 200, 3), dtype=np.uint16)
    striped = tmp_path / "striped.tif"
    tifffile.imwrite(striped, pixels, rowsperstrip=16, photometric="rgb")
    window = Window(0, 0, 100, 50, 64, 64)
    with striped.open("rb") as fh:
        assert np.array_equal(read_tiff_window(fh, window), pixels[100:164, 50:114])
    planar = tmp_path / "planar.tif"
    tifffile.imwrite(planar, np.moveaxis(pixels, -1, 0), photometric="minisblack", planarconfig="separate")
    with planar.open("rb") as fh, pytest.raises(ValueError, match="INTERLEAVE=PIXEL"):
        read_tiff_window(fh, window)


def test_georeferenced_windows_get_their_bounds(scene, tmp_path: Path) -> None:
    path, whole = scene
    with tifffile.TiffFile(path) as tif:
        west, south, east, north = geo_bounds(tif.pages.first, Window(1, 2, 256, 512, 256, 256)) or ()
    x0, y0 = SPEC.origin
    assert (west, north) == (x0 + 512 * 10, y0 - 256 * 10)
    assert (east - west, north - south) == (2560, 2560)
    plain = tmp_path / "plain.tif"
    tifffile.imwrite(plain, whole[:16, :16])
    with tifffile.TiffFile(plain) as tif:
        assert geo_bounds(tif.pages.first, Window(0, 0, 0, 0, 16, 16)) is None
