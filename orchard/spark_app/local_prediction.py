"""Predictions for local image files with a registered model version or a pretrained ImageNet base
(`imagenet:efficientnet-lite0`), in this process (no Spark):
the quickest way to try a model on a photo (`orchard predict FILE...`).

The same decoding (orchard.spark_app.images.decode_image), preprocessing (the card's) and top-k as
`orchard infer`, so a file gets here the prediction the batch job gives its object in the lake.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from orchard.core.iterables import batched
from orchard.core.rasters import DEFAULT_CONVERSION, Conversion, conversion_from_card
from orchard.core.settings import Settings
from orchard.spark_app.images import ImageDecodeError, decode_image
from orchard.spark_app.preprocess import as_probabilities, prepare, preprocessor, top_k
from orchard.spark_app.versions import load_card, load_model

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FilePrediction:
    """One file's top-k (label, probability) pairs, best first, or why it has none."""

    file: str
    model: str
    top: tuple[tuple[str, float], ...] = ()
    error: str | None = None

    def as_dict(self) -> dict:
        """{"file", "model", "top5": [{"label", "probability"}, ...]} (and "error" when it failed)."""
        doc: dict = {"file": self.file, "model": self.model}
        doc["top5"] = [{"label": label, "probability": round(p, 6)} for label, p in self.top]
        if self.error is not None:
            doc["error"] = self.error
        return doc


def predict_files(s: Settings, version: str, files: Sequence[Path], batch_size: int = 32, k: int = 5) -> Iterator:
    """FilePrediction per file, in order, `batch_size` files per model call; a file that cannot be
    read or decoded gets its error and the others proceed. ModelNotFound etc. from the registry."""
    net, card = load_predictor(s, version)
    classes, prep = tuple(card["classes"]), preprocessor(card["preprocessing"])
    size, channels = tuple(card["input_size"]), int(card.get("channels", 3))
    conversion = conversion_from_card(card)
    for batch in batched(files, batch_size):
        ready = [model_input(path, size, channels, prep, conversion) for path in batch]
        good = [x for x, _ in ready if x is not None]
        probs = iter(top_k(as_probabilities(net.predict_on_batch(np.stack(good))), classes, k) if good else [])
        yield from (
            FilePrediction(str(path), version, tuple(next(probs)))
            if x is not None
            else FilePrediction(str(path), version, error=error)
            for path, (x, error) in zip(batch, ready, strict=True)
        )


def model_input(
    path: Path, size: Sequence[int], channels: int, prep, conversion: Conversion = DEFAULT_CONVERSION
) -> tuple[np.ndarray | None, str | None]:
    """(the model's input for a file, None) or (None, why the file cannot be used)."""
    array, error = decode_file(path, size, channels, conversion)
    return prepare(prep, array) if array is not None else (None, error)


def load_predictor(s: Settings, version: str) -> tuple[Any, dict]:
    """(Keras model, model card) of a registered version or of a pretrained base (`imagenet:...`)."""
    card = load_card(s, version)  # first: an unknown version fails before TensorFlow loads
    return load_model(s, card).master_network, card  # the Keras model itself (no Spark here)


def decode_file(
    path: Path, size: Sequence[int], channels: int, conversion: Conversion = DEFAULT_CONVERSION
) -> tuple[np.ndarray | None, str | None]:
    """(uint8 array at the model's input size, None) or (None, the reason the file cannot be used)."""
    try:
        return decode_image(path.read_bytes(), (int(size[0]), int(size[1])), channels, conversion), None
    except ImageDecodeError as exc:
        return None, str(exc)
    except OSError as exc:
        return None, f"cannot read the file: {exc.strerror or exc}"
