"""Image documents in Elasticsearch: built from an inspected item, created once, never overwritten.

The document `_id` is the content sha256, so an image is indexed once however often it is
uploaded. Documents are written with `op_type=create`: a document that already exists answers
409 and is left untouched, which keeps `uploaded_at` stable across re-runs and never clobbers the
`prediction`, `embedding` and `pca` fields that the Spark app fills in later with partial updates.
`quality` (empty, dark and no-data fractions: orchard.core.quality) is written at upload.
Those fields are absent at upload time (the mapping is strict, absent = empty).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from elasticsearch import ApiError, Elasticsearch, TransportError

from orchard.core.iterables import batched
from orchard.core.lake import Field, s3a_uri
from orchard.core.retry import (
    ES_BULK,
    ES_CHUNK,
    ES_READ,
    ES_RETRY_STATUS,
    BulkResends,
    es_transient,
    retried,
    retrying,
    without_transport_retries,
)
from orchard.uploader.inspection import Inspected

log = logging.getLogger(__name__)

CREATED, PRESENT = "created", "present"
SOURCE_FIELDS = [Field.KEY, Field.DATASET, Field.SOURCE_PATH]
BULK_CHUNK = 500  # documents per bulk request

# Reads and deletes by id: connection errors, timeouts, 429 and 5xx (orchard.core.retry).
es_read_retry = retried(ES_READ, es_transient, log)


def build_document(info: Inspected, bucket: str, etag: str, uploaded_at: str) -> dict:
    """The document of one stored object (fields of es_mappings/images.json); `quality` only when
    inspection measured it (its pixels were decoded)."""
    item = info.item
    return {
        Field.ID: info.sha256,
        Field.DATASET: item.dataset,
        Field.SPLIT: item.split,
        Field.LABEL: item.label,
        Field.LABEL_TEXT: item.label_text,
        Field.BUCKET: bucket,
        Field.KEY: item.key,
        Field.URI: s3a_uri(bucket, item.key),
        Field.BYTES: info.size,
        Field.FORMAT: info.format,
        Field.WIDTH: info.width,
        Field.HEIGHT: info.height,
        Field.CHANNELS: info.channels,
        Field.COLOR_MODE: info.color_mode,
        Field.SHA256: info.sha256,
        Field.ETAG: etag,
        Field.UPLOADED_AT: uploaded_at,
        Field.SOURCE_PATH: item.source,
        **({Field.QUALITY: info.quality.document()} if info.quality is not None else {}),
    }


@es_read_retry
def existing_documents(es: Elasticsearch, index: str, ids: Iterable[str]) -> dict[str, dict]:
    """id -> {key, dataset, source_path} of the documents that already exist (realtime GET)."""
    return _found(without_transport_retries(es), index, ids)


def _found(es: Elasticsearch, index: str, ids: Iterable[str]) -> dict[str, dict]:
    """One mget (existing_documents without its retries)."""
    ids = sorted(set(ids))
    if not ids:
        return {}
    response = es.mget(index=index, ids=ids, source_includes=SOURCE_FIELDS, realtime=True)
    return {doc["_id"]: doc.get("_source", {}) for doc in response["docs"] if doc.get("found")}


def _bulk_once(
    es: Elasticsearch, index: str, docs: list[tuple[str, dict]], results: dict[str, str], resends: BulkResends
) -> None:
    """One streaming_bulk pass over the docs without a result yet (rejected ones resent inside,
    ES_BULK); fills `results` in place. Raises on connection errors and timeouts."""
    actions = [
        {"_op_type": "create", "_index": index, "_id": doc_id, "_source": doc}
        for doc_id, doc in docs
        if doc_id not in results
    ]
    for ok, info in resends.stream(
        es, actions, chunk_size=max(1, len(actions)), raise_on_error=False, raise_on_exception=False, yield_ok=True
    ):
        outcome = info.get("create", {})
        doc_id, status = outcome.get("_id"), outcome.get("status")
        if ok:
            results[doc_id] = CREATED
        elif status == 409:
            results[doc_id] = PRESENT
        elif status in ES_RETRY_STATUS:
            results[doc_id] = (
                f"index error: Elasticsearch kept rejecting the write (HTTP {status}: {_error_text(outcome)}) "
                f"after {ES_BULK.max_retries} resends"
            )
        else:
            results[doc_id] = f"index error: {_error_text(outcome)}"


def _error_text(outcome: dict) -> str:
    error = outcome.get("error")
    if isinstance(error, dict):
        return f"{error.get('type')}: {error.get('reason')}"
    return str(error)


def create_documents(es: Elasticsearch, index: str, docs: dict[str, dict]) -> dict[str, str]:
    """Create documents by id; returns id -> "created" | "present" (409) | an error reason.

    Bulk requests of BULK_CHUNK documents. Documents rejected with 429/5xx are resent with backoff
    by streaming_bulk itself (ES_BULK), each resend logged; a dropped connection or a timeout
    redoes the chunk's documents without a result yet (ES_CHUNK; create is idempotent: a redone
    document that did get written answers 409). No retry multiplies another: the client's own
    retries are off for these requests.
    """
    results: dict[str, str] = {}
    resends = BulkResends(ES_BULK, log)
    for chunk in batched(docs.items(), BULK_CHUNK):
        try:
            retrying(ES_CHUNK, es_transient, log)(_bulk_once, es, index, chunk, results, resends)
        except (ApiError, TransportError) as exc:
            log.warning("indexing failed after retries: %s", exc)
            for doc_id, _ in chunk:
                results.setdefault(doc_id, f"index error: Elasticsearch failed after retries ({exc})"[:300])
    return results


def make_searchable(es: Elasticsearch, index: str) -> None:
    """Refresh the index, so that a search run after the upload sees every document it wrote.

    Why: bulk writes become searchable only at the next periodic refresh, and each shard copy
    refreshes on its own clock; without this an upload followed at once by a search or a count
    sees part of its documents (CI saw 9 of 20). The documents are written either way, so a
    refresh that still fails after retries is logged, not raised."""
    try:
        _refresh(es, index)
    except (ApiError, TransportError) as exc:
        log.warning("documents written, but the index refresh failed (they become searchable within ~1 s): %s", exc)


@es_read_retry
def _refresh(es: Elasticsearch, index: str) -> None:
    without_transport_retries(es).indices.refresh(index=index)


@es_read_retry
def delete_document_if_key(es: Elasticsearch, index: str, doc_id: str, key: str) -> bool:
    """Delete document `doc_id` if it still describes `key` (its object was replaced); True if deleted."""
    es = without_transport_retries(es)
    found = _found(es, index, [doc_id]).get(doc_id)
    if not found or found.get(Field.KEY) != key:
        return False
    es.delete(index=index, id=doc_id, refresh=False)
    return True


def index_exists(es: Elasticsearch, index: str) -> bool:
    """Whether the index exists (only the client's own retries, ES_TRANSPORT: a pre-flight check fails fast)."""
    return bool(es.indices.exists(index=index))
