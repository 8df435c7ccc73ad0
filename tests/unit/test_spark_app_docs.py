"""spark_app document shapes and accounting: prediction docs, bulk actions, tallies, search rows, versions."""

from __future__ import annotations

import json
import pickle
import re
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

import pytest

from orchard.spark_app import registry, search
from orchard.spark_app.images import ImageRef
from orchard.spark_app.infer import (
    PredictSpec,
    error_doc,
    inference_summary,
    prediction_doc,
    same_prediction,
    skip_unchanged,
    update_action,
)
from orchard.spark_app.sink import Tally, failure_reason, merge_tallies
from orchard.spark_app.versions import read_class_names
from spark_app_settings import CFG

SPEC = PredictSpec(CFG, "v1", ("a", "b"), "scale01", (100, 100), 3, 8, "2026-01-01T00:00:00+00:00")
REF = ImageRef("abc123", "ds/test/a/1.jpg", "ds", "test", "a")


def test_prediction_doc_has_top1_top5_version_and_time():
    doc = prediction_doc(SPEC, [("b", 0.75), ("a", 0.25)])
    assert doc["label"] == "b" and doc["confidence"] == 0.75
    assert doc["top5"] == [{"label": "b", "confidence": 0.75}, {"label": "a", "confidence": 0.25}]
    assert doc["model_version"] == "v1" and doc["predicted_at"] == SPEC.predicted_at
    assert doc["error"] is None  # sent as null: a partial update then clears an older error


def test_error_doc_clears_the_label_fields():
    doc = error_doc(SPEC, "undecodable image: x")
    assert doc["error"] == "undecodable image: x" and doc["model_version"] == "v1"
    assert doc["label"] is None and doc["top5"] is None and doc["confidence"] is None


def test_update_action_is_a_partial_update_by_content_id():
    action = update_action("orchard-images", REF, prediction_doc(SPEC, [("a", 1.0)]))
    assert action["_id"] == "abc123" and action["_op_type"] == "update" and action["_index"] == "orchard-images"
    assert action["doc"]["prediction"]["label"] == "a"
    json.dumps(action)  # serialisable as is


def test_same_prediction_ignores_time_and_confidence_but_not_model_or_label():
    new = prediction_doc(SPEC, [("a", 0.9)])
    assert same_prediction({**new, "predicted_at": "earlier", "confidence": 0.8999}, new)
    assert not same_prediction({**new, "model_version": "v0"}, new)
    assert not same_prediction({**new, "label": "b"}, new)
    assert not same_prediction(error_doc(SPEC, "bad"), new)
    assert not same_prediction(None, new)


class FakeEs:
    """mget only: what skip_unchanged reads."""

    def __init__(self, stored):
        self.stored = stored

    def mget(self, index, ids, source_includes):
        return {"docs": [{"_id": i, "found": i in self.stored, "_source": self.stored.get(i, {})} for i in ids]}


def test_skip_unchanged_keeps_new_and_changed_drops_same_and_missing():
    same = prediction_doc(SPEC, [("a", 0.9)])
    earlier = {**same, "predicted_at": "2020-01-01T00:00:00Z", "confidence": 0.8999}
    chunk = [
        (update_action("ix", ImageRef(i, f"k{i}", "ds", "test", "a"), same), f"k{i}", False)
        for i in ("same", "changed", "fresh", "missing")
    ]
    es = FakeEs({"same": {"prediction": earlier}, "changed": {"prediction": {**same, "label": "b"}}, "fresh": {}})
    kept: dict = {}
    keep, tally = skip_unchanged(False, kept, es, chunk)
    assert [action["_id"] for action, _, _ in keep] == ["changed", "fresh"]
    assert (tally.noop, tally.failed) == (1, 1) and "no document" in tally.examples[0][1]
    assert kept == {"same": earlier}  # the stored prediction, first predicted_at included, for the lake's row
    keep, tally = skip_unchanged(True, {}, es, chunk)
    assert [action["_id"] for action, _, _ in keep] == ["same", "changed", "fresh"]


def test_tallies_merge_counts_and_cap_examples():
    a, b = Tally(updated=2, noop=1), Tally(updated=1)
    for i in range(15):
        a.fail(f"k{i}", "r1")
        b.fail(f"j{i}", "r2" if i % 2 else "r1")
    total = merge_tallies(a, b)
    assert (total.updated, total.noop, total.failed, total.written) == (3, 1, 30, 4)
    assert total.reasons == {"r1": 23, "r2": 7}
    assert len(total.examples) == 20


def test_failure_reason_of_a_missing_document():
    info = {
        "_id": "x",
        "status": 404,
        "error": {"type": "document_missing_exception", "reason": "[x]: document missing"},
    }
    assert "no document" in failure_reason(info)
    assert failure_reason(
        {"status": 429, "error": {"type": "es_rejected_execution_exception", "reason": "queue full"}}
    ).startswith("es_rejected")


def test_inference_summary_counts_images_once():
    summary = inference_summary(Tally(updated=8, noop=2, failed=1, errors=1), "v1", 2, 5.0)
    assert summary["images"] == 11 and summary["images_per_second"] == 2.2 and summary["model_loads"] == 2


def test_version_ids_are_sortable_and_hash_suffixed():
    now = datetime(2026, 3, 4, 5, 6, 7, tzinfo=UTC)
    assert registry.new_version("cnn", "deadbeefcafe", now) == "cnn-20260304050607-deadbeef"
    assert re.fullmatch(
        r"user-mobilenet-v2-[0-9a-f]{10}", registry.user_version(Path("MobileNet V2.keras"), "0123456789abcdef")
    )


def test_labels_file_formats(tmp_path):
    (tmp_path / "l.json").write_text(json.dumps({"classes": ["x", "y"]}))
    (tmp_path / "l2.json").write_text(json.dumps(["x", "y", "z"]))
    (tmp_path / "l.txt").write_text("x\n\ny\n")
    assert read_class_names(tmp_path / "l.json") == ["x", "y"]
    assert read_class_names(tmp_path / "l2.json") == ["x", "y", "z"]
    assert read_class_names(tmp_path / "l.txt") == ["x", "y"]


def test_search_filters_and_rows():
    clauses = search.filters(dataset="ds", label=None, predicted="Lime", min_confidence=0.9)
    assert {"term": {"dataset": "ds"}} in clauses and {"term": {"prediction.label": "Lime"}} in clauses
    assert {"range": {"prediction.confidence": {"gte": 0.9}}} in clauses
    assert len(clauses) == 3
    hit = {
        "_id": "i",
        "_score": 1.0,
        "_source": {
            "key": "k",
            "label": "a",
            "prediction": {"label": "b", "confidence": 0.5},
            "pca": {"x": 1.0, "y": 2.0},
        },
    }
    row = search.result_row(hit)
    assert (row["key"], row["predicted"], row["x"]) == ("k", "b", 1.0)
    table = search.format_table([row])
    assert table.splitlines()[0].split() == ["score", "key", "label", "predicted", "confidence", "x", "y"]
    assert "0.5000" in table


def test_settings_reach_executors_by_value():
    s = pickle.loads(pickle.dumps(SPEC)).settings  # what a closure capturing the spec unpickles on an executor
    assert s.s3_url == "http://s3" and s.es_urls == ["http://es"]
    assert s.s3_secret_key.get_secret_value() == "sk" and s.images_index == "orchard-images"
    assert hash(s) == hash(CFG) and s == CFG  # usable as a cache key (es_of, s3_of)


@pytest.mark.parametrize("pairs, expected", [(("a=1", "b=x=y"), {"a": "1", "b": "x=y"}), ((), {})])
def test_parse_conf(pairs, expected):
    from orchard.spark_app.session import parse_conf

    assert parse_conf(pairs) == expected
    with pytest.raises(ValueError):
        parse_conf(("novalue",))


def test_package_zip_ships_only_what_executors_import(tmp_path):
    import zipfile

    from orchard.spark_app.session import package_zip

    names = zipfile.ZipFile(package_zip(tmp_path)).namelist()
    assert "orchard/spark_app/infer.py" in names and "orchard/core/settings.py" in names
    assert "orchard/__init__.py" in names
    assert not any(n.startswith(("orchard/app/", "orchard/uploader/", "orchard/stack/")) for n in names)
    assert not any("__pycache__" in n for n in names)


class FakeIndices:
    def __init__(self, index_type):
        self.index_type = index_type

    def get_mapping(self, index):
        return SimpleNamespace(
            body={index: {"mappings": {"properties": {"embedding": {"index_options": {"type": self.index_type}}}}}}
        )


class FakeSearchEs:
    """Records the kNN request; answers with the query image and one neighbour."""

    def __init__(self, index_type):
        self.indices = FakeIndices(index_type)
        self.knn = None

    def search(self, index, size, knn=None, query=None, source_includes=None):
        if knn is None:  # the lookup of the query image
            return {
                "hits": {
                    "hits": [{"_id": "q", "_source": {"key": "k", "embedding": [1.0, 0.0], "embedding_model": "v1"}}]
                }
            }
        self.knn = knn
        return {
            "hits": {
                "hits": [
                    {"_id": "q", "_score": 1.0, "_source": {"key": "k"}},
                    {"_id": "n", "_score": 0.9, "_source": {"key": "n"}},
                ]
            }
        }


@pytest.mark.parametrize("index_type, rescored", [("int8_hnsw", True), ("bbq_flat", True), ("hnsw", False)])
def test_similar_rescores_quantized_indices_and_filters_by_model(index_type, rescored):
    es = FakeSearchEs(index_type)
    rows = search.similar(es, "ix", "k", k=2, clauses=search.filters(dataset="ds"))
    assert [r["key"] for r in rows] == ["k", "n"]
    assert ("rescore_vector" in es.knn) is rescored
    assert {"term": {"embedding_model": "v1"}} in es.knn["filter"]["bool"]["filter"]
    assert {"term": {"dataset": "ds"}} in es.knn["filter"]["bool"]["filter"]
    assert es.knn["k"] == 3 and es.knn["num_candidates"] >= 3  # k + 1: the image itself is one of them


# The resends of rejected bulk writes (429/5xx) are tested with the retry policies in test_retry_policy.py.
