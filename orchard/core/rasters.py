"""Arrays that are images but not 8-bit pictures: `.npy` objects and TIFFs Pillow cannot give as 8-bit
(16-bit, float, more than 4 bands), read with numpy and tifffile (pure Python: executors stay light).

Default conversion to what the models take (uint8, 1 or 3 channels), `to_picture`:
- Layout: channels-first data (the first axis short, <= 16, and both others longer, as tifffile
  returns planar TIFFs and Sentinel-2 tiles come) is transposed to (H, W, bands) (`image_shape`).
- Bands: 1 as is, 2 -> the first, 3 as is, 4 or more -> the first 3.
- Values: uint8 as is; any other type is scaled per image by min-max over its finite values to
  0..255 (NaN and +-inf become 0; a constant image becomes all zeros).

A `Conversion` chosen at training (`orchard train --bands 4,3,2 --scaling percentile:2,98`) replaces
those defaults: the bands it names, in that order (1-based, as GDAL and the Sentinel-2 band numbers
count; the model then takes that many channels), and one of the scalings of `SCALINGS`. It is
recorded in the model card and applied identically by training, `orchard infer` and `orchard serve`.

tifffile alone (no imagecodecs) decodes uncompressed, Deflate, PackBits, LZMA and Zstd TIFFs; an
LZW- or JPEG-compressed 16-bit/float TIFF is refused with that reason (8-bit ones go to Pillow,
which reads them all).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from itertools import groupby
from operator import attrgetter
from typing import BinaryIO

import numpy as np
import tifffile

from orchard.core.formats import NPY

PLANAR_MAX_BANDS = 16  # a first axis this short, with both others longer, holds bands
GDAL_NODATA = 42113  # the TIFF tag GDAL writes a raster's no-data value into (ASCII)
GEOTIFF_PIXEL_SCALE, GEOTIFF_TIEPOINT = 33550, 33922  # GeoTIFF tags: pixel size, and a pixel's position
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
    shape, _, dtype, offset = read_npy_layout(fh)
    return shape, dtype, offset


def read_npy_layout(fh: BinaryIO) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """(shape, Fortran order, dtype, offset of the data) from an .npy header; ValueError if it is not one."""
    version = np.lib.format.read_magic(fh)
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    if version not in readers:
        raise ValueError(f"unsupported .npy format version {version}")
    shape, fortran, dtype = readers[version](fh)
    return tuple(shape), bool(fortran), dtype, fh.tell()


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
    return stretch(array, *finite_range(array, lambda v: (v.min(), v.max())))


def finite_range(array: np.ndarray, bounds) -> tuple[float, float]:
    """`bounds(finite values)` as floats; (0, 0) when no value is finite (stretch then gives zeros)."""
    values = array[np.isfinite(array)] if array.dtype.kind == "f" else array.ravel()
    if not values.size:
        return 0.0, 0.0
    low, high = bounds(values)
    return float(low), float(high)


def stretch(array: np.ndarray, low: float, high: float) -> np.ndarray:
    """uint8 of `array` with `low` -> 0 and `high` -> 255, linearly, clipped; non-finite values -> 0,
    and all zeros when high <= low (a constant image: no division by zero)."""
    values = array.astype(np.float64)
    scaled = np.zeros(array.shape, np.float64)
    span = high - low
    if span > 0 and math.isfinite(span):
        np.divide(values - low, span / 255.0, out=scaled, where=np.isfinite(values))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


class BandError(ValueError):
    """An image lacks a band the model's conversion names, or gives the model another channel count."""


AUTO, MINMAX, MAX, PERCENTILE, RANGE = "auto", "minmax", "max", "percentile", "range"
SCALINGS = {
    AUTO: "uint8 as stored, any other type min-max per image (the default)",
    MINMAX: "min-max per image, every type",
    MAX: "0..the image's maximum, per image (values as counts or reflectance, 0 = black)",
    PERCENTILE: "percentile:LOW,HIGH, e.g. percentile:2,98: clip to those percentiles per image",
    RANGE: "range:LOW,HIGH, e.g. range:0,3000: a fixed value range for every image",
}
SCALING_ARGS = {PERCENTILE: 2, RANGE: 2}  # scalings that take LOW,HIGH


@dataclass(frozen=True)
class Conversion:
    """How stored pixels become the model's uint8 channels: `bands` (1-based, in order; empty: the
    default rule of the module docstring) and the value `scaling` (a key of SCALINGS, with `bounds`
    LOW, HIGH for percentile and range)."""

    bands: tuple[int, ...] = ()
    scaling: str = AUTO
    bounds: tuple[float, ...] = ()

    @property
    def is_default(self) -> bool:
        return not self.bands and self.scaling == AUTO

    @property
    def spec(self) -> str:
        """The scaling as the --scaling flag spells it, e.g. `percentile:2,98`."""
        return f"{self.scaling}:{','.join(f'{b:g}' for b in self.bounds)}" if self.bounds else self.scaling

    def channels(self, default: int = 3) -> int:
        """The model's input channels: one per chosen band, else `default` (the default rule's 1 or 3)."""
        return len(self.bands) or default

    def to_card(self) -> dict:
        """The model card's `conversion` entry."""
        return {"bands": list(self.bands), "scaling": self.spec}

    def apply(self, array: np.ndarray) -> np.ndarray:
        """uint8 (H, W, channels) of an image array ((H, W), (H, W, C) or (C, H, W)); ValueError if a
        band it names is not in the image."""
        pixels = channels_last(array)
        pixels = pick_bands(pixels, self.bands) if self.bands else select_bands(pixels)
        return self.scale(pixels)

    def scale(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 of the selected bands by this conversion's scaling (one range over all bands: the
        bands keep their relative brightness)."""
        if self.scaling == AUTO:
            return scale_to_uint8(pixels)
        if self.scaling == RANGE:
            return stretch(pixels, *self.bounds)
        if self.scaling == PERCENTILE:
            return stretch(pixels, *finite_range(pixels, lambda v: np.percentile(v, self.bounds)))
        if self.scaling == MAX:
            return stretch(pixels, 0.0, finite_range(pixels, lambda v: (0, v.max()))[1])
        return stretch(pixels, *finite_range(pixels, lambda v: (v.min(), v.max())))


DEFAULT_CONVERSION = Conversion()


def pick_bands(pixels: np.ndarray, bands: tuple[int, ...]) -> np.ndarray:
    """The (H, W, len(bands)) array of the 1-based `bands` of an (H, W, C) array; BandError naming
    the first band the image does not have."""
    have = pixels.shape[-1]
    missing = [b for b in bands if b > have]
    if missing:
        raise BandError(f"band {missing[0]} asked (--bands), the image has {have}")
    return pixels[..., [b - 1 for b in bands]]


def parse_bands(text: str | None) -> tuple[int, ...]:
    """(4, 3, 2) of "4,3,2" (1-based band numbers); () for None or ""; ValueError saying what is wrong."""
    if not text:
        return ()
    try:
        bands = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise ValueError(f"bands {text!r}: expected 1-based band numbers such as 4,3,2") from None
    if min(bands) < 1:
        raise ValueError(f"bands {text!r}: band numbers start at 1")
    return bands


def parse_scaling(text: str | None) -> tuple[str, tuple[float, ...]]:
    """(scaling, bounds) of "percentile:2,98", "range:0,3000", "max", ... (None: auto); ValueError
    saying what is wrong."""
    name, _, args = (text or AUTO).partition(":")
    if name not in SCALINGS:
        raise ValueError(f"scaling {text!r}: expected one of {', '.join(SCALINGS)}")
    try:
        bounds = tuple(float(part) for part in args.split(",")) if args else ()
    except ValueError:
        raise ValueError(f"scaling {text!r}: LOW,HIGH must be numbers") from None
    want = SCALING_ARGS.get(name, 0)
    if len(bounds) != want or (bounds and not (math.isfinite(bounds[0]) and bounds[0] < bounds[1])):
        raise ValueError(f"scaling {text!r}: {SCALINGS[name]}" if want else f"scaling {text!r} takes no LOW,HIGH")
    if name == PERCENTILE and not (bounds[0] >= 0 and bounds[1] <= 100):
        raise ValueError(f"scaling {text!r}: percentiles are between 0 and 100")
    return name, bounds


def conversion_of(bands: str | None, scaling: str | None) -> Conversion:
    """The Conversion of --bands and --scaling flags; ValueError saying which is wrong and why."""
    name, bounds = parse_scaling(scaling)
    return Conversion(parse_bands(bands), name, bounds)


def conversion_from_card(card: dict) -> Conversion:
    """A model card's conversion (the default for cards written before conversions were recorded)."""
    entry = card.get("conversion") or {}
    return conversion_of(",".join(str(b) for b in entry.get("bands") or ()), entry.get("scaling"))


# --- windows of large rasters (tiling) ---------------------------------------------------------


@dataclass(frozen=True)
class Window:
    """A tile of a raster: its grid position (row, col) and its pixels (top, left, height, width)."""

    row: int
    col: int
    top: int
    left: int
    height: int
    width: int


def tile_windows(height: int, width: int, size: int, stride: int) -> list[Window]:
    """The windows cutting a height x width raster into size x size tiles every `stride` pixels; the
    last row and column of tiles end flush with the raster's edge (every pixel is covered), and a
    raster smaller than a tile is one window of its own size. ValueError for a non-positive size or
    stride."""
    if size < 1 or stride < 1:
        raise ValueError(f"tile size and stride must be positive, got {size} and {stride}")
    tops, lefts = tile_starts(height, size, stride), tile_starts(width, size, stride)
    return [
        Window(r, c, top, left, min(size, height), min(size, width))
        for r, top in enumerate(tops)
        for c, left in enumerate(lefts)
    ]


def tile_starts(length: int, size: int, stride: int) -> list[int]:
    """Start offsets of tiles of `size` every `stride` along `length`, the last one flush with the end."""
    if length <= size:
        return [0]
    starts = list(range(0, length - size + 1, stride))
    return starts if starts[-1] == length - size else [*starts, length - size]


def read_tiff_window(source: BinaryIO, window: Window) -> np.ndarray:
    """(height, width, bands) pixels of a window of a TIFF's first page, reading and decoding only the
    tiles or strips it overlaps (the raster is never whole in memory; `source` may be a ranged
    reader of a remote object). ValueError for band-separate (planar) TIFFs, which would need one
    read per band."""
    with tifffile.TiffFile(source) as tif:
        return page_window(tif, window)


def page_window(tif: tifffile.TiffFile, window: Window) -> np.ndarray:
    """read_tiff_window of an open TIFF."""
    page = tif.pages.first
    if page.planarconfig != 1 and page.samplesperpixel > 1:
        raise ValueError("windowed reads need pixel-interleaved bands (GDAL's INTERLEAVE=PIXEL)")
    out = np.zeros((window.height, window.width, page.samplesperpixel), page.dtype)
    for index in overlapping_segments(page, window):
        paste_segment(out, page, tif.filehandle, index, window)
    return out


def overlapping_segments(page, window: Window) -> list[int]:
    """Indices of a page's tiles or strips (row-major) that overlap a window."""
    seg_height, seg_width = page.chunks[0], page.chunks[1]
    per_row = -(-page.imagewidth // seg_width)
    rows = range(window.top // seg_height, (window.top + window.height - 1) // seg_height + 1)
    cols = range(window.left // seg_width, (window.left + window.width - 1) // seg_width + 1)
    return [r * per_row + c for r in rows for c in cols]


def paste_segment(out: np.ndarray, page, fh, index: int, window: Window) -> None:
    """Read, decode and copy the part of one tile or strip that falls in the window into `out`."""
    fh.seek(page.dataoffsets[index])
    segment, (_, _, top, left, _), _ = page.decode(fh.read(page.databytecounts[index]), index)
    segment = segment.reshape(segment.shape[-3:])  # (rows, columns, bands) of the tile or strip
    r0, c0 = max(top, window.top), max(left, window.left)
    r1 = min(top + segment.shape[0], window.top + window.height, page.imagelength)
    c1 = min(left + segment.shape[1], window.left + window.width, page.imagewidth)
    out[r0 - window.top : r1 - window.top, c0 - window.left : c1 - window.left] = segment[
        r0 - top : r1 - top, c0 - left : c1 - left
    ]


GeoTransform = tuple[float, float, float, float, float, float]  # sx, sy, tie column, tie row, x, y


def geo_transform(page) -> GeoTransform | None:
    """A north-up GeoTIFF's pixel scale and tie point, or None when the TIFF is not georeferenced."""
    scale, tie = page.tags.get(GEOTIFF_PIXEL_SCALE), page.tags.get(GEOTIFF_TIEPOINT)
    if scale is None or tie is None:
        return None
    (sx, sy), (col0, row0, _, x0, y0) = scale.value[:2], tie.value[:5]
    return float(sx), float(sy), float(col0), float(row0), float(x0), float(y0)


def window_bounds(transform: GeoTransform, window: Window) -> tuple[float, float, float, float]:
    """(west, south, east, north) of a window in the raster's CRS."""
    sx, sy, col0, row0, x0, y0 = transform
    west, north = x0 + (window.left - col0) * sx, y0 - (window.top - row0) * sy
    return west, north - window.height * sy, west + window.width * sx, north


def geo_bounds(page, window: Window) -> tuple[float, float, float, float] | None:
    """(west, south, east, north) of a window in the raster's CRS from its GeoTIFF pixel scale and tie
    point (a north-up raster), or None when the TIFF is not georeferenced."""
    transform = geo_transform(page)
    return window_bounds(transform, window) if transform else None


@dataclass(frozen=True)
class Band:
    """A strip of a raster read at once: one row of its tile grid (or a run of columns of it, so that
    a strip of a very wide raster stays under a pixel budget) and the tile windows it holds."""

    window: Window  # the strip's pixels in the raster
    tiles: tuple[Window, ...]  # in raster coordinates


def tile_bands(height: int, width: int, size: int, stride: int, max_pixels: int) -> list[Band]:
    """The strips that read every tile of tile_windows(height, width, size, stride) once, each at most
    `max_pixels` pixels (but always a whole tile)."""
    bands: list[Band] = []
    for _, row in groupby(tile_windows(height, width, size, stride), key=attrgetter("row")):  # row-major
        run: list[Window] = []
        for tile in row:
            if run and (tile.left + tile.width - run[0].left) * tile.height > max_pixels:
                bands.append(band_of(run))
                run = []
            run.append(tile)
        bands.append(band_of(run))
    return bands


def band_of(tiles: list[Window]) -> Band:
    """The strip covering tiles of one grid row."""
    first, last = tiles[0], tiles[-1]
    window = Window(first.row, first.col, first.top, first.left, first.height, last.left + last.width - first.left)
    return Band(window, tuple(tiles))


def tile_of(band_pixels: np.ndarray, band: Window, tile: Window) -> np.ndarray:
    """A tile's pixels cut out of its strip's (a view, no copy)."""
    top, left = tile.top - band.top, tile.left - band.left
    return band_pixels[top : top + tile.height, left : left + tile.width]


def read_raster_window(
    source: BinaryIO, decoder: str, window: Window
) -> tuple[np.ndarray, float | None, GeoTransform | None]:
    """(height, width, bands) pixels of a window of a TIFF or .npy raster, its declared no-data value
    and its geotransform (None when not georeferenced), reading only what the window needs (`source`
    may be a ranged reader of a remote object). ValueError for layouts that cannot be read by
    window (band-first .npy, Fortran order, planar TIFFs)."""
    if decoder == NPY:
        return read_npy_window(source, window), None, None
    with tifffile.TiffFile(source) as tif:
        page = tif.pages.first
        return page_window(tif, window), declared_nodata(page), geo_transform(page)


def read_npy_window(source: BinaryIO, window: Window) -> np.ndarray:
    """(height, width, bands) pixels of a window of an (H, W) or (H, W, C) C-order .npy: one read of
    the window's rows when it spans the full width, else one read per row."""
    source.seek(0)
    shape, fortran, dtype, offset = read_npy_layout(source)
    if fortran or is_planar(shape) or len(shape) not in (2, 3) or dtype.hasobject:
        raise ValueError(f"windowed reads need a C-order (H, W[, C]) array, not {'Fortran-order ' * fortran}{shape}")
    height, width, bands = image_shape(shape)
    if window.top + window.height > height or window.left + window.width > width:
        raise ValueError(f"window {window} outside the {height} x {width} array")
    pixel = bands * dtype.itemsize
    if window.left == 0 and window.width == width:
        rows = [read_exactly(source, offset + window.top * width * pixel, window.height * width * pixel)]
    else:
        rows = [
            read_exactly(source, offset + ((window.top + r) * width + window.left) * pixel, window.width * pixel)
            for r in range(window.height)
        ]
    return np.frombuffer(b"".join(rows), dtype).reshape(window.height, window.width, bands)


def read_exactly(source: BinaryIO, offset: int, length: int) -> bytes:
    """`length` bytes at `offset`; ValueError if the file ends first (a truncated array)."""
    source.seek(offset)
    data = source.read(length)
    if len(data) != length:
        raise ValueError(f"the array ends at byte {offset + len(data)}, {length - len(data)} bytes short")
    return data
