"""Inspect one work item: content sha256 and image properties, or a one-line reason it is bad.

Memory stays bounded whatever the file size: small files are read once into memory (hashed,
parsed, and later uploaded from that buffer); large files are hashed in chunks and parsed from
their headers. Pixels are decoded to prove an image is not truncated or corrupt only up to
`verify_pixels` (default 16 Mpx, ~48 MB as RGB); above that JPEGs are decoded at 1/8 scale
(libjpeg DCT scaling), PNGs have every chunk CRC checked (`verify()`), other formats are
checked from their headers only. .npy arrays are checked from their header and file size; TIFFs
Pillow cannot give as 8-bit (16-bit, float, many bands) from tifffile's header, their samples read
up to `verify_pixels`. Formats are named by their leading bytes (orchard.core.formats): a file that
announces one but cannot be read is *corrupt*, anything else is *not an image*.

Quality (orchard.core.quality: empty, dark and no-data fractions) is measured on the pixels this
already decodes, with no second decode: pictures loaded up to `verify_pixels`, JPEGs above it on
their 1/8-scale draft, TIFF arrays whose samples are read; .npy arrays are loaded for it up to
`verify_pixels` (memory-mapped stack rows and small files are in memory already). Otherwise (a PNG
or other picture above the limit, a larger array) it is left absent: the executors measure every
image again when training, so nothing depends on it but the document.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, UnidentifiedImageError

from orchard.core import formats, rasters
from orchard.core.files import sha256_file
from orchard.core.formats import ARRAY_SUFFIX, BY_NAME
from orchard.core.quality import ImageQuality, measure_quality, picture_pixels
from orchard.core.rasters import read_npy_header
from orchard.uploader.discovery import WorkItem

log = logging.getLogger(__name__)

SMALL_FILE = 256 << 10  # read once into memory up to this size (dataset images are mostly < 100 kB);
# with two batches of 256 in flight that bounds buffered bytes to 128 MiB
CHUNK = 1 << 20
DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own decompression-bomb threshold (Image.MAX_IMAGE_PIXELS)
DEFAULT_VERIFY_PIXELS = 16_000_000

NPY_MODES = {1: "L", 3: "RGB", 4: "RGBA"}


class BadInput(Exception):
    """An item that cannot be uploaded: `code` for programs, the message for people."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass(frozen=True)
class Inspected:
    """What the index needs to know about an item, plus its bytes when small (`data`)."""

    item: WorkItem
    sha256: str
    size: int
    format: str
    width: int
    height: int
    channels: int
    color_mode: str
    data: bytes | None = None
    quality: ImageQuality | None = None  # None: the pixels were not decoded (module docstring)

    @property
    def content_type(self) -> str:
        known = BY_NAME.get(self.format)
        return known.content_type if known else "application/octet-stream"


@dataclass(frozen=True)
class Limits:
    """Decompression-bomb and verification thresholds (pixels); max_pixels 0 = no limit."""

    max_pixels: int = DEFAULT_MAX_PIXELS
    verify_pixels: int = DEFAULT_VERIFY_PIXELS


@dataclass(frozen=True)
class Properties:
    """What inspection read of an image: format, size, channels, colour mode, and its quality when
    its pixels were decoded."""

    format: str
    width: int
    height: int
    channels: int
    color_mode: str
    quality: ImageQuality | None = None


def inspect_item(item: WorkItem, limits: Limits = Limits()) -> Inspected:
    """Hash and parse `item`; raises BadInput with the reason it cannot be uploaded."""
    if item.row is not None:
        data = read_stack_row(item.path, item.row)
        return _inspected(
            item, data, hashlib.sha256(data).hexdigest(), len(data), npy_properties(io.BytesIO(data), len(data), limits)
        )
    size = _file_size(item.path)
    if size == 0:
        raise BadInput("empty", "empty file (0 bytes)")
    if size <= SMALL_FILE:
        data = _read_all(item.path)
        props = properties(io.BytesIO(data), size, item.path.suffix, limits)
        return _inspected(item, data, hashlib.sha256(data).hexdigest(), size, props)
    digest = file_sha256(item.path)
    with _open(item.path) as fh:
        props = properties(fh, size, item.path.suffix, limits)
    return _inspected(item, None, digest, size, props)


def _inspected(item: WorkItem, data: bytes | None, digest: str, size: int, p: Properties) -> Inspected:
    return Inspected(item, digest, size, p.format, p.width, p.height, p.channels, p.color_mode, data, p.quality)


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError as exc:
        raise BadInput("unreadable", f"unreadable: {exc.strerror or exc}") from None


def _open(path: Path) -> BinaryIO:
    try:
        return path.open("rb")
    except OSError as exc:
        raise BadInput("unreadable", f"unreadable: {exc.strerror or exc}") from None


def _read_all(path: Path) -> bytes:
    with _open(path) as fh:
        try:
            return fh.read()
        except OSError as exc:
            raise BadInput("unreadable", f"read error: {exc.strerror or exc}") from None


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file (constant memory); BadInput("unreadable") if it cannot be read."""
    try:
        return sha256_file(path)
    except OSError as exc:
        raise BadInput("unreadable", f"read error: {exc.strerror or exc}") from None


def sniff(head: bytes) -> str | None:
    """The format the leading bytes announce (orchard.core.formats), or None."""
    found = formats.sniff(head)
    return found.name if found else None


def properties(fh: BinaryIO, size: int, suffix: str, limits: Limits) -> Properties:
    """Format, size and colour mode of an image or .npy stream; BadInput if it is not valid."""
    head = fh.read(16)
    fh.seek(0)
    announced = sniff(head)
    if suffix.lower() == ARRAY_SUFFIX or announced == "npy":
        if announced != "npy":
            raise BadInput("not_image", "not an .npy array (no NUMPY magic)")
        return npy_properties(fh, size, limits)
    if announced == "tiff" and (header := _tiff_array_header(fh)) is not None:
        return tiff_properties(fh, header, limits)
    return image_properties(fh, announced, limits)


def _tiff_array_header(fh: BinaryIO) -> rasters.RasterHeader | None:
    """rasters.tiff_array_header, the stream rewound after it."""
    try:
        return rasters.tiff_array_header(fh)
    finally:
        fh.seek(0)


# A raster TIFF above the pixel limit is still accepted (`orchard infer` reads it by tiles, never
# whole) unless its declared samples are this many times its bytes: a bomb, not a compressed scene.
BOMB_RATIO = 200


def tiff_properties(fh: BinaryIO, header: rasters.RasterHeader, limits: Limits) -> Properties:
    """Properties of a 16-bit, float or many-band TIFF; its samples are read (to catch a truncated
    or corrupt file) up to the verification limit. BadInput (decompression bomb) when it declares
    more pixels than the limit and BOMB_RATIO times more sample bytes than the file holds."""
    pixels = header.width * header.height
    declared = pixels * header.bands * header.dtype.itemsize
    stored = fh.seek(0, io.SEEK_END)
    fh.seek(0)
    if limits.max_pixels and pixels > limits.max_pixels and declared > BOMB_RATIO * stored:
        raise BadInput(
            "decompression_bomb",
            f"decompression bomb: {pixels} pixels exceeds {limits.max_pixels} and declares {declared} bytes "
            f"of samples in a {stored}-byte file",
        )
    quality = None
    if pixels <= limits.verify_pixels:
        try:
            quality = measure_quality(*rasters.read_tiff_raster(fh))
        except (ValueError, OSError, EOFError, IndexError, KeyError) as exc:
            raise _decode_problem(exc) from None
    return Properties("tiff", header.width, header.height, header.bands, header.mode, quality)


def image_properties(fh: BinaryIO, announced: str | None, limits: Limits) -> Properties:
    """Open with Pillow, apply the pixel limit, and decode as far as memory allows."""
    try:
        image = Image.open(fh)
    except Image.DecompressionBombError as exc:
        raise BadInput("decompression_bomb", f"decompression bomb: {exc}") from None
    except UnidentifiedImageError:
        if announced:
            raise BadInput("corrupt", f"corrupt image: unreadable {announced.upper()} header") from None
        raise BadInput("not_image", "not an image (unrecognised content)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise _decode_problem(exc) from None
    with image:
        if image.format is None:  # not for a file Image.open read: the format plugin that read it sets it
            raise BadInput("not_image", "not an image (no format recognised)")
        width, height = image.size
        if limits.max_pixels and width * height > limits.max_pixels:
            raise BadInput(
                "decompression_bomb",
                f"decompression bomb: {width}x{height} = {width * height} pixels "
                f"exceeds the limit of {limits.max_pixels}",
            )
        name, channels, mode = image.format.lower(), len(image.getbands()), image.mode
        quality = picture_quality(image) if _verify(image, fh, limits) else None
    return Properties(name, width, height, channels, mode, quality)


def picture_quality(image: Image.Image) -> ImageQuality | None:
    """The quality of a decoded picture; None if Pillow cannot convert its mode for measuring (the
    image itself is valid: it is uploaded without `quality`)."""
    try:
        return measure_quality(picture_pixels(image))
    except (ValueError, OSError) as exc:
        log.warning("quality not measured (%s image): %s", image.mode, exc)
        return None


def _verify(image: Image.Image, fh: BinaryIO, limits: Limits) -> bool:
    """Decode (or checksum) the pixel data to catch truncated and corrupt files; True if the pixels
    were decoded (in full, or a JPEG's 1/8-scale draft)."""
    pixels = image.size[0] * image.size[1]
    try:
        if pixels <= limits.verify_pixels:
            image.load()
            return True
        if image.format == "JPEG":
            image.draft(image.mode, (max(1, image.size[0] // 8), max(1, image.size[1] // 8)))
            image.load()
            return True
        if image.format == "PNG":
            image.verify()
        return False
    except Image.DecompressionBombError as exc:
        raise BadInput("decompression_bomb", f"decompression bomb: {exc}") from None
    except (OSError, SyntaxError, ValueError, EOFError, zlib.error, IndexError) as exc:
        raise _decode_problem(exc) from None


def _decode_problem(exc: BaseException) -> BadInput:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, EOFError) or "truncated" in text.lower():
        return BadInput("truncated", f"truncated image: {text}")
    return BadInput("corrupt", f"corrupt image: {text}")


def npy_properties(fh: BinaryIO, size: int, limits: Limits = Limits()) -> Properties:
    """Properties of a one-image .npy: (H, W), (H, W, C) or channels-first (C, H, W), with its quality
    up to `limits.verify_pixels` (the array is loaded for it)."""
    try:
        shape, dtype, offset = read_npy_header(fh)
    except (ValueError, SyntaxError, EOFError) as exc:
        raise BadInput("corrupt", f"corrupt .npy header: {exc}") from None
    if dtype.hasobject:
        raise BadInput("not_image", "object arrays are not accepted (they would need pickle)")
    expected = offset + math.prod(shape) * dtype.itemsize
    if size < expected:
        raise BadInput("truncated", f"truncated array: {size} of {expected} bytes")
    if size > expected:
        raise BadInput("corrupt", f"corrupt array: {size - expected} bytes after the data")
    height, width, channels = image_shape(shape)
    mode = NPY_MODES.get(channels) if dtype == np.uint8 else None
    quality = npy_quality(fh) if width * height <= limits.verify_pixels else None
    return Properties("npy", width, height, channels, mode or f"{channels}x{dtype.name}", quality)


def npy_quality(fh: BinaryIO) -> ImageQuality:
    """The quality of a checked .npy (header and size valid): its array loaded from the start."""
    fh.seek(0)
    try:
        return measure_quality(np.load(fh, allow_pickle=False))
    except (ValueError, OSError, EOFError) as exc:
        raise BadInput("corrupt", f"corrupt array: {exc}") from None


def image_shape(shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(height, width, channels) of an array shape (orchard.core.rasters.image_shape); BadInput if
    it is not an image."""
    try:
        return rasters.image_shape(shape)
    except ValueError as exc:
        raise BadInput("not_image", str(exc)) from None


def read_stack_row(path: Path, row: int) -> bytes:
    """Row `row` of an .npy stack as a standalone .npy (memory-mapped: only that row is read)."""
    try:
        stack = np.load(path, mmap_mode="r", allow_pickle=False)
        buffer = io.BytesIO()
        np.save(buffer, np.ascontiguousarray(stack[row]), allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise BadInput("unreadable", f"cannot read stack row {row}: {exc}") from None
    return buffer.getvalue()
