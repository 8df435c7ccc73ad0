"""Bulk updates of image documents, sent from executors, retried, and accounted.

Every action carries the document's deterministic id (content sha256), so a retried chunk or a
re-run Spark task writes the same result again instead of a duplicate. Documents rejected with
429/5xx are resent with exponential backoff by streaming_bulk itself (orchard.core.retry.ES_BULK),
each resend logged (executors log to their stderr, which Spark keeps beside the executor) and
counted; connection errors and timeouts redo the whole chunk (ES_CHUNK, idempotent). The client's
own retries are off for these requests, so no retry multiplies another. Only per-partition counts
travel back to the driver, resends included.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from elasticsearch import ApiError

from orchard.core.iterables import batched
from orchard.core.retry import (
    ES_BULK,
    ES_CHUNK,
    ES_RETRY_STATUS,
    BulkResends,
    es_transient,
    retrying,
    without_transport_retries,
)

log = logging.getLogger(__name__)

MAX_EXAMPLES = 20  # failure examples kept per run (counts are exact, examples are samples)


@dataclass
class Tally:
    """Counts of one write (a partition, or a whole run after merging)."""

    updated: int = 0
    noop: int = 0
    failed: int = 0
    errors: int = 0  # documents that got an error field instead of a result (e.g. undecodable)
    retried: int = 0  # document writes resent after a 429/5xx rejection
    reasons: dict[str, int] = field(default_factory=dict)
    examples: list[tuple[str, str]] = field(default_factory=list)  # (key or id, reason)

    @property
    def written(self) -> int:
        """Documents the run accounted as written (changed or already up to date)."""
        return self.updated + self.noop

    def fail(self, where: str, reason: str) -> None:
        """Count one failed document with its reason."""
        self.failed += 1
        self.reasons[reason] = self.reasons.get(reason, 0) + 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append((where, reason))

    def merge(self, other: Tally) -> Tally:
        """The sum of two tallies (used by RDD.reduce)."""
        reasons = dict(self.reasons)
        for reason, n in other.reasons.items():
            reasons[reason] = reasons.get(reason, 0) + n
        return Tally(
            self.updated + other.updated,
            self.noop + other.noop,
            self.failed + other.failed,
            self.errors + other.errors,
            self.retried + other.retried,
            reasons,
            (self.examples + other.examples)[:MAX_EXAMPLES],
        )


def merge_tallies(a: Tally, b: Tally) -> Tally:
    """Module-level reducer (picklable by reference)."""
    return a.merge(b)


def failure_reason(info: dict) -> str:
    """A short reason from one failed bulk item."""
    error = info.get("error") or {}
    if isinstance(error, dict):
        kind = error.get("type", "error")
        if kind == "document_missing_exception":
            return "no document with this id in the index (not uploaded?)"
        return f"{kind}: {error.get('reason', '')}"[:200]
    return str(error)[:200] or f"status {info.get('status')}"


def send_chunk(es, actions: list[dict], labels: dict[str, str], resends: BulkResends | None = None) -> Tally:
    """Send one chunk through streaming_bulk; its tally. Documents rejected with 429/5xx are resent
    by the helper (ES_BULK), each resend logged and counted in `retried`; those still rejected after
    the last resend fail with their reason. Raises on connection errors and timeouts (the caller
    redoes the chunk) and on a whole request refused with a status not worth resending."""
    resends = resends or BulkResends(ES_BULK, log)
    resent_before = resends.resent
    tally, done = Tally(), set()
    results = resends.stream(es, actions, chunk_size=len(actions), raise_on_error=False, raise_on_exception=True)
    try:
        for ok, item in results:
            info = next(iter(item.values()))
            doc_id = str(info.get("_id"))
            done.add(doc_id)
            if ok:
                tally.noop += info.get("result") == "noop"
                tally.updated += info.get("result") != "noop"
            else:
                tally.fail(labels.get(doc_id, doc_id), failure_reason(info))
    except ApiError as exc:  # the whole request refused again after the last resend
        if exc.status_code not in ES_RETRY_STATUS:
            raise
        for action in actions:
            doc_id = str(action["_id"])
            if doc_id not in done:
                tally.fail(labels.get(doc_id, doc_id), f"HTTP {exc.status_code}: {exc}"[:200])
    tally.retried += resends.resent - resent_before
    return tally


Selector = Callable[[Any, list[tuple[dict, str, bool]]], tuple[list[tuple[dict, str, bool]], Tally]]


def process_chunk(
    es, chunk: list[tuple[dict, str, bool]], select: Selector | None, resends: BulkResends | None = None
) -> Tally:
    """Optionally filter a chunk (`select` reads what is stored), send the rest; the chunk's tally."""
    tally = Tally()
    if select is not None:
        chunk, tally = select(es, chunk)
    if chunk:
        labels = {action["_id"]: key for action, key, _ in chunk}
        tally = tally.merge(send_chunk(es, [action for action, _, _ in chunk], labels, resends))
    return tally


def write_actions(
    es, items: Iterable[tuple[dict, str, bool]], chunk_size: int = 500, select: Selector | None = None
) -> Tally:
    """Bulk-send (action, key, is_error) items in chunks; the tally of the whole stream.

    `key` names the image in failure reports; `is_error` marks documents that get an error field;
    `select(es, chunk) -> (chunk to send, tally of the rest)` may drop items that need no write.
    A chunk is redone as a whole after connection errors, timeouts, or a 429/5xx answer to the
    selector's read (ES_CHUNK; idempotent: same ids, same content); `retried` counts the document
    writes resent, those of redone attempts included.
    """
    es = without_transport_retries(es)  # one level: ES_CHUNK redoes chunks, ES_BULK resends documents
    total = Tally()
    for chunk in batched(items, chunk_size):
        resends = BulkResends(ES_BULK, log)
        tally = retrying(ES_CHUNK, es_transient, log)(process_chunk, es, chunk, select, resends)
        tally.retried = resends.resent
        tally.errors = sum(1 for _, _, is_error in chunk if is_error)
        total = total.merge(tally)
    return total


def tally_partition(
    es_factory, items: Iterator[tuple[dict, str, bool]], chunk_size: int, select: Selector | None = None
) -> Iterator[Tally]:
    """mapPartitions body: write the partition's items and yield its one tally."""
    yield write_actions(es_factory(), items, chunk_size, select)


def log_retries(tally: Tally) -> None:
    """Driver side: one warning line if the executors had to resend rejected writes."""
    if tally.retried:
        log.warning(
            "Elasticsearch rejected %d document writes (429 / shard unavailable) that the executors "
            "retried with backoff (see the executor logs)",
            tally.retried,
        )
