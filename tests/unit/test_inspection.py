"""Inspection: sha256, image properties, and the reason code for every kind of bad file."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from orchard.uploader.discovery import WorkItem
from orchard.uploader.inspection import SMALL_FILE, BadInput, Limits, inspect_item, read_stack_row
from orchard.uploader.synth import class_specs, encode_jpeg, image_rng, render


def item_for(path: Path, row: int | None = None) -> WorkItem:
    return WorkItem(path, "d/train/l/" + path.name, "d", "train", "l", "L", row)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=True)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def fruit() -> Image.Image:
    return render(class_specs(1, seed=9)[0], image_rng(9, 0, "train", 0))


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_jpeg_properties_and_sha(tmp_path: Path, fruit: Image.Image) -> None:
    data = encode_jpeg(fruit)
    info = inspect_item(item_for(write(tmp_path, "a.jpg", data)))
    assert info.sha256 == hashlib.sha256(data).hexdigest() and info.size == len(data)
    assert (info.format, info.width, info.height, info.channels, info.color_mode) == ("jpeg", 100, 100, 3, "RGB")
    assert info.data == data and info.content_type == "image/jpeg"


@pytest.mark.parametrize(("mode", "channels"), [("L", 1), ("RGBA", 4), ("P", 1)])
def test_png_modes(tmp_path: Path, fruit: Image.Image, mode: str, channels: int) -> None:
    info = inspect_item(item_for(write(tmp_path, "a.png", png_bytes(fruit.convert(mode)))))
    assert (info.format, info.color_mode, info.channels) == ("png", mode, channels)


def test_large_files_are_streamed_not_kept(tmp_path: Path) -> None:
    noise = np.random.default_rng(0).integers(0, 255, (800, 800, 3), dtype=np.uint8)
    data = png_bytes(Image.fromarray(noise))
    assert len(data) > SMALL_FILE
    info = inspect_item(item_for(write(tmp_path, "big.png", data)))
    assert info.data is None and info.sha256 == hashlib.sha256(data).hexdigest()
    assert (info.width, info.height) == (800, 800)


def test_npy_image_properties(tmp_path: Path) -> None:
    rgb = inspect_item(item_for(write(tmp_path, "rgb.npy", npy_bytes(np.zeros((30, 20, 3), np.uint8)))))
    assert (rgb.format, rgb.width, rgb.height, rgb.channels, rgb.color_mode) == ("npy", 20, 30, 3, "RGB")
    bands = inspect_item(item_for(write(tmp_path, "s2.npy", npy_bytes(np.zeros((13, 64, 32), np.uint16)))))
    assert (bands.width, bands.height, bands.channels, bands.color_mode) == (32, 64, 13, "13xuint16")
    grey = inspect_item(item_for(write(tmp_path, "g.npy", npy_bytes(np.zeros((5, 6), np.float32)))))
    assert (grey.channels, grey.color_mode) == (1, "1xfloat32")


def test_stack_rows_are_standalone_npy(tmp_path: Path) -> None:
    stack = np.arange(3 * 4 * 5, dtype=np.int16).reshape(3, 4, 5)
    path = tmp_path / "stack.npy"
    np.save(path, stack)
    data = read_stack_row(path, 2)
    assert np.array_equal(np.load(io.BytesIO(data)), stack[2])
    info = inspect_item(item_for(path, row=2))
    assert info.data == data and info.sha256 == hashlib.sha256(data).hexdigest()
    assert (info.width, info.height, info.channels) == (5, 4, 1)


def corrupt_png(fruit: Image.Image) -> bytes:
    data = bytearray(png_bytes(fruit))
    data[len(data) // 2] ^= 0xFF  # inside IDAT
    return bytes(data)


def bad_jpeg_header(fruit: Image.Image) -> bytes:
    data = bytearray(encode_jpeg(fruit))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = b"\0\0\0\0"  # zero width and height
    return bytes(data)


BAD_CASES = {
    "empty.jpg": (lambda f: b"", "empty"),
    "truncated.jpg": (lambda f: encode_jpeg(f)[: len(encode_jpeg(f)) // 2], "truncated"),
    "truncated.png": (lambda f: png_bytes(f)[: len(png_bytes(f)) // 2], "truncated"),
    "text.jpg": (lambda f: b"this is a text file, not a JPEG\n" * 20, "not_image"),
    "header.jpg": (bad_jpeg_header, "corrupt"),
    "flipped.png": (corrupt_png, "corrupt"),
    "truncated.npy": (lambda f: npy_bytes(np.zeros((10, 10, 3), np.uint8))[:-7], "truncated"),
    "object.npy": (lambda f: npy_bytes(np.array([{"a": 1}], dtype=object)), "not_image"),
    "magic.npy": (lambda f: b"not numpy at all", "not_image"),
    "volume.npy": (lambda f: npy_bytes(np.zeros((2, 3, 4, 5), np.uint8)), "not_image"),
}


@pytest.mark.parametrize("name", sorted(BAD_CASES))
def test_bad_files_get_a_reason_code(tmp_path: Path, fruit: Image.Image, name: str) -> None:
    make, code = BAD_CASES[name]
    with pytest.raises(BadInput) as caught:
        inspect_item(item_for(write(tmp_path, name, make(fruit))))
    assert caught.value.code == code, caught.value.reason
    assert caught.value.reason and "\n" not in caught.value.reason


def test_decompression_bomb_limit(tmp_path: Path) -> None:
    path = write(tmp_path, "bomb.png", png_bytes(Image.new("L", (2000, 1000))))
    with pytest.raises(BadInput) as caught:
        inspect_item(item_for(path), Limits(max_pixels=1_000_000))
    assert caught.value.code == "decompression_bomb" and "2000x1000" in caught.value.reason
    assert inspect_item(item_for(path), Limits(max_pixels=0)).width == 2000


def test_above_the_decode_limit_jpeg_is_still_checked_at_reduced_scale(tmp_path: Path, fruit: Image.Image) -> None:
    data = encode_jpeg(fruit)
    path = write(tmp_path, "t.jpg", data[: len(data) // 2])
    with pytest.raises(BadInput) as caught:
        inspect_item(item_for(path), Limits(verify_pixels=10))
    assert caught.value.code == "truncated"


def test_above_the_decode_limit_png_chunks_are_crc_checked(tmp_path: Path, fruit: Image.Image) -> None:
    path = write(tmp_path, "c.png", corrupt_png(fruit))
    with pytest.raises(BadInput) as caught:
        inspect_item(item_for(path), Limits(verify_pixels=10))
    assert caught.value.code == "corrupt"


def test_unreadable_and_vanished_files(tmp_path: Path) -> None:
    (tmp_path / "dir.jpg").mkdir()
    for path in (tmp_path / "dir.jpg", tmp_path / "gone.jpg"):
        with pytest.raises(BadInput) as caught:
            inspect_item(item_for(path))
        assert caught.value.code == "unreadable"


def test_a_raster_tiff_above_the_pixel_limit_is_a_bomb_only_if_it_declares_far_more_than_it_holds(
    tmp_path: Path,
) -> None:
    """Rasters are read by tiles (orchard infer), not whole: a large scene passes the pixel limit;
    a compressed file declaring 200 times its bytes in samples does not."""
    import tifffile

    scene = tmp_path / "scene.tif"
    tifffile.imwrite(scene, np.arange(2000 * 1000, dtype=np.uint16).reshape(1000, 2000))
    assert inspect_item(item_for(scene), Limits(max_pixels=1_000_000)).width == 2000
    bomb = tmp_path / "bomb.tif"
    tifffile.imwrite(bomb, np.zeros((3000, 3000), np.uint16), compression="zlib")
    with pytest.raises(BadInput) as caught:
        inspect_item(item_for(bomb), Limits(max_pixels=1_000_000))
    assert caught.value.code == "decompression_bomb" and "9000000 pixels" in caught.value.reason
    assert inspect_item(item_for(bomb), Limits(max_pixels=0)).height == 3000
