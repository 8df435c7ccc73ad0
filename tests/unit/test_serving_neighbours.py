"""Neighbour search of the service (orchard/serving/neighbours.py): exact cosine top-k in memory,
scored like Elasticsearch, and when the held copy is used, loaded, reloaded or given up; the
neighbours' rows kept for a bounded time (RowCache). The index
is a recording stand-in (the real one is exercised by tests/integration/test_serving.py)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

from orchard.serving.neighbours import Embeddings, Neighbours, RowCache, scored_rows, unit_rows


def brute_force(vectors: np.ndarray, query: np.ndarray, k: int) -> list[tuple[int, float]]:
    """(row, (1 + cosine) / 2) of the k most similar rows, best first, one row at a time."""
    scores = []
    for i, row in enumerate(vectors):
        cosine = float(row @ query / (np.linalg.norm(row) * np.linalg.norm(query)))
        scores.append((i, (1 + cosine) / 2))
    return sorted(scores, key=lambda pair: (-pair[1], pair[0]))[:k]


def test_nearest_equals_brute_force_cosine_with_elasticsearch_scores():
    rng = np.random.default_rng(7)
    vectors = rng.normal(size=(300, 16)) * rng.uniform(0.1, 10, size=(300, 1))  # lengths must not matter
    ids = [f"id{i}" for i in range(300)]
    held = Embeddings.of("v1", ids, vectors)
    queries = rng.normal(size=(4, 16))
    found = held.nearest(queries, [1, 5, 10, 3])
    for query, k, got in zip(queries, [1, 5, 10, 3], found, strict=True):
        expected = brute_force(vectors, query, k)
        assert [image_id for image_id, _ in got] == [ids[i] for i, _ in expected]
        np.testing.assert_allclose([s for _, s in got], [s for _, s in expected], rtol=1e-5)


def test_a_stored_vector_finds_itself_first_and_ties_keep_row_order():
    vectors = np.array([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    held = Embeddings.of("v1", ["a", "b", "c", "d"], vectors)
    [found] = held.nearest(np.array([[3.0, 0.0]]), [4])
    assert [i for i, _ in found] == ["a", "b", "c", "d"]  # a and b tie at cosine 1
    assert [round(s, 6) for _, s in found] == [1.0, 1.0, 0.5, 0.0]


def test_k_beyond_the_held_count_and_empty_copies():
    held = Embeddings.of("v1", ["a", "b"], np.eye(2))
    assert [len(f) for f in held.nearest(np.eye(2), [5, 0])] == [2, 0]
    empty = Embeddings.of("v1", [], np.zeros((0, 2)))
    assert empty.nearest(np.eye(2), [3, 3]) == [[], []]


def test_unit_rows_leaves_zero_rows_zero():
    rows = unit_rows(np.array([[3.0, 4.0], [0.0, 0.0]]))
    np.testing.assert_allclose(rows, [[0.6, 0.8], [0.0, 0.0]])


class Index:
    """Stands in for the catalog: `count` embeddings of 2 dimensions per model; records its calls."""

    def __init__(self, count: int):
        self.count, self.calls = count, []
        self.fail = False

    def embedding_count(self, model: str) -> int:
        self.calls.append(("count", model))
        if self.fail:
            raise ConnectionError("Elasticsearch is down")
        return self.count

    def embeddings(self, model: str) -> tuple[list[str], np.ndarray]:
        self.calls.append(("embeddings", model))
        angles = np.linspace(0, np.pi / 2, self.count)
        return [f"{model}-{i}" for i in range(self.count)], np.stack([np.cos(angles), np.sin(angles)], axis=1)

    def rows_by_id(self, ids: Sequence[str]) -> dict[str, dict]:
        self.calls.append(("rows", len(ids)))
        return {i: {"score": None, "id": i} for i in ids}

    def nearest_many(self, model: str, queries) -> list[list[dict]]:
        self.calls.append(("knn", model))
        return [[{"id": "from-elasticsearch"}] for _ in queries]

    def kinds(self) -> list[str]:
        return [kind for kind, _ in self.calls]


def settle(nearby: Neighbours) -> None:
    """Wait for a background (re)load to end."""
    if nearby._loading is not None:
        nearby._loading.join(timeout=10)
        assert not nearby._loading.is_alive()


def test_elasticsearch_answers_until_the_copy_is_loaded_then_memory_does():
    index = Index(count=10)
    nearby = Neighbours(index, max_vectors=100, recheck_seconds=3600)
    assert nearby.nearest_many("v1", [([1.0, 0.0], 2)]) == [[{"id": "from-elasticsearch"}]]
    settle(nearby)
    assert nearby.describe() == {"searched_in": "memory", "model": "v1", "vectors": 10, "max_vectors": 100}
    [rows] = nearby.nearest_many("v1", [([1.0, 0.0], 2)])
    assert [row["id"] for row in rows] == ["v1-0", "v1-1"] and rows[0]["score"] == pytest.approx(1.0)
    # (the load's thread may have counted before the first search asked Elasticsearch)
    assert sorted(index.kinds()) == ["count", "embeddings", "knn", "rows"]  # no recheck within the period


def test_a_changed_count_reloads_and_too_many_hands_back_to_elasticsearch():
    index = Index(count=10)
    nearby = Neighbours(index, max_vectors=20, recheck_seconds=0)
    nearby.nearest_many("v1", [([1.0, 0.0], 1)])
    settle(nearby)
    nearby.nearest_many("v1", [([1.0, 0.0], 1)])  # same count: checked, not reloaded
    settle(nearby)
    assert index.kinds().count("embeddings") == 1
    index.count = 15
    nearby.nearest_many("v1", [([1.0, 0.0], 1)])
    settle(nearby)
    assert index.kinds().count("embeddings") == 2 and nearby.describe()["vectors"] == 15
    index.count = 21
    nearby.nearest_many("v1", [([1.0, 0.0], 1)])
    settle(nearby)
    assert nearby.held is None and nearby.describe()["searched_in"] == "elasticsearch"
    assert nearby.nearest_many("v1", [([1.0, 0.0], 1)]) == [[{"id": "from-elasticsearch"}]]


def test_a_lake_over_the_limit_is_counted_once_per_period_not_at_every_search():
    index = Index(count=30)
    nearby = Neighbours(index, max_vectors=20, recheck_seconds=3600)
    for _ in range(5):
        assert nearby.nearest_many("v1", [([1.0, 0.0], 1)]) == [[{"id": "from-elasticsearch"}]]
        settle(nearby)
    assert index.kinds().count("count") == 1 and "embeddings" not in index.kinds()


def test_another_model_is_never_answered_from_the_held_copy():
    index = Index(count=5)
    nearby = Neighbours(index, max_vectors=100, recheck_seconds=3600)
    nearby.nearest_many("v1", [([1.0, 0.0], 1)])
    settle(nearby)
    assert nearby.nearest_many("v2", [([1.0, 0.0], 1)]) == [[{"id": "from-elasticsearch"}]]
    settle(nearby)
    assert nearby.held is not None and nearby.held.model == "v2"


def test_a_failed_check_keeps_the_held_copy_and_zero_disables_memory():
    index = Index(count=5)
    nearby = Neighbours(index, max_vectors=100, recheck_seconds=0)
    nearby.nearest_many("v1", [([1.0, 0.0], 1)])
    settle(nearby)
    index.fail = True
    nearby.nearest_many("v1", [([1.0, 0.0], 1)])
    settle(nearby)
    assert nearby.held is not None and nearby.held.model == "v1"
    never = Neighbours(Index(count=5), max_vectors=0, recheck_seconds=0)
    never.nearest_many("v1", [([1.0, 0.0], 1)])
    assert never._loading is None and never.describe()["searched_in"] == "elasticsearch"


class Clock:
    """A clock the test moves."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Reads:
    """Rows read from a stand-in index: the ids asked at each read; `gone` ids have no document."""

    def __init__(self, gone: frozenset[str] = frozenset()):
        self.asked: list[list[str]] = []
        self.gone, self.version = gone, 1

    def __call__(self, ids: list[str]) -> dict[str, dict]:
        self.asked.append(ids)
        return {i: {"id": i, "label": f"label-{self.version}"} for i in ids if i not in self.gone}


def test_rows_are_read_once_then_held_until_they_are_ttl_seconds_old():
    clock, reads = Clock(), Reads()
    cache = RowCache(ttl=5, clock=clock)
    assert cache.rows(["a", "b", "a"], reads) == {
        "a": {"id": "a", "label": "label-1"},
        "b": {"id": "b", "label": "label-1"},
    }
    reads.version = 2  # a new prediction written meanwhile
    clock.now += 4.9
    assert cache.rows(["b", "c"], reads)["b"]["label"] == "label-1"  # held: at most 5 s old
    clock.now += 0.2
    got = cache.rows(["a", "b", "c"], reads)
    assert reads.asked == [["a", "b"], ["c"], ["a", "b"]]  # each read asks only what is not held, once
    assert {i: row["label"] for i, row in got.items()} == {"a": "label-2", "b": "label-2", "c": "label-2"}


def test_gone_documents_are_left_out_and_asked_again_and_the_least_recently_used_go_first():
    clock, reads = Clock(), Reads(gone=frozenset({"x"}))
    cache = RowCache(ttl=60, capacity=2, clock=clock)
    assert cache.rows(["x", "a"], reads).keys() == {"a"}
    assert cache.rows(["x"], reads) == {}
    cache.rows(["b"], reads)
    cache.rows(["a"], reads)  # held; now the most recently used
    cache.rows(["c"], reads)  # over capacity: b goes, not a
    cache.rows(["a", "b"], reads)
    assert reads.asked == [["x", "a"], ["x"], ["b"], ["c"], ["b"]]


def test_scored_rows_keep_each_querys_order_and_scores():
    rows = {"a": {"score": None, "id": "a"}, "b": {"score": None, "id": "b"}}
    found = [[("b", 0.9), ("gone", 0.8), ("a", 0.7)], []]
    assert scored_rows(found, rows) == [[{"score": 0.9, "id": "b"}, {"score": 0.7, "id": "a"}], []]
