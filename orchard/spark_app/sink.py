"""Bulk updates of image documents, sent from executors, retried, and accounted.

Every action carries the document's deterministic id (content sha256), so a retried chunk or a
re-run Spark task writes the same result again instead of a duplicate. Rejections (429) are retried
here with exponential backoff, each retry logged (executors log to their stderr, which Spark keeps
beside the executor); connection errors and timeouts redo the whole chunk (idempotent) via
tenacity. Only per-partition counts travel back to the driver, retries included.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from tenacity import before_sleep_log, retry, retry_if_exception_type, stop_after_attempt, wait_exponential

from orchard.core.clients import ES_RETRY_STATUS
from orchard.core.iterables import batched

log = logging.getLogger(__name__)

MAX_EXAMPLES = 20  # failure examples kept per run (counts are exact, examples are samples)
MAX_RESENDS = 8
BACKOFF_SECONDS = (1.0, 30.0)  # first and longest wait between resends (doubling)


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


def _transport_errors() -> tuple[type[BaseException], ...]:
    from elastic_transport import ConnectionError as EsConnectionError
    from elastic_transport import ConnectionTimeout

    return (EsConnectionError, ConnectionTimeout, ConnectionError, TimeoutError, OSError)


def send_once(es, actions: list[dict], labels: dict[str, str], tally: Tally, last: bool) -> list[dict]:
    """One bulk request for `actions`, counted into `tally`; the actions rejected with a retryable
    status (none if `last`: those are counted as failed). Raises on transport errors."""
    from elasticsearch import ApiError
    from elasticsearch.helpers import streaming_bulk

    by_id = {str(action["_id"]): action for action in actions}
    rejected = []
    results = streaming_bulk(
        es, actions, chunk_size=len(actions), max_retries=0, raise_on_error=False, raise_on_exception=True
    )
    try:
        items = list(results)  # one request: the chunk is already in memory, so are its results
    except ApiError as exc:  # the whole request refused (e.g. 429 before any item ran)
        if exc.status_code not in ES_RETRY_STATUS:
            raise
        if not last:
            return list(actions)
        for action in actions:
            tally.fail(labels.get(str(action["_id"]), str(action["_id"])), f"HTTP {exc.status_code}: {exc}"[:200])
        return []
    for ok, item in items:
        info = next(iter(item.values()))
        doc_id = str(info.get("_id"))
        if ok:
            tally.noop += info.get("result") == "noop"
            tally.updated += info.get("result") != "noop"
        elif info.get("status") in ES_RETRY_STATUS and not last and doc_id in by_id:
            rejected.append(by_id[doc_id])
        else:
            tally.fail(labels.get(doc_id, doc_id), failure_reason(info))
    return rejected


def send_chunk(es, actions: list[dict], labels: dict[str, str]) -> Tally:
    """Send one chunk; documents rejected with 429/5xx are resent with backoff, each resend logged.
    Its tally. Raises on transport errors (the caller redoes the chunk)."""
    tally, pending = Tally(), actions
    for attempt in range(1, MAX_RESENDS + 2):
        pending = send_once(es, pending, labels, tally, last=attempt > MAX_RESENDS)
        if not pending:
            break
        wait = min(BACKOFF_SECONDS[1], BACKOFF_SECONDS[0] * 2 ** (attempt - 1))
        log.warning(
            "Elasticsearch rejected %d of %d writes (429 too many requests / shard unavailable): retry %d/%d in %.0fs",
            len(pending),
            len(actions),
            attempt,
            MAX_RESENDS,
            wait,
        )
        tally.retried += len(pending)
        time.sleep(wait)
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


def write_actions(
    es, items: Iterable[tuple[dict, str, bool]], chunk_size: int = 500, select: Selector | None = None
) -> Tally:
    """Bulk-send (action, key, is_error) items in chunks; the tally of the whole stream.

    `key` names the image in failure reports; `is_error` marks documents that get an error field;
    `select(es, chunk) -> (chunk to send, tally of the rest)` may drop items that need no write.
    A chunk is redone as a whole after connection errors (idempotent: same ids, same content).
    """
    redo = retry(
        reraise=True,
        stop=stop_after_attempt(6),
        wait=wait_exponential(multiplier=1, max=30),
        retry=retry_if_exception_type(_transport_errors()),
        before_sleep=before_sleep_log(log, logging.WARNING),
    )(process_chunk)
    total = Tally()
    for chunk in batched(items, chunk_size):
        tally = redo(es, chunk, select)
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
