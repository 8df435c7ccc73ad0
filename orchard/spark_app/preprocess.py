"""Pure numpy pieces of the model pipeline: preprocessing by name, probabilities, top-k, label maps.

No TensorFlow here, so executors and unit tests can use them cheaply.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TypeVar

import numpy as np

from orchard.core.errors import UnusableImage
from orchard.core.iterables import batched

T = TypeVar("T")


def _scale01(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float32) / np.float32(255.0)


def _scale_pm1(x: np.ndarray) -> np.ndarray:
    # tf.keras.applications.{mobilenet,mobilenet_v2,inception_v3,xception} "tf" mode: [-1, 1].
    return x.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


def _caffe(x: np.ndarray) -> np.ndarray:
    # tf.keras.applications.{vgg16,vgg19,resnet50} "caffe" mode: RGB->BGR, ImageNet means subtracted.
    bgr = x[..., ::-1].astype(np.float32)
    return bgr - np.array([103.939, 116.779, 123.68], dtype=np.float32)


def _torch(x: np.ndarray) -> np.ndarray:
    # tf.keras.applications.densenet "torch" mode: [0,1] then ImageNet mean/std.
    mean = np.array([0.485, 0.456, 0.406], dtype=np.float32)
    std = np.array([0.229, 0.224, 0.225], dtype=np.float32)
    return (_scale01(x) - mean) / std


def _raw(x: np.ndarray) -> np.ndarray:
    # EfficientNet and ConvNeXt in Keras take 0..255 and rescale inside the model.
    return x.astype(np.float32)


PREPROCESSORS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "scale01": _scale01,
    "mobilenet_v2": _scale_pm1,
    "mobilenet": _scale_pm1,
    "inception_v3": _scale_pm1,
    "xception": _scale_pm1,
    "vgg16": _caffe,
    "resnet50": _caffe,
    "densenet": _torch,
    "efficientnet": _raw,
    "none": _raw,
}


def preprocessor(name: str) -> Callable[[np.ndarray], np.ndarray]:
    """The preprocessing function called `name` (uint8 HxWxC -> float32 model input); ValueError if
    unknown. Besides PREPROCESSORS, a bag-of-visual-words version's `<descriptor>-<keypoints>`
    (orchard.spark_app.descriptors; per image: it may raise UnusableImage)."""
    if name in PREPROCESSORS:
        return PREPROCESSORS[name]
    # OpenCV: loaded only for a descriptor model.
    from orchard.spark_app.descriptors import preprocessor_of  # noqa: PLC0415

    found = preprocessor_of(name)
    if found is None:
        choices = ", ".join(sorted(PREPROCESSORS))
        raise ValueError(f"unknown preprocessing {name!r}; choose one of {choices}, or sift-N / orb-N")
    return found


def prepare(prep: Callable[[np.ndarray], np.ndarray], array: np.ndarray) -> tuple[np.ndarray | None, str | None]:
    """(model input, None) of one decoded image, or (None, the reason) if the preprocessing cannot use it."""
    try:
        return prep(array), None
    except UnusableImage as exc:
        return None, str(exc)


def as_probabilities(outputs: np.ndarray) -> np.ndarray:
    """Model outputs as class probabilities: kept if rows already are (>=0, sum 1), else softmax of logits."""
    out = np.asarray(outputs, dtype=np.float64)
    if out.size and out.min() >= 0 and np.allclose(out.sum(axis=1), 1.0, atol=1e-3):
        return out
    shifted = out - out.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def top_k(probs: np.ndarray, labels: Sequence[str], k: int = 5) -> list[list[tuple[str, float]]]:
    """Per row, the k most probable (label, probability) pairs, best first (ties: lower index first)."""
    order = top_indices(probs, min(k, probs.shape[1]))
    return [[(labels[i], float(row[i])) for i in idx] for row, idx in zip(probs, order, strict=True)]


def top_indices(probs: np.ndarray, k: int) -> np.ndarray:
    """(rows, k) column indices of each row's k largest values, largest first, equal values in
    ascending index order: what a stable sort of -probs gives, without sorting whole rows (a
    1000-class head made the stable sort 1.5 s of executor CPU per 16,000 images)."""
    if k <= 0 or k >= probs.shape[1]:
        return np.argsort(-probs, axis=1, kind="stable")[:, : max(k, 0)]
    picked = np.argpartition(-probs, k - 1, axis=1)[:, :k]  # the k largest, unordered
    values = np.take_along_axis(probs, picked, axis=1)
    # Exact unless a value equal to a row's k-th largest is left out (a tie across the cut): then
    # argpartition chose among equals arbitrarily, and those rows take the stable sort.
    kth = values.min(axis=1, keepdims=True)
    ambiguous = (probs >= kth).sum(axis=1) > k
    within = np.lexsort((picked, -values), axis=1)  # by value descending, then index ascending
    order = np.take_along_axis(picked, within, axis=1)
    if ambiguous.any():
        order[ambiguous] = np.argsort(-probs[ambiguous], axis=1, kind="stable")[:, :k]
    return order


def map_batches(
    run: Callable[[np.ndarray], np.ndarray], items: Iterable[tuple[T, np.ndarray | None]], batch_size: int
) -> Iterator[tuple[T, np.ndarray | None]]:
    """(meta, x or None) in, (meta, run's output row for x, or None) out, in order: `run` gets the
    stacked non-None xs of each batch of `batch_size` items, so one batch at a time is in memory."""
    for batch in batched(items, batch_size):
        xs = [x for _, x in batch if x is not None]
        outputs = iter(run(np.stack(xs))) if xs else iter(())
        for meta, x in batch:
            yield meta, (next(outputs) if x is not None else None)


def label_map(labels: Iterable[str]) -> dict[str, int]:
    """Label -> class index, sorted by label so every run on the same data gets the same map."""
    return {label: i for i, label in enumerate(sorted(set(labels)))}


def one_hot(index: int, num_classes: int) -> np.ndarray:
    """A float32 one-hot row."""
    row = np.zeros(num_classes, dtype=np.float32)
    row[index] = 1.0
    return row


def cross_entropy_terms(probs: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per-row categorical cross-entropy -log p[target] (clipped like Keras, epsilon 1e-7)."""
    p = np.clip(probs[np.arange(len(targets)), targets], 1e-7, 1.0)
    return -np.log(p)


def choose_k(explained: Sequence[float], threshold: float) -> int:
    """The smallest number of leading components whose explained variance ratios sum to >= threshold.

    `explained` is a descending list of ratios (Spark ML PCAModel.explainedVariance); returns all of
    them if even the total stays below the threshold (rounding).
    """
    if not 0 < threshold <= 1:
        raise ValueError(f"explained-variance threshold must be in (0, 1], got {threshold}")
    total = 0.0
    for i, ratio in enumerate(explained, start=1):
        total += float(ratio)
        if total >= threshold - 1e-9:
            return i
    return len(explained)


def finite(value: float) -> float | None:
    """`value` as a float, or None if it is NaN/inf (Elasticsearch rejects those)."""
    value = float(value)
    return value if math.isfinite(value) else None


def mean_history(histories: Sequence[dict]) -> dict[str, float]:
    """Per metric, the mean over workers of the last value in each Keras history dict."""
    sums: dict[str, list[float]] = {}
    for history in histories:
        for name, values in (history or {}).items():
            if values:
                sums.setdefault(name, []).append(float(values[-1]))
    return {name: float(np.mean(values)) for name, values in sums.items()}
