"""Pure pieces of transfer learning, the embeddings table and pretrained features: rows in, rows out."""

from __future__ import annotations

import numpy as np
import pytest

from orchard.app.spark_cli import training_summary
from orchard.core.errors import ConfigError
from orchard.spark_app import embedding_cache, features, search, transfer
from orchard.spark_app.images import ImageRef


class Counter:
    """What an accumulator offers the executors: add."""

    def __init__(self) -> None:
        self.value = 0

    def add(self, n: int) -> None:
        self.value += n


class Row(dict):
    """A Spark Row as the code reads it: by column name (and attributes, for feature rows)."""

    __getattr__ = dict.__getitem__


def test_labelled_vectors_one_hot_known_classes_and_drop_the_others():
    rows = [
        Row(label="b", embedding=[1.0, 2.0]),
        Row(label="zzz", embedding=[0.0, 0.0]),
        Row(label="a", embedding=[3, 4]),
    ]
    out = list(transfer.labelled_vectors(("a", "b"), rows))
    assert len(out) == 2
    np.testing.assert_array_equal(out[0][0], np.array([1, 2], dtype=np.float32))
    np.testing.assert_array_equal(out[0][1], [0, 1])
    np.testing.assert_array_equal(out[1][1], [1, 0])
    assert out[0][0].dtype == np.float32


def test_vector_inputs_carry_the_ref_the_scoring_reads():
    rows = [Row(id="i1", key="d/test/a/1.jpg", split="test", label="a", embedding=[0.5])]
    (((ref, error), x),) = transfer.vector_inputs("d", rows)
    assert ref == ImageRef("i1", "d/test/a/1.jpg", "d", "test", "a") and error is None
    np.testing.assert_array_equal(x, [0.5])


def test_table_rows_keep_errors_and_count_only_embedded_images():
    ref = ImageRef("i1", "k", "d", "train", "a")
    outputs = [((ref, None), np.array([1.0, 2.0], dtype=np.float32)), ((ref, "undecodable image: x"), None)]
    computed = Counter()
    rows = list(embedding_cache.table_rows("base@1", "when", computed, outputs))
    assert rows == [("i1", "base@1", [1.0, 2.0], None, "when"), ("i1", "base@1", None, "undecodable image: x", "when")]
    assert computed.value == 1


def test_feature_docs_go_to_the_trained_or_the_pretrained_fields():
    row = Row(id="i", key="k", embedding=[0.0, 1.0], x=0.5, y=-1.0)
    assert features.feature_doc("cnn-1", row, pretrained=False) == {
        "embedding_model": "cnn-1",
        "pca": {"x": 0.5, "y": -1.0},
        "embedding": [0.0, 1.0],
    }
    assert features.feature_doc("imagenet:b", row, pretrained=True) == {
        "pretrained": {"model": "imagenet:b", "pca": {"x": 0.5, "y": -1.0}, "embedding": [0.0, 1.0]}
    }
    zero = Row(id="i", key="k", embedding=[0.0, 0.0], x=0.0, y=0.0)
    assert "embedding" not in features.feature_doc("imagenet:b", zero, pretrained=True)["pretrained"]


def test_search_reads_the_space_it_was_asked_for():
    source = {"key": "k", "pca": {"x": 1.0, "y": 2.0}, "pretrained": {"pca": {"x": 3.0, "y": 4.0}, "model": "m"}}
    assert search.value_at(source, "pretrained.model") == "m" and search.value_at(source, "pretrained.nope.x") is None
    hit = {"_id": "i", "_score": 1.0, "_source": source}
    assert (search.result_row(hit)["x"], search.result_row(hit, search.PRETRAINED)["x"]) == (1.0, 3.0)


@pytest.mark.parametrize(("base", "blocks"), [("resnet50", 0), ("efficientnet-lite0", 17)])
def test_a_transfer_plan_names_a_known_base_and_depth(base, blocks):
    with pytest.raises(ConfigError):
        transfer.check_plan(transfer.TransferPlan("d", base, fine_tune=blocks))


def test_training_summary_adds_the_transfer_figures_only_for_transfer_versions():
    doc = {
        "version": "v",
        "family": "cnn",
        "base": None,
        "trained_on_version": 3,
        "metrics": {"test_accuracy": 0.9},
        "num_classes": 2,
        "train_images": 10,
        "test_images": 4,
        "params": 5,
        "training_seconds": 1.5,
        "model_uri": "s3a://m/v/model.keras",
    }
    assert "base_forward_passes" not in training_summary(doc)
    assert training_summary({**doc, "base_forward_passes": 0, "fine_tuned_blocks": 1})["base_forward_passes"] == 0
