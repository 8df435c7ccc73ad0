"""The predictions the service writes into documents, also kept in the lake's predictions table.

Auto-enrichment predicts uploads one by one; each written prediction's row waits here and goes into
the table (orchard.core.prediction_rows, delta-rs) with the others of the last FLUSH_SECONDS in one
commit: a commit per upload would grow the table's log by thousands of tiny files. A batch that
still fails after LAKE_COMMIT's retries is logged and dropped, never blocks predictions: the
documents hold those predictions, and the next `orchard infer` (whose rows follow the documents,
first `predicted_at` included) writes their rows. The same holds for rows held when the service is
killed. The rows left when it stops normally are written first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from orchard.core.errors import ServiceUnavailable
from orchard.core.prediction_rows import merge_predictions
from orchard.core.retry import LAKE_COMMIT, retrying
from orchard.core.settings import Settings

log = logging.getLogger(__name__)

FLUSH_SECONDS = 2.0  # rows held at most this long before their commit
MAX_ROWS = 1000  # rows held at most before a commit, whatever the time


@dataclass
class PredictionLog:
    """Rows waiting for their commit, written by a background task (`start`, `stop`)."""

    s: Settings
    merge: Callable[[Settings, Sequence[dict]], dict] = merge_predictions
    rows: list[dict] = field(default_factory=list)
    written: dict[str, int] = field(default_factory=lambda: {"inserted": 0, "updated": 0, "dropped": 0})
    _task: asyncio.Task | None = None
    _full: asyncio.Event = field(default_factory=asyncio.Event)

    def add(self, row: dict) -> None:
        """Hold a row for the next commit (the event loop's thread only)."""
        self.rows.append(row)
        if len(self.rows) >= MAX_ROWS:
            self._full.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="prediction-log")

    async def stop(self) -> None:
        """Stop the background task and write what it holds."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.flush()

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._full.wait(), FLUSH_SECONDS)
            await self.flush()

    async def flush(self) -> None:
        """Commit the held rows (one commit per dataset); dropped with a warning if the table refuses."""
        rows, self.rows = self.rows, []
        self._full.clear()
        if not rows:
            return
        try:
            counts = await asyncio.to_thread(retrying(LAKE_COMMIT, _transient, log), self.merge, self.s, rows)
        except ServiceUnavailable as exc:
            self.written["dropped"] += len(rows)
            log.warning(
                "%d predictions not kept in the lake (%s): the next `orchard infer` writes them", len(rows), exc
            )
            return
        for name, count in counts.items():
            self.written[name] += count


def _transient(exc: BaseException) -> bool:
    """A store error or a concurrent commit: worth another MERGE (it re-reads the table)."""
    return isinstance(exc, ServiceUnavailable)
