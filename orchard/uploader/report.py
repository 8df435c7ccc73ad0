"""Accounting of an upload run: every discovered file ends in exactly one outcome.

Outcomes:
  uploaded  something was written for it (the object, its document, or both)
  present   object and document were already there with the same sha256: nothing written
  skipped   deliberately not uploaded, with a reason (duplicate content, symlink, not a split folder)
  failed    bad input or a write that failed after retries, with a one-line reason

`ignored` counts files that are not candidates at all (no image/.npy suffix, hidden files).
The exit status is non-zero iff something failed; the JSON report lists every failed and
skipped item with a machine-readable `code` and a human `reason`.
"""

from __future__ import annotations

import enum
import json
import logging
import os
import threading
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from orchard.core.lake import utc_timestamp

log = logging.getLogger(__name__)


class Outcome(enum.StrEnum):
    """What happened to one discovered item."""

    UPLOADED = "uploaded"
    PRESENT = "present"
    SKIPPED = "skipped"
    FAILED = "failed"


@dataclass(frozen=True)
class Problem:
    """Why an item was skipped or failed: `code` for programs, `reason` (one line) for people."""

    path: str
    code: str
    reason: str
    outcome: Outcome = Outcome.FAILED
    key: str | None = None

    def line(self) -> str:
        """The one-line message naming the file."""
        return f"{self.path}: {self.reason}"


@dataclass
class Report:
    """Counts and problems of one run, serialisable to the JSON failure report."""

    dataset: str
    source: str
    bucket: str
    index: str
    started_at: str = field(default_factory=utc_timestamp)
    finished_at: str | None = None
    counts: Counter = field(default_factory=Counter)
    bytes_uploaded: int = 0
    ignored: int = 0
    discovered: int = 0  # items found under the source (every one ends in counts, or is not attempted)
    problems: list[Problem] = field(default_factory=list)
    stopped_early: bool = False
    interrupted: bool = False
    table: dict | None = None  # what the run did to the images table (orchard.uploader.table_feed)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def record(self, outcome: Outcome, problem: Problem | None = None) -> None:
        """Count one item's outcome; log and keep its problem (skipped/failed). Thread-safe."""
        with self._lock:
            self.counts[outcome.value] += 1
            if problem is not None:
                self.problems.append(problem)
        if problem is not None:  # skips are logged as loudly as failures: both name a file not uploaded
            log.warning("%s %s", outcome.value, problem.line())

    @property
    def failed(self) -> int:
        return self.counts[Outcome.FAILED.value]

    @property
    def not_attempted(self) -> int:
        """Discovered items the run never reached (it was stopped or interrupted): a re-run does them."""
        return max(0, self.discovered - sum(self.counts.values()))

    def failures(self) -> list[Problem]:
        """Failed items, sorted by path (workers record them in completion order)."""
        return sorted((p for p in self.problems if p.outcome is Outcome.FAILED), key=lambda p: p.path)

    def skips(self) -> list[Problem]:
        """Skipped items, sorted by path."""
        return sorted((p for p in self.problems if p.outcome is Outcome.SKIPPED), key=lambda p: p.path)

    def summary(self) -> str:
        """The final one-line summary printed by `orchard upload`."""
        c = self.counts
        text = (
            f"{self.dataset}: uploaded {c['uploaded']}, already present {c['present']}, "
            f"skipped {c['skipped']}, failed {c['failed']}"
        )
        if self.not_attempted:
            text += f", not attempted {self.not_attempted}"
        if self.ignored:
            text += f" (ignored {self.ignored} non-image files)"
        if self.stopped_early:
            text += " - stopped at the first failure (--strict)"
        if self.interrupted:
            text += " - interrupted"
        return text + self.table_summary()

    def table_summary(self) -> str:
        """`; images table: N rows added ...` (or why it was not updated), "" before the run ends."""
        if not self.table:
            return ""
        if self.table["skipped"]:
            return "; images table left to `orchard lake sync` (--no-table)"
        if self.table["error"]:
            return "; images table not updated (the next Spark stage syncs it)"
        added, updated = self.table["inserted"], self.table["updated"]
        if not (added or updated):
            return f"; images table up to date (version {self.table['version']})"
        return f"; images table: {added} rows added, {updated} replaced (version {self.table['version']})"

    def to_dict(self) -> dict:
        """The JSON report: counts plus every failure and skip with its reason."""
        return {
            "dataset": self.dataset,
            "source": self.source,
            "bucket": self.bucket,
            "index": self.index,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "counts": {o.value: self.counts[o.value] for o in Outcome} | {"ignored": self.ignored},
            "not_attempted": self.not_attempted,
            "bytes_uploaded": self.bytes_uploaded,
            "stopped_early": self.stopped_early,
            "interrupted": self.interrupted,
            "table": self.table,
            "failures": [_problem_dict(p) for p in self.failures()],
            "skipped": [_problem_dict(p) for p in self.skips()],
        }


def _problem_dict(problem: Problem) -> dict:
    row = asdict(problem)
    row["outcome"] = problem.outcome.value
    return row


def write_report(report: Report, path: Path) -> Path:
    """Write the JSON report atomically; returns its path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path
