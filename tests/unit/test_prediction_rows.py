"""The predictions table's rows (orchard.spark_app.prediction_table.row_of): the document's
`prediction` fields, in the table's column order, for a prediction and for an error."""

from __future__ import annotations

from orchard.core.lake import PREDICTION_COLUMNS, PREDICTION_KEY, SAME_PREDICTION, Column, Prediction
from orchard.spark_app.images import ImageRef
from orchard.spark_app.prediction_table import row_of

REF = ImageRef("ab" * 32, "fruits/train/apple/1.jpg", "fruits", "train", "apple")
NAMES = [name for name, _ in PREDICTION_COLUMNS]


def prediction(**fields) -> dict:
    base = {
        Prediction.LABEL: "apple",
        Prediction.CONFIDENCE: 0.9,
        Prediction.TOP5: [
            {Prediction.LABEL: "apple", Prediction.CONFIDENCE: 0.9},
            {Prediction.LABEL: "lime", Prediction.CONFIDENCE: 0.1},
        ],
        Prediction.MODEL_VERSION: "cnn-20261206000000-abcdef01",
        Prediction.MODEL_FAMILY: "cnn",
        Prediction.PREDICTED_AT: "2026-12-06T00:00:00+00:00",
        Prediction.TABLE_VERSION: 7,
        Prediction.ERROR: None,
    }
    return {**base, **fields}


def test_a_row_holds_the_image_and_every_field_of_its_prediction_in_column_order() -> None:
    row = dict(zip(NAMES, row_of(REF, prediction()), strict=True))
    assert (row[Column.ID], row[Column.DATASET], row[Column.KEY]) == (REF.id, "fruits", REF.key)
    assert row[Prediction.TOP5] == [("apple", 0.9), ("lime", 0.1)]
    assert row[Prediction.TABLE_VERSION] == 7 and row[Prediction.MODEL_FAMILY] == "cnn"
    assert all(row[name] is not None for name in PREDICTION_KEY)


def test_an_error_row_keeps_the_reason_and_no_label() -> None:
    failed = prediction(**{Prediction.LABEL: None, Prediction.CONFIDENCE: None, Prediction.TOP5: None})
    row = dict(zip(NAMES, row_of(REF, {**failed, Prediction.ERROR: "undecodable image"}), strict=True))
    assert row[Prediction.ERROR] == "undecodable image"
    assert row[Prediction.LABEL] is None and row[Prediction.TOP5] is None


def test_rows_are_compared_by_the_fields_documents_are_compared_by() -> None:
    # the table's key and the "same prediction" rule are columns of the table
    assert set(PREDICTION_KEY) | set(SAME_PREDICTION) <= set(NAMES)
