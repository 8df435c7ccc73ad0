"""Rows of the predictions table, and the table written without Spark (delta-rs), by the online
service's auto-enrichment.

The table (schema: orchard.core.lake.PREDICTION_COLUMNS) keeps every prediction a document was given,
one row per (image id, model version). `orchard infer` MERGEs its rows from Spark
(orchard.spark_app.prediction_table); the service, which predicts new uploads one by one, MERGEs its
rows in batches with delta-rs (`merge_predictions`): a Spark application per upload would cost more
than the prediction. Both build the row with `prediction_record` from the prediction the document
holds after the write (a document left as it was gives its stored prediction, first `predicted_at`
included), and a stored row is replaced only when that differs: the row of an image's newest
prediction is its document's `prediction`, which is what `orchard reindex` rebuilds documents from.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from orchard.core import table_log
from orchard.core.errors import ServiceUnavailable
from orchard.core.lake import PREDICTION_COLUMNS, PREDICTION_KEY, SAME_PREDICTION, Column, Prediction, object_store_uri
from orchard.core.settings import Settings
from orchard.core.table_write import sql_string

log = logging.getLogger(__name__)


def prediction_record(image_id: str, dataset: str, key: str, prediction: Mapping[str, Any]) -> dict:
    """The table row (column -> value) of an image's `prediction` object, as its document holds it."""
    values = {Column.ID: image_id, Column.DATASET: dataset, Column.KEY: key, **prediction}
    return {name: values.get(name) for name, _ in PREDICTION_COLUMNS}


def arrow_schema() -> Any:
    """The predictions table's schema as an Arrow schema (NOT NULL columns not nullable)."""
    import pyarrow as pa

    top5 = pa.list_(pa.struct([(Prediction.LABEL, pa.string()), (Prediction.CONFIDENCE, pa.float64())]))
    types = {"STRING": pa.string(), "DOUBLE": pa.float64(), "BIGINT": pa.int64()}

    def arrow_type(kind: str) -> Any:
        return top5 if kind.startswith("ARRAY") else types[kind.removesuffix(" NOT NULL")]

    return pa.schema([pa.field(n, arrow_type(k), nullable="NOT NULL" not in k) for n, k in PREDICTION_COLUMNS])


def same_key() -> str:
    """Target row t and source row s are the same image and model version."""
    return " AND ".join(f"t.{name} = s.{name}" for name in PREDICTION_KEY)


def merge_condition(dataset: str) -> str:
    """delta-rs's MERGE condition: the same key, within the dataset's partition (the literal prunes
    the others)."""
    return f"{same_key()} AND t.{Column.DATASET} = {sql_string(dataset)}"


def changed_predicate() -> str:
    """A stored row is replaced only when the new one says something else: another prediction
    (SAME_PREDICTION) or the same one written again later (its document got a new `predicted_at`)."""
    compared = (*SAME_PREDICTION, Prediction.PREDICTED_AT)
    return " OR ".join(f"(t.{name} IS DISTINCT FROM s.{name})" for name in compared)


def open_or_create(s: Settings) -> Any:
    """delta-rs's DeltaTable of the predictions table, created (empty, partitioned by dataset) if
    there is none."""
    from deltalake import DeltaTable, write_deltalake

    uri, options = object_store_uri(s.predictions_table_uri), table_log.storage_options(s)
    if not DeltaTable.is_deltatable(uri, options):
        empty = arrow_schema().empty_table()
        write_deltalake(uri, empty, partition_by=[Column.DATASET], mode="ignore", storage_options=options)
        log.info("created the predictions table at %s", s.predictions_table_uri)
    return DeltaTable(uri, storage_options=options)


def merge_predictions(s: Settings, rows: Sequence[dict]) -> dict[str, int]:
    """MERGE `rows` (prediction_record dicts) into the table, one commit per dataset; returns the
    counts {inserted, updated}. ServiceUnavailable if the store refuses (or a concurrent commit won:
    a retry re-reads the table)."""
    import pyarrow as pa
    from deltalake.exceptions import DeltaError

    counts = {"inserted": 0, "updated": 0}
    for dataset in sorted({row[Column.DATASET] for row in rows}):
        source = pa.Table.from_pylist([r for r in rows if r[Column.DATASET] == dataset], schema=arrow_schema())
        try:
            metrics = (
                open_or_create(s)
                .merge(source, merge_condition(dataset), source_alias="s", target_alias="t")
                .when_matched_update_all(predicate=changed_predicate())
                .when_not_matched_insert_all()
                .execute()
            )
        except (DeltaError, OSError) as exc:
            raise ServiceUnavailable(
                f"cannot update the predictions table at {s.predictions_table_uri}: {exc}"
            ) from exc
        counts["inserted"] += int(metrics["num_target_rows_inserted"])
        counts["updated"] += int(metrics["num_target_rows_updated"])
    return counts
