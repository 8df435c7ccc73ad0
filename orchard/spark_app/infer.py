"""Streaming batched inference over an RDD of (ImageRef, content) pairs read from the images table,
and prediction write-back from executors.

`predict` returns a lazy RDD of (ImageRef, prediction): decode + preprocess (executors) -> the
Keras model wrapped by Elephas, applied with `OrchardSparkModel.predict_stream` (batches inside each
partition, model built once per executor Python worker) -> top-5. `write_predictions` sends them as
bulk partial updates from the executors and returns only counts. Nothing data-sized reaches the
driver; the driver holds the model (as Elephas requires) and aggregates counts.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np

from orchard.core.clients import es_client
from orchard.core.errors import ItemsFailed
from orchard.core.iterables import batched
from orchard.core.lake import SAME_PREDICTION, Field, Prediction, utc_timestamp
from orchard.core.rasters import DEFAULT_CONVERSION, Conversion, conversion_from_card
from orchard.core.settings import Settings
from orchard.spark_app import prediction_table
from orchard.spark_app.context import es_of
from orchard.spark_app.images import ImageRef, decode_rows
from orchard.spark_app.preprocess import as_probabilities, cross_entropy_terms, prepare, preprocessor, top_k
from orchard.spark_app.registry import family_of, record_inference
from orchard.spark_app.sink import Tally, log_retries, merge_tallies, tally_partition
from orchard.spark_app.table import stage_images
from orchard.spark_app.tiles import TileCount, add_counts, count_tiles, summary_action, tile_fields
from orchard.spark_app.versions import load_card, load_model

if TYPE_CHECKING:
    from pyspark import RDD

    from orchard.spark_app.model import OrchardSparkModel

log = logging.getLogger(__name__)

# A document whose stored prediction has the same model version, label and error is not written
# again: a re-run, or a task retried after a lost executor, changes nothing (predicted_at stays the
# first one). The check reads the stored predictions of each chunk with one mget, because the
# Elasticsearch distribution of the native stack has no scripting (no painless module); a partial
# `doc` update then replaces the whole prediction object (absent fields are sent as null).
# --force writes everything.
PREDICTION_FIELDS = (
    Prediction.LABEL,
    Prediction.CONFIDENCE,
    Prediction.TOP5,
    Prediction.MODEL_VERSION,
    Prediction.MODEL_FAMILY,
    Prediction.PREDICTED_AT,
    Prediction.TABLE_VERSION,
    Prediction.ERROR,
)
# Where a stage's images come from: (spark, settings, dataset, split, images per partition) ->
# (RDD of (ImageRef, content), table version or None).
ImageSource = Callable[..., tuple[Any, int | None]]


@dataclass(frozen=True)
class PredictSpec:
    """What executors need besides the model: settings, classes, preprocessing, input size, run metadata."""

    settings: Settings  # the driver's own (see orchard.spark_app.context)
    version: str
    classes: tuple[str, ...]
    preprocessing: str
    size: tuple[int, int]
    channels: int = 3
    batch_size: int = 64
    predicted_at: str = ""
    top: int = 5
    table_version: int | None = None  # the images table version the run reads
    family: str = ""  # the version's model family (registry.family_of)
    conversion: Conversion = DEFAULT_CONVERSION  # bands and scaling (the card's)

    @classmethod
    def from_card(cls, s: Settings, card: dict, batch_size: int, table_version: int | None = None) -> PredictSpec:
        """A spec for a model version from its card (labels.json)."""
        return cls(
            s,
            card["version"],
            tuple(card["classes"]),
            card["preprocessing"],
            tuple(card["input_size"]),
            int(card.get("channels", 3)),
            batch_size,
            utc_timestamp(timespec="seconds", zulu=False),
            table_version=table_version,
            family=family_of(card["version"]),
            conversion=conversion_from_card(card),
        )


def prediction_doc(spec: PredictSpec, top: list[tuple[str, float]]) -> dict:
    """The `prediction` object of one image (every field present, `error` null)."""
    return {
        Prediction.LABEL: top[0][0],
        Prediction.CONFIDENCE: round(top[0][1], 6),
        Prediction.TOP5: [{Prediction.LABEL: label, Prediction.CONFIDENCE: round(p, 6)} for label, p in top],
        Prediction.MODEL_VERSION: spec.version,
        Prediction.MODEL_FAMILY: spec.family,
        Prediction.PREDICTED_AT: spec.predicted_at,
        Prediction.TABLE_VERSION: spec.table_version,
        Prediction.ERROR: None,
    }


def error_doc(spec: PredictSpec, error: str) -> dict:
    """The `prediction` object of an image that could not be predicted (no label, `error` set)."""
    return {
        Prediction.LABEL: None,
        Prediction.CONFIDENCE: None,
        Prediction.TOP5: None,
        Prediction.MODEL_VERSION: spec.version,
        Prediction.MODEL_FAMILY: spec.family,
        Prediction.PREDICTED_AT: spec.predicted_at,
        Prediction.TABLE_VERSION: spec.table_version,
        Prediction.ERROR: error,
    }


def same_prediction(stored: dict | None, new: dict) -> bool:
    """True if the stored prediction already says what `new` says (same model, label and error)."""
    if not stored:
        return False
    return all(stored.get(f) == new.get(f) for f in SAME_PREDICTION)


def model_inputs(spec: PredictSpec, rows: Iterable) -> Iterator[tuple[tuple[ImageRef, str | None], np.ndarray | None]]:
    """mapPartitions body: ((ref, error), preprocessed image or None) per (ref, content) pair."""
    prep = preprocessor(spec.preprocessing)
    for ref, array, error in decode_rows(rows, spec.settings, spec.size, spec.channels, spec.conversion):
        if array is None:  # exactly when error is set
            yield (ref, error), None
            continue
        x, unusable = prepare(prep, array)
        yield (ref, unusable), x


def inputs(pairs_rdd, spec: PredictSpec):
    """Lazy RDD of model inputs for an RDD of (ref, content) pairs."""
    return pairs_rdd.mapPartitions(partial(model_inputs, spec))


def probability_batches(spec: PredictSpec, outputs: Iterable) -> Iterator[tuple[list, list, np.ndarray | None]]:
    """Per batch of predict_stream outputs: ((ref, error) of undecodable images, decoded refs, probabilities)."""
    for batch in batched(outputs, spec.batch_size):
        errors = [meta for meta, out in batch if out is None]
        good = [(meta[0], out) for meta, out in batch if out is not None]
        probs = as_probabilities(np.stack([out for _, out in good])) if good else None
        yield errors, [ref for ref, _ in good], probs


def to_predictions(spec: PredictSpec, outputs: Iterable) -> Iterator[tuple[ImageRef, dict]]:
    """mapPartitions body: (ref, prediction document) per model output."""
    for errors, refs, probs in probability_batches(spec, outputs):
        for ref, error in errors:
            yield ref, error_doc(spec, error)
        if probs is not None:  # None exactly when the batch has no decoded image (refs empty)
            for ref, top in zip(refs, top_k(probs, spec.classes, spec.top), strict=True):
                yield ref, prediction_doc(spec, top)


def predict(pairs_rdd, spec: PredictSpec, spark_model, loads=None):
    """Lazy RDD of (ImageRef, prediction) for an RDD of (ref, content) pairs."""
    outputs = spark_model.predict_stream(inputs(pairs_rdd, spec), spec.batch_size, loads=loads)
    return outputs.mapPartitions(partial(to_predictions, spec))


def update_action(index: str, ref: ImageRef, prediction: dict) -> dict:
    """The bulk partial update of one image document (id = content sha256); a tile's document is
    created by it if it does not exist yet (with the tile's fields, orchard.spark_app.tiles)."""
    action: dict[str, Any] = {
        "_op_type": "update",
        "_index": index,
        "_id": ref.id,
        "retry_on_conflict": 3,
        "doc": {Field.PREDICTION: prediction},
    }
    if ref.tile is not None:
        action["doc"].update(tile_fields(ref))
        action["doc_as_upsert"] = True
    return action


def skip_unchanged(force: bool, kept: dict[str, dict], es, chunk: list[tuple[dict, str, bool]]) -> tuple[list, Tally]:
    """Chunk selector: drop documents whose stored prediction is the same (counted as noop; their
    stored `prediction` put in `kept` by id) and documents that do not exist (counted as failed);
    with `force`, only the missing ones."""
    ids = [action["_id"] for action, _, _ in chunk]
    found = es.mget(index=chunk[0][0]["_index"], ids=ids, source_includes=[Field.PREDICTION])["docs"]
    stored = {d["_id"]: d for d in found}
    keep, tally = [], Tally()
    for item in chunk:
        action, key, _ = item
        doc = stored.get(action["_id"], {})
        previous = (doc.get("_source") or {}).get(Field.PREDICTION)
        if not doc.get("found") and action.get("doc_as_upsert"):
            keep.append(item)  # a tile predicted for the first time: its document is created
        elif not doc.get("found"):
            tally.fail(key, "no document with this id in the index (not uploaded?)")
        elif not force and previous and same_prediction(previous, action["doc"][Field.PREDICTION]):
            tally.noop += 1
            kept[action["_id"]] = previous
        else:
            keep.append(item)
    return keep, tally


INDEX_WRITTEN = "predictions written to the index"  # logged between the index and lake writes
TALLY, ROW = "tally", "row"  # write_partition's tags of its tally and its table rows (other items: tile counts)


def write_partition(s: Settings, force: bool, chunk_size: int, tiles, pairs: Iterable) -> Iterator[tuple]:
    """mapPartitions body: bulk-update the partition's predictions; yields (TALLY, its tally), then
    (ROW, predictions table row) per prediction, then ((raster id, label), tile count) per raster and
    class of the tiles it predicted (`tiles`, an accumulator, adds up the tiles).

    A document left as it was (the same prediction stored) gives the row of its stored prediction,
    first `predicted_at` included: the table row and the document always say the same."""
    counts: dict[tuple[str, str], TileCount] = {}
    predicted: list[tuple[ImageRef, dict]] = []  # the partition's predictions (a few hundred bytes each)
    kept: dict[str, dict] = {}  # id -> the stored prediction of a document left as it was
    items = (
        (update_action(s.images_index, ref, pred), ref.key, pred[Prediction.ERROR] is not None)
        for ref, pred in kept_predictions(count_tiles(pairs, counts), predicted)
    )
    # With --force nothing is compared, so nothing is read first: a document that does not exist
    # fails its update (document_missing_exception, counted with its reason by the sink).
    select = None if force else partial(skip_unchanged, force, kept)
    for tally in tally_partition(lambda: es_of(s), items, chunk_size, select):
        yield TALLY, tally
    yield from ((ROW, prediction_table.row_of(ref, kept.get(ref.id, pred))) for ref, pred in predicted)
    tiles.add(sum(count[0] for count in counts.values()))
    yield from counts.items()


def kept_predictions(predictions: Iterable[tuple[ImageRef, dict]], kept: list) -> Iterator[tuple[ImageRef, dict]]:
    """`predictions`, each also appended to `kept`."""
    for pair in predictions:
        kept.append(pair)
        yield pair


def is_tally(item: tuple) -> bool:
    return item[0] == TALLY


def is_row(item: tuple) -> bool:
    return item[0] == ROW


def is_tile_count(item: tuple) -> bool:
    return isinstance(item[0], tuple)


@dataclass(frozen=True)
class Written:
    """What write_predictions did: the documents' tally, tiles predicted, rasters summarised, and
    the predictions table's counts ({inserted, updated})."""

    tally: Tally
    tiles: int = 0
    rasters: Tally = field(default_factory=Tally)
    lake: dict = field(default_factory=dict)


def write_predictions(
    pairs_rdd, s: Settings, version: str, dataset: str, force: bool = False, chunk_size: int = 500
) -> Written:
    """Send every prediction from the executors, MERGE them into the predictions table, then send
    each tiled raster's summary of its tiles; returns the merged counts (the only things collected).

    The index is written first and the lake after, from the same persisted predictions: a run
    killed in between leaves documents the lake lacks, and a re-run (the documents unchanged)
    still merges every row."""
    from pyspark import StorageLevel
    from pyspark.sql import SparkSession

    tiles = pairs_rdd.context.accumulator(0)
    # Kept (spilled to disk beyond memory) so that the lake's rows do not predict the images again.
    out = pairs_rdd.mapPartitions(partial(write_partition, s, force, chunk_size, tiles))
    out = out.persist(StorageLevel.MEMORY_AND_DISK)
    spark = SparkSession.builder.getOrCreate()
    warm = prediction_table.warm_up(spark, s)  # overlaps the prediction job
    try:
        tally = out.filter(is_tally).map(second).fold(Tally(), merge_tallies)
        warm.join()
        log.info(INDEX_WRITTEN + ": %d updated, %d unchanged; keeping them in the lake", tally.updated, tally.noop)
        began = time.monotonic()
        lake = prediction_table.merge_rows(spark, s, out.filter(is_row).map(second), dataset)
        lake["seconds"] = round(time.monotonic() - began, 1)  # the lake's share of the run
        if not tiles.value:  # no tile: no second job
            return Written(tally, lake=lake)
        rasters = write_summaries(out.filter(is_tile_count), s, version, chunk_size)
        return Written(tally, tiles.value, rasters, lake)
    finally:
        out.unpersist()


def second(item: tuple):
    return item[1]


def write_summaries(counts_rdd, s: Settings, version: str, chunk_size: int = 500) -> Tally:
    """Reduce ((raster id, label), tile count) by key in the executors and update each raster's
    document with its `tiles` summary from them; returns the tally."""
    by_raster = counts_rdd.reduceByKey(add_counts).map(lambda kv: (kv[0][0], (kv[0][1], kv[1]))).groupByKey()
    return by_raster.mapPartitions(partial(summary_partition, s, version, chunk_size)).fold(Tally(), merge_tallies)


def summary_partition(s: Settings, version: str, chunk_size: int, groups: Iterable) -> Iterator[Tally]:
    """mapPartitions body: bulk-update the rasters' `tiles` summaries; yields the tally."""
    items = ((summary_action(s.images_index, version, parent, classes), parent, False) for parent, classes in groups)
    return tally_partition(lambda: es_of(s), items, chunk_size)


Score = tuple[int, int, float, int]  # images, correct, cross-entropy sum, skipped


def score_partition(spec: PredictSpec, splits: frozenset[str] | None, outputs: Iterable) -> Iterator[dict[str, Score]]:
    """mapPartitions body for evaluation: one {split: (images, correct, loss sum, skipped)} per partition."""
    index = {label: i for i, label in enumerate(spec.classes)}
    scores: dict[str, Score] = {}
    for errors, refs, probs in probability_batches(spec, outputs):
        for ref, _ in errors:
            add_score(scores, ref.split, (0, 0, 0.0, 1))
        if probs is None:  # no decoded image in this batch (refs empty)
            continue
        for i, ref in enumerate(refs):
            if splits is not None and ref.split not in splits:
                continue
            if ref.label not in index:
                add_score(scores, ref.split, (0, 0, 0.0, 1))
                continue
            target = index[ref.label]
            loss = float(cross_entropy_terms(probs[i : i + 1], np.array([target]))[0])
            add_score(scores, ref.split, (1, int(probs[i].argmax() == target), loss, 0))
    yield scores


def add_score(scores: dict[str, Score], split: str, score: Score) -> None:
    """Add one score tuple to a split's running totals."""
    images, correct, loss, skipped = scores.get(split, (0, 0, 0.0, 0))
    scores[split] = (images + score[0], correct + score[1], loss + score[2], skipped + score[3])


def merge_scores(a: dict[str, Score], b: dict[str, Score]) -> dict[str, Score]:
    """Sum of two {split: score} dicts (the fold's combiner)."""
    merged = dict(a)
    for split, score in b.items():
        add_score(merged, split, score)
    return merged


def evaluate(pairs_rdd, spec: PredictSpec, spark_model, splits: set[str] | None = None) -> dict[str, dict]:
    """Per split: accuracy and mean cross-entropy of a model on labelled images (one streamed pass)."""
    return score(spark_model.predict_stream(inputs(pairs_rdd, spec), spec.batch_size), spec, splits)


def score(outputs, spec: PredictSpec, splits: set[str] | None = None) -> dict[str, dict]:
    """Per split: accuracy and mean cross-entropy of an RDD of model outputs ((ref, error), output or None)."""
    wanted = frozenset(splits) if splits else None
    totals = outputs.mapPartitions(partial(score_partition, spec, wanted)).fold({}, merge_scores)
    results = {}
    for split in splits or totals:
        n, correct, loss, skipped = totals.get(split, (0, 0, 0.0, 0))
        if skipped:
            log.warning("evaluation of split %r skipped %d images (undecodable or unknown label)", split, skipped)
        results[split] = {
            "images": n,
            "accuracy": correct / n if n else float("nan"),
            "loss": loss / n if n else float("nan"),
            "skipped": skipped,
        }
    return results


@dataclass(frozen=True)
class ModelRun:
    """What a model job over a dataset's images (`orchard infer`, `orchard features`) starts with and
    ends with: a registered version loaded on the driver, its spec, the images (from the table, at
    a pinned version); then, after the executors' writes, the resends logged and the index refreshed."""

    spark_model: OrchardSparkModel
    spec: PredictSpec
    images: RDD  # (ImageRef, content) pairs, read by the executors
    began: float  # time.monotonic() at the start

    @classmethod
    def start(
        cls,
        spark,
        s: Settings,
        dataset: str,
        version: str,
        split: str | None,
        batch_size: int,
        images_per_partition: int,
        source: ImageSource = stage_images,
    ) -> ModelRun:
        """Load `version` (driver side) while the dataset is synced into the table and read at that
        version (`source`: the images table; the benchmark passes its binaryFile baseline)."""
        began = time.monotonic()
        card = load_card(s, version)  # first: an unknown version fails before any Spark job
        # The model loads in a thread while Spark checks the table (seconds each, independent).
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="model-load") as pool:
            loading = pool.submit(load_model, s, card)
            images, table_version = source(spark, s, dataset, split, images_per_partition)
            spark_model = loading.result()
        spec = PredictSpec.from_card(s, card, batch_size, table_version)
        return cls(spark_model, spec, images, began)

    def finish(self, tally: Tally) -> float:
        """After the executors' writes: log their resends, make the documents searchable (refresh);
        returns the seconds since the start."""
        settle(self.spec.settings, tally)
        return time.monotonic() - self.began


def settle(s: Settings, tally: Tally) -> None:
    """After the executors' document writes: log their resends, make the documents searchable."""
    log_retries(tally)
    es_client(s).indices.refresh(index=s.images_index)


def tiled_images(spark, s: Settings, dataset: str, split: str | None, images_per_partition: int):
    """What `orchard infer` predicts: the images table, rasters above tile_min_pixels as their tiles."""
    return stage_images(spark, s, dataset, split, images_per_partition, tiles=True)


def run_inference(
    spark,
    s: Settings,
    dataset: str,
    version: str,
    split: str | None = None,
    batch_size: int = 64,
    images_per_partition: int = 1024,
    force: bool = False,
    source: ImageSource | None = None,
) -> dict:
    """Predict every image of a dataset (split), write the predictions and record the rate in the
    model registry; returns the run summary (counts, failure reasons and examples; the caller
    decides the exit status)."""
    run = ModelRun.start(spark, s, dataset, version, split, batch_size, images_per_partition, source or tiled_images)
    loads = spark.sparkContext.accumulator(0)
    log.info(
        "inference of %s with %s, %d partitions",
        dataset + (f"/{split}" if split else ""),
        version,
        run.images.getNumPartitions(),
    )
    written = write_predictions(predict(run.images, run.spec, run.spark_model, loads), s, version, dataset, force)
    tally = written.tally
    log.info("%d predictions written (%d unchanged)", tally.updated, tally.noop)
    seconds = run.finish(tally)
    summary = inference_summary(tally, version, loads.value, seconds, run.spec.predicted_at)
    summary["table_version"] = run.spec.table_version
    summary["tiles"] = written.tiles  # of summary["images"]: tiles of large rasters
    summary["tiled_rasters"] = written.rasters.written
    summary["lake"] = {"predictions_table": s.predictions_table_uri, **written.lake}
    if written.rasters.failed:
        summary["failed"] += written.rasters.failed
        summary["failure_examples"] += [list(e) for e in written.rasters.examples]
        for reason, n in written.rasters.reasons.items():
            summary["failure_reasons"][reason] = summary["failure_reasons"].get(reason, 0) + n
    if source is None:  # a benchmark's baseline source is not the rate `orchard infer` achieves
        record_inference(s, version, summary)
    return summary


def inference_summary(tally: Tally, version: str, loads: int, seconds: float, predicted_at: str = "") -> dict:
    """The run's figures as a dict (what `orchard infer` prints)."""
    images = tally.written + tally.failed
    return {
        "model_version": version,
        "predicted_at": predicted_at,
        "images": images,
        "updated": tally.updated,
        "unchanged": tally.noop,
        "errors": tally.errors,
        "failed": tally.failed,
        "retried_writes": tally.retried,
        "failure_reasons": tally.reasons,
        "failure_examples": [list(e) for e in tally.examples],
        "model_loads": loads,
        "seconds": round(seconds, 1),
        "images_per_second": round(images / seconds, 1) if seconds > 0 else None,
    }


def raise_for_failures(summary: dict) -> None:
    """Log one line per failure example and raise ItemsFailed if any document failed."""
    for where, reason in summary.get("failure_examples", []):
        log.error("%s: %s", where, reason)
    if summary.get("failed"):
        reasons = ", ".join(summary.get("failure_reasons", {}))
        raise ItemsFailed(f"{summary['failed']} documents were not updated ({reasons})")
