"""The satellite-scene generator (orchard.uploader.raster_synth, `orchard dataset raster`): the same
pixels in GeoTIFF and .npy, georeferencing and no-data declared, pixels independent of the window
they are computed in, determinism, and memory bounded by a tile whatever the raster's size."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import tifffile
from click.testing import CliRunner

from orchard.app.upload_cli import dataset
from orchard.core import rasters
from orchard.uploader import raster_synth as rs

SMALL = rs.SceneSpec(700, 900, bands=6, tile=256, cell=300, seed=3)


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("scene")
    return rs.write_scene(SMALL, root / "scene.tif"), rs.write_scene(SMALL, root / "scene.npy")


def test_geotiff_and_npy_hold_the_same_pixels(written) -> None:
    tif, npy = written
    pixels = tifffile.imread(tif)
    assert pixels.shape == (700, 900, 6) and pixels.dtype == np.uint16
    assert np.array_equal(pixels, np.load(npy))


def test_the_geotiff_is_tiled_georeferenced_and_declares_no_data(written) -> None:
    with tifffile.TiffFile(written[0]) as tif:
        page = tif.pages[0]
        assert page.is_tiled and (page.tilelength, page.tilewidth) == (256, 256)
        assert page.tags[rasters.GEOTIFF_PIXEL_SCALE].value == (10.0, 10.0, 0.0)
        assert page.tags[rasters.GEOTIFF_TIEPOINT].value[3:5] == SMALL.origin
        assert tif.geotiff_metadata["ProjectedCSTypeGeoKey"] == SMALL.epsg
        assert rasters.declared_nodata(page) == 0.0


def test_cells_follow_the_class_map(written) -> None:
    pixels, truth = np.load(written[1]), rs.class_map(SMALL)
    nir = rs.LAND_COVER.index("forest"), rs.LAND_COVER.index("water")
    means = {}
    for (row, col), label in np.ndenumerate(truth):
        cell = pixels[row * 300 : (row + 1) * 300, col * 300 : (col + 1) * 300]
        if label >= 0:
            means.setdefault(int(label), []).append(cell[..., 3].mean())
    assert set(means) >= set(nir), "the seed should give forest and water cells"
    assert min(means[nir[0]]) > 5 * max(means[nir[1]])  # forest is bright in near infrared, water dark


def test_no_data_cells_are_zero_in_every_band_and_only_they_are() -> None:
    spec = rs.SceneSpec(200, 200, bands=4, cell=10, seed=5)  # 400 cells, about 5 % of them no-data
    pixels, truth = rs.window(spec, 0, 0, 200, 200), rs.class_map(spec)
    no_data = np.repeat(np.repeat(truth < 0, 10, axis=0), 10, axis=1)
    assert 0 < no_data.mean() < 0.2
    assert not pixels[no_data].any() and pixels[~no_data].min() > 0


def test_a_window_computed_alone_equals_the_same_pixels_of_the_scene(written) -> None:
    pixels = np.load(written[1])
    assert np.array_equal(rs.window(SMALL, 100, 200, 300, 400), pixels[100:400, 200:600])
    assert np.array_equal(rs.window(SMALL, 650, 850, 256, 256), pixels[650:, 850:])  # clipped at the edge


def test_the_same_arguments_give_the_same_bytes(written, tmp_path: Path) -> None:
    again = rs.write_scene(SMALL, tmp_path / "again.tif")
    assert again.read_bytes() == written[0].read_bytes()
    other = rs.write_scene(rs.SceneSpec(700, 900, bands=6, tile=256, cell=300, seed=4), tmp_path / "other.tif")
    assert other.read_bytes() != written[0].read_bytes()


def test_more_bands_and_float_samples() -> None:
    spec = rs.SceneSpec(40, 50, bands=9, dtype="float32", tile=16, cell=20, seed=1)
    pixels = rs.window(spec, 0, 0, 40, 50)
    assert pixels.shape == (40, 50, 9) and pixels.dtype == np.float32 and pixels.max() <= 1.0


@pytest.mark.parametrize("suffix", [".tif", ".npy"])
def test_memory_stays_at_a_tile_not_the_raster(tmp_path: Path, suffix: str) -> None:
    spec = rs.SceneSpec(1536, 2560, bands=6, seed=1)  # 47 MB of pixels, tiles of 3 MB (float64 at work)
    tracemalloc.start()
    try:
        rs.write_scene(spec, tmp_path / f"big{suffix}")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < spec.nbytes / 2, f"{peak / 1e6:.0f} MB allocated at most for a {spec.nbytes / 1e6:.0f} MB raster"


def test_the_command_refuses_other_suffixes_and_writes_a_scene(tmp_path: Path) -> None:
    refused = CliRunner().invoke(dataset, ["raster", str(tmp_path / "scene.png")])
    assert refused.exit_code == 2 and "write a scene as .tif" in refused.output
    ok = CliRunner().invoke(dataset, ["raster", str(tmp_path / "s.tif"), "--height", "64", "--width", "48"])
    assert ok.exit_code == 0, ok.output
    assert tifffile.imread(tmp_path / "s.tif").shape == (64, 48, 6)


def test_a_raster_past_the_classic_tiff_limit_is_written_as_bigtiff(tmp_path: Path, monkeypatch) -> None:
    spec = rs.SceneSpec(64, 64, bands=3, tile=32, cell=16)
    with tifffile.TiffFile(rs.write_scene(spec, tmp_path / "classic.tif")) as classic:
        assert not classic.is_bigtiff
    monkeypatch.setattr(rs, "BIGTIFF_BYTES", spec.nbytes)  # as if these 24 kB were 4 GiB
    with tifffile.TiffFile(rs.write_scene(spec, tmp_path / "big.tif")) as tif:
        assert tif.is_bigtiff and np.array_equal(tif.asarray(), rs.window(spec, 0, 0, 64, 64))
