"""Images in executors: (ImageRef, content) pairs, decoding, and the `binaryFile` baseline reader.

Every Spark stage reads the images table (orchard.spark_app.table.stage_images), whose rows carry
the id, key, dataset, split and label. `read_image_files` + `file_pairs` are the former path (each
image its own S3 object, the id re-hashed from the bytes), kept as the benchmark's baseline.
Key layout (orchard.core.lake): `<dataset>/<split>/<label>/<file>`; the id is the content sha256.
`measured_rows` also measures each image's quality (orchard.core.quality) on its pixels as stored:
training leaves empty images out with it.
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import cached_property, partial
from typing import BinaryIO, cast

import numpy as np
from minio.error import S3Error
from PIL import Image, UnidentifiedImageError

from orchard.core import rasters
from orchard.core.errors import DatasetNotFound
from orchard.core.formats import NPY, TIFF, decoder_of
from orchard.core.lake import dataset_uri, key_of, parse_key
from orchard.core.objects import read_object
from orchard.core.quality import ImageQuality, measure_quality, picture_pixels
from orchard.core.ranged import RangedObject
from orchard.core.rasters import DEFAULT_CONVERSION, Conversion
from orchard.core.settings import Settings
from orchard.spark_app.context import s3_of

IMAGE_GLOB = "*.{jpg,jpeg,png,JPG,JPEG,PNG}"  # what the baseline reads
# binaryFile counts every file as its length + openCostInBytes when packing partitions; with
# thumbnails the open cost dominates, so images per partition ~= maxPartitionBytes / openCost.
OPEN_COST_BYTES = 4 * 1024 * 1024

log = logging.getLogger(__name__)


class ImageDecodeError(ValueError):
    """The bytes are not an image of an accepted format that can be decoded."""


@dataclass(frozen=True)
class TilePlace:
    """Where a tile is in its raster (orchard.spark_app.tiles)."""

    parent: str  # the raster's id
    window: rasters.Window
    bounds: tuple[float, ...] = ()  # (west, south, east, north) when the raster is georeferenced


@dataclass(frozen=True)
class ImageRef:
    """Where an image is and what its key says about it; a tile of a large raster has its `tile` place
    (its key and labels are the raster's)."""

    id: str  # sha256 of the content = the Elasticsearch document id (a tile's: tile_id)
    key: str  # key in the images bucket
    dataset: str
    split: str
    label: str
    tile: TilePlace | None = None


@dataclass(frozen=True)
class BandJob:
    """In place of content: read this strip of a large raster and give each of its tiles as an image."""

    decoder: str  # orchard.core.formats.TIFF or NPY
    band: rasters.Band


Pair = tuple[ImageRef, "bytes | BandJob | None"]  # content None: too large for the table, read by key


def tile_id(parent: str, window: rasters.Window) -> str:
    """A tile's deterministic id: the sha256 of its raster's id and its pixel window."""
    place = f"{parent}/tile/{window.top},{window.left},{window.height},{window.width}"
    return hashlib.sha256(place.encode()).hexdigest()


def tile_ref(parent: ImageRef, window: rasters.Window, transform: rasters.GeoTransform | None) -> ImageRef:
    """The ref of one tile of a raster (bounds from the raster's geotransform, if any)."""
    bounds = rasters.window_bounds(transform, window) if transform else ()
    place = TilePlace(parent.id, window, tuple(round(b, 9) for b in bounds))
    return ImageRef(tile_id(parent.id, window), parent.key, parent.dataset, parent.split, parent.label, place)


def ref_of(path: str, content: bytes, bucket: str) -> ImageRef:
    """The ImageRef of one file read by Spark's binaryFile source (baseline path)."""
    key = key_of(path, bucket)
    dataset, split, label = parse_key(key)
    return ImageRef(hashlib.sha256(content).hexdigest(), key, dataset, split, label)


def file_pair(bucket: str, row) -> Pair:
    """(ref, content) of one (path, content) row of `read_image_files` (baseline path)."""
    content = bytes(row[1])
    return ref_of(row[0], content, bucket), content


def file_pairs(files_df, bucket: str):
    """RDD of (ref, content) from a DataFrame of (path, content) (baseline path)."""
    return files_df.rdd.map(partial(file_pair, bucket))


def binaryfile_images(spark, s: Settings, dataset: str, split: str | None = None, images_per_partition: int = 64):
    """The former image source, kept as the benchmark's baseline: (RDD of (ref, content) read with
    `binaryFile`, one S3 object per image, the id re-hashed from the bytes; None: no table version)."""
    files = read_image_files(spark, s.images_bucket, dataset, split, images_per_partition)
    return file_pairs(files, s.images_bucket), None


def table_ref(row) -> ImageRef:
    """The ref of a table row that starts with id, key, dataset, split, label."""
    return ImageRef(row[0], row[1], row[2], row[3], row[4])


def table_pair(row) -> Pair:
    """(ref, content) of one table row (id, key, dataset, split, label, content)."""
    return table_ref(row), (bytes(row[5]) if row[5] is not None else None)


def decode_image(
    content: bytes, size: tuple[int, int], channels: int = 3, conversion: Conversion = DEFAULT_CONVERSION
) -> np.ndarray:
    """uint8 array (height, width, channels) of an encoded image, resized to `size` = (height, width).

    Every accepted format (orchard.core.formats): Pillow for 8-bit pictures, tifffile for other
    TIFFs, numpy for .npy; bands and values converted by `conversion` (orchard.core.rasters: the
    model card's; the default scales non-8-bit data by to_picture). Raises ImageDecodeError with a
    short reason when the bytes cannot be decoded or converted.
    """
    return decoded(content, size, channels, measure=False, conversion=conversion)[0]


def decoded(
    content: bytes,
    size: tuple[int, int],
    channels: int,
    measure: bool,
    conversion: Conversion = DEFAULT_CONVERSION,
) -> tuple[np.ndarray, ImageQuality | None]:
    """(decode_image's uint8 array, and if `measure` the image's quality, else None); ImageDecodeError
    if it cannot be decoded. The quality is measured on the pixels as stored, before scaling and
    resizing (orchard.core.quality: the measure the uploader writes into the document)."""
    return converted(partial(open_raster, content), size, channels, measure, conversion)


def converted(
    open_image: Callable[[], Raster],
    size: tuple[int, int],
    channels: int,
    measure: bool,
    conversion: Conversion = DEFAULT_CONVERSION,
) -> tuple[np.ndarray, ImageQuality | None]:
    """decoded() of the Raster `open_image` returns; ImageDecodeError with a short reason when it
    cannot be opened or converted."""
    try:
        raster = open_image()
        quality = raster.quality() if measure else None
        array = raster.pixels(conversion, channels, size)
    except rasters.BandError as exc:  # decodable, but not what the model takes
        raise ImageDecodeError(str(exc)) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError, IndexError, KeyError) as exc:
        raise ImageDecodeError(f"undecodable image: {type(exc).__name__}: {exc}"[:240]) from None
    return array, quality


def resized(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 (height, width, C) of (H, W, C) pixels, bilinear; each band on its own beyond 3 (Pillow
    images hold at most RGB)."""
    height, width = size
    if pixels.shape[:2] == (height, width):
        return pixels
    if pixels.shape[-1] in (1, 3):
        image = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else np.ascontiguousarray(pixels))
        out = np.asarray(image.resize((width, height), Image.Resampling.BILINEAR), dtype=np.uint8)
        return out[..., None] if out.ndim == 2 else out
    return np.stack(
        [resized(np.ascontiguousarray(pixels[..., [b]]), size)[..., 0] for b in range(pixels.shape[-1])], -1
    )


@dataclass(frozen=True)
class Raster:
    """An opened image: its Pillow picture, and for arrays (.npy, non-8-bit TIFFs) the array as stored
    with the no-data value the file declares."""

    picture: Image.Image
    array: np.ndarray | None = None
    nodata: float | None = None

    @cached_property
    def stored(self) -> np.ndarray:
        """The pixels as stored: the array, else the decoded picture's (computed once per image: the
        quality measure and an explicit conversion both start from them)."""
        return self.array if self.array is not None else picture_pixels(self.picture)

    def quality(self) -> ImageQuality:
        """The image's quality, measured on the pixels as stored."""
        return measure_quality(self.stored, self.nodata)

    def pixels(self, conversion: Conversion, channels: int, size: tuple[int, int]) -> np.ndarray:
        """uint8 (height, width, channels) the model takes, `size` = (height, width); ValueError if
        the conversion's bands are not `channels` or not in the image (BandError)."""
        if not conversion.is_default:
            return resized(with_channels(conversion.apply(self.stored), channels, bool(conversion.bands)), size)
        shrink_while_decoding(self.picture, size)
        # Pillow's own L/RGB conversion (palette, CMYK, alpha, ...), resized before it becomes an array
        image = self.picture.convert("L" if channels == 1 else "RGB")
        if image.size != (size[1], size[0]):
            image = image.resize((size[1], size[0]), Image.Resampling.BILINEAR)
        array = np.asarray(image, dtype=np.uint8)
        return array[..., None] if channels == 1 else array


def shrink_while_decoding(picture: Image.Image, size: tuple[int, int]) -> None:
    """Have a JPEG not decoded yet decode at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling) when that
    still leaves at least `size` = (height, width): a 4032x3024 phone photo for a 100x100 model
    decodes ~3x faster (bench/decode.py; pixels within 2 levels of a full decode). Other
    formats, and pictures already loaded (the quality measure reads them whole), are unchanged."""
    if picture.format == "JPEG" and getattr(picture, "tile", None):
        picture.draft(picture.mode, (size[1], size[0]))


def with_channels(pixels: np.ndarray, channels: int, explicit: bool) -> np.ndarray:
    """`pixels` with `channels` bands: grey repeated to RGB, RGB to grey (Pillow's L) when the bands
    came from the default rule; BandError when chosen bands (`explicit`) are not as many."""
    have = pixels.shape[-1]
    if have == channels:
        return pixels
    if explicit or {have, channels} != {1, 3}:
        raise rasters.BandError(f"{have} bands selected, the model takes {channels}")
    if channels == 3:
        return np.repeat(pixels, 3, axis=-1)
    return np.asarray(Image.fromarray(np.ascontiguousarray(pixels)).convert("L"), dtype=np.uint8)[..., None]


def open_raster(content: bytes) -> Raster:
    """The image of the bytes: opened by Pillow, or built from the array numpy or tifffile read
    (errors as they raise them)."""
    decoder = decoder_of(content)
    if decoder == NPY:
        return raster_of(rasters.read_npy(content))
    if decoder == TIFF and rasters.tiff_array_header(io.BytesIO(content)) is not None:
        return raster_of(*rasters.read_tiff_raster(content))
    return Raster(Image.open(io.BytesIO(content)))


def image_of(array: np.ndarray) -> Image.Image:
    """An L or RGB Pillow image of an image array (rasters.to_picture's defaults)."""
    picture = rasters.to_picture(array)
    return Image.fromarray(picture[..., 0] if picture.shape[-1] == 1 else np.ascontiguousarray(picture))


Decoded = tuple[ImageRef, np.ndarray | None, str | None]  # (ref, uint8 array or None, error or None)


def decode_rows(
    pairs: Iterable[Pair],
    s: Settings,
    size: tuple[int, int],
    channels: int = 3,
    conversion: Conversion = DEFAULT_CONVERSION,
) -> Iterator[Decoded]:
    """(ref, uint8 array or None, error or None) per (ref, content) pair, lazily (runs in executors);
    content None (a large image the table references by key) is read from the bucket."""
    for ref, array, error, _ in measured_rows(pairs, s, size, channels, measure=False, conversion=conversion):
        yield ref, array, error


def measured_rows(
    pairs: Iterable[Pair],
    s: Settings,
    size: tuple[int, int],
    channels: int = 3,
    measure: bool = True,
    conversion: Conversion = DEFAULT_CONVERSION,
) -> Iterator[tuple[ImageRef, np.ndarray | None, str | None, ImageQuality | None]]:
    """decode_rows, each row with the image's quality (orchard.core.quality; None when undecodable or
    not `measure`)."""
    for ref, content in pairs:
        if isinstance(content, BandJob):
            yield from tile_rows(ref, content, s, size, channels, measure, conversion)
            continue
        try:
            data = content if content is not None else read_object(s3_of(s), s.images_bucket, ref.key)
            array, quality = decoded(data, size, channels, measure, conversion)
            yield ref, array, None, quality
        except ImageDecodeError as exc:
            yield ref, None, str(exc), None
        except S3Error as exc:
            yield ref, None, f"cannot read the object: {exc.code}", None


def tile_rows(
    parent: ImageRef,
    job: BandJob,
    s: Settings,
    size: tuple[int, int],
    channels: int,
    measure: bool,
    conversion: Conversion,
) -> Iterator[tuple[ImageRef, np.ndarray | None, str | None, ImageQuality | None]]:
    """measured_rows of each tile of a strip of a large raster: the strip read by ranged requests
    (orchard.core.ranged), never the whole raster; every tile gets the strip's error if it cannot be read."""
    try:
        source = cast(BinaryIO, RangedObject(s3_of(s), s.images_bucket, parent.key))
        pixels, nodata, transform = rasters.read_raster_window(source, job.decoder, job.band.window)
    except S3Error as exc:
        yield from failed_tiles(parent, job, f"cannot read the object: {exc.code}")
        return
    except (OSError, ValueError, EOFError, IndexError, KeyError) as exc:  # tifffile's and numpy's errors
        yield from failed_tiles(parent, job, f"undecodable raster window: {type(exc).__name__}: {exc}"[:240])
        return
    for window in job.band.tiles:
        ref = tile_ref(parent, window, transform)
        tile = rasters.tile_of(pixels, job.band.window, window)
        try:
            array, quality = converted(partial(raster_of, tile, nodata), size, channels, measure, conversion)
            yield ref, array, None, quality
        except ImageDecodeError as exc:
            yield ref, None, str(exc), None


def failed_tiles(parent: ImageRef, job: BandJob, error: str) -> Iterator:
    """measured_rows of each tile of a strip that could not be read: the strip's error."""
    return ((tile_ref(parent, window, None), None, error, None) for window in job.band.tiles)


def raster_of(array: np.ndarray, nodata: float | None = None) -> Raster:
    """The Raster of an image array as stored."""
    return Raster(image_of(array), array, nodata)


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
