"""Bulk updates of image documents, sent from executors, retried, and accounted.

Every action carries the document's deterministic id (content sha256), so a retried chunk or a
re-run Spark task writes the same result again instead of a duplicate. Rejections (429) are retried
by `streaming_bulk` with exponential backoff; connection errors and timeouts redo the whole chunk
(idempotent) via tenacity. Only per-partition counts travel back to the driver.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from tenacity import before_sleep_log, retry, retry_if_exception_type, stop_after_attempt, wait_exponential

from spark_app.preprocess import batched

log = logging.getLogger(__name__)

MAX_EXAMPLES = 20  # failure examples kept per run (counts are exact, examples are samples)


@dataclass
class Tally:
    """Counts of one write (a partition, or a whole run after merging)."""

    updated: int = 0
    noop: int = 0
    failed: int = 0
    errors: int = 0  # documents that got an error field instead of a result (e.g. undecodable)
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

    def merge(self, other: "Tally") -> "Tally":
        """The sum of two tallies (used by RDD.reduce)."""
        reasons = dict(self.reasons)
        for reason, n in other.reasons.items():
            reasons[reason] = reasons.get(reason, 0) + n
        return Tally(self.updated + other.updated, self.noop + other.noop, self.failed + other.failed,
                     self.errors + other.errors, reasons, (self.examples + other.examples)[:MAX_EXAMPLES])


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


def _transport_errors() -> tuple[type[BaseException], ...]:
    from elastic_transport import ConnectionError as EsConnectionError, ConnectionTimeout

    return (EsConnectionError, ConnectionTimeout, ConnectionError, TimeoutError, OSError)


def send_chunk(es, actions: list[dict], labels: dict[str, str]) -> Tally:
    """Send one chunk with streaming_bulk (429s retried with backoff); its tally. Raises on transport errors."""
    from elasticsearch.helpers import streaming_bulk

    tally = Tally()
    results = streaming_bulk(es, actions, chunk_size=len(actions), max_retries=8, initial_backoff=1,
                             max_backoff=30, raise_on_error=False, raise_on_exception=True)
    for ok, item in results:
        info = next(iter(item.values()))
        if ok:
            if info.get("result") == "noop":
                tally.noop += 1
            else:
                tally.updated += 1
        else:
            doc_id = str(info.get("_id"))
            tally.fail(labels.get(doc_id, doc_id), failure_reason(info))
    return tally


Selector = Callable[[Any, list[tuple[dict, str, bool]]], tuple[list[tuple[dict, str, bool]], Tally]]


def process_chunk(es, chunk: list[tuple[dict, str, bool]], select: Selector | None) -> Tally:
    """Optionally filter a chunk (`select` reads what is stored), send the rest; the chunk's tally."""
    tally = Tally()
    if select is not None:
        chunk, tally = select(es, chunk)
    if chunk:
        labels = {action["_id"]: key for action, key, _ in chunk}
        tally = tally.merge(send_chunk(es, [action for action, _, _ in chunk], labels))
    return tally


def write_actions(es, items: Iterable[tuple[dict, str, bool]], chunk_size: int = 500,
                  select: Selector | None = None) -> Tally:
    """Bulk-send (action, key, is_error) items in chunks; the tally of the whole stream.

    `key` names the image in failure reports; `is_error` marks documents that get an error field;
    `select(es, chunk) -> (chunk to send, tally of the rest)` may drop items that need no write.
    A chunk is redone as a whole after connection errors (idempotent: same ids, same content).
    """
    redo = retry(
        reraise=True, stop=stop_after_attempt(6), wait=wait_exponential(multiplier=1, max=30),
        retry=retry_if_exception_type(_transport_errors()),
        before_sleep=before_sleep_log(log, logging.WARNING),
    )(process_chunk)
    total = Tally()
    for chunk in batched(items, chunk_size):
        tally = redo(es, chunk, select)
        tally.errors = sum(1 for _, _, is_error in chunk if is_error)
        total = total.merge(tally)
    return total


def tally_partition(es_factory, items: Iterator[tuple[dict, str, bool]], chunk_size: int,
                    select: Selector | None = None) -> Iterator[Tally]:
    """mapPartitions body: write the partition's items and yield its one tally."""
    yield write_actions(es_factory(), items, chunk_size, select)
