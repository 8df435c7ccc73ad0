"""Auto-enrichment: every new image of the images bucket predicted by the serving model within
seconds of its upload, its document's `prediction` written like `orchard infer` writes it.

MinIO publishes each object creation to the service's `POST /v1/events` (a webhook target with a
persistent queue directory on every node, configured by `orchard stack up`). The route keeps the
events that name an image in the service's inbox (orchard.serving.events: on disk before the 2xx)
and answers at once; with the service stopped, uploads wait in MinIO's queue and are delivered when
it is back. The `Enricher` takes the inbox's due events in batches: their documents in one
multi-get (by the sha256 the uploader declared in the object's metadata: an image already predicted,
or not indexed yet, costs no read of its object), the objects that need a prediction read
concurrently and their ids checked against their bytes, one model call (through the service's
micro-batcher, shared with /v1/predict), one bulk update. An event is forgotten once its document
is written, or when there is nothing to write (object gone, no document after EVENT_PATIENCE: not
uploaded by `orchard upload`); otherwise it stays in the inbox and is taken again after a back-off.
A document the uploader has not indexed yet (it indexes right after it stores, in batches) is such
a case.

Enrichment fills a missing prediction; it never replaces one. A document that already has a
prediction (a duplicate delivery, or `orchard infer` got there first) is left as it is; each update
is conditional on the document version read (optimistic concurrency control), so a late event cannot
overwrite a batch run's newer prediction. `orchard infer` stays the way to re-predict with another
model.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from minio.error import S3Error

from orchard.core.lake import Field, in_layout, parse_key
from orchard.core.objects import read_object
from orchard.core.prediction_rows import prediction_record
from orchard.serving.batcher import MicroBatcher
from orchard.serving.catalog import Catalog
from orchard.serving.events import Inbox, ObjectEvent, Queued, skip_reason
from orchard.serving.prediction_log import PredictionLog
from orchard.serving.predictor import ModelHolder, RejectedImage, Scored, ServingModel, content_id
from orchard.spark_app.infer import PredictSpec, error_doc, prediction_doc

log = logging.getLogger(__name__)

# An object whose document has not appeared this long after its event was not uploaded by
# `orchard upload` (e.g. `mc cp`): forgotten without a prediction rather than retried forever.
EVENT_PATIENCE = timedelta(minutes=5)
ALREADY_PREDICTED = "already predicted"
IDLE_POLL_S = 1.0  # how often an idle worker looks for events whose back-off has passed


@dataclass
class EnrichTally:
    """What enrichment has done since the service started: predicted, errors written, skipped (by
    reason), events kept for later (by reason)."""

    predicted: int = 0
    errors: int = 0
    skipped: Counter = field(default_factory=Counter)
    retried: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict:
        return {
            "predicted": self.predicted,
            "errors": self.errors,
            "skipped": dict(self.skipped),
            "retried": dict(self.retried),
        }


@dataclass
class Outcomes:
    """One batch's verdicts: seq -> why it needs nothing (done, "" once written), seq -> why not
    yet (later; those in `soon` are worth another look at the first back-off)."""

    done: dict[int, str] = field(default_factory=dict)
    later: dict[int, str] = field(default_factory=dict)
    soon: set[int] = field(default_factory=set)

    def settled(self, seq: int) -> bool:
        return seq in self.done or seq in self.later


@dataclass
class Write:
    """One prediction to write: the event, the document's id and the version it was read at."""

    queued: Queued
    image_id: str
    seq_no: int
    primary_term: int
    prediction: dict = field(default_factory=dict)
    error: str | None = None


def fetch(catalog: Catalog, event: ObjectEvent) -> bytes | None:
    """The object's bytes (transient errors retried), None if it was deleted since."""
    try:
        return read_object(catalog.s3, event.bucket, event.key)
    except S3Error as exc:
        if exc.code in {"NoSuchKey", "NoSuchBucket"}:
            return None
        raise


def stored_predictions(catalog: Catalog, image_ids: Sequence[str]) -> dict[str, dict]:
    """id -> its document's hit (`prediction` only, with _seq_no and _primary_term), for the ids
    that have a document (one multi-get)."""
    if not image_ids:
        return {}
    docs = catalog.es.mget(index=catalog.s.images_index, ids=list(image_ids), source_includes=[Field.PREDICTION])
    return {doc["_id"]: doc for doc in docs["docs"] if doc.get("found")}


def missing_document(event: ObjectEvent) -> tuple[bool, str]:
    """(keep waiting?, why) for an event whose object has no document."""
    if datetime.now(UTC) - event.at < EVENT_PATIENCE:
        return True, "no document yet (the uploader indexes it after storing)"
    return False, f"no document {EVENT_PATIENCE} after the upload (not uploaded by `orchard upload`)"


def prediction_of(model: ServingModel, spec: PredictSpec, scored: Scored | None, error: str | None) -> dict:
    """The document's `prediction` object: `orchard infer`'s form."""
    if error is not None or scored is None:
        return error_doc(spec, error or "not predicted")
    return prediction_doc(spec, model.top(scored, spec.top))


def write_predictions(catalog: Catalog, writes: Sequence[Write]) -> dict[str, int]:
    """Each write's document updated unless it changed since it was read (one bulk request);
    returns image id -> the update's HTTP status (200: written, 409: it changed, ...)."""
    operations: list[dict] = []
    for w in writes:
        operations += [
            {"update": {"_id": w.image_id, "if_seq_no": w.seq_no, "if_primary_term": w.primary_term}},
            {"doc": {Field.PREDICTION: w.prediction}},
        ]
    answer = catalog.es.bulk(index=catalog.s.images_index, operations=operations)
    return {item["update"]["_id"]: int(item["update"]["status"]) for item in answer["items"]}


class Enricher:
    """Takes the inbox's due events in batches and writes their predictions (a background task:
    `start`, `stop`); `accept` is the events route's part."""

    def __init__(
        self,
        inbox: Inbox,
        catalog: Catalog,
        holder: ModelHolder,
        batcher: MicroBatcher[ServingModel, Scored],
        lake: PredictionLog,
    ):
        self.inbox, self.catalog, self.holder, self.batcher, self.lake = inbox, catalog, holder, batcher, lake
        self.s = catalog.s
        self.tally = EnrichTally()
        self._arrived = asyncio.Event()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="enrichment")

    async def stop(self) -> None:
        """Stop taking events (those held stay in the inbox for the next start)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.inbox.close()

    async def accept(self, events: Sequence[ObjectEvent]) -> dict:
        """Keep the delivered events that name an image in the inbox (on disk when this returns;
        OSError or sqlite3.Error if it cannot); returns {"queued": n, "skipped": {key: why}}."""
        skipped: dict[str, str] = {}
        wanted = []
        for event in events:
            reason = self.reason_to_skip(event)
            if reason is None:
                wanted.append(event)
            else:
                skipped[event.key] = reason
                self.tally.skipped[reason] += 1
        if wanted:
            await asyncio.to_thread(self.inbox.add, wanted)
            self._arrived.set()
        return {"queued": len(wanted), "skipped": skipped}

    def reason_to_skip(self, event: ObjectEvent) -> str | None:
        """Why a delivered event needs no prediction at all (None if it does)."""
        if self.holder.current is None and self.holder.nothing_to_serve:
            # No version trained yet: acknowledged, not kept (a backlog replayed at the first
            # training would race that version's own `orchard infer`, which covers these images).
            return f"no model serves: {self.holder.problem}"
        return skip_reason(event, self.s.images_bucket)

    async def _run(self) -> None:
        while True:
            try:
                if not await self._take():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._arrived.wait(), IDLE_POLL_S)
            except (OSError, sqlite3.Error) as exc:  # the inbox itself failed: its events stay on disk
                log.error("the events inbox %s failed: %s", self.inbox.path, exc)
                await asyncio.sleep(IDLE_POLL_S)

    async def _take(self) -> bool:
        """Handle one batch of due events; False if there was none to take."""
        self._arrived.clear()  # before looking: an event added meanwhile sets it again
        if self.holder.current is None and not self.holder.nothing_to_serve:
            return False  # the model loads: events taken now would only back off
        batch = await asyncio.to_thread(self.inbox.due, self.s.serve_max_batch)
        if not batch:
            return False
        try:
            outcomes = await self.handle(batch)
        except Exception as exc:  # Elasticsearch or MinIO unreachable: the whole batch waits
            log.warning("enrichment of %d events postponed: %s: %s", len(batch), type(exc).__name__, exc)
            outcomes = Outcomes(later={q.seq: f"{type(exc).__name__}: {exc}"[:300] for q in batch})
        await asyncio.to_thread(self.settle, batch, outcomes)
        return True

    async def handle(self, batch: list[Queued]) -> Outcomes:
        """Predict the batch's images and write their documents; returns each event's verdict."""
        out = Outcomes()
        model = self.holder.current
        if model is None:
            keep = not self.holder.nothing_to_serve  # loading, or cannot load yet: wait for it
            why = f"no model serves: {self.holder.problem or 'loading'}"
            (out.later if keep else out.done).update({q.seq: why for q in batch})
            return out
        # The ids the uploader declared let documents be checked before any object is read: an
        # image already predicted, or whose document is not indexed yet, costs no GET.
        declared = {q.seq: q.event.sha256 for q in batch if q.event.sha256}
        docs = await asyncio.to_thread(stored_predictions, self.catalog, unique(declared.values()))
        to_read = [w.queued for w in plan_writes([q for q in batch if q.seq in declared], declared, docs, out)]
        out.soon.update(seq for seq in out.later if seq in declared)
        to_read += [q for q in batch if q.seq not in declared]
        contents = await self.read_objects(to_read, out)
        ids = {seq: content_id(content) for seq, content in contents.items()}  # the ids themselves
        docs |= await asyncio.to_thread(stored_predictions, self.catalog, unique(set(ids.values()) - set(docs)))
        writes = plan_writes(to_read, ids, docs, out)
        if writes:
            await self.predict(model, writes, contents)
            statuses = await asyncio.to_thread(write_predictions, self.catalog, writes)
            self.record(writes, statuses, out)
        return out

    async def read_objects(self, batch: list[Queued], out: Outcomes) -> dict[int, bytes]:
        """seq -> the event's object bytes, read concurrently; an object deleted since, or that
        cannot be read now, gets its verdict in `out`."""
        read = await asyncio.gather(
            *(asyncio.to_thread(fetch, self.catalog, q.event) for q in batch), return_exceptions=True
        )
        contents: dict[int, bytes] = {}
        for q, content in zip(batch, read, strict=True):
            if isinstance(content, BaseException):
                out.later[q.seq] = f"cannot read the object: {type(content).__name__}: {content}"[:300]
            elif content is None:
                out.done[q.seq] = "deleted since"
            else:
                contents[q.seq] = content
        return contents

    async def predict(self, model: ServingModel, writes: list[Write], contents: dict[int, bytes]) -> None:
        """Fill each write's prediction (its error if the image cannot be predicted) in one model call."""
        limit = self.s.serve_max_pixels

        def inputs() -> list:
            prepared = []
            for w in writes:
                try:
                    prepared.append(model.input_of(contents[w.queued.seq], limit))
                except RejectedImage as exc:
                    w.error = str(exc)
            return prepared

        ready = await asyncio.to_thread(inputs)
        scored = iter(await self.batcher.submit(model, ready)) if ready else iter(())
        spec = PredictSpec.from_card(self.s, model.card, batch_size=1)
        for w in writes:
            w.prediction = prediction_of(model, spec, None if w.error else next(scored)[0], w.error)

    def record(self, writes: list[Write], statuses: dict[str, int], out: Outcomes) -> None:
        """Each write's verdict from its update's status; the written ones' rows held for the lake."""
        for w in writes:
            status, seq, key = statuses.get(w.image_id, 0), w.queued.seq, w.queued.event.key
            if status != 200:
                out.later[seq] = UPDATE_REFUSED.get(status, f"the update was refused: HTTP {status}")
                continue
            out.done[seq] = ""
            self.tally.predicted += w.error is None
            self.tally.errors += w.error is not None
            if in_layout(key):  # a document's key is in the layout (the uploader's)
                self.lake.add(prediction_record(w.image_id, parse_key(key)[0], key, w.prediction))

    def settle(self, batch: list[Queued], out: Outcomes) -> None:
        """Forget the handled events, keep the others for later; counted and logged."""
        self.inbox.later({q: out.later[q.seq] for q in batch if q.seq in out.later}, soon=out.soon)
        self.inbox.done(out.done)
        now = datetime.now(UTC)
        for q in batch:
            if why := out.done.get(q.seq):
                self.tally.skipped[why] += 1
                log.info("skipped %s: %s", q.event.key, why)
            elif q.seq in out.later:
                self.tally.retried[out.later[q.seq]] += 1
                log.info("kept %s for later (attempt %d): %s", q.event.key, q.attempts + 1, out.later[q.seq])
        written = [q for q in batch if out.done.get(q.seq) == ""]
        if written:
            behind = max((now - q.event.at).total_seconds() for q in written)
            log.info("enriched %d of %d events (the oldest uploaded %.1f s ago)", len(written), len(batch), behind)


UPDATE_REFUSED = {
    409: "the document changed while being updated",
    404: "the document vanished between its read and its update",
}


def unique(ids: Iterable[str]) -> list[str]:
    """The ids once each, in a stable order."""
    return sorted(set(ids))


def plan_writes(batch: list[Queued], ids: dict[int, str], docs: dict[str, dict], out: Outcomes) -> list[Write]:
    """The documents to write (one per image, conditional on the version read); the other events of
    the batch get their verdict in `out`."""
    writes: list[Write] = []
    planned: set[str] = set()
    for q in batch:
        if out.settled(q.seq):
            continue
        image_id = ids[q.seq]
        hit = docs.get(image_id)
        if hit is None:
            wait, why = missing_document(q.event)
            (out.later if wait else out.done)[q.seq] = why
        elif hit["_source"].get(Field.PREDICTION) or image_id in planned:
            out.done[q.seq] = ALREADY_PREDICTED  # the same image twice in a batch: written once
        else:
            planned.add(image_id)
            writes.append(Write(q, image_id, hit["_seq_no"], hit["_primary_term"]))
    return writes
