"""Band selection and value scaling chosen at training are recorded in the model card and applied
identically by `orchard infer` (Spark executors), `orchard predict` (local files) and the serving
model (issue 16, deliverable 2), on the real stack.

The data: 6-band 16-bit planar TIFFs (a multispectral scene's value range, 0..10000), two classes
told apart by bands 4 and 2, the others noise; trained with `--bands 4,2 --scaling range:0,10000`,
so the model takes 2 channels. One test image has 3 bands only: it must fail alone, with the reason.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tifffile
from lake_datasets import Dataset, clean_up
from orchard_cli import last_json, ok, orchard

from orchard.core.clients import es_client
from orchard.core.settings import Settings
from orchard.serving.predictor import load_serving_model
from orchard.spark_app.registry import load_card

pytestmark = pytest.mark.integration

BANDS, SCALING = "4,2", "range:0,10000"
SHAPE = (6, 24, 32)  # bands first, as a GeoTIFF's planar bands come
MEANS = {"vegetation": {4: 4000, 2: 800}, "water": {4: 500, 2: 3000}}  # band -> mean value
TRAIN_PER_CLASS, TEST_PER_CLASS = 8, 3
THREE_BAND_KEY = "test/water/three-bands.tif"


def scene(rng: np.random.Generator, label: str) -> np.ndarray:
    """A 6-band uint16 image: noise over 0..10000, bands 4 and 2 around the label's means."""
    array = rng.integers(0, 10000, SHAPE).astype(np.float64)
    for band, mean in MEANS[label].items():
        array[band - 1] = rng.normal(mean, 300, SHAPE[1:])
    return np.clip(array, 0, 10000).astype(np.uint16)


def tiff_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, array, photometric="minisblack", planarconfig="separate")
    return buffer.getvalue()


def write_tree(root: Path, seed: int) -> Path:
    """`root/<split>/<label>/<i>.tif`, plus one 3-band test image; returns `root`."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", TRAIN_PER_CLASS), ("test", TEST_PER_CLASS)):
        for label in MEANS:
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(count):
                (folder / f"{i}.tif").write_bytes(tiff_bytes(scene(rng, label)))
    (root / THREE_BAND_KEY).write_bytes(tiff_bytes(scene(rng, "water")[:3]))
    return root


@pytest.fixture(scope="module")
def banded(stack: Settings, tmp_path_factory) -> Iterator[tuple[Dataset, Path, str]]:
    """(dataset, local tree, version): uploaded, and a CNN trained on bands 4,2 scaled 0..10000."""
    token = os.urandom(3).hex()
    root = write_tree(tmp_path_factory.mktemp("bands") / "tree", int(token, 16))
    ds = Dataset(f"it-bands-{token}", stack, corrupt_key="")
    try:
        ok(orchard("upload", str(root), "--dataset", ds.name))
        args = ("--bands", BANDS, "--scaling", SCALING, "--epochs", "1", "--batch-size", "8", "--json")
        trained = last_json(ok(orchard("train", "--dataset", ds.name, *args)))
        ds.versions.append(trained["version"])
        yield ds, root, trained["version"]
    finally:
        clean_up(ds)


def test_the_card_records_the_bands_and_scaling(stack: Settings, banded) -> None:
    _, _, version = banded
    card = load_card(stack, version)
    assert card["conversion"] == {"bands": [4, 2], "scaling": SCALING}
    assert card["channels"] == 2  # one input channel per chosen band


def test_infer_predict_and_serving_apply_the_same_conversion(stack: Settings, banded) -> None:
    ds, root, version = banded
    summary = last_json(ok(orchard("infer", "--dataset", ds.name, "--model", version, "--json")))
    total = 2 * (TRAIN_PER_CLASS + TEST_PER_CLASS) + 1
    assert summary["images"] == total and summary["errors"] == 1 and summary["failed"] == 0, summary

    by_key = lake_predictions(stack, ds.name)
    three_band = by_key.pop(f"{ds.name}/{THREE_BAND_KEY}")
    assert three_band["label"] is None and "band 4 asked" in three_band["error"], three_band
    assert all(p["label"] in MEANS and p["error"] is None for p in by_key.values()), by_key

    files = sorted(p for p in (root / "test").rglob("*.tif") if p.name != "three-bands.tif")
    local = predicted_locally(version, files)
    for path in files:
        assert local[str(path)] == by_key[f"{ds.name}/{path.relative_to(root)}"]["label"], path
    assert served_labels(stack, version, files) == [local[str(p)] for p in files]


def lake_predictions(s: Settings, dataset: str) -> dict[str, dict]:
    """key -> the prediction `orchard infer` wrote into the image's document."""
    es = es_client(s)
    es.indices.refresh(index=s.images_index)
    hits = es.search(
        index=s.images_index, query={"term": {"dataset": dataset}}, size=100, source_includes=["key", "prediction"]
    )["hits"]["hits"]
    return {hit["_source"]["key"]: hit["_source"]["prediction"] for hit in hits}


def predicted_locally(version: str, files: list[Path]) -> dict[str, str]:
    """file -> top label of `orchard predict` (the card's conversion, no Spark)."""
    run = ok(orchard("predict", *map(str, files), "--model", version, "--json"))
    rows = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    return {row["file"]: row["top5"][0]["label"] for row in rows}


def served_labels(s: Settings, version: str, files: list[Path]) -> list[str]:
    """Top labels of the files through the serving model (what `orchard serve` loads and calls)."""
    model = load_serving_model(s, version)
    inputs = [model.input_of(path.read_bytes(), max_pixels=10**8) for path in files]
    return [model.top(scored, 1)[0][0] for scored in model.score(inputs)]
