"""Tiling of large rasters (issue 16, deliverable 4), its pure parts: strips of the tile grid
(orchard.core.rasters.tile_bands), windows of .npy arrays read by ranges, tile ids and documents,
the per-raster summary of the tiles' classes (orchard.spark_app.tiles), and the tile's bulk upsert
(orchard.spark_app.infer)."""

from __future__ import annotations

import io
from collections import Counter

import numpy as np
import pytest
import tifffile

from orchard.core.formats import NPY, TIFF
from orchard.core.rasters import Window, read_npy_window, read_raster_window, tile_bands, tile_of, tile_windows
from orchard.spark_app.images import BandJob, ImageRef, tile_id, tile_ref
from orchard.spark_app.infer import PredictSpec, prediction_doc, skip_unchanged, update_action
from orchard.spark_app.tiles import add_counts, count_tiles, raster_jobs, summary_doc, tile_fields
from orchard.uploader import raster_synth as rs
from spark_app_settings import CFG

PARENT = ImageRef("p" * 64, "ds/test/forest/scene.tif", "ds", "test", "forest")
SPEC = PredictSpec(CFG, "v1", ("forest", "water"), "scale01", (64, 64))


class CountingReader(io.BytesIO):
    """Bytes that count the reads made of them (what a ranged S3 reader would fetch)."""

    reads = 0

    def read(self, size: int | None = -1) -> bytes:
        self.reads += 1
        return super().read(size)


@pytest.mark.parametrize(
    ("height", "width", "size", "stride"), [(700, 900, 256, 256), (300, 1000, 128, 100), (50, 60, 64, 64)]
)
def test_strips_hold_every_tile_once(height: int, width: int, size: int, stride: int) -> None:
    bands = tile_bands(height, width, size, stride, max_pixels=size * 400)
    held = [tile for band in bands for tile in band.tiles]
    assert held == tile_windows(height, width, size, stride)
    for band in bands:
        w = band.window
        assert all(w.top == t.top and w.left <= t.left and t.left + t.width <= w.left + w.width for t in band.tiles)
        assert w.height * w.width <= max(size * 400, w.height * size)


def test_a_wide_row_is_cut_into_runs_under_the_pixel_budget() -> None:
    bands = tile_bands(256, 10_000, 256, 256, max_pixels=256 * 1024)
    assert len(bands) > 1 and all(b.window.width <= 1024 for b in bands)
    assert sum(len(b.tiles) for b in bands) == len(tile_windows(256, 10_000, 256, 256))


def npy_bytes(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, array)
    return out.getvalue()


@pytest.mark.parametrize("shape", [(300, 400), (300, 400, 4)])
def test_npy_windows_equal_the_array(shape: tuple[int, ...]) -> None:
    array = np.random.default_rng(1).integers(0, 60000, shape).astype(np.uint16)
    source = CountingReader(npy_bytes(array))
    full = read_npy_window(source, Window(0, 0, 100, 0, 50, 400))  # full width: one read of the rows
    assert np.array_equal(full[..., 0] if array.ndim == 2 else full, array[100:150])
    assert source.reads <= 4  # the magic, the header length, the header, the rows
    part = read_npy_window(source, Window(1, 2, 10, 30, 20, 25))
    want = array[10:30, 30:55]
    assert np.array_equal(part[..., 0] if array.ndim == 2 else part, want)


def test_npy_windows_refuse_layouts_they_cannot_read_by_rows() -> None:
    with pytest.raises(ValueError, match="C-order"):
        read_npy_window(
            io.BytesIO(npy_bytes(np.asfortranarray(np.zeros((40, 50, 3), np.uint16)))), Window(0, 0, 0, 0, 8, 8)
        )
    with pytest.raises(ValueError, match="C-order"):
        read_npy_window(io.BytesIO(npy_bytes(np.zeros((4, 40, 50), np.uint16))), Window(0, 0, 0, 0, 8, 8))
    with pytest.raises(ValueError, match="outside"):
        read_npy_window(io.BytesIO(npy_bytes(np.zeros((40, 50), np.uint16))), Window(0, 0, 30, 0, 16, 8))


def test_tiff_strips_give_tiles_with_their_bounds(tmp_path) -> None:
    spec = rs.SceneSpec(300, 500, bands=4, tile=128, cell=100, seed=5)
    path = rs.write_scene(spec, tmp_path / "scene.tif")
    whole = tifffile.imread(path)
    band = tile_bands(300, 500, 128, 128, 10**9)[1]
    with open(path, "rb") as fh:
        pixels, nodata, transform = read_raster_window(fh, TIFF, band.window)
    assert nodata == 0 and transform is not None
    for window in band.tiles:
        tile = tile_of(pixels, band.window, window)
        top, left = window.top, window.left
        assert np.array_equal(tile, whole[top : top + window.height, left : left + window.width])
        west, south, east, north = tile_ref(PARENT, window, transform).tile.bounds
        assert west == spec.origin[0] + left * spec.pixel_size and north == spec.origin[1] - top * spec.pixel_size
        assert (east - west, north - south) == (window.width * spec.pixel_size, window.height * spec.pixel_size)


def test_tile_ids_are_deterministic_and_distinct() -> None:
    windows = tile_windows(700, 900, 256, 128)
    ids = {tile_id(PARENT.id, w) for w in windows}
    assert len(ids) == len(windows) and tile_id(PARENT.id, windows[3]) == tile_id(PARENT.id, windows[3])
    assert tile_id("q" * 64, windows[3]) not in ids and PARENT.id not in ids


def test_a_raster_row_becomes_strip_jobs() -> None:
    row = (PARENT.id, PARENT.key, "ds", "test", "forest", NPY, 900, 700)  # width, then height
    jobs = list(raster_jobs(256, 256, row))
    assert {ref for ref, _ in jobs} == {PARENT} and all(
        isinstance(job, BandJob) and job.decoder == NPY for _, job in jobs
    )
    assert [t for _, job in jobs for t in job.band.tiles] == tile_windows(700, 900, 256, 256)


def test_a_tile_document_is_created_by_its_first_prediction() -> None:
    window = Window(2, 3, 512, 768, 256, 256)
    ref = tile_ref(PARENT, window, (10.0, 10.0, 0.0, 0.0, 500_000.0, 4_600_000.0))
    action = update_action("ix", ref, prediction_doc(SPEC, [("water", 0.8)]))
    assert action["_id"] == ref.id and action["doc_as_upsert"] is True
    doc = action["doc"]
    assert doc["tile"]["parent"] == PARENT.id and (doc["tile"]["row"], doc["tile"]["col"]) == (2, 3)
    assert doc["tile"]["bounds"] == [507_680.0, 4_592_320.0, 510_240.0, 4_594_880.0]
    assert doc["key"] == PARENT.key and doc["label"] == "forest" and doc["prediction"]["label"] == "water"
    assert "doc_as_upsert" not in update_action("ix", PARENT, prediction_doc(SPEC, [("water", 0.8)]))
    assert "bounds" not in tile_fields(tile_ref(PARENT, window, None))["tile"]


class FakeEs:
    def mget(self, index, ids, source_includes):
        return {"docs": [{"_id": i, "found": False} for i in ids]}


def test_a_missing_tile_document_is_written_a_missing_image_document_fails() -> None:
    pred = prediction_doc(SPEC, [("water", 0.8)])
    tile = tile_ref(PARENT, Window(0, 0, 0, 0, 256, 256), None)
    chunk = [(update_action("ix", tile, pred), tile.key, False), (update_action("ix", PARENT, pred), PARENT.key, False)]
    keep, tally = skip_unchanged(False, {}, FakeEs(), chunk)
    assert [action["_id"] for action, _, _ in keep] == [tile.id] and tally.failed == 1


def test_tile_counts_summarise_a_raster() -> None:
    windows = tile_windows(600, 700, 256, 256)  # 3 x 3
    labels = ["water", "forest", "water", None, "water", "forest", "water", "forest", "water"]
    pairs = [(tile_ref(PARENT, w, None), {"label": label}) for w, label in zip(windows, labels, strict=True)]
    pairs.append((ImageRef("x", "k", "ds", "test", "a"), {"label": "water"}))  # not a tile: not counted
    counts: dict = {}
    assert list(count_tiles(pairs, counts)) == pairs
    halves = [dict(list(counts.items())[:1]), dict(list(counts.items())[1:])]
    merged = Counter()
    for half in halves:
        for key, count in half.items():
            merged[key] = add_counts(merged[key], count) if key in merged else count
    doc = summary_doc("v1", [(label, count) for (_, label), count in merged.items()])
    assert doc["classes"] == [{"label": "water", "count": 5}, {"label": "forest", "count": 3}]
    assert (doc["count"], doc["rows"], doc["cols"], doc["label"], doc["model_version"]) == (8, 3, 3, "water", "v1")
