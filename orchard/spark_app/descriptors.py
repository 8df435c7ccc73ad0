"""Local image descriptors for the bag-of-visual-words family (OpenCV SIFT or ORB): numpy and cv2
(imported where descriptors are computed), no TensorFlow, so executors and unit tests use them cheaply.

A BoVW version's preprocessing is named `<descriptor>-<keypoints>` (e.g. `sift-50`): a decoded image
becomes one fixed-shape float32 array of `keypoints` rows x (descriptor width + 1) columns: the
descriptors of its strongest keypoints (ORB's 256 bits unpacked to 0/1), zero rows after them when
it has fewer, and a last column that is 1 on real rows. The model (orchard.spark_app.model's
BagOfWords layer) counts the nearest visual word of the real rows only. A fixed shape lets the same
batched predict path serve CNNs and BoVW versions alike; memory per image is bounded by `keypoints`.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from functools import partial

import numpy as np

from orchard.core.errors import UnusableImage

WIDTHS = {"sift": 128, "orb": 256}  # descriptor values per keypoint (ORB: 32 bytes = 256 bits)
KINDS = tuple(WIDTHS)
# Detector thresholds below OpenCV's defaults (0.04, 20), which are set for large, sharp photos: at
# the thumbnail sizes of image datasets (Fruits-360: 100x100) the defaults find a handful of
# keypoints or none. They are part of what a version's preprocessing means: change them only with
# a new preprocessing name.
SIFT_CONTRAST = 0.02
ORB_FAST_THRESHOLD = 10
_NAME = re.compile(r"^(sift|orb)-([1-9][0-9]*)$")

# cv2 detectors are not thread-safe; one per (kind, keypoints) and thread (executors reuse workers).
_local = threading.local()


def preprocessing_name(kind: str, keypoints: int) -> str:
    """The card's preprocessing name of a descriptor model: `sift-50`."""
    if kind not in WIDTHS or keypoints < 1:
        raise ValueError(f"descriptor must be one of {', '.join(KINDS)} with >= 1 keypoint, got {kind!r}, {keypoints}")
    return f"{kind}-{keypoints}"


def parse_name(name: str) -> tuple[str, int] | None:
    """(kind, keypoints) of a descriptor preprocessing name, or None if `name` is not one."""
    match = _NAME.match(name)
    return (match.group(1), int(match.group(2))) if match else None


def preprocessor_of(name: str) -> Callable[[np.ndarray], np.ndarray] | None:
    """The model-input function of a descriptor preprocessing name, or None if `name` is not one."""
    parsed = parse_name(name)
    return partial(model_input, kind=parsed[0], keypoints=parsed[1]) if parsed else None


def detector(kind: str, keypoints: int):
    """This thread's OpenCV detector+extractor for `kind`, keeping the `keypoints` strongest."""
    import cv2  # noqa: PLC0415 - OpenCV loads only where descriptors are computed (not in every CLI command)

    cache = _local.__dict__.setdefault("detectors", {})
    if (kind, keypoints) not in cache:
        if kind == "sift":
            cache[kind, keypoints] = cv2.SIFT_create(nfeatures=keypoints, contrastThreshold=SIFT_CONTRAST)  # type: ignore[attr-defined]
        else:
            cache[kind, keypoints] = cv2.ORB_create(nfeatures=keypoints, fastThreshold=ORB_FAST_THRESHOLD)  # type: ignore[attr-defined]
    return cache[kind, keypoints]


def grey(array: np.ndarray) -> np.ndarray:
    """A uint8 HxW (or HxWx1/3/4) image as one uint8 grey channel (ITU-R 601 luma, as OpenCV)."""
    import cv2  # noqa: PLC0415 - see detector()

    if array.ndim == 2:
        return array
    if array.shape[2] == 1:
        return array[..., 0]
    return cv2.cvtColor(np.ascontiguousarray(array[..., :3]), cv2.COLOR_RGB2GRAY)


def describe(array: np.ndarray, kind: str, keypoints: int) -> np.ndarray:
    """float32 (m, width) descriptors of at most `keypoints` strongest keypoints of a uint8 image,
    strongest first; UnusableImage if it has none (flat, blank or tiny images)."""
    found, values = detector(kind, keypoints).detectAndCompute(grey(array), None)
    if values is None or not len(found):
        raise UnusableImage(f"no {kind} keypoints found (flat, blank or too small an image)")
    order = np.argsort([-k.response for k in found], kind="stable")[:keypoints]
    values = values[order]
    return (np.unpackbits(values, axis=1) if kind == "orb" else values).astype(np.float32)


def model_input(array: np.ndarray, kind: str, keypoints: int) -> np.ndarray:
    """The fixed-shape (keypoints, width + 1) input of a BoVW model for one uint8 image (see the
    module docstring); UnusableImage if the image has no keypoints."""
    values = describe(array, kind, keypoints)
    out = np.zeros((keypoints, WIDTHS[kind] + 1), dtype=np.float32)
    out[: len(values), :-1] = values
    out[: len(values), -1] = 1.0
    return out


def real_rows(inputs: np.ndarray) -> np.ndarray:
    """The descriptors (without the flag column) of the real rows of one model input."""
    return inputs[inputs[:, -1] > 0.5, :-1]


def nearest_words(descriptors: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """Index of the nearest centre (squared Euclidean distance) of each descriptor row."""
    d2 = (descriptors**2).sum(axis=1)[:, None] - 2.0 * descriptors @ centers.T + (centers**2).sum(axis=1)[None, :]
    return np.argmin(d2, axis=1)


def word_counts(inputs: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """float64 histogram (len(centers) bins) of the nearest visual words of one model input's real rows."""
    words = nearest_words(real_rows(inputs), centers)
    return np.bincount(words, minlength=len(centers)).astype(np.float64)
