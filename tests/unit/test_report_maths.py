"""Pure pieces of the demo report: confusion matrix, accuracies, history shapes, tables, timings."""

from __future__ import annotations

import numpy as np
import pytest

from orchard.app.report import (
    Stage,
    class_axis,
    confusion_matrix,
    history_series,
    human_seconds,
    ordered_splits,
    overall_accuracy,
    per_class_accuracy,
    split_rows,
)

CLASSES = ["apple", "banana", "cherry"]
CELLS = [
    ("apple", "apple", 8),
    ("apple", "banana", 2),
    ("banana", "banana", 5),
    ("cherry", "apple", 1),
    ("cherry", "cherry", 3),
    ("apple", "banana", 1),
]


def test_confusion_matrix_rows_are_true_labels_and_repeated_cells_add_up() -> None:
    matrix = confusion_matrix(CELLS, CLASSES)
    assert matrix.tolist() == [[8, 3, 0], [0, 5, 0], [1, 0, 3]]
    assert matrix.sum() == sum(c for *_, c in CELLS)


def test_confusion_matrix_rejects_a_label_outside_the_axis() -> None:
    with pytest.raises(ValueError, match="durian"):
        confusion_matrix([("durian", "apple", 1)], CLASSES)


def test_per_class_and_overall_accuracy() -> None:
    matrix = confusion_matrix(CELLS, CLASSES)
    rows = per_class_accuracy(matrix, CLASSES)
    assert [(r["label"], r["correct"], r["total"]) for r in rows] == [
        ("apple", 8, 11),
        ("banana", 5, 5),
        ("cherry", 3, 4),
    ]
    assert rows[0]["accuracy"] == pytest.approx(8 / 11)
    assert rows[1]["accuracy"] == 1.0
    assert overall_accuracy(matrix) == pytest.approx(16 / 20)


def test_a_class_without_test_images_has_no_accuracy_and_empty_matrix_none() -> None:
    matrix = confusion_matrix([("apple", "apple", 2)], CLASSES)
    assert per_class_accuracy(matrix, CLASSES)[2]["accuracy"] is None
    assert overall_accuracy(np.zeros((0, 0), dtype=int)) is None


def test_class_axis_keeps_model_order_then_adds_unknown_labels_sorted() -> None:
    assert class_axis(["b", "a"], ["a", "z", "c", "b"]) == ["b", "a", "c", "z"]


def test_history_from_per_epoch_records_and_from_keras_dict() -> None:
    records = [
        {"epoch": 1, "loss": 1.5, "accuracy": 0.4, "workers": 2},
        {"epoch": 2, "loss": 0.9, "accuracy": 0.7, "workers": 2},
    ]
    series = history_series(records)
    assert series["epoch"] == [1.0, 2.0] and series["loss"] == [1.5, 0.9] and series["accuracy"] == [0.4, 0.7]
    keras = history_series({"loss": [2.0, 1.0, 0.5], "accuracy": [0.1, 0.5, 0.8]})
    assert keras["epoch"] == [1.0, 2.0, 3.0] and keras["accuracy"] == [0.1, 0.5, 0.8]
    assert history_series(None) == {}


def test_split_rows_and_totals() -> None:
    rows = split_rows({"b": {"train": 3, "test": 1}, "a": {"train": 2}}, ["train", "test"])
    assert rows == [
        {"label": "a", "train": 2, "test": 0, "total": 2},
        {"label": "b", "train": 3, "test": 1, "total": 4},
        {"label": "all classes", "train": 5, "test": 1, "total": 6},
    ]


def test_splits_in_reading_order() -> None:
    assert ordered_splits({"test", "extra", "train", "val"}) == ["train", "val", "test", "extra"]


def test_stage_throughput_uses_work_when_given() -> None:
    assert Stage("infer", 4.0, items=100).per_second == 25.0
    assert Stage("train", 10.0, items=100, work=500).per_second == 50.0
    assert Stage("stack up", 0.0, items=11).per_second is None
    assert Stage("synth", 2.0, items=None).per_second is None


@pytest.mark.parametrize(
    ("seconds", "text"), [(None, "-"), (4.25, "4.2 s"), (59.94, "59.9 s"), (65.0, "1 min 05 s"), (600.4, "10 min 00 s")]
)
def test_human_seconds(seconds, text) -> None:
    assert human_seconds(seconds) == text
