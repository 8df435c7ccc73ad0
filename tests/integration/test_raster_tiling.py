"""Large rasters cut into tiles by `orchard infer` on the real stack (issue 16, deliverable 4): a
georeferenced 4-band GeoTIFF and an .npy scene above the tiling threshold get one document per
tile (the expected count, grid places, pixel windows, geographic bounds of the GeoTIFF's), each
predicted like any image with the model card's band conversion, and the raster's document a
summary of its tiles' classes; a tile's prediction equals `orchard predict` of the same pixels cut
locally; a second run writes nothing new.

The model: a CNN trained on 64 x 64 patches of another generated scene (bands 4,3,2, range
0..5000), labelled by their land-cover cell, as EuroSAT-like patch datasets are made.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from elasticsearch.helpers import scan
from lake_datasets import Dataset, clean_up, fresh_seed
from orchard_cli import last_json, ok, orchard

from orchard.core.clients import es_client
from orchard.core.rasters import tile_windows
from orchard.core.settings import Settings
from orchard.uploader import raster_synth as rs

pytestmark = pytest.mark.integration

TILE = 128
TILING_ENV = {"ORCHARD_TILE_MIN_PIXELS": "500000", "ORCHARD_TILE_SIZE": str(TILE), "ORCHARD_TILE_STRIDE": str(TILE)}
# Scenes of this run's own (see fresh_seed: fixed seeds let an interrupted run's leftovers turn
# every later upload into duplicates of them); the seed is printed by the fixture.
SEED = fresh_seed()
PATCHES = rs.SceneSpec(640, 640, bands=4, tile=64, cell=64, seed=SEED)  # 100 training patches of one cell each
SCENES = {  # key below the dataset -> what it holds (above the 500,000-pixel threshold, both)
    "test/forest/scene.tif": rs.SceneSpec(900, 1100, bands=4, tile=128, cell=128, seed=SEED + 1),
    "test/forest/scene.npy": rs.SceneSpec(700, 800, bands=4, tile=100, cell=128, seed=SEED + 2),
}


def write_patches(root: Path) -> None:
    """`root/<split>/<label>/<row>_<col>.npy`: every data cell of PATCHES as a 64 x 64 x 4 patch
    (every fifth to the test split)."""
    classes = rs.class_map(PATCHES)
    for (row, col), cls in np.ndenumerate(classes):
        if cls < 0:
            continue
        split = "test" if (row * 10 + col) % 5 == 0 else "train"
        folder = root / split / rs.LAND_COVER[cls]
        folder.mkdir(parents=True, exist_ok=True)
        patch = rs.window(PATCHES, row * 64, col * 64, 64, 64)
        np.save(folder / f"{row}_{col}.npy", patch)


@pytest.fixture(scope="module")
def tiled(stack: Settings, tmp_path_factory) -> Iterator[tuple[Dataset, Path, str, dict]]:
    """(dataset, local tree, model version, summary of the first `orchard infer`)."""
    token = os.urandom(3).hex()
    print(f"scene seed {SEED}")  # shown with a failure: the scenes can be made again
    root = tmp_path_factory.mktemp("tiles") / "tree"
    write_patches(root)
    for key, spec in SCENES.items():
        rs.write_scene(spec, root / key)
    ds = Dataset(f"it-tiles-{token}", stack, corrupt_key="")
    try:
        ok(orchard("upload", str(root), "--dataset", ds.name))
        args = ("--bands", "4,3,2", "--scaling", "range:0,5000", "--epochs", "2", "--batch-size", "16", "--json")
        version = last_json(ok(orchard("train", "--dataset", ds.name, *args)))["version"]
        ds.versions.append(version)
        infer = ("infer", "--dataset", ds.name, "--model", version, "--json")
        yield ds, root, version, last_json(ok(orchard(*infer, env=TILING_ENV)))
    finally:
        clean_up(ds)


def documents(s: Settings, dataset: str) -> list[dict]:
    es = es_client(s)
    es.indices.refresh(index=s.images_index)
    hits = scan(es, index=s.images_index, query={"query": {"term": {"dataset": dataset}}})
    return [{"_id": hit["_id"], **hit["_source"]} for hit in hits]


def expected_tiles(spec: rs.SceneSpec) -> int:
    return len(tile_windows(spec.height, spec.width, TILE, TILE))


def test_each_raster_becomes_its_tiles(stack: Settings, tiled) -> None:
    ds, _, version, summary = tiled
    want = {key: expected_tiles(spec) for key, spec in SCENES.items()}
    assert want == {"test/forest/scene.tif": 72, "test/forest/scene.npy": 42}
    assert summary["tiles"] == sum(want.values()) and summary["tiled_rasters"] == 2, summary
    assert summary["failed"] == 0 and summary["errors"] == 0, summary
    docs = documents(stack, ds.name)
    rasters = {doc["key"]: doc for doc in docs if "tile" not in doc and doc["key"].endswith(tuple(SCENES))}
    assert set(rasters) == {f"{ds.name}/{key}" for key in SCENES}
    for key, spec in SCENES.items():
        raster = rasters[f"{ds.name}/{key}"]
        tiles = [doc for doc in docs if doc.get("tile", {}).get("parent") == raster["_id"]]
        assert len(tiles) == want[key] and all(doc["key"] == raster["key"] for doc in tiles)
        places = {(t["tile"]["top"], t["tile"]["left"], t["tile"]["height"], t["tile"]["width"]) for t in tiles}
        assert places == {(w.top, w.left, w.height, w.width) for w in tile_windows(spec.height, spec.width, TILE, TILE)}
        assert all(
            t["prediction"]["label"] in rs.LAND_COVER and t["prediction"]["model_version"] == version for t in tiles
        )
        counts = raster["tiles"]
        assert counts["count"] == want[key] and sum(c["count"] for c in counts["classes"]) == want[key]
        assert (counts["rows"], counts["cols"], counts["model_version"]) == (
            max(t["tile"]["row"] for t in tiles) + 1,
            max(t["tile"]["col"] for t in tiles) + 1,
            version,
        )
        assert counts["label"] == counts["classes"][0]["label"]


def test_geotiff_tiles_carry_their_bounds(stack: Settings, tiled) -> None:
    ds, *_ = tiled
    spec = SCENES["test/forest/scene.tif"]
    for doc in documents(stack, ds.name):
        tile = doc.get("tile")
        if tile is None:
            continue
        if not doc["key"].endswith(".tif"):
            assert "bounds" not in tile  # an .npy has no georeference
            continue
        west, south, east, north = tile["bounds"]
        assert west == pytest.approx(spec.origin[0] + tile["left"] * spec.pixel_size)
        assert north == pytest.approx(spec.origin[1] - tile["top"] * spec.pixel_size)
        assert (east - west, north - south) == pytest.approx((tile["width"] * 10.0, tile["height"] * 10.0))


def test_a_tile_is_predicted_as_its_pixels_are_locally(stack: Settings, tiled, tmp_path) -> None:
    ds, _, version, _ = tiled
    docs = [doc for doc in documents(stack, ds.name) if "tile" in doc and doc["tile"]["row"] == 1]
    picked = {doc["key"].rsplit(".", 1)[1]: doc for doc in docs if doc["tile"]["col"] == 2}
    files = []
    for suffix, doc in sorted(picked.items()):
        tile = doc["tile"]
        whole = rs.window(SCENES[f"test/forest/scene.{suffix}"], 0, 0, 10**6, 10**6)
        pixels = whole[tile["top"] : tile["top"] + tile["height"], tile["left"] : tile["left"] + tile["width"]]
        files.append(tmp_path / f"{suffix}.npy")
        np.save(files[-1], pixels)
    run = ok(orchard("predict", *map(str, files), "--model", version, "--json"))
    local = {Path(row["file"]).stem: row["top5"][0]["label"] for row in map(json.loads, run.stdout.splitlines())}
    assert len(local) == 2 and local == {suffix: doc["prediction"]["label"] for suffix, doc in picked.items()}


def test_a_second_run_writes_nothing_new(stack: Settings, tiled) -> None:
    ds, _, version, first = tiled
    before = len(documents(stack, ds.name))
    again = last_json(ok(orchard("infer", "--dataset", ds.name, "--model", version, "--json", env=TILING_ENV)))
    assert again["tiles"] == first["tiles"] and again["unchanged"] == first["images"] and again["updated"] == 0
    assert len(documents(stack, ds.name)) == before


def test_the_report_maps_each_raster_and_counts_images_not_tiles(stack: Settings, tiled) -> None:
    from orchard.app.report import class_maps, split_counts

    ds, *_ = tiled
    es = es_client(stack)
    maps = {m["key"]: m for m in class_maps(es, stack, ds.name)}
    assert set(maps) == {f"{ds.name}/{key}" for key in SCENES}
    for m in maps.values():
        summary, grid = m["summary"], m["grid"]
        assert grid.shape == (summary["rows"], summary["cols"]) and all(label in rs.LAND_COVER for label in grid.flat)
        assert dict(Counter(grid.flat)) == {c["label"]: c["count"] for c in summary["classes"]}
    images = [doc for doc in documents(stack, ds.name) if "tile" not in doc]
    counted = sum(n for by_split in split_counts(es, stack, ds.name).values() for n in by_split.values())
    assert counted == len(images)


def test_lake_sync_reads_a_large_object_as_a_stream_and_its_header_by_ranges(stack: Settings, tiled) -> None:
    """What `orchard lake sync` makes of a large object another tool put in the bucket (the upload
    writes its rows itself): the same id and header as the uploader's, the content referenced."""
    import hashlib
    from datetime import UTC, datetime

    from orchard.core.clients import s3_client
    from orchard.spark_app.table import fetch_row

    ds, root, _, _ = tiled
    key, spec = "test/forest/scene.tif", SCENES["test/forest/scene.tif"]
    data = (root / key).read_bytes()
    small = stack.model_copy(update={"lake_inline_max_bytes": 1_000_000})
    row = fetch_row(s3_client(stack), small, f"{ds.name}/{key}", datetime.now(UTC), len(data))
    assert row["error"] is None and row["id"] == hashlib.sha256(data).hexdigest()
    assert (row["format"], row["width"], row["height"], row["channels"]) == ("tiff", spec.width, spec.height, 4)
    assert row["content"] is None and row["bytes"] == len(data) and row["label"] == "forest"
