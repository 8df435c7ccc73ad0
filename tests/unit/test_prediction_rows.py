"""The predictions table's rows: the document's `prediction` fields in the table's column order
(Spark's row_of, the service's prediction_record), and the service's delta-rs MERGE and batching."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path
from unittest.mock import patch

from orchard.core.errors import ServiceUnavailable
from orchard.core.lake import PREDICTION_COLUMNS, PREDICTION_KEY, SAME_PREDICTION, Column, Prediction
from orchard.core.prediction_rows import merge_predictions, prediction_record
from orchard.core.retry import LAKE_COMMIT
from orchard.core.settings import Settings
from orchard.serving.prediction_log import PredictionLog
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


# --- the service's writes: delta-rs on a local table (the same code as on MinIO) --------------------


def local_settings(tmp_path: Path) -> Settings:
    return Settings(predictions_uri=str(tmp_path / "predictions"), s3_access_key="k", s3_secret_key="s")


def stored_rows(s: Settings) -> dict[tuple[str, str], dict]:
    from deltalake import DeltaTable

    rows = DeltaTable(s.predictions_table_uri).to_pyarrow_table().to_pylist()
    return {(row[Column.ID], row[Prediction.MODEL_VERSION]): row for row in rows}


def record(image_id: str, dataset: str = "fruits", **fields) -> dict:
    return prediction_record(image_id, dataset, f"{dataset}/test/apple/{image_id}.jpg", prediction(**fields))


def test_the_service_merge_inserts_once_and_replaces_a_row_only_when_it_differs(tmp_path: Path) -> None:
    s = local_settings(tmp_path)
    assert merge_predictions(s, [record("a"), record("b", "other")]) == {"inserted": 2, "updated": 0}
    # the same row again (a duplicate event, a retried task) changes nothing
    assert merge_predictions(s, [record("a")]) == {"inserted": 0, "updated": 0}
    assert merge_predictions(s, [record("a", label="lime")]) == {"inserted": 0, "updated": 1}
    # the document got the same prediction again, later (e.g. `orchard infer --force`): the row follows
    assert merge_predictions(s, [record("a", label="lime", predicted_at="later")]) == {"inserted": 0, "updated": 1}
    rows = stored_rows(s)
    assert len(rows) == 2 and rows[("a", prediction()[Prediction.MODEL_VERSION])][Prediction.LABEL] == "lime"
    assert rows[("b", prediction()[Prediction.MODEL_VERSION])][Prediction.TOP5][1] == {
        "label": "lime",
        "confidence": 0.1,
    }
    # another model version's prediction of the same image is another row
    assert merge_predictions(s, [record("a", model_version="v2")]) == {"inserted": 1, "updated": 0}


def test_the_service_log_commits_held_rows_in_one_batch_and_counts_what_it_drops() -> None:
    batches: list[int] = []

    def merge(_s, rows):
        batches.append(len(rows))
        if len(batches) == 2:
            raise ServiceUnavailable("store down")
        return {"inserted": len(rows), "updated": 0}

    async def scenario() -> PredictionLog:
        lake = PredictionLog(Settings(), merge=merge)
        for i in range(3):
            lake.add(record(str(i)))
        await lake.flush()  # one commit for the three
        lake.add(record("x"))
        await lake.flush()  # refused (every retry): dropped, counted
        await lake.flush()  # nothing held: no commit
        return lake

    with patch("orchard.serving.prediction_log.LAKE_COMMIT", replace(LAKE_COMMIT, attempts=1)):
        lake = asyncio.run(scenario())
    assert batches == [3, 1] and not lake.rows
    assert lake.written == {"inserted": 3, "updated": 0, "dropped": 1}
