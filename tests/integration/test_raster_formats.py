"""Every format the uploader accepts decodes in the Spark executors (issue 16): a class-per-folder
tree with one file of each format per label and split (8-bit pictures, 16-bit and float TIFFs, a
4-band float TIFF, an .npy array), uploaded with the real uploader, then `orchard infer` with the
ImageNet-pretrained base (no training): every document gets a label and no error.

Commands run as `bin/orchard ...` subprocesses, as in test_spark_app.py. Pixels are random per run
(ids are content hashes: no other test's documents collide with ours).
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

from orchard.core.clients import es_client
from orchard.core.settings import Settings

pytestmark = pytest.mark.integration


MODEL = "imagenet:efficientnet-lite0"
LABELS = ("apple", "lime")
SPLITS = ("Training", "Test")
SIZE = (48, 64)  # height, width


def pillow(fmt: str, **options) -> Callable[[np.random.Generator], bytes]:
    def encode(rng: np.random.Generator) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (*SIZE, 3), dtype=np.uint8)).save(buffer, format=fmt, **options)
        return buffer.getvalue()

    return encode


def tiff(make: Callable[[np.random.Generator], np.ndarray], **options) -> Callable[[np.random.Generator], bytes]:
    def encode(rng: np.random.Generator) -> bytes:
        buffer = io.BytesIO()
        tifffile.imwrite(buffer, make(rng), **options)
        return buffer.getvalue()

    return encode


def npy(rng: np.random.Generator) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, rng.normal(0, 1, SIZE).astype(np.float32), allow_pickle=False)
    return buffer.getvalue()


# file name -> encoder of random pixels
FILES: dict[str, Callable[[np.random.Generator], bytes]] = {
    "photo.jpg": pillow("JPEG"),
    "photo.png": pillow("PNG"),
    "photo.bmp": pillow("BMP"),
    "photo.gif": pillow("GIF"),
    "photo.webp": pillow("WEBP"),
    "rgb8.tif": tiff(lambda rng: rng.integers(0, 256, (*SIZE, 3), dtype=np.uint8), photometric="rgb"),
    "gray16.tif": tiff(lambda rng: rng.integers(0, 65536, SIZE, dtype=np.uint16)),
    "bands4.tif": tiff(
        lambda rng: rng.normal(0, 1, (4, *SIZE)).astype(np.float32), photometric="minisblack", planarconfig="separate"
    ),
    "array.npy": npy,
}
FILE_COUNT = len(FILES) * len(LABELS) * len(SPLITS)


def write_tree(root: Path, seed: int) -> Path:
    """`root/<split>/<label>/<one file per format>`, random pixels from `seed`; returns `root`."""
    rng = np.random.default_rng(seed)
    for split in SPLITS:
        for label in LABELS:
            folder = root / split / label
            folder.mkdir(parents=True)
            for name, encode in FILES.items():
                (folder / name).write_bytes(encode(rng))
    return root


@pytest.fixture(scope="module")
def formats_dataset(stack: Settings, tmp_path_factory) -> Iterator[str]:
    token = secrets.token_hex(3)
    name = f"it-formats-{token}"
    root = write_tree(tmp_path_factory.mktemp("formats") / "tree", int(token, 16))
    try:
        ok(orchard("upload", str(root), "--dataset", name))  # exits non-zero if any file fails
        yield name
    finally:
        clean_up(Dataset(name, stack, corrupt_key=""))


def test_every_accepted_format_is_predicted_without_error(stack: Settings, formats_dataset: str) -> None:
    summary = last_json(ok(orchard("infer", "--dataset", formats_dataset, "--model", MODEL, "--json")))
    assert summary["images"] == FILE_COUNT and summary["errors"] == 0 and summary["failed"] == 0, summary
    es = es_client(stack)
    hits = es.search(
        index=stack.images_index,
        query={"term": {"dataset": formats_dataset}},
        size=1000,
        source_includes=["key", "format", "prediction"],
    )["hits"]["hits"]
    assert len(hits) == FILE_COUNT
    for hit in hits:
        prediction = hit["_source"].get("prediction") or {}
        assert prediction.get("label") and prediction.get("error") is None, hit["_source"]
