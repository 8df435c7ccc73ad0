"""The nearest lake images of posted photos: exact cosine search over the serving model's
embeddings held in the service's memory while there are few enough of them, else Elasticsearch's
kNN (HNSW) search.

Why: under load an Elasticsearch kNN search per posted photo cost more than the model call itself
(a filtered HNSW search and its rescoring per query, on the same cores), while a matrix product
over some tens of thousands of vectors answers a whole batch of queries in milliseconds, and
exactly. Above `max_vectors` (ORCHARD_SERVE_LOCAL_KNN_MAX) HNSW's sub-linear search wins, and the
memory would grow with the lake: Elasticsearch answers.

Only (id, vector) pairs are kept: the neighbours' result rows (key, label, prediction...) are read
back in one multi-get per batch of the ids not read in the last `recheck_seconds` (a RowCache: a
neighbour's prediction is at most that old, as the serving model is; measured at 32 clients, the
multi-get per batch was a quarter of each request's time). A version's embeddings only change when
`orchard features` adds or removes images (an image's embedding by one version is a function of
its bytes), so the held copy is reloaded when the number of embedded documents changes (checked
every `recheck_seconds`), in a background thread: until it is ready, Elasticsearch answers.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

log = logging.getLogger(__name__)


class EmbeddingSource(Protocol):
    """What the neighbour search reads from the index (orchard.serving.catalog.Catalog)."""

    def embedding_count(self, model: str) -> int: ...

    def embeddings(self, model: str) -> tuple[list[str], np.ndarray]: ...

    def rows_by_id(self, ids: Sequence[str]) -> dict[str, dict]: ...

    def nearest_many(self, model: str, queries: Sequence[tuple[Iterable[float], int]]) -> list[list[dict]]: ...


@dataclass(frozen=True, eq=False)
class Embeddings:
    """One model's embeddings in memory: document ids and their unit-length vectors (row i is ids[i])."""

    model: str
    ids: list[str]
    unit: np.ndarray  # float32, (len(ids), dimensions)

    @classmethod
    def of(cls, model: str, ids: list[str], vectors: np.ndarray) -> Embeddings:
        """The held copy of `vectors` (one row per id), normalized once here."""
        matrix = np.asarray(vectors, dtype=np.float32)
        if not ids:  # nothing embedded: np.array([]) has no second dimension
            matrix = matrix.reshape(0, 0)
        return cls(model, ids, unit_rows(matrix))

    def nearest(self, queries: np.ndarray, ks: Sequence[int]) -> list[list[tuple[str, float]]]:
        """For each query row and its k: the k (id, score) nearest by cosine, best first; the score
        is Elasticsearch's for cosine similarity, (1 + cosine) / 2, so both paths rank alike."""
        if not len(self.ids):
            return [[] for _ in ks]
        cosines = unit_rows(np.asarray(queries, dtype=np.float32)) @ self.unit.T
        return [self._best(row, k) for row, k in zip(cosines, ks, strict=True)]

    def _best(self, cosines: np.ndarray, k: int) -> list[tuple[str, float]]:
        """The k highest of one query's cosines as (id, score), best first (ties: lower row first)."""
        k = min(k, len(cosines))
        if k <= 0:
            return []
        top = np.argpartition(-cosines, k - 1)[:k]
        top = top[np.lexsort((top, -cosines[top]))]
        return [(self.ids[i], float((1.0 + cosines[i]) / 2.0)) for i in top]


class RowCache:
    """Result rows of lake images by id, each used for at most `ttl` seconds after it was read; at
    most `capacity` of them (the least recently used go first). Thread-safe."""

    def __init__(self, ttl: float, capacity: int = 10_000, clock: Callable[[], float] = time.monotonic):
        self.ttl, self.capacity, self._clock = ttl, capacity, clock
        self._rows: OrderedDict[str, tuple[float, dict]] = OrderedDict()  # id -> (read at, row)
        self._lock = threading.Lock()

    def rows(self, ids: Sequence[str], read: Callable[[list[str]], dict[str, dict]]) -> dict[str, dict]:
        """The rows of `ids` (those whose document is gone left out): held ones younger than `ttl`,
        the others from one call of `read` (never asked for nothing)."""
        now = self._clock()
        found: dict[str, dict] = {}
        missing: list[str] = []
        with self._lock:
            for image_id in dict.fromkeys(ids):
                held = self._rows.get(image_id)
                if held is not None and now - held[0] < self.ttl:
                    found[image_id] = held[1]
                    self._rows.move_to_end(image_id)
                else:
                    missing.append(image_id)
        if missing:
            fresh = read(missing)
            self._keep(now, fresh)
            found.update(fresh)
        return found

    def _keep(self, now: float, rows: dict[str, dict]) -> None:
        with self._lock:
            for image_id, row in rows.items():
                self._rows[image_id] = (now, row)
                self._rows.move_to_end(image_id)
            while len(self._rows) > self.capacity:
                self._rows.popitem(last=False)


def scored_rows(found: Sequence[Sequence[tuple[str, float]]], rows: dict[str, dict]) -> list[list[dict]]:
    """Per query, its (id, score) pairs as result rows with their score, in order; ids with no row left out."""
    return [[{**rows[i], "score": score} for i, score in pairs if i in rows] for pairs in found]


def unit_rows(matrix: np.ndarray) -> np.ndarray:
    """Each row scaled to length 1 (a zero row stays zero: it is near nothing)."""
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return matrix / np.where(norms == 0, 1.0, norms)


class Neighbours:
    """Nearest-image searches for the service: in memory for a model with at most `max_vectors`
    embedded images (0: never), Elasticsearch otherwise and while the copy loads."""

    def __init__(self, source: EmbeddingSource, max_vectors: int, recheck_seconds: float):
        self._source, self.max_vectors, self._recheck = source, max_vectors, recheck_seconds
        self.held: Embeddings | None = None
        self._checked: dict[str, float] = {}  # model -> when its count was last compared
        self._loading: threading.Thread | None = None
        self._lock = threading.Lock()
        self._rows = RowCache(recheck_seconds)

    def nearest_many(self, model: str, queries: Sequence[tuple[Iterable[float], int]]) -> list[list[dict]]:
        """For each (vector, k): the k nearest lake images' result rows (blocking: a worker thread)."""
        held = self._current(model)
        if held is None:
            return self._source.nearest_many(model, queries)
        found = held.nearest(np.array([vector for vector, _ in queries]), [k for _, k in queries])
        ids = [image_id for pairs in found for image_id, _ in pairs]
        return scored_rows(found, self._rows.rows(ids, self._source.rows_by_id))

    def describe(self) -> dict:
        """What answers neighbour searches now (for /healthz)."""
        held = self.held
        if held is None:
            return {"searched_in": "elasticsearch", "max_vectors": self.max_vectors}
        return {"searched_in": "memory", "model": held.model, "vectors": len(held.ids), "max_vectors": self.max_vectors}

    def _current(self, model: str) -> Embeddings | None:
        """The held copy if it is `model`'s; starts a check (and a load if needed) at most once per
        `recheck_seconds` per model, whether or not a copy is held: a lake over the limit, or an
        index that cannot answer, is asked again only that often, not at every search."""
        if self.max_vectors <= 0:
            return None
        held = self.held if self.held is not None and self.held.model == model else None
        now = time.monotonic()
        if model not in self._checked or now - self._checked[model] >= self._recheck:
            self._checked[model] = now
            self._start_load(model, held)
        return held

    def _start_load(self, model: str, held: Embeddings | None) -> None:
        """Check the count (and load if needed) in a background thread, one at a time."""
        with self._lock:
            if self._loading is not None and self._loading.is_alive():
                return
            self._loading = threading.Thread(target=self._load, args=(model, held), name="neighbours-load", daemon=True)
            self._loading.start()

    def _load(self, model: str, held: Embeddings | None) -> None:
        """Replace the held copy with `model`'s embeddings if their count changed and fits; drop it
        (Elasticsearch answers) if there are too many. A failure keeps what is held."""
        try:
            count = self._source.embedding_count(model)
            if held is not None and count == len(held.ids):
                return
            if count > self.max_vectors:
                if held is not None:
                    log.info(
                        "%d embeddings by %s: over ORCHARD_SERVE_LOCAL_KNN_MAX, Elasticsearch searches", count, model
                    )
                self.held = None
                return
            began = time.monotonic()
            ids, vectors = self._source.embeddings(model)
            self.held = Embeddings.of(model, ids, vectors)
            log.info(
                "neighbours by %s searched in memory: %d embeddings (loaded in %.1f s)",
                model,
                len(ids),
                time.monotonic() - began,
            )
        except Exception as exc:  # Elasticsearch unreachable: keep answering as before, retry later
            log.warning("cannot load the embeddings of %s: %s: %s", model, type(exc).__name__, exc)
