"""Images from s3a into Spark: which files, what their keys say (dataset/split/label), decoding in executors.

Key layout (orchard.core.lake, written by the uploader): `<dataset>/<split>/<label>/<file>` in the
images bucket; the image's Elasticsearch document id is the sha256 of its bytes, so it is recomputed here from the
content and never needs a lookup.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from orchard.core.errors import DatasetNotFound
from orchard.core.lake import dataset_uri, key_of, parse_key

IMAGE_GLOB = "*.{jpg,jpeg,png,JPG,JPEG,PNG}"
# binaryFile counts every file as its length + openCostInBytes when packing partitions; with
# thumbnails the open cost dominates, so images per partition ~= maxPartitionBytes / openCost.
OPEN_COST_BYTES = 4 * 1024 * 1024


class ImageDecodeError(ValueError):
    """The bytes are not an image Pillow can decode."""


@dataclass(frozen=True)
class ImageRef:
    """Where an image is and what its key says about it."""

    id: str  # sha256 of the content = the Elasticsearch document id
    key: str  # key in the images bucket
    dataset: str
    split: str
    label: str


def ref_of(path: str, content: bytes, bucket: str) -> ImageRef:
    """The ImageRef of one file read by Spark."""
    key = key_of(path, bucket)
    dataset, split, label = parse_key(key)
    return ImageRef(hashlib.sha256(content).hexdigest(), key, dataset, split, label)


def decode_image(content: bytes, size: tuple[int, int], channels: int = 3) -> np.ndarray:
    """uint8 array (height, width, channels) of an encoded image, resized to `size` = (height, width).

    Raises ImageDecodeError with a short reason when Pillow cannot read the bytes.
    """
    try:
        with Image.open(io.BytesIO(content)) as opened:
            img = opened.convert("L" if channels == 1 else "RGB")
            if img.size != (size[1], size[0]):
                img = img.resize((size[1], size[0]), Image.Resampling.BILINEAR)
            array = np.asarray(img, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise ImageDecodeError(f"undecodable image: {type(exc).__name__}: {exc}"[:240]) from None
    return array[..., None] if channels == 1 else array


def decode_rows(
    rows: Iterable, bucket: str, size: tuple[int, int], channels: int = 3
) -> Iterator[tuple[ImageRef, np.ndarray | None, str | None]]:
    """(ref, uint8 array or None, error or None) per (path, content) row, lazily (runs in executors)."""
    for row in rows:
        content = bytes(row[1])
        ref = ref_of(row[0], content, bucket)
        try:
            yield ref, decode_image(content, size, channels), None
        except ImageDecodeError as exc:
            yield ref, None, str(exc)


def read_image_files(spark, bucket: str, dataset: str, split: str | None = None, images_per_partition: int = 64):
    """DataFrame (path, content) of every image file of a dataset split, read through s3a.

    Only the file listing happens on the driver; the bytes are read by the executors.
    `images_per_partition` sets how many files go into one task (smaller = finer retries).
    """
    from pyspark.errors import AnalysisException

    spark.conf.set("spark.sql.files.openCostInBytes", str(OPEN_COST_BYTES))
    spark.conf.set("spark.sql.files.maxPartitionBytes", str(OPEN_COST_BYTES * max(1, images_per_partition)))
    root = dataset_uri(bucket, dataset, split)
    reader = spark.read.format("binaryFile").option("recursiveFileLookup", "true").option("pathGlobFilter", IMAGE_GLOB)
    try:
        return reader.load(root).select("path", "content")
    except AnalysisException as exc:
        if "PATH_NOT_FOUND" not in str(exc):
            raise
        what = f"dataset {dataset!r}" + (f" (split {split!r})" if split else "")
        raise DatasetNotFound(
            f"{what} has no objects at {root}: upload it first (`orchard upload DIR "
            f"--dataset {dataset}`) or check --dataset/--split"
        ) from None
