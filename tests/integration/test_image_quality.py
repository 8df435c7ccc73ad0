"""Empty images (issue 16): black, constant and no-data files are flagged at upload (`quality` in the
document) and left out of training by default (`excluded_empty` in the summary and the registry),
kept with `--include-empty`; evaluation still scores every image.

A tiny class-per-folder tree (32x32 pixels, 2 labels) uploaded with the real uploader, then two
1-epoch `orchard train` runs as `bin/orchard ...` subprocesses, as in test_raster_formats.py. Every
file carries the run's token (random pixels, or a PNG text chunk / TIFF description for the uniform
ones), so no other test's documents share our content-hash ids.
"""

from __future__ import annotations

import io
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import tifffile
from lake_datasets import Dataset, clean_up
from orchard_cli import last_json, ok, orchard
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from orchard.core.clients import es_client
from orchard.core.lake import Field, Quality
from orchard.core.settings import Settings

pytestmark = pytest.mark.integration

LABELS = ("apple", "lime")
SIZE = (32, 32)  # height, width
Encoder = Callable[[np.random.Generator, str], bytes]


def png(array: np.ndarray, token: str) -> bytes:
    info = PngInfo()
    info.add_text("orchard-test", token)  # unique bytes, same pixels
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG", pnginfo=info)
    return buffer.getvalue()


def noise(rng: np.random.Generator, token: str) -> bytes:
    return png(rng.integers(0, 256, (*SIZE, 3), dtype=np.uint8), token)


def black(rng: np.random.Generator, token: str) -> bytes:
    return png(np.zeros((*SIZE, 3), np.uint8), token)


def grey(rng: np.random.Generator, token: str) -> bytes:
    return png(np.full((*SIZE, 3), 128, np.uint8), token)


def nodata(rng: np.random.Generator, token: str) -> bytes:
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, np.full(SIZE, np.nan, np.float32), description=token)
    return buffer.getvalue()


# split -> file name -> encoder; the names say which files are empty
FILES: dict[str, dict[str, Encoder]] = {
    "train": {
        **{f"noise{n}.png": noise for n in range(4)},
        "black.png": black,
        "grey.png": grey,
        "nodata.tif": nodata,
    },
    "test": {"noise0.png": noise, "noise1.png": noise, "black.png": black},
}
EMPTY_NAMES = ("black.png", "grey.png", "nodata.tif")


def count(split: str, empty: bool | None = None) -> int:
    """Files of a split over all labels (only the empty or non-empty ones when `empty` is given)."""
    names = [n for n in FILES[split] if empty is None or (n in EMPTY_NAMES) == empty]
    return len(names) * len(LABELS)


def write_tree(root: Path, token: str) -> Path:
    """`root/<split>/<label>/<file>` of FILES; returns `root`."""
    rng = np.random.default_rng(int(token, 16))
    for split, files in FILES.items():
        for label in LABELS:
            folder = root / split / label
            folder.mkdir(parents=True)
            for name, encode in files.items():
                (folder / name).write_bytes(encode(rng, f"{token}/{split}/{label}/{name}"))
    return root


@pytest.fixture(scope="module")
def versions() -> list[str]:
    return []


@pytest.fixture(scope="module")
def quality_dataset(stack: Settings, tmp_path_factory, versions: list[str]) -> Iterator[str]:
    token = secrets.token_hex(3)
    name = f"it-quality-{token}"
    root = write_tree(tmp_path_factory.mktemp("quality") / "tree", token)
    try:
        ok(orchard("upload", str(root), "--dataset", name))
        yield name
    finally:
        clean_up(Dataset(name, stack, corrupt_key="", versions=versions))


def train(stack: Settings, dataset: str, versions: list[str], *flags: str) -> tuple[dict, dict]:
    """(summary, registry document) of a 1-epoch `orchard train` run."""
    summary = last_json(
        ok(orchard("train", "--dataset", dataset, "--epochs", "1", "--batch-size", "4", *flags, "--json"))
    )
    versions.append(summary["version"])
    doc = es_client(stack).get(index=stack.models_index, id=summary["version"])["_source"]
    return summary, doc


def test_documents_carry_the_quality_measured_at_upload(stack: Settings, quality_dataset: str) -> None:
    hits = es_client(stack).search(
        index=stack.images_index,
        query={"term": {Field.DATASET: quality_dataset}},
        size=1000,
        source_includes=[Field.KEY, Field.QUALITY],
    )["hits"]["hits"]
    assert len(hits) == count("train") + count("test")
    for hit in hits:
        key, quality = hit["_source"][Field.KEY], hit["_source"][Field.QUALITY]
        name = key.rsplit("/", 1)[-1]
        assert quality[Quality.EMPTY] == (name in EMPTY_NAMES), hit["_source"]
        if name == "black.png":
            assert quality[Quality.DARK_FRACTION] == 1.0
        if name == "grey.png":
            assert quality[Quality.STD] == 0.0 and quality[Quality.DARK_FRACTION] == 0.0
        if name == "nodata.tif":
            assert quality[Quality.NODATA_FRACTION] == 1.0
        if name.startswith("noise"):
            assert quality[Quality.NODATA_FRACTION] == 0.0 and quality[Quality.STD] > 0.1


def test_training_leaves_empty_images_out_by_default(
    stack: Settings, quality_dataset: str, versions: list[str]
) -> None:
    summary, doc = train(stack, quality_dataset, versions)
    assert summary["excluded_empty"] == doc["excluded_empty"] == count("train", empty=True), summary
    # evaluation scores every image, empty ones included
    assert (summary["train_images"], summary["test_images"]) == (count("train"), count("test"))


def test_include_empty_keeps_them(stack: Settings, quality_dataset: str, versions: list[str]) -> None:
    summary, doc = train(stack, quality_dataset, versions, "--include-empty")
    assert summary["excluded_empty"] == doc["excluded_empty"] == 0, summary
    assert summary["train_images"] == count("train")
