"""The file formats Orchard accepts, in one place: suffixes, leading bytes, content types, and the
decoder each needs.

Owned here (and listed nowhere else):
- `FORMATS`: every accepted format. The uploader uploads exactly the files whose suffix is in
  `SUFFIXES` (orchard/uploader/discovery.py) and checks their leading bytes with `sniff`
  (inspection); the images table holds a row per object whose key has one of them (`is_image_key`,
  orchard/spark_app/table.py), and the executors pick a decoder by the same leading bytes
  (orchard/spark_app/images.py).
- `.npy` arrays (one image per object: (H, W), (H, W, C) or (C, H, W)) are images like any other:
  a stack uploaded with `--labels` becomes one `.npy` object per row.

Decoders: `PILLOW` (8-bit raster formats), `TIFF` (Pillow when the TIFF is 8-bit with at most 4
bands, else tifffile: 16-bit, float, many bands), `NPY` (numpy, never unpickled).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

PILLOW: Final = "pillow"
TIFF: Final = "tiff"
NPY: Final = "npy"


@dataclass(frozen=True)
class Format:
    """One accepted format: its name as stored (the table's and document's `format`), file suffixes
    (lower case), leading bytes, content type and decoder."""

    name: str
    suffixes: tuple[str, ...]
    magics: tuple[bytes, ...]
    content_type: str
    decoder: str


FORMATS: Final = (
    Format("jpeg", (".jpg", ".jpeg"), (b"\xff\xd8\xff",), "image/jpeg", PILLOW),
    Format("png", (".png",), (b"\x89PNG\r\n\x1a\n",), "image/png", PILLOW),
    Format("gif", (".gif",), (b"GIF87a", b"GIF89a"), "image/gif", PILLOW),
    Format("bmp", (".bmp",), (b"BM",), "image/bmp", PILLOW),
    Format("tiff", (".tif", ".tiff"), (b"II*\x00", b"MM\x00*"), "image/tiff", TIFF),
    Format("webp", (".webp",), (b"RIFF",), "image/webp", PILLOW),
    Format("npy", (".npy",), (b"\x93NUMPY",), "application/x-npy", NPY),
)
BY_NAME: Final = {f.name: f for f in FORMATS}
SUFFIXES: Final = frozenset(s for f in FORMATS for s in f.suffixes)  # what the uploader accepts
ARRAY_SUFFIX: Final = ".npy"  # also the suffix of the stacks and label files `--labels` reads
MAGIC_BYTES: Final = 16  # enough leading bytes for `sniff`


def suffix_of(name: str) -> str:
    """The lower-case suffix (with its dot) of a file name or object key; '' if it has none."""
    base = name.rsplit("/", 1)[-1].lower()
    return base[base.rindex(".") :] if "." in base else ""


def is_image_key(key: str) -> bool:
    """True if the key's file name has an accepted suffix: the object is an image (a row of the
    images table), `.npy` arrays included."""
    return suffix_of(key) in SUFFIXES


def sniff(head: bytes) -> Format | None:
    """The format the leading bytes announce, or None."""
    return next((f for f in FORMATS if head.startswith(f.magics)), None)


def decoder_of(content: bytes) -> str:
    """The decoder for an object's bytes, chosen by its leading bytes (not its name: a `.jpg` that
    is really a PNG still decodes); unknown bytes go to Pillow, which says why it cannot read them."""
    found = sniff(content[:MAGIC_BYTES])
    return found.decoder if found else PILLOW


def by_suffix(name: str) -> Format | None:
    """The format a file name or object key's suffix names, or None."""
    suffix = suffix_of(name)
    return next((f for f in FORMATS if suffix in f.suffixes), None)
