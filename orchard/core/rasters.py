"""Arrays that are images but not 8-bit pictures: `.npy` objects and TIFFs Pillow cannot give as 8-bit
(16-bit, float, more than 4 bands), read with numpy and tifffile (pure Python: executors stay light).

Default conversion to what the models take (uint8, 1 or 3 channels), `to_picture`:
- Layout: channels-first data (the first axis short, <= 16, and both others longer, as tifffile
  returns planar TIFFs and Sentinel-2 tiles come) is transposed to (H, W, bands) (`image_shape`).
- Bands: 1 as is, 2 -> the first, 3 as is, 4 or more -> the first 3 (choosing other bands comes
  with band-selection flags later).
- Values: uint8 as is; any other type is scaled per image by min-max over its finite values to
  0..255 (NaN and +-inf become 0; a constant image becomes all zeros).

tifffile alone (no imagecodecs) decodes uncompressed, Deflate, PackBits, LZMA and Zstd TIFFs; an
LZW- or JPEG-compressed 16-bit/float TIFF is refused with that reason (8-bit ones go to Pillow,
which reads them all).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
import tifffile

PLANAR_MAX_BANDS = 16  # a first axis this short, with both others longer, holds bands
GDAL_NODATA = 42113  # the TIFF tag GDAL writes a raster's no-data value into (ASCII)
PICTURE_MAX_BANDS = 4  # Pillow reads 8-bit TIFFs with up to 4 bands (L, LA, RGB, RGBA, CMYK)


@dataclass(frozen=True)
class RasterHeader:
    """What a header says: height, width, bands (channels), the sample type, and whether the bands
    come first (planar TIFFs, multi-page stacks)."""

    height: int
    width: int
    bands: int
    dtype: np.dtype
    planar: bool = False

    @property
    def mode(self) -> str:
        """A colour-mode-like name for non-picture data, e.g. `4xuint16`."""
        return f"{self.bands}x{self.dtype.name}"


def read_npy_header(fh: BinaryIO) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, offset of the data) from an .npy header; ValueError if it is not one."""
    version = np.lib.format.read_magic(fh)
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    if version not in readers:
        raise ValueError(f"unsupported .npy format version {version}")
    shape, _, dtype = readers[version](fh)
    return tuple(shape), dtype, fh.tell()


def is_planar(shape: tuple[int, ...]) -> bool:
    """True for a channels-first (bands, H, W) shape."""
    return len(shape) == 3 and shape[0] <= PLANAR_MAX_BANDS < min(shape[1], shape[2])


def image_shape(shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(height, width, bands) of an array shape (H, W), (H, W, C) or (C, H, W); ValueError otherwise."""
    if len(shape) == 2:
        return shape[0], shape[1], 1
    if len(shape) == 3:
        return (shape[1], shape[2], shape[0]) if is_planar(shape) else (shape[0], shape[1], shape[2])
    raise ValueError(f"array of shape {shape} is not an image (expected H x W [x C])")


def npy_header(fh: BinaryIO) -> RasterHeader:
    """The header of a one-image .npy; ValueError if it is not one (or holds objects)."""
    shape, dtype, _ = read_npy_header(fh)
    if dtype.hasobject:
        raise ValueError("object arrays are not accepted (they would need pickle)")
    height, width, bands = image_shape(shape)
    return RasterHeader(height, width, bands, dtype)


def tiff_header(fh: BinaryIO) -> RasterHeader:
    """The header of a TIFF's first image (its first series); ValueError if it is not a TIFF."""
    with tifffile.TiffFile(fh) as tif:
        if not tif.series:  # tifffile logs and carries on past a bad first-page offset
            raise ValueError("no image in the TIFF")
        series = tif.series[0]
        shape = tuple(series.shape)
        return RasterHeader(*image_shape(shape), series.dtype, is_planar(shape))


def is_picture(header: RasterHeader) -> bool:
    """True if Pillow gives the TIFF as 8-bit as it is: interleaved 8-bit (or bilevel) with at most
    4 bands. Else tifffile reads it: Pillow would clip 16-bit values, read one plane of planar data,
    or refuse."""
    return header.dtype in (np.uint8, np.bool_) and header.bands <= PICTURE_MAX_BANDS and not header.planar


def tiff_array_header(fh: BinaryIO) -> RasterHeader | None:
    """The header of a TIFF that is an array rather than an 8-bit picture; None when it is a
    picture or tifffile cannot parse it (Pillow then reads it, or says what is wrong)."""
    try:
        header = tiff_header(fh)
    except (ValueError, OSError, EOFError, IndexError, KeyError):  # tifffile's errors on bad bytes
        return None
    return None if is_picture(header) else header


def read_npy(content: bytes) -> np.ndarray:
    """The array of an .npy object (never unpickled); ValueError if it is not an image array."""
    array = np.load(io.BytesIO(content), allow_pickle=False)
    image_shape(array.shape)
    return array


def read_tiff(source: bytes | BinaryIO) -> np.ndarray:
    """The first series of a TIFF (its bytes, or an open file) as an array; ValueError if there is none."""
    return read_tiff_raster(source)[0]


def read_tiff_raster(source: bytes | BinaryIO) -> tuple[np.ndarray, float | None]:
    """(array of the first series, its declared no-data value or None) of a TIFF (its bytes, or an
    open file); ValueError if there is no image."""
    with tifffile.TiffFile(io.BytesIO(source) if isinstance(source, bytes) else source) as tif:
        if not tif.series:
            raise ValueError("no image in the TIFF")
        series = tif.series[0]
        return series.asarray(), declared_nodata(series.pages[0])


def declared_nodata(page) -> float | None:
    """The GDAL_NODATA value (TIFF tag 42113, ASCII) of a TIFF page, or None when it has none or it is
    not a number (tifffile's own `page.nodata` says 0 when the tag is absent)."""
    tag = page.tags.get(GDAL_NODATA) if page is not None else None
    if tag is None:
        return None
    try:
        return float(str(tag.value).strip().rstrip("\x00"))
    except ValueError:
        return None


def to_picture(array: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 1 or 3) of an image array, by the defaults of the module docstring."""
    return scale_to_uint8(select_bands(channels_last(array)))


def channels_last(array: np.ndarray) -> np.ndarray:
    """(H, W, bands) of a (H, W), (H, W, C) or (C, H, W) array; ValueError for other shapes."""
    image_shape(array.shape)
    if array.ndim == 2:
        return array[..., None]
    return np.moveaxis(array, 0, -1) if is_planar(array.shape) else array


def select_bands(array: np.ndarray) -> np.ndarray:
    """1 or 3 bands of an (H, W, bands) array: 2 bands -> the first, 4 or more -> the first 3."""
    bands = array.shape[-1]
    if bands in (1, 3):
        return array
    return array[..., :1] if bands == 2 else array[..., :3]


def scale_to_uint8(array: np.ndarray) -> np.ndarray:
    """uint8 as is; otherwise min-max over the finite values to 0..255 (non-finite -> 0, constant -> 0)."""
    if array.dtype == np.uint8:
        return array
    values = array.astype(np.float64)
    finite = np.isfinite(values)
    if not finite.any():
        return np.zeros(array.shape, np.uint8)
    low, high = float(values[finite].min()), float(values[finite].max())
    span = high - low
    scaled = np.zeros(array.shape, np.float64)
    if span > 0 and math.isfinite(span):  # constant: all zeros, no division by zero
        np.divide(values - low, span / 255.0, out=scaled, where=finite)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
