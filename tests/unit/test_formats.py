"""Every accepted format (orchard.core.formats): accepted by the uploader, a row of the images table,
and decoded in the executors (orchard.spark_app.images.decode_image with orchard.core.rasters'
default scaling and band selection). Real files, written here with Pillow, tifffile and numpy."""

from __future__ import annotations

import io
import re
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from orchard.core import formats, rasters, table_write
from orchard.spark_app.images import ImageDecodeError, decode_image
from orchard.uploader.discovery import discover
from orchard.uploader.inspection import BadInput, inspect_item

ORCHARD = Path(__file__).resolve().parents[2] / "orchard"
RNG = np.random.default_rng(16)
PICTURE = RNG.integers(0, 256, (24, 32, 3), dtype=np.uint8)


def pillow(fmt: str, mode: str = "RGB", **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(PICTURE).convert(mode).save(buffer, format=fmt, **options)
    return buffer.getvalue()


def tiff(array: np.ndarray, **options) -> bytes:
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, array, **options)
    return buffer.getvalue()


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


GRADIENT16 = (np.arange(24 * 32, dtype=np.uint16).reshape(24, 32) * 80).astype(np.uint16)
FLOAT3 = RNG.normal(0, 1, (24, 32, 3)).astype(np.float32)
BANDS4 = RNG.integers(0, 4000, (4, 24, 32), dtype=np.uint16)

# format name -> (file suffix, bytes, (height, width, channels) of its header)
SAMPLES: dict[str, tuple[str, bytes, tuple[int, int, int]]] = {
    "jpeg": (".jpg", pillow("JPEG"), (24, 32, 3)),
    "png": (".png", pillow("PNG"), (24, 32, 3)),
    "bmp": (".bmp", pillow("BMP"), (24, 32, 3)),
    "gif": (".gif", pillow("GIF", "P"), (24, 32, 1)),
    "webp": (".webp", pillow("WEBP", lossless=True), (24, 32, 3)),
    "tiff": (".tif", tiff(FLOAT3, photometric="rgb"), (24, 32, 3)),
    "npy": (".npy", npy(GRADIENT16), (24, 32, 1)),
}
ALL_SAMPLES = {
    "jpeg": pillow("JPEG"),
    "png": pillow("PNG"),
    "bmp": pillow("BMP"),
    "gif": pillow("GIF", "P"),
    "webp": pillow("WEBP"),
    "tiff 8-bit": tiff(PICTURE, photometric="rgb"),
    "tiff 16-bit 1 band": tiff(GRADIENT16),
    "tiff float32 3 bands": tiff(FLOAT3, photometric="rgb"),
    "tiff uint16 4 bands planar": tiff(BANDS4, photometric="minisblack", planarconfig="separate"),
    "tiff uint16 4 bands interleaved": tiff(np.moveaxis(BANDS4, 0, -1), photometric="minisblack"),
    "npy uint8 (H, W, 3)": npy(PICTURE),
    "npy float32 (H, W)": npy(FLOAT3[..., 0]),
    "npy uint16 (H, W)": npy(GRADIENT16),
}


def test_every_format_has_a_sample_and_a_known_decoder() -> None:
    assert set(SAMPLES) == set(formats.BY_NAME)
    assert {f.decoder for f in formats.FORMATS} <= {formats.PILLOW, formats.TIFF, formats.NPY}
    assert {s for f in formats.FORMATS for s in f.suffixes} == formats.SUFFIXES


def test_the_uploader_accepts_exactly_the_formats_suffixes(tmp_path: Path) -> None:
    """Fails when a suffix is added in one place only: discovery takes every suffix of the formats
    and no other, and inspection names each sample's format as the formats module does."""
    for name, (_, data, _) in SAMPLES.items():
        for suffix in formats.BY_NAME[name].suffixes:
            (tmp_path / "Training" / "a").mkdir(parents=True, exist_ok=True)
            (tmp_path / "Training" / "a" / f"{name}{suffix.upper()}").write_bytes(data)
    for other in (".txt", ".jp2", ".heic", ".csv", ".npz"):
        (tmp_path / "Training" / "a" / f"x{other}").write_bytes(b"x")
    found = discover(tmp_path, "ds")
    assert {formats.suffix_of(item.key) for item in found.items} == formats.SUFFIXES
    assert found.ignored == 5 and found.problems == []
    for item in found.items:
        assert inspect_item(item).format == formats.sniff(item.path.read_bytes()[:16]).name  # type: ignore[union-attr]


def test_no_module_hard_codes_a_suffix_of_its_own() -> None:
    """Suffix literals live in orchard/core/formats.py only (".npy" as the stack suffix included)."""
    literal = re.compile(r"""["']\.(jpe?g|png|bmp|gif|tiff?|webp|npy)["']""", re.IGNORECASE)
    offenders = [
        str(path.relative_to(ORCHARD))
        for path in ORCHARD.rglob("*.py")
        if path.name != "formats.py" and literal.search(path.read_text(encoding="utf-8"))
    ]
    assert offenders == []


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_table_rows_carry_each_formats_header(name: str) -> None:
    _, data, (height, width, channels) = SAMPLES[name]
    header = table_write.image_header(data)
    assert header == {"format": name, "width": width, "height": height, "channels": channels}


def test_npy_and_array_tiff_headers() -> None:
    assert table_write.image_header(npy(np.zeros((13, 40, 30), np.uint16)))["channels"] == 13
    planar = tiff(BANDS4, photometric="minisblack", planarconfig="separate")
    assert table_write.image_header(planar) == {"format": "tiff", "width": 32, "height": 24, "channels": 4}
    assert table_write.image_header(b"\x93NUMPY garbage")["format"] is None


def test_the_uploader_reads_array_tiffs_with_tifffile(tmp_path: Path) -> None:
    """Pillow refuses many-band and float TIFFs: inspection reads their header with tifffile, and
    a truncated one is still caught."""
    planar = tmp_path / "Training" / "a" / "planar.tif"
    planar.parent.mkdir(parents=True)
    planar.write_bytes(ALL_SAMPLES["tiff uint16 4 bands planar"])
    info = inspect_item(discover(tmp_path, "ds").items[0])
    assert (info.format, info.width, info.height, info.channels, info.color_mode) == ("tiff", 32, 24, 4, "4xuint16")
    planar.write_bytes(ALL_SAMPLES["tiff uint16 4 bands planar"][:-500])
    with pytest.raises(BadInput):
        inspect_item(discover(tmp_path, "ds").items[0])


@pytest.mark.parametrize("name", sorted(ALL_SAMPLES))
@pytest.mark.parametrize("channels", [3, 1])
def test_every_sample_decodes_to_the_model_size(name: str, channels: int) -> None:
    array = decode_image(ALL_SAMPLES[name], (16, 20), channels)
    assert array.shape == (16, 20, channels) and array.dtype == np.uint8


def test_8bit_data_keeps_its_values() -> None:
    for data in (pillow("PNG"), tiff(PICTURE, photometric="rgb"), npy(PICTURE)):
        assert np.array_equal(decode_image(data, (24, 32)), PICTURE)


def test_16bit_is_scaled_by_its_own_range_not_clipped() -> None:
    array = decode_image(tiff(GRADIENT16), (24, 32))
    assert array.min() == 0 and array.max() == 255  # Pillow's RGB conversion would clip to 255
    assert np.array_equal(array[..., 0], array[..., 2])  # one band, replicated to 3 channels
    assert np.array_equal(decode_image(npy(GRADIENT16), (24, 32)), array)


def test_float_scaling_is_min_max_over_the_image() -> None:
    array = decode_image(ALL_SAMPLES["tiff float32 3 bands"], (24, 32))
    expected = np.rint((FLOAT3 - FLOAT3.min()) / (FLOAT3.max() - FLOAT3.min()) * 255)
    assert np.abs(array.astype(int) - expected).max() <= 1


def test_four_bands_keep_the_first_three_planar_or_interleaved() -> None:
    planar = decode_image(ALL_SAMPLES["tiff uint16 4 bands planar"], (24, 32))
    interleaved = decode_image(ALL_SAMPLES["tiff uint16 4 bands interleaved"], (24, 32))
    assert np.array_equal(planar, interleaved)
    assert np.array_equal(planar, rasters.scale_to_uint8(np.moveaxis(BANDS4, 0, -1)[..., :3]))


def test_band_selection_and_layout() -> None:
    assert rasters.select_bands(np.zeros((4, 5, 2))).shape == (4, 5, 1)
    assert rasters.select_bands(np.zeros((4, 5, 13))).shape == (4, 5, 3)
    assert rasters.channels_last(np.zeros((13, 64, 32))).shape == (64, 32, 13)
    assert rasters.channels_last(np.zeros((8, 20, 3))).shape == (8, 20, 3)  # a short image, not planar
    with pytest.raises(ValueError, match="not an image"):
        rasters.channels_last(np.zeros((2, 3, 4, 5)))


def test_a_constant_image_becomes_zeros_without_warnings() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for constant in (np.full((8, 8), 7, np.uint16), np.full((8, 8, 3), 0.5, np.float32)):
            assert not rasters.scale_to_uint8(constant).any()
            assert not decode_image(npy(constant), (8, 8)).any()


def test_nan_and_inf_become_zero_and_do_not_set_the_range() -> None:
    data = np.array([[np.nan, 1.0], [np.inf, 3.0], [-np.inf, 2.0]], np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scaled = rasters.scale_to_uint8(data)
        assert not rasters.scale_to_uint8(np.full((3, 3), np.nan, np.float32)).any()
    assert scaled.tolist() == [[0, 0], [0, 255], [0, 128]]


BROKEN: dict[str, Callable[[bytes], bytes]] = {
    "truncated": lambda data: data[: len(data) // 2],
    "garbage after the magic": lambda data: data[:8] + b"\x00garbage" * 8,
}


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")  # Pillow's, reading the garbage TIFFs
@pytest.mark.parametrize("kind", sorted(BROKEN))
@pytest.mark.parametrize(
    "name", ["jpeg", "png", "bmp", "gif", "webp", "tiff 8-bit", "tiff float32 3 bands", "npy float32 (H, W)"]
)
def test_broken_files_of_each_family_give_a_reason(name: str, kind: str) -> None:
    with pytest.raises(ImageDecodeError, match="undecodable image"):
        decode_image(BROKEN[kind](ALL_SAMPLES[name]), (16, 16))


def test_npy_that_is_not_an_image_gives_a_reason() -> None:
    for data in (npy(np.zeros((2, 3, 4, 5))), npy(np.zeros(7))):
        with pytest.raises(ImageDecodeError, match="not an image"):
            decode_image(data, (16, 16))
    pickled = io.BytesIO()
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ImageDecodeError):
        decode_image(pickled.getvalue(), (16, 16))


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_a_header_read_from_a_file_equals_the_one_read_from_bytes(name: str) -> None:
    """lake sync reads a large object's header through a ranged file, not its bytes."""
    _, data, _ = SAMPLES[name]
    assert table_write.image_header(io.BytesIO(data)) == table_write.image_header(data)
