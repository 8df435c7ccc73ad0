"""Image quality (orchard.core.quality): black, constant and no-data images are empty, pictures with
content are not, whatever the dtype; the uploader writes it into the document, training leaves empty
images out unless `--include-empty`."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import pytest
import tifffile
from click.testing import CliRunner
from PIL import Image

from orchard.app import spark_cli
from orchard.core import rasters
from orchard.core.lake import Field, Quality
from orchard.core.quality import MAX_PIXELS, ImageQuality, measure_quality, picture_pixels, subsample
from orchard.spark_app import images
from orchard.spark_app.images import ImageRef
from orchard.spark_app.train import labelled_examples
from orchard.uploader.discovery import WorkItem
from orchard.uploader.index import build_document
from orchard.uploader.inspection import Limits, inspect_item
from spark_app_settings import CFG

RNG = np.random.default_rng(16)


def dark_photo() -> np.ndarray:
    """A night shot: mostly black with sensor noise, a lit window and a street lamp."""
    photo = RNG.integers(0, 7, (120, 160, 3)).astype(np.uint8)
    photo[30:50, 40:70] = RNG.integers(90, 220, (20, 30, 3))
    photo[80:84, 100:140] = 240
    return photo


def encoded(array: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    if fmt == "npy":
        np.save(buffer, array, allow_pickle=False)
    elif fmt == "tiff":
        tifffile.imwrite(buffer, array)
    else:
        Image.fromarray(array).save(buffer, fmt)
    return buffer.getvalue()


# --- the measure ------------------------------------------------------------------------------------


def test_a_black_image_is_empty() -> None:
    quality = measure_quality(np.zeros((64, 64, 3), np.uint8))
    assert quality == ImageQuality(True, 1.0, 0.0, 0.0)


def test_a_black_jpeg_with_compression_noise_is_empty() -> None:
    assert measure_quality(RNG.integers(0, 5, (64, 64, 3)).astype(np.uint8)).empty


@pytest.mark.parametrize("level", [1, 128, 255])
def test_a_constant_grey_is_empty_and_not_dark_unless_black(level: int) -> None:
    quality = measure_quality(np.full((50, 40), level, np.uint8))
    assert quality.empty and quality.std == 0.0 and quality.dark_fraction == (1.0 if level <= 8 else 0.0)


def test_a_uniform_colour_is_constant_although_its_bands_differ() -> None:
    red = np.zeros((32, 32, 3), np.uint8)
    red[..., 0] = 200
    assert measure_quality(red).empty


def test_a_dark_photo_with_structure_is_not_empty() -> None:
    quality = measure_quality(dark_photo())
    assert not quality.empty
    assert 0.9 < quality.dark_fraction < 0.99 and quality.nodata_fraction == 0.0


def test_uint8_noise_is_not_empty() -> None:
    quality = measure_quality(RNG.integers(0, 256, (64, 64, 3)).astype(np.uint8))
    assert not quality.empty and quality.dark_fraction < 0.01 and quality.std > 0.2


def test_16_bit_rasters_are_measured_on_their_own_range() -> None:
    scene = RNG.integers(300, 4000, (4, 64, 64)).astype(np.uint16)  # planar, 12-bit reflectances
    assert not measure_quality(scene).empty
    scene[:, :, :40] = 0  # a scene border: 60% fill, the rest is data
    border = measure_quality(scene)
    assert not border.empty and border.dark_fraction == pytest.approx(40 / 64)
    scene[:] = 0
    scene[:, 0, 0] = 4000  # one valid pixel left
    assert measure_quality(scene).empty
    assert measure_quality(RNG.integers(0, 4, (64, 64)).astype(np.uint16)).empty  # black with sensor noise


def test_a_flat_16_bit_field_is_constant_though_scaling_would_stretch_it() -> None:
    flat = RNG.integers(3000, 3003, (64, 64)).astype(np.uint16)
    assert measure_quality(flat).empty
    assert rasters.to_picture(flat).std() > 50  # what the model would see: full-range noise


def test_float_arrays() -> None:
    assert not measure_quality(RNG.random((48, 48, 3), dtype=np.float32)).empty
    assert measure_quality(np.full((48, 48), 0.37, np.float32)).empty
    assert measure_quality(np.zeros((48, 48), np.float64)).empty
    signed = RNG.normal(0, 1, (48, 48)).astype(np.float32)  # e.g. a difference image around 0
    assert not measure_quality(signed).empty


def test_nan_fill_is_nodata() -> None:
    fill = np.full((64, 64, 2), np.nan, np.float32)
    quality = measure_quality(fill)
    assert quality.empty and quality.nodata_fraction == 1.0 and quality.dark_fraction == 0.0
    fill[:, :32] = RNG.random((64, 32, 2))
    half = measure_quality(fill)
    assert not half.empty and half.nodata_fraction == 0.5
    fill[:, 32:] = np.inf
    assert measure_quality(fill).nodata_fraction == 0.5


def test_a_declared_nodata_value_counts_as_nodata_not_as_black() -> None:
    array = RNG.random((64, 64)).astype(np.float32)
    array[:, :64] = -9999.0
    array[0, 0] = 0.5
    quality = measure_quality(array, nodata=-9999.0)
    assert quality.empty and quality.nodata_fraction > 0.99 and quality.dark_fraction < 0.01
    assert measure_quality(array).nodata_fraction == 0.0  # undeclared: a value like any other


def test_black_and_nodata_together_make_an_empty_tile() -> None:
    tile = np.zeros((100, 100), np.float32)
    tile[:60] = np.nan
    tile[99, :50] = RNG.random(50) + 0.5  # a sliver of data
    quality = measure_quality(tile)
    assert quality.empty and quality.nodata_fraction == 0.6 and quality.dark_fraction < 0.99


def test_large_rasters_are_measured_on_a_bounded_subsample() -> None:
    big = np.zeros((3000, 2000, 3), np.uint8)
    assert subsample(big).shape[0] * subsample(big).shape[1] <= MAX_PIXELS
    assert measure_quality(big).empty


@pytest.mark.parametrize(
    ("mode", "shape"), [("P", (20, 30, 3)), ("RGBA", (20, 30, 3)), ("1", (20, 30)), ("L", (20, 30))]
)
def test_pillow_modes_are_measured_as_grey_or_rgb(mode: str, shape: tuple[int, ...]) -> None:
    picture = Image.fromarray(RNG.integers(0, 256, (20, 30, 3)).astype(np.uint8)).convert(mode)
    assert picture_pixels(picture).shape == shape


def test_tiff_nodata_is_read_from_the_gdal_tag() -> None:
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, np.zeros((8, 8), np.float32), extratags=[(rasters.GDAL_NODATA, "s", 0, "-9999", True)])
    assert rasters.read_tiff_raster(buffer.getvalue())[1] == -9999.0
    assert rasters.read_tiff_raster(encoded(np.zeros((8, 8), np.float32), "tiff"))[1] is None


# --- the uploader -----------------------------------------------------------------------------------


def inspected(tmp_path: Path, name: str, data: bytes, limits: Limits | None = None):
    path = tmp_path / name
    path.write_bytes(data)
    return inspect_item(WorkItem(path, "d/train/l/" + name, "d", "train", "l", "L"), limits or Limits())


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "npy", "tiff"])
def test_inspection_measures_every_format(tmp_path: Path, fmt: str) -> None:
    black = inspected(tmp_path, f"black.{fmt.lower()}", encoded(np.zeros((40, 40, 3), np.uint8), fmt))
    photo = inspected(tmp_path, f"photo.{fmt.lower()}", encoded(dark_photo(), fmt))
    assert black.quality is not None and black.quality.empty
    assert photo.quality is not None and not photo.quality.empty


def test_inspection_measures_16_bit_tiffs_with_their_nodata(tmp_path: Path) -> None:
    array = np.full((32, 32), 65535, np.uint16)
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, array, extratags=[(rasters.GDAL_NODATA, "s", 0, "65535", True)])
    info = inspected(tmp_path, "fill.tif", buffer.getvalue())
    assert info.quality is not None and info.quality.empty and info.quality.nodata_fraction == 1.0


def test_pictures_not_decoded_have_no_quality(tmp_path: Path) -> None:
    info = inspected(tmp_path, "a.png", encoded(dark_photo(), "PNG"), Limits(verify_pixels=100))
    assert info.quality is None  # a PNG above the limit is only checksummed


def test_the_document_carries_quality_when_measured(tmp_path: Path) -> None:
    info = inspected(tmp_path, "black.png", encoded(np.zeros((10, 10), np.uint8), "PNG"))
    doc = build_document(info, "images", "etag", "2026-01-01T00:00:00.000Z")
    assert doc[Field.QUALITY] == {
        Quality.EMPTY: True,
        Quality.DARK_FRACTION: 1.0,
        Quality.NODATA_FRACTION: 0.0,
        Quality.STD: 0.0,
    }
    unmeasured = inspected(tmp_path, "b.png", encoded(dark_photo(), "PNG"), Limits(verify_pixels=100))
    assert Field.QUALITY not in build_document(unmeasured, "images", "etag", "2026-01-01T00:00:00.000Z")


# --- the executors and training ---------------------------------------------------------------------


class Counter:
    """An accumulator stand-in."""

    def __init__(self) -> None:
        self.value = 0

    def add(self, n: int) -> None:
        self.value += n


def test_executors_measure_the_stored_pixels_not_the_scaled_picture() -> None:
    flat = RNG.integers(3000, 3003, (64, 64)).astype(np.uint16)
    array, quality = images.decoded(encoded(flat, "npy"), (16, 16), 3, measure=True)
    assert array.shape == (16, 16, 3) and quality is not None and quality.empty
    nan = np.full((16, 16), np.nan, np.float32)
    _, tiff_quality = images.decoded(encoded(nan, "tiff"), (8, 8), 3, measure=True)
    assert tiff_quality is not None and tiff_quality.nodata_fraction == 1.0
    assert images.decoded(encoded(flat, "npy"), (16, 16), 3, measure=False)[1] is None


def rows() -> list[tuple[ImageRef, bytes]]:
    contents = {
        "black": encoded(np.zeros((20, 20, 3), np.uint8), "PNG"),
        "grey": encoded(np.full((20, 20, 3), 90, np.uint8), "JPEG"),
        "photo": encoded(dark_photo(), "PNG"),
        "noise": encoded(RNG.integers(0, 256, (20, 20, 3)).astype(np.uint8), "PNG"),
        "broken": b"not an image",
    }
    return [(ImageRef(name, f"d/train/a/{name}.png", "d", "train", "a"), data) for name, data in contents.items()]


def test_training_leaves_empty_images_out_by_default_and_counts_them() -> None:
    skipped, excluded = Counter(), Counter()
    examples = list(labelled_examples(CFG, ("a", "b"), "scale01", (8, 8), rows(), skipped, excluded=excluded))
    assert (len(examples), skipped.value, excluded.value) == (2, 1, 2)


def test_include_empty_keeps_them() -> None:
    skipped, excluded = Counter(), Counter()
    examples = list(labelled_examples(CFG, ("a", "b"), "scale01", (8, 8), rows(), skipped, True, excluded))
    assert (len(examples), skipped.value, excluded.value) == (4, 1, 0)


# --- `orchard train --include-empty` ----------------------------------------------------------------


@pytest.fixture
def runs(monkeypatch) -> list[tuple[str, tuple, dict]]:
    """The run functions `orchard train` would call, recorded instead of run."""
    calls: list[tuple[str, tuple, dict]] = []
    doc = {
        "version": "cnn-1",
        "family": "cnn",
        "base": None,
        "trained_on_version": 3,
        "metrics": {"test_accuracy": 0.5},
        "num_classes": 2,
        "train_images": 10,
        "test_images": 4,
        "params": 100,
        "training_seconds": 1.0,
        "model_uri": "s3a://models/cnn-1/model.keras",
        "excluded_empty": 3,
    }

    def run_training(*args, **kwargs):
        calls.append(("cnn", args, kwargs))
        return doc

    def run_transfer(spark, s, plan, as_of):
        calls.append(("transfer", (plan,), {}))
        return doc

    monkeypatch.setattr(spark_cli, "spark_session", lambda *a, **k: contextlib.nullcontext())
    monkeypatch.setattr(spark_cli, "run_training", run_training)
    monkeypatch.setattr(spark_cli, "run_transfer", run_transfer)
    return calls


def train(*flags: str):
    result = CliRunner().invoke(spark_cli.train, ["--dataset", "d", *flags], obj=CFG)
    assert result.exit_code == 0, result.output
    return result


def test_train_leaves_empty_images_out_unless_include_empty(runs) -> None:
    assert "excluded_empty: 3" in train().output
    train("--include-empty")
    (_, default, _), (_, included, _) = runs
    assert (default[-2], included[-2]) == (False, True)  # run_training's include_empty (then the conversion)


def test_train_passes_bands_and_scaling_and_refuses_them_where_they_do_not_apply(runs) -> None:
    train("--bands", "4,3,2", "--scaling", "percentile:2,98")
    assert runs[-1][1][-1] == rasters.Conversion((4, 3, 2), "percentile", (2.0, 98.0))
    for flags, says in (
        (("--bands", "0,1"), "start at 1"),
        (("--scaling", "gamma"), "expected one of"),
        (("--base", "efficientnet-lite0", "--bands", "4,3,2"), "for --family cnn, not transfer"),
        (("--family", "bovw", "--scaling", "max"), "for --family cnn, not bovw"),
    ):
        result = CliRunner().invoke(spark_cli.train, ["--dataset", "d", *flags], obj=CFG)
        assert result.exit_code == 2 and says in result.output, (flags, result.output)
    assert len(runs) == 1  # nothing ran for the refused flags


def test_train_with_a_base_passes_include_empty_in_the_plan(runs) -> None:
    train("--base", "efficientnet-lite0", "--fine-tune", "2", "--include-empty")
    train("--base", "efficientnet-lite0")
    (_, (included,), _), (_, (default,), _) = runs
    assert (included.include_empty, included.fine_tune, default.include_empty) == (True, 2, False)
