"""The upload run: discover -> inspect -> plan -> store objects -> create documents, in batches.

Items are processed in key order, in batches (default 256). Within a batch, inspection and
object PUTs run on a thread pool (hashing, Pillow decoding and sockets release the GIL);
planning (one mget, one listing per label folder) happens once per batch, and the batch's
documents are bulk-written by a second thread while the next batch is transferred.

Idempotence and resumability come from the order of writes and deterministic ids:
- an object is PUT only if the key holds no object with the same sha256 metadata;
- its document (`_id` = sha256) is created only after the object is stored, with
  `op_type=create`, so existing documents are never rewritten;
- a run killed at any point leaves objects without documents at worst; the next run finds
  them in the listing (no re-upload) and creates the missing documents, taking `uploaded_at`
  from the object's Last-Modified (otherwise it is the time the PUT completed), so the final
  state equals that of an uninterrupted run;
- a key whose content changed on disk is re-uploaded and the document of the old content is
  deleted (if it still describes that key).

Duplicate content is stored once: the first item with a sha256 (in key order, or an image
already indexed under another key) wins; later ones are skipped with "duplicate content of
<first>". Duplicates are *skipped*, not failed: their content is in the lake.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Protocol

import urllib3
from elasticsearch import ApiError, Elasticsearch, TransportError
from minio import Minio
from minio.error import InvalidResponseError, S3Error, ServerError

from orchard.core.errors import ConfigError, ServiceUnavailable
from orchard.core.health import probe_minio_cluster
from orchard.core.iterables import batched
from orchard.core.lake import Field, s3a_uri, utc_timestamp
from orchard.core.settings import Settings
from orchard.uploader import index, transfer
from orchard.uploader.discovery import WorkItem, discover, read_labels
from orchard.uploader.inspection import BadInput, Inspected, Limits, inspect_item
from orchard.uploader.report import Outcome, Problem, Report
from orchard.uploader.table_feed import TableFeed, row_of

log = logging.getLogger(__name__)

UPLOAD_ERRORS = (S3Error, ServerError, InvalidResponseError, urllib3.exceptions.HTTPError, OSError, ValueError)
# errors of the planning and indexing calls (listing, mget, bulk), raised once their retries are spent
# This many S3 writes failing in a row (after their retries) means MinIO refuses writes (write quorum
# lost, credentials revoked, disk full): stop instead of failing every remaining file slowly.
ABORT_AFTER_FAILED_WRITES = 16
SERVICE_ERRORS = (
    S3Error,
    ServerError,
    InvalidResponseError,
    urllib3.exceptions.HTTPError,
    ConnectionError,
    ApiError,
    TransportError,
)


def _require_exists(
    what: str, exists: Callable[[], bool], service: str, unreachable: tuple[type[Exception], ...]
) -> None:
    """ConfigError if `exists()` says `what` is missing, ServiceUnavailable if it raises one of `unreachable`."""
    try:
        found = exists()
    except unreachable as exc:
        raise ServiceUnavailable(f"{service} is unreachable: {exc}") from None
    if not found:
        raise ConfigError(f"{what} does not exist: run `orchard setup`")


class ProgressBar(Protocol):
    """The part of tqdm the run uses."""

    def reset(self, total: int | None = None) -> None: ...

    def update(self, n: int = 1) -> object: ...


@dataclass(frozen=True)
class UploadOptions:
    """Flags of `orchard upload`."""

    dataset: str
    default_split: str = "train"
    labels: Path | None = None
    workers: int = 8
    batch_size: int = 256
    strict: bool = False
    limits: Limits = field(default_factory=Limits)
    table: bool = True  # MERGE the rows of stored objects into the images table (orchard.uploader.table_feed)


@dataclass(frozen=True)
class Plan:
    """What an inspected item needs: its object, its document, or both."""

    info: Inspected
    remote: transfer.Remote | None
    need_object: bool
    need_doc: bool

    @property
    def replaced_sha(self) -> str | None:
        """The sha256 of a different object this upload overwrites (its document goes stale)."""
        if self.need_object and self.remote is not None and self.remote.sha256:
            return self.remote.sha256
        return None


# A stored (or found stored) item: its plan, what the PUT returned, its table row (None: none).
Stored = tuple[Plan, transfer.Stored, dict | None]


class Uploader:
    """One `orchard upload` run against one bucket and one index."""

    def __init__(
        self,
        settings: Settings,
        options: UploadOptions,
        s3: Minio,
        es: Elasticsearch,
        progress: ProgressBar | None = None,
    ) -> None:
        self.options = options
        self.bucket = settings.images_bucket
        self.index = settings.images_index
        self.settings = settings
        self.s3 = s3
        self.es = es
        self.progress = progress
        self.remote = transfer.RemoteIndex(s3, self.bucket)
        self.seen: dict[str, str] = {}  # sha256 -> source of the first item with that content
        self.report: Report | None = None
        self._writes = threading.Lock()
        self.failed_writes_in_a_row = 0
        self.last_write_error = ""
        self.writes_unavailable = ""  # why MinIO cannot take writes at all (set once, stops the run)
        self._put = transfer.retried_put(self._worth_retrying)
        self.feed = TableFeed(settings, enabled=options.table)

    def run(self, root: Path) -> Report:
        """Upload everything under `root`; returns the report (also kept on self.report)."""
        self.report = report = Report(self.options.dataset, str(root.absolute()), self.bucket, self.index)
        labels = read_labels(self.options.labels) if self.options.labels else None
        exclude = [self.options.labels] if self.options.labels else []
        found = discover(root, self.options.dataset, self.options.default_split, labels, exclude)
        report.ignored = found.ignored
        report.discovered = len(found.items) + len(found.problems)
        if self.progress is not None:
            self.progress.reset(total=len(found.items))
        for problem in found.problems:
            report.record(problem.outcome, problem)
        if self._must_stop():
            return self._finish()
        self.check_services()
        pool = ThreadPoolExecutor(max_workers=self.options.workers, thread_name_prefix="upload")
        indexer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="index")
        try:
            self._run_batches(found.items, pool, indexer)
            self.feed.flush()  # the rows of the last batches (the indexer has finished)
            index.make_searchable(self.es, self.index)
        except SERVICE_ERRORS as exc:  # still failing after retries: abort with one line, not a traceback
            self._finish()
            raise ServiceUnavailable(f"upload aborted, MinIO or Elasticsearch kept failing: {exc}") from exc
        finally:  # on Ctrl-C, let in-flight writes finish but start no queued ones
            pool.shutdown(wait=True, cancel_futures=True)
            indexer.shutdown(wait=True, cancel_futures=True)
        return self._finish()

    def _run_batches(self, items: Sequence[WorkItem], pool: ThreadPoolExecutor, indexer: ThreadPoolExecutor) -> None:
        """Batch k+1 is inspected while batch k's objects are stored, and batch k's documents are
        written while batch k+1 is planned and stored; at most two batches are in memory."""
        batches = iter(batched(items, self.options.batch_size))
        upcoming = self._start_inspection(next(batches, None), pool)
        pending: Future | None = None
        while upcoming:
            count = len(upcoming)
            inspected = [info for info in (future.result() for future in upcoming) if info is not None]
            if self._must_stop():  # --strict: nothing of a batch with a bad file is written
                break
            storing = [pool.submit(self._store, plan) for plan in self._plan(inspected)]
            upcoming = self._start_inspection(next(batches, None), pool)
            stored = [result for result in (future.result() for future in storing) if result is not None]
            if pending is not None:
                pending.result()
            pending = indexer.submit(self._index_batch, stored, count)
            if self.options.strict:  # a failed document must stop the next batch too
                pending.result()
            if self.stop_reason:
                pending.result()
                raise self.writes_refused()
        if pending is not None:
            pending.result()

    @property
    def stop_reason(self) -> str:
        """Why the run must stop writing (write quorum lost, or too many writes refused in a row); "" if not."""
        if self.writes_unavailable:
            return self.writes_unavailable
        if self.failed_writes_in_a_row >= ABORT_AFTER_FAILED_WRITES:
            return (
                f"MinIO refused the last {self.failed_writes_in_a_row} writes in a row ({self.last_write_error[:200]})"
            )
        return ""

    def writes_refused(self) -> ServiceUnavailable:
        """The error that stops a run whose writes MinIO refuses (write quorum lost, keys revoked...)."""
        return ServiceUnavailable(
            f"upload stopped: {self.stop_reason}; files not yet sent were not attempted. Re-run the same command "
            "once `orchard stack status` shows the MinIO nodes up (stored files are skipped)."
        )

    def _worth_retrying(self, exc: BaseException) -> bool:
        """Retry a failed write if the error is transient and MinIO still has write quorum."""
        if not transfer.is_transient(exc):
            return False
        self._check_write_quorum(exc)
        return not self.writes_unavailable

    def _check_write_quorum(self, exc: BaseException) -> None:
        """After a refused write, ask MinIO's cluster health; no write quorum stops the run.

        Why: without quorum MinIO holds each PUT for up to minutes and then refuses it, so retrying
        file after file would take very long to say what one health call says at once.
        """
        if self.writes_unavailable:
            return
        problem = self.write_quorum_problem()
        if problem:
            self.writes_unavailable = f"{problem}; last error: {str(exc).replace(chr(10), ' ')[:160]}"
            log.error("%s", self.writes_unavailable)

    def write_quorum_problem(self) -> str:
        """Why MinIO cannot take writes, if its cluster health says so (503); "" otherwise (also when
        the endpoint has no such health check, e.g. AWS S3)."""
        probe = probe_minio_cluster(self.settings)
        if probe.ok or not probe.detail.endswith("HTTP 503"):
            return ""
        return (
            f"MinIO has no write quorum (GET {self.settings.s3_url}/minio/health/cluster answered 503: "
            "too many nodes or drives are down)"
        )

    def _count_write(self, error: Exception | None) -> None:
        with self._writes:
            self.failed_writes_in_a_row = self.failed_writes_in_a_row + 1 if error else 0
            self.last_write_error = str(error).replace("\n", " ") if error else ""

    def _start_inspection(self, batch: Sequence[WorkItem] | None, pool: ThreadPoolExecutor) -> list[Future]:
        """Submit the inspection of a batch (empty list when there is none)."""
        return [pool.submit(self._inspect, item) for item in batch or ()]

    @property
    def _accounts(self) -> Report:
        """The report of the run in progress (`run` creates it before anything is accounted)."""
        if self.report is None:
            raise RuntimeError("Uploader.run has not started")
        return self.report

    def _fail(self, item: WorkItem, code: str, reason: str) -> None:
        """Account for `item` as failed, for `reason`."""
        self._accounts.record(Outcome.FAILED, Problem(item.source, code, reason, Outcome.FAILED, item.key))

    def _finish(self) -> Report:
        report = self._accounts
        report.finished_at = utc_timestamp()
        report.table = self.feed.update.as_dict()
        return report

    def _must_stop(self) -> bool:
        report = self._accounts
        stop = self.options.strict and report.failed > 0
        report.stopped_early = stop
        return stop

    def check_services(self) -> None:
        """Fail fast, with the fix in the message, if the bucket or index is missing or unreachable."""
        _require_exists(
            f"bucket {self.bucket!r}",
            partial(transfer.bucket_exists, self.s3, self.bucket),
            f"MinIO at {self.settings.s3_url}",
            UPLOAD_ERRORS,
        )
        problem = self.write_quorum_problem()
        if problem:  # reads work, writes would hang then fail: say so before sending anything
            raise ServiceUnavailable(
                f"{problem}: nothing was uploaded. Re-run once `orchard stack status` shows the MinIO nodes up."
            )
        _require_exists(
            f"index {self.index!r}",
            partial(index.index_exists, self.es, self.index),
            f"Elasticsearch at {self.settings.es_urls[0]}",
            (Exception,),
        )

    def _index_batch(self, stored: list[Stored], done: int) -> None:
        self._index(stored)
        self._advance(done)

    def _advance(self, done: int) -> None:
        if self.progress is not None:
            self.progress.update(done)

    def _inspect(self, item: WorkItem) -> Inspected | None:
        try:
            return inspect_item(item, self.options.limits)
        except BadInput as exc:
            self._fail(item, exc.code, exc.reason)
            return None

    def _plan(self, inspected: list[Inspected]) -> list[Plan]:
        """Decide per item: duplicate (skip), or what to write (present items: only their table row)."""
        existing = index.existing_documents(self.es, self.index, [info.sha256 for info in inspected])
        plans = []
        for info in inspected:
            plan = self._decide(info, existing)
            if plan is not None:
                plans.append(plan)
        return plans

    def _decide(self, info: Inspected, existing: dict[str, dict]) -> Plan | None:
        """The plan of one item, or None when it is accounted for already (a duplicate)."""
        item = info.item
        duplicate_of = self._duplicate_of(info, existing.get(info.sha256))
        if duplicate_of:
            self._accounts.record(
                Outcome.SKIPPED,
                Problem(item.source, "duplicate", f"duplicate content of {duplicate_of}", Outcome.SKIPPED, item.key),
            )
            return None
        self.seen[info.sha256] = item.source
        remote = self.remote.get(item.key)
        # Present objects get a plan too: their table rows are MERGEd (a no-op when the table has them).
        return Plan(
            info,
            remote,
            need_object=remote is None or remote.sha256 != info.sha256,
            need_doc=info.sha256 not in existing,
        )

    def _duplicate_of(self, info: Inspected, doc: dict | None) -> str | None:
        """Where this content already is (in this run or in the index under another key), or None."""
        if info.sha256 in self.seen:
            return self.seen[info.sha256]
        if doc is not None and doc.get(Field.KEY) != info.item.key:
            return f"{s3a_uri(self.bucket, str(doc.get(Field.KEY)))} (indexed from {doc.get(Field.SOURCE_PATH)})"
        return None

    def _store(self, plan: Plan) -> Stored | None:
        """PUT the object if needed; returns what the document and the table row record, or None on failure."""
        remote = plan.remote
        if not plan.need_object and remote is not None:  # (need_object is False only with a remote object)
            stored = transfer.Stored(remote.etag, remote.last_modified or utc_timestamp())
            return replace(plan, info=replace(plan.info, data=None)), stored, self._row(plan.info, stored.etag)
        if self.stop_reason:  # queued behind writes MinIO refused
            self._fail(plan.info.item, "upload_error", "not attempted: " + self.stop_reason[:120])
            return None
        try:
            stored = self._put(self.s3, self.bucket, plan.info)
            self._count_write(None)
        except UPLOAD_ERRORS as exc:
            if isinstance(exc, S3Error) or transfer.is_transient(exc):  # MinIO's refusal, not a local file error
                self._count_write(exc)
            self._fail(plan.info.item, "upload_error", f"upload failed: {exc}".replace("\n", " "))
            return None
        row = self._row(plan.info, stored.etag)
        return replace(plan, info=replace(plan.info, data=None)), stored, row  # free the bytes early

    def _row(self, info: Inspected, etag: str) -> dict | None:
        """The item's table row, or None if its bytes cannot be read again (the stages sync it then)
        or the table is not this run's to write (`--no-table`)."""
        if not self.feed.enabled:
            return None
        try:
            return row_of(info, etag, self.settings.lake_inline_max_bytes)
        except (OSError, ValueError) as exc:
            log.warning("%s: no table row (%s); the next Spark stage syncs it", info.item.source, exc)
            return None

    def _index(self, stored: list[Stored]) -> None:
        """Create the documents of stored objects, account for every item of the batch, and queue the
        table rows of those whose document is there."""
        docs = {
            plan.info.sha256: index.build_document(plan.info, self.bucket, result.etag, result.uploaded_at)
            for plan, result, _ in stored
            if plan.need_doc
        }
        results = index.create_documents(self.es, self.index, docs) if docs else {}
        report = self._accounts
        rows = []
        for plan, _, row in stored:
            item = plan.info.item
            status = results.get(plan.info.sha256, index.PRESENT)
            if status not in (index.CREATED, index.PRESENT):
                self._fail(item, "index_error", status)
                continue
            if row is not None:
                rows.append(row)
            if plan.need_object:
                report.bytes_uploaded += plan.info.size
            wrote = plan.need_object or status == index.CREATED
            report.record(Outcome.UPLOADED if wrote else Outcome.PRESENT)
            if plan.replaced_sha and plan.replaced_sha != plan.info.sha256:
                index.delete_document_if_key(self.es, self.index, plan.replaced_sha, item.key)
        self.feed.add(rows)
