"""Image documents in Elasticsearch: built from an inspected item, created once, never overwritten.

The document `_id` is the content sha256, so an image is indexed once however often it is
uploaded. Documents are written with `op_type=create`: a document that already exists answers
409 and is left untouched, which keeps `uploaded_at` stable across re-runs and never clobbers the
`prediction`, `embedding` and `pca` fields that the Spark app fills in later with partial updates.
Those fields are absent at upload time (the mapping is strict, absent = empty).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from elasticsearch import ApiError, Elasticsearch, TransportError
from elasticsearch.helpers import streaming_bulk
from tenacity import Retrying, retry, retry_if_exception, stop_after_attempt, wait_exponential

from orchard.core.clients import ES_RETRY_STATUS
from orchard.uploader.inspection import Inspected

log = logging.getLogger(__name__)

CREATED, PRESENT = "created", "present"
SOURCE_FIELDS = ["key", "dataset", "source_path"]


class StillThrottled(Exception):
    """Some documents were still rejected with a retryable status after streaming_bulk's retries."""


def is_transient(exc: BaseException) -> bool:
    """Connection problems, timeouts, throttling and unavailable shards are worth retrying."""
    if isinstance(exc, StillThrottled):
        return True
    if isinstance(exc, ApiError):
        return exc.status_code in ES_RETRY_STATUS
    return isinstance(exc, (TransportError, ConnectionError))


es_retry = retry(
    reraise=True,
    retry=retry_if_exception(is_transient),
    stop=stop_after_attempt(6),
    wait=wait_exponential(multiplier=0.5, max=15),
)


def s3a_uri(bucket: str, key: str) -> str:
    """The URI Spark reads the object with."""
    return f"s3a://{bucket}/{key}"


def build_document(info: Inspected, bucket: str, etag: str, uploaded_at: str) -> dict:
    """The document of one stored object (fields of es_mappings/images.json)."""
    item = info.item
    return {
        "id": info.sha256,
        "dataset": item.dataset,
        "split": item.split,
        "label": item.label,
        "label_text": item.label_text,
        "bucket": bucket,
        "key": item.key,
        "uri": s3a_uri(bucket, item.key),
        "bytes": info.size,
        "format": info.format,
        "width": info.width,
        "height": info.height,
        "channels": info.channels,
        "color_mode": info.color_mode,
        "sha256": info.sha256,
        "etag": etag,
        "uploaded_at": uploaded_at,
        "source_path": item.source,
    }


@es_retry
def existing_documents(es: Elasticsearch, index: str, ids: Iterable[str]) -> dict[str, dict]:
    """id -> {key, dataset, source_path} of the documents that already exist (realtime GET)."""
    ids = sorted(set(ids))
    if not ids:
        return {}
    response = es.mget(index=index, ids=ids, source_includes=SOURCE_FIELDS, realtime=True)
    return {doc["_id"]: doc.get("_source", {}) for doc in response["docs"] if doc.get("found")}


def _bulk_once(es: Elasticsearch, index: str, docs: dict[str, dict], results: dict[str, str]) -> None:
    """One streaming_bulk pass over the docs without a result yet; fills `results` in place."""
    actions = (
        {"_op_type": "create", "_index": index, "_id": doc_id, "_source": doc}
        for doc_id, doc in docs.items()
        if doc_id not in results
    )
    for ok, info in streaming_bulk(
        es,
        actions,
        chunk_size=500,
        max_retries=8,
        initial_backoff=0.5,
        max_backoff=20,
        retry_on_status=ES_RETRY_STATUS,
        raise_on_error=False,
        raise_on_exception=False,
        yield_ok=True,
    ):
        outcome = info.get("create", {})
        doc_id, status = outcome.get("_id"), outcome.get("status")
        if ok:
            results[doc_id] = CREATED
        elif status == 409:
            results[doc_id] = PRESENT
        elif status not in ES_RETRY_STATUS:
            results[doc_id] = f"index error: {_error_text(outcome)}"


def _error_text(outcome: dict) -> str:
    error = outcome.get("error")
    if isinstance(error, dict):
        return f"{error.get('type')}: {error.get('reason')}"
    return str(error)


def create_documents(es: Elasticsearch, index: str, docs: dict[str, dict]) -> dict[str, str]:
    """Create documents by id; returns id -> "created" | "present" (409) | an error reason.

    429s are retried with backoff inside streaming_bulk; a dropped connection or a chunk still
    throttled after that is retried here for the documents without a result (create is
    idempotent: a retried document that did get written answers 409).
    """
    results: dict[str, str] = {}
    retrying = Retrying(
        reraise=True,
        retry=retry_if_exception(is_transient),
        stop=stop_after_attempt(5),
        wait=wait_exponential(multiplier=1, max=30),
    )
    try:
        for attempt in retrying:
            with attempt:
                _bulk_once(es, index, docs, results)
                if len(results) < len(docs):
                    raise StillThrottled(f"{len(docs) - len(results)} documents still rejected")
    except (ApiError, TransportError, StillThrottled) as exc:
        log.warning("indexing failed after retries: %s", exc)
    for doc_id in docs:
        results.setdefault(doc_id, "index error: Elasticsearch kept rejecting the write (throttled or unavailable)")
    return results


@es_retry
def delete_document_if_key(es: Elasticsearch, index: str, doc_id: str, key: str) -> bool:
    """Delete document `doc_id` if it still describes `key` (its object was replaced); True if deleted."""
    found = existing_documents(es, index, [doc_id]).get(doc_id)
    if not found or found.get("key") != key:
        return False
    es.delete(index=index, id=doc_id, refresh=False)
    return True


def index_exists(es: Elasticsearch, index: str) -> bool:
    """Whether the index exists (no retries beyond the client's own: a pre-flight check fails fast)."""
    return bool(es.indices.exists(index=index))
