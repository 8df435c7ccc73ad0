"""Auto-enrichment: every new image of the images bucket predicted by the serving model within
seconds of its upload, its document's `prediction` written like `orchard infer` writes it.

MinIO publishes each object creation to the service's `POST /v1/events` (a webhook target with a
persistent queue directory on every node, configured by `orchard stack up`). An event is
acknowledged (2xx) only once its document is written, or when there is nothing to write (not an
image, object gone, no document after EVENT_PATIENCE). Otherwise the answer is 503 and MinIO keeps
the event in its queue and sends it again: with the service stopped, uploads wait in MinIO and are
predicted when it is back. A document the uploader has not indexed yet (it indexes right after it
stores, in batches) is such a case: 503, and the retry finds it.

Enrichment fills a missing prediction; it never replaces one. A document that already has a
prediction (a duplicate delivery, or `orchard infer` got there first) is left as it is; the update
is conditional on the document version read (optimistic concurrency control), so a late event cannot
overwrite a batch run's newer prediction.
`orchard infer` stays the way to re-predict with another model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from urllib.parse import unquote_plus

from elasticsearch import ConflictError, NotFoundError
from minio.error import S3Error

from orchard.core import formats
from orchard.core.lake import Field
from orchard.core.objects import read_object
from orchard.serving.catalog import Catalog
from orchard.serving.predictor import ServingModel, content_id
from orchard.spark_app.infer import PredictSpec, error_doc, prediction_doc

log = logging.getLogger(__name__)

# An object whose document has not appeared this long after its event was not uploaded by
# `orchard upload` (e.g. `mc cp`): acknowledged without a prediction rather than retried forever.
EVENT_PATIENCE = timedelta(minutes=5)
CREATED = "s3:ObjectCreated:"
ALREADY_PREDICTED = "already predicted"
WRITE_ATTEMPTS = 3  # conditional updates that lost a race before the event is retried later


class NotReady(RuntimeError):
    """An event that cannot be handled yet (no model, no document yet): MinIO should send it again."""


@dataclass(frozen=True)
class ObjectEvent:
    """One object creation: bucket, key (decoded), when."""

    bucket: str
    key: str
    at: datetime


@dataclass
class EnrichTally:
    """What one delivery did: predicted, errors written, skipped (with reasons)."""

    predicted: int = 0
    errors: int = 0
    skipped: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"predicted": self.predicted, "errors": self.errors, "skipped": self.skipped}


def object_events(body: dict) -> list[ObjectEvent]:
    """The object creations of a MinIO (S3-format) event notification body."""
    events = []
    for record in body.get("Records") or []:
        if not str(record.get("eventName", "")).startswith(CREATED):
            continue
        s3 = record.get("s3") or {}
        key = unquote_plus(str((s3.get("object") or {}).get("key", "")))  # keys arrive URL-encoded
        events.append(ObjectEvent(str((s3.get("bucket") or {}).get("name", "")), key, event_time(record)))
    return events


def event_time(record: dict) -> datetime:
    """When the event happened (now if it does not say)."""
    try:
        return datetime.fromisoformat(str(record["eventTime"]).replace("Z", "+00:00"))
    except (KeyError, ValueError):
        return datetime.now(UTC)


def skip_reason(event: ObjectEvent, images_bucket: str) -> str | None:
    """Why an event needs no prediction (None if it does)."""
    if event.bucket != images_bucket:
        return f"not the images bucket ({event.bucket})"
    if not formats.is_image_key(event.key):
        return "not an image (suffix)"
    return None


def fetch(catalog: Catalog, event: ObjectEvent) -> bytes | None:
    """The object's bytes (transient errors retried), None if it was deleted since."""
    try:
        return read_object(catalog.s3, event.bucket, event.key)
    except S3Error as exc:
        if exc.code in {"NoSuchKey", "NoSuchBucket"}:
            return None
        raise


def stored_prediction(catalog: Catalog, image_id: str) -> dict | None:
    """The document's hit (its `prediction` only, with _seq_no and _primary_term); None if absent."""
    try:
        return dict(catalog.es.get(index=catalog.s.images_index, id=image_id, source_includes=[Field.PREDICTION]))
    except NotFoundError:
        return None


def document_state(catalog: Catalog, image_id: str, event: ObjectEvent) -> str:
    """Why the image's document needs no prediction ("" if it needs one); NotReady while the
    uploader may still index it."""
    found = stored_prediction(catalog, image_id)
    if found is None:
        if datetime.now(UTC) - event.at < EVENT_PATIENCE:
            raise NotReady(f"{event.key}: no document yet (the uploader indexes it after storing)")
        return f"no document {EVENT_PATIENCE} after the upload (not uploaded by `orchard upload`)"
    return ALREADY_PREDICTED if found["_source"].get(Field.PREDICTION) else ""


def usable_content(catalog: Catalog, event: ObjectEvent) -> tuple[bytes | None, str]:
    """(the image's bytes, "") if the event's object is to be predicted, else (None, why not);
    NotReady while its document may still be coming."""
    reason = skip_reason(event, catalog.s.images_bucket)
    if reason is not None:
        return None, reason
    content = fetch(catalog, event)
    if content is None:
        return None, "deleted since"
    reason = document_state(catalog, content_id(content), event)
    return (None, reason) if reason else (content, "")


def prediction_of(model: ServingModel, spec: PredictSpec, scored, error: str | None) -> dict:
    """The document's `prediction` object: `orchard infer`'s form."""
    if error is not None:
        return error_doc(spec, error)
    return prediction_doc(spec, model.top(scored, spec.top))


def write_prediction(catalog: Catalog, image_id: str, prediction: dict) -> bool:
    """Write the prediction into the image's document unless it has one by now; returns whether it
    was written. NotReady if the document is gone or keeps changing."""
    for _ in range(WRITE_ATTEMPTS):
        found = stored_prediction(catalog, image_id)
        if found is None:
            raise NotReady("the document vanished between its check and its update")
        if found["_source"].get(Field.PREDICTION):
            return False
        try:
            # Conditional on the version just read: a prediction written in between wins.
            catalog.es.update(
                index=catalog.s.images_index,
                id=image_id,
                doc={Field.PREDICTION: prediction},
                if_seq_no=found["_seq_no"],
                if_primary_term=found["_primary_term"],
            )
            return True
        except ConflictError:
            continue
    raise NotReady(f"the document {image_id} changed {WRITE_ATTEMPTS} times while being updated")
