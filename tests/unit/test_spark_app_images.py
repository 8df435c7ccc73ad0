"""orchard.spark_app.images and the key layout of orchard.core.lake: key parsing, document ids from content,
decoding and its errors."""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pytest
from PIL import Image

from orchard.core import lake
from orchard.spark_app import images
from spark_app_settings import CFG


def jpeg_bytes(size=(60, 40), color=(200, 30, 30), fmt="JPEG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


def test_key_and_labels_come_from_the_layout():
    key = lake.key_of("s3a://images/fruits/train/Apple Red/0_100.jpg", "images")
    assert key == "fruits/train/Apple Red/0_100.jpg"
    assert lake.parse_key(key) == ("fruits", "train", "Apple Red")
    # Spark's binaryFile `path` is the raw key: a literal % stays as it is
    assert lake.key_of("s3a://images/ds/test/x y/a b%41.jpg", "images") == "ds/test/x y/a b%41.jpg"


def test_keys_outside_the_bucket_or_layout_are_rejected():
    with pytest.raises(ValueError):
        lake.key_of("s3a://other/fruits/train/a/b.jpg", "images")
    with pytest.raises(ValueError):
        lake.parse_key("fruits/b.jpg")


def test_dataset_uri_per_split():
    assert lake.dataset_uri("images", "fruits", "test") == "s3a://images/fruits/test/"
    assert lake.dataset_uri("images", "fruits") == "s3a://images/fruits/"
    with pytest.raises(ValueError):
        lake.dataset_uri("images", "a/b")


def test_ref_id_is_the_content_sha256():
    content = jpeg_bytes()
    ref = images.ref_of("s3a://images/ds/test/Lime/1.jpg", content, "images")
    assert ref.id == hashlib.sha256(content).hexdigest()
    assert (ref.dataset, ref.split, ref.label, ref.key) == ("ds", "test", "Lime", "ds/test/Lime/1.jpg")


def test_decode_resizes_to_height_width_and_keeps_colour():
    array = images.decode_image(jpeg_bytes(size=(60, 40)), (100, 80))
    assert array.shape == (100, 80, 3) and array.dtype == np.uint8
    assert array[..., 0].mean() > 150 and array[..., 1].mean() < 80


def photo_like(width: int, height: int) -> bytes:
    """A smooth colour scene with sensor-like noise, as JPEG."""
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    scene = np.stack([np.sin(6 * x + 1), np.cos(5 * y), np.sin(4 * (x + y))], -1) * 90 + 128
    scene += np.random.default_rng(0).normal(0, 6, scene.shape)
    buf = io.BytesIO()
    Image.fromarray(scene.clip(0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def test_a_large_jpeg_is_decoded_at_a_reduced_scale_into_the_same_pixels():
    content = photo_like(1600, 1200)
    full = Image.open(io.BytesIO(content)).convert("RGB").resize((100, 100), Image.Resampling.BILINEAR)
    raster = images.open_raster(content)

    pixels = raster.pixels(images.DEFAULT_CONVERSION, 3, (100, 100))

    assert raster.picture.size == (200, 150)  # libjpeg's 1/8 scale: still >= 100 x 100
    difference = np.abs(pixels.astype(int) - np.asarray(full, dtype=int))
    assert pixels.shape == (100, 100, 3) and difference.mean() < 1 and difference.max() <= 4
    # the quality measure reads an image whole first: it is not shrunk then
    measured = images.open_raster(content)
    measured.quality()
    measured.pixels(images.DEFAULT_CONVERSION, 3, (100, 100))
    assert measured.picture.size == (1600, 1200)


def test_decode_png_and_grayscale():
    array = images.decode_image(jpeg_bytes(fmt="PNG"), (10, 10), channels=1)
    assert array.shape == (10, 10, 1)


def test_undecodable_bytes_give_a_reason_not_a_crash():
    with pytest.raises(images.ImageDecodeError, match="undecodable image"):
        images.decode_image(b"definitely not a jpeg", (100, 100))
    truncated = jpeg_bytes()[:200]
    with pytest.raises(images.ImageDecodeError):
        images.decode_image(truncated, (100, 100))


def test_decode_rows_yields_errors_in_place():
    rows = [("s3a://images/ds/train/a/1.jpg", jpeg_bytes()), ("s3a://images/ds/train/a/2.jpg", b"junk")]
    pairs = [images.file_pair("images", row) for row in rows]
    out = list(images.decode_rows(pairs, CFG, (20, 20)))
    assert out[0][1].shape == (20, 20, 3) and out[0][2] is None
    assert out[1][1] is None and "undecodable" in out[1][2]
