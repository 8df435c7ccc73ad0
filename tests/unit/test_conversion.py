"""Band selection and value scaling chosen at training (orchard.core.rasters.Conversion): parsing of
the flags, the model card entry, and what the decoder gives the model (issue 16, deliverable 2)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import tifffile
from PIL import Image

from orchard.core import rasters
from orchard.core.rasters import Conversion, conversion_from_card, conversion_of
from orchard.spark_app.images import ImageDecodeError, decode_image

# 5 planar bands (bands first, both sides over 16) of 20x24 uint16: band b (1-based) holds 1000 * b,
# but for one pixel
BANDS5 = np.stack([np.full((20, 24), 1000 * b, np.uint16) for b in range(1, 6)])
BANDS5[:, 0, 0] = 0


def tiff_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, array, photometric="minisblack", planarconfig="separate")
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("bands", "scaling", "expected"),
    [
        (None, None, Conversion()),
        ("4,3,2", None, Conversion((4, 3, 2))),
        ("1", "max", Conversion((1,), "max")),
        (None, "percentile:2,98", Conversion((), "percentile", (2.0, 98.0))),
        ("8,4,3", "range:0,3000", Conversion((8, 4, 3), "range", (0.0, 3000.0))),
    ],
)
def test_flags_parse_to_a_conversion(bands, scaling, expected: Conversion) -> None:
    assert conversion_of(bands, scaling) == expected


@pytest.mark.parametrize(
    ("bands", "scaling", "says"),
    [
        ("0,1,2", None, "start at 1"),
        ("red,green", None, "1-based band numbers"),
        (None, "gamma", "expected one of"),
        (None, "percentile:2", "percentile:LOW,HIGH"),
        (None, "percentile:5,200", "between 0 and 100"),
        (None, "range:3000,0", "range:LOW,HIGH"),
        (None, "range:a,b", "must be numbers"),
        (None, "max:1,2", "takes no LOW,HIGH"),
    ],
)
def test_bad_flags_say_what_is_wrong(bands, scaling, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        conversion_of(bands, scaling)


def test_the_card_entry_round_trips_and_old_cards_mean_the_default() -> None:
    conversion = conversion_of("4,3,2", "percentile:2.5,97.5")
    card = {"conversion": conversion.to_card()}
    assert card["conversion"] == {"bands": [4, 3, 2], "scaling": "percentile:2.5,97.5"}
    assert conversion_from_card(card) == conversion
    assert conversion_from_card({}) == Conversion() and Conversion().is_default


def test_bands_are_taken_in_the_order_named() -> None:
    picked = Conversion((4, 3, 2), "range", (0, 5000)).apply(BANDS5)
    assert picked.shape == (20, 24, 3) and picked.dtype == np.uint8
    assert picked[1, 1].tolist() == [204, 153, 102]  # 4000, 3000, 2000 of 0..5000 -> 0..255
    with pytest.raises(ValueError, match="band 6 asked"):
        Conversion((6,)).apply(BANDS5)


def test_each_scaling_maps_values_as_documented() -> None:
    values = np.arange(101, dtype=np.float32).reshape(1, 101)  # 0..100
    values[0, 50] = np.nan
    assert Conversion(scaling="max").apply(values)[0, 100, 0] == 255
    assert Conversion(scaling="max").apply(values + 100)[0, 0, 0] == 128  # 100 of 0..200: 0 stays black
    assert Conversion(scaling="minmax").apply(values + 100)[0, 0, 0] == 0
    clipped = Conversion(scaling="percentile", bounds=(10, 90)).apply(values)
    assert clipped[0, 5, 0] == 0 and clipped[0, 95, 0] == 255 and 0 < clipped[0, 40, 0] < 255
    fixed = Conversion(scaling="range", bounds=(0, 50)).apply(values)
    assert fixed[0, 25, 0] == 128 and fixed[0, 80, 0] == 255 and fixed[0, 50, 0] == 0  # NaN -> 0
    eight_bit = np.array([[10, 20]], np.uint8)
    assert Conversion(scaling="minmax").apply(eight_bit)[0, :, 0].tolist() == [0, 255]  # uint8 too, when asked
    assert Conversion().apply(eight_bit)[0, :, 0].tolist() == [10, 20]  # auto: uint8 as stored


def test_one_scaling_range_over_all_bands_keeps_their_relative_brightness() -> None:
    out = Conversion((1, 5), "minmax").apply(BANDS5)
    assert out[1, 1].tolist() == [51, 255]  # 1000 and 5000 of 0..5000, not each band stretched alone


def test_the_decoder_gives_the_model_one_channel_per_band_at_its_size() -> None:
    content = tiff_bytes(BANDS5)
    five = decode_image(content, (8, 12), 5, Conversion((1, 2, 3, 4, 5), "range", (0, 5000)))
    assert five.shape == (8, 12, 5) and five.dtype == np.uint8
    assert five[4, 6].tolist() == [51, 102, 153, 204, 255]
    rgb = decode_image(content, (20, 24), 3, Conversion((3, 2, 1)))
    assert rgb[1, 1].tolist() == [255, 170, 85]  # auto: min-max of 0..3000 over the 3 chosen bands
    with pytest.raises(ImageDecodeError, match=r"^2 bands selected, the model takes 3$"):
        decode_image(content, (20, 24), 3, Conversion((1, 2)))
    with pytest.raises(ImageDecodeError, match=r"^band 6 asked"):  # decodable: no "undecodable image" prefix
        decode_image(content, (20, 24), 3, Conversion((6, 1, 2)))


def test_scaling_alone_keeps_the_default_bands_and_the_models_channels() -> None:
    buffer = io.BytesIO()
    Image.fromarray(np.array([[10, 20], [30, 40]], np.uint8)).save(buffer, format="PNG")
    grey = buffer.getvalue()
    stretched = decode_image(grey, (2, 2), 3, Conversion(scaling="minmax"))
    assert stretched.shape == (2, 2, 3) and stretched[0, 0].tolist() == [0, 0, 0] and stretched[1, 1, 0] == 255
    assert decode_image(grey, (2, 2), 3)[1, 1].tolist() == [40, 40, 40]  # the default: as stored


def test_the_default_conversion_is_the_module_default() -> None:
    array = np.random.default_rng(0).normal(0, 1, (7, 9, 4)).astype(np.float32)
    assert np.array_equal(Conversion().apply(array), rasters.to_picture(array))
