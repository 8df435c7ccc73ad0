"""Whether an image carries information: the one measure the uploader writes into the image document
(`quality`, orchard.core.lake.Quality) and the executors apply when `orchard train` leaves empty images out.

`measure_quality(array, nodata)` takes the decoded pixels as they are stored, before any scaling
to 8 bits (which would stretch a flat 16-bit tile into full-range noise and turn NaN into black):
- `nodata_fraction`: pixels none of whose bands holds a value (NaN, +-inf, or the TIFF's declared
  no-data value, GDAL_NODATA).
- `dark_fraction`: pixels every band of which holds a value at most DARK_LEVEL of the value scale
  above black (no-data is not black). The value scale: uint8 (and bilevel) 0..255; other integer
  types from black (0, or the minimum if negative) to the image's maximum, at least 255 (a 16-bit
  tile whose values stay below 256 is dark, not a picture to stretch); floats from black to the
  image's finite maximum (their unit is unknown: reflectance 0..1, radiance, dB).
- `std`: the largest standard deviation of one band's valid values, as a fraction of the value
  scale (8-bit: / 255).
- `empty`: no information: near-constant (std at most NEAR_CONSTANT_STD), or at least EMPTY_FRACTION
  of the pixels dark or no-data (either, or both together: a border tile of black and NaN fill).
  A dark photo with some content (a night street: most pixels black, a few lit windows) is not
  empty; an all-black tile at a scene border or a no-data fill is.

Large rasters are measured on a regular subsample of at most MAX_PIXELS pixels (every k-th row and
column), so the cost is bounded, and the same pixels give the same answer in the uploader and the executors.

Pure numpy (Pillow images are taken duck-typed by `picture_pixels`); nothing is read at import time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import numpy as np

from orchard.core.lake import Quality
from orchard.core.rasters import channels_last

if TYPE_CHECKING:
    from PIL import Image

# Black: at most 8 of 255 grey levels, where JPEG noise and sensor dark current leave "black" pixels
# (a black tile compressed as JPEG is 0..6), while the darkest visible content of a photo is above it.
DARK_LEVEL: Final = 8 / 255
# Near-constant: a standard deviation of at most one 8-bit grey level. A flat tile (one colour,
# a blank fill) has 0 to well under 1 after compression; any visible structure has several levels.
NEAR_CONSTANT_STD: Final = 1 / 255
# Empty when at least this fraction of the pixels is black or no-data: the all-black tiles at a
# satellite scene's border and no-data fills, which keep at most a sliver of real pixels. Below it an
# image with a small subject on black (a dark photo, a night shot) still counts as information.
EMPTY_FRACTION: Final = 0.99
# Pixels measured at most (a regular subsample above it): ~1 Mpx keeps the measure to a few
# milliseconds and some tens of MB whatever the raster's size, and fractions of 1% stay exact enough.
MAX_PIXELS: Final = 1_000_000
UINT8_SCALE: Final = 255.0
DIGITS: Final = 6  # stored fractions are rounded to this many decimals


@dataclass(frozen=True)
class ImageQuality:
    """The quality of one image (module docstring): `empty`, and the measures it is decided from."""

    empty: bool
    dark_fraction: float
    nodata_fraction: float
    std: float

    def document(self) -> dict:
        """The image document's `quality` object (es_mappings/images.json)."""
        return {
            Quality.EMPTY: self.empty,
            Quality.DARK_FRACTION: self.dark_fraction,
            Quality.NODATA_FRACTION: self.nodata_fraction,
            Quality.STD: self.std,
        }


def measure_quality(array: np.ndarray, nodata: float | None = None) -> ImageQuality:
    """The quality of a decoded image array ((H, W), (H, W, C) or (C, H, W), any numeric dtype);
    `nodata`: the value the file declares as no-data, if any. Returns an ImageQuality."""
    pixels = subsample(channels_last(array))
    values = pixels.astype(np.float64) if pixels.dtype != np.float64 else pixels
    finite = np.isfinite(values)
    missing = ~finite if nodata is None or math.isnan(nodata) else ~finite | (values == nodata)
    nodata_pixels = missing.all(axis=-1)
    black, scale = value_scale(pixels.dtype, values[~missing])
    dark = (np.where(missing, np.inf, values) <= black + DARK_LEVEL * scale).all(axis=-1)
    dark_fraction = float(dark.mean()) if dark.size else 1.0
    nodata_fraction = float(nodata_pixels.mean()) if nodata_pixels.size else 1.0
    std = band_std(values, missing) / scale if scale > 0 else 0.0
    blank = (dark | nodata_pixels).mean() if dark.size else 1.0  # black or no-data
    empty = bool(std <= NEAR_CONSTANT_STD or blank >= EMPTY_FRACTION)
    return ImageQuality(empty, round(dark_fraction, DIGITS), round(nodata_fraction, DIGITS), round(std, DIGITS))


def band_std(values: np.ndarray, missing: np.ndarray) -> float:
    """The largest standard deviation of one band's valid values (0 if none has any): a uniform
    colour is constant although its bands differ."""
    bands = values.reshape(-1, values.shape[-1]).T
    holes = missing.reshape(-1, missing.shape[-1]).T
    return max(
        (float(band[~hole].std()) for band, hole in zip(bands, holes, strict=True) if not hole.all()), default=0.0
    )


def subsample(array: np.ndarray) -> np.ndarray:
    """Every k-th row and column of an (H, W, C) array, k the smallest that leaves at most MAX_PIXELS."""
    height, width = array.shape[:2]
    step = max(1, math.ceil(math.sqrt(height * width / MAX_PIXELS)))
    return array[::step, ::step] if step > 1 else array


def value_scale(dtype: np.dtype, valid: np.ndarray) -> tuple[float, float]:
    """(black, scale) of an image's values (module docstring): black is 0 unless values go below it."""
    if dtype in (np.uint8, np.bool_):
        return 0.0, UINT8_SCALE if dtype == np.uint8 else 1.0
    if not valid.size:
        return 0.0, 0.0
    black = min(float(valid.min()), 0.0)
    span = float(valid.max()) - black
    if np.issubdtype(dtype, np.integer):
        return black, max(span, UINT8_SCALE)
    return black, span if math.isfinite(span) else 0.0


def picture_pixels(image: Image.Image) -> np.ndarray:
    """The pixels of a decoded Pillow image as measure_quality takes them: 16/32-bit integer and float
    modes as they are, bilevel and grey as L, anything else (palette, alpha, CMYK, ...) as RGB."""
    mode = image.mode
    if mode in ("I", "F") or mode.startswith("I;16"):
        return np.asarray(image)
    if mode in ("1", "L", "LA", "La"):
        return np.asarray(image.convert("L"))
    return np.asarray(image.convert("RGB"))
