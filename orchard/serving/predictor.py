"""The model that serves: the registry's `serving` alias (else the newest version), loaded once,
re-read every few seconds so that `orchard models promote` takes effect without a restart.

Decoding, preprocessing and top-k are the batch job's own (orchard.spark_app.images, .preprocess),
so a photo posted here gets the prediction `orchard infer` gives the same bytes in the lake.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import io
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from orchard.core.errors import ConfigError, UnusableImage
from orchard.core.formats import PILLOW, decoder_of
from orchard.core.rasters import DEFAULT_CONVERSION, Conversion, conversion_from_card
from orchard.core.settings import Settings
from orchard.spark_app.images import ImageDecodeError, Raster, converted, open_raster
from orchard.spark_app.local_prediction import load_predictor
from orchard.spark_app.preprocess import as_probabilities, preprocessor, top_k
from orchard.spark_app.registry import serving_version

log = logging.getLogger(__name__)


LOADING = "loading the serving model"  # the problem until the first refresh has run
NOTHING_TRAINED = "no model version is registered yet: run `orchard train`"


class RejectedImage(ValueError):
    """An uploaded file that cannot be predicted; `status` is the HTTP status it earns."""

    def __init__(self, reason: str, status: int = 422):
        super().__init__(reason)
        self.status = status


Vector = np.ndarray  # one embedding: a float row of the model's output (kept as numpy: no per-value objects)


@dataclass(frozen=True)
class Scored:
    """One image's model outputs: class probabilities (the card's order) and its embedding."""

    probabilities: np.ndarray
    embedding: Vector


@dataclass(frozen=True, eq=False)
class ServingModel:
    """A loaded version: the network with (class outputs, embedding) outputs, and its card."""

    version: str
    card: dict
    net: Any  # keras.Model with two outputs (orchard.spark_app.model.with_embedding)
    prep: Callable[[np.ndarray], np.ndarray]
    conversion: Conversion = DEFAULT_CONVERSION  # bands and scaling (the card's)

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(self.card["classes"])

    def input_of(self, content: bytes, max_pixels: int, opened: Raster | None = None) -> np.ndarray:
        """The model input of an encoded image (`opened`: its image as small_picture opened it, so that
        its header is read once); RejectedImage saying why it cannot be used."""
        raster = checked_raster(content, max_pixels, opened)
        size = tuple(int(v) for v in self.card["input_size"])
        try:
            # decode_image's own path (converted), from the raster already opened
            array, _ = converted(
                lambda: raster, (size[0], size[1]), int(self.card.get("channels", 3)), False, self.conversion
            )
            return self.prep(array)
        except (ImageDecodeError, UnusableImage) as exc:
            raise RejectedImage(str(exc)) from None

    def score(self, inputs: list[np.ndarray]) -> list[Scored]:
        """Probabilities and embedding of each input, in one model call (runs in a worker thread)."""
        outputs, embeddings = self.net.predict_on_batch(np.stack(inputs))
        probabilities = as_probabilities(np.asarray(outputs))
        vectors = np.asarray(embeddings).reshape(len(inputs), -1)
        return [Scored(p, vec) for p, vec in zip(probabilities, vectors, strict=True)]

    def top(self, scored: Scored, k: int) -> list[tuple[str, float]]:
        """The k most probable (label, probability) pairs of one image, best first."""
        return top_k(scored.probabilities[None, :], self.classes, k)[0]


def checked_raster(content: bytes, max_pixels: int, opened: Raster | None = None) -> Raster:
    """The image of the bytes (`opened` if given), opened, nothing decoded; RejectedImage (413) if it
    declares more than `max_pixels` pixels, read from its header before anything is decoded (a small
    file can declare gigapixels: a decompression bomb)."""
    try:
        raster = opened or open_raster(content)
        width, height = raster.picture.size
    except Image.DecompressionBombError as exc:
        raise RejectedImage(f"over the limit of {max_pixels} pixels (ORCHARD_SERVE_MAX_PIXELS): {exc}", 413) from None
    except Exception as exc:  # any decoder's refusal is the client's bad file
        raise RejectedImage(f"undecodable image: {type(exc).__name__}: {exc}"[:240]) from None
    if width * height > max_pixels:
        raise RejectedImage(
            f"{width}x{height} = {width * height} pixels is over the limit of {max_pixels} (ORCHARD_SERVE_MAX_PIXELS)",
            413,
        )
    return raster


SMALL_PICTURE_BYTES = 256 * 1024


def small_picture(content: bytes) -> Raster | None:
    """A small encoded picture opened by Pillow (its header read, nothing decoded: its size is known);
    None for a body over SMALL_PICTURE_BYTES, an array format (opening .npy or TIFF arrays reads
    them), or bytes Pillow cannot open (broken files, decompression bombs)."""
    if len(content) > SMALL_PICTURE_BYTES or decoder_of(content) != PILLOW:
        return None
    try:
        return Raster(Image.open(io.BytesIO(content)))
    except Exception:  # any refusal: not known to be small, opened again (and refused) in a worker
        return None


def content_id(content: bytes) -> str:
    """The lake's id of an image: the sha256 of its bytes (a posted photo already in the lake has its id)."""
    return hashlib.sha256(content).hexdigest()


def load_serving_model(s: Settings, version: str) -> ServingModel:
    """Load a registered version for serving (TensorFlow is imported here, not at start)."""
    from orchard.spark_app.model import with_embedding  # noqa: PLC0415 - TensorFlow on first load

    net, card = load_predictor(s, version)
    prep = preprocessor(card["preprocessing"])
    return ServingModel(version, card, with_embedding(net), prep, conversion_from_card(card))


def settle_heap() -> None:
    """Collect what a previous model left, then exclude every object alive now (TensorFlow's and the
    model's, millions of them) from the garbage collector's later passes.

    Why: requests allocate many short-lived objects, so the collector runs often, and each of its
    full passes walked the whole TensorFlow object graph: 7.5 % of the service's CPU at 32 clients."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()


class ModelHolder:
    """The current ServingModel; `refresh` loads the alias' version when it changed."""

    def __init__(self, s: Settings, loader: Callable[[Settings, str], ServingModel] = load_serving_model):
        self._s, self._loader = s, loader
        self.current: ServingModel | None = None
        self.problem: str | None = LOADING
        self.nothing_to_serve = False  # the registry has no version at all (not: cannot reach it)
        self.checked_at = 0.0

    def refresh(self) -> bool:
        """Re-read the alias and load its version if it is not the one loaded; True if it changed.
        Blocking (runs in a worker thread); a failure keeps the model that serves and says why."""
        self.checked_at = time.time()
        try:
            version = serving_version(self._s)
            self.nothing_to_serve = version is None
            if version is None:
                self.problem = NOTHING_TRAINED
                return False
            if self.current is not None and self.current.version == version:
                self.problem = None
                return False
            began = time.monotonic()
            self.current, self.problem = self._loader(self._s, version), None
            settle_heap()
            log.info("serving model %s (loaded in %.1f s)", version, time.monotonic() - began)
            return True
        except (ConfigError, OSError, ValueError) as exc:
            self.report(f"cannot load the serving model: {exc}")
            return False

    def report(self, problem: str) -> None:
        """Record why no (new) model serves; logged once per distinct problem, not every refresh."""
        if problem != self.problem:
            log.warning("%s", problem)
        self.problem = problem

    async def watch(self, every: float) -> None:
        """Refresh now, then every `every` seconds, forever (cancelled at shutdown)."""
        while True:
            try:
                await asyncio.to_thread(self.refresh)
            except Exception as exc:  # e.g. Elasticsearch down: keep serving, retry later
                self.report(f"cannot read the serving alias: {type(exc).__name__}: {exc}"[:300])
            await asyncio.sleep(every)
