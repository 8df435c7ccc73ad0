"""MinIO's object-created events as the service keeps them: parsed from a notification body, and
held in the service's inbox until their image is predicted.

The inbox is a SQLite file (`ORCHARD_SERVE_INBOX`, default `$ORCHARD_HOME/serve/inbox.sqlite3`)
written with `synchronous=FULL`: an event is on disk before MinIO gets its 2xx, so a service killed
after acknowledging loses nothing; its next start takes up what is left. Acknowledging at once is
what lets enrichment keep up with uploads: MinIO sends a webhook target's events one at a time per
node (at most 4 in flight here), so a delivery that waited for the prediction capped enrichment at
~30 images/s whatever the service could do; here the enrichment worker takes the waiting events in
batches (one multi-get, one model call, one bulk update per batch). An event that cannot be handled
yet (no document yet, Elasticsearch down) stays in the inbox and is taken again after a back-off.
"""

from __future__ import annotations

import fcntl
import re
import sqlite3
import threading
import time
from collections.abc import Iterable, Mapping, Sequence, Set
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO
from urllib.parse import unquote_plus

from orchard.core import formats
from orchard.core.errors import ConfigError
from orchard.core.objects import meta_sha256

CREATED = "s3:ObjectCreated:"
SHA256_HEX = re.compile(r"[0-9a-f]{64}")
RETRY_FIRST_S = 0.5  # an event not handled yet is taken again after this, doubling per attempt...
RETRY_MAX_S = 30.0  # ...up to this

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    bucket TEXT NOT NULL,
    key TEXT NOT NULL,
    at TEXT NOT NULL,
    sha256 TEXT NOT NULL DEFAULT '',
    attempts INTEGER NOT NULL DEFAULT 0,
    due REAL NOT NULL DEFAULT 0,
    reason TEXT
);
CREATE INDEX IF NOT EXISTS events_due ON events (due, seq);
"""


@dataclass(frozen=True)
class ObjectEvent:
    """One object creation: bucket, key (decoded), when, and the sha256 its uploader declared in
    the object's metadata (`orchard upload` does; "" if none): trusted to look up the image's
    document before reading the object; a prediction is written under the bytes' own sha256."""

    bucket: str
    key: str
    at: datetime
    sha256: str = ""


@dataclass(frozen=True)
class Queued:
    """An event held in the inbox: its sequence number and how often it was taken before."""

    seq: int
    event: ObjectEvent
    attempts: int


def object_events(body: dict) -> list[ObjectEvent]:
    """The object creations of a MinIO (S3-format) event notification body."""
    events = []
    for record in body.get("Records") or []:
        if not str(record.get("eventName", "")).startswith(CREATED):
            continue
        s3 = record.get("s3") or {}
        obj = s3.get("object") or {}
        key = unquote_plus(str(obj.get("key", "")))  # keys arrive URL-encoded
        bucket = str((s3.get("bucket") or {}).get("name", ""))
        events.append(ObjectEvent(bucket, key, event_time(record), declared_sha256(obj.get("userMetadata"))))
    return events


def declared_sha256(metadata: object) -> str:
    """The content sha256 an event's user metadata declares, if it is one ("" otherwise)."""
    value = meta_sha256(metadata) if isinstance(metadata, dict) else None
    return value.lower() if isinstance(value, str) and SHA256_HEX.fullmatch(value.lower()) else ""


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


def retry_delay(attempts: int) -> float:
    """Seconds before an event taken `attempts` times (1 or more) is taken again."""
    return min(RETRY_MAX_S, RETRY_FIRST_S * 2 ** max(0, attempts - 1))


class Inbox:
    """The events waiting for their prediction, in a SQLite file (one connection, shared by threads
    under a lock; every method is blocking and quick). One service per inbox: ConfigError if
    another process holds it (two would take the same events)."""

    def __init__(self, path: Path):
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)  # object keys: the lake's names
        self.path = path
        self._owner = hold_exclusively(path.with_name(path.name + ".lock"))
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a commit is on disk before it returns
        self._db.executescript(SCHEMA)

    def add(self, events: Sequence[ObjectEvent]) -> None:
        """Hold the events (one transaction: all or none, on disk when this returns)."""
        rows = [(e.bucket, e.key, e.at.isoformat(), e.sha256) for e in events]
        with self._lock, self._db:
            self._db.executemany("INSERT INTO events (bucket, key, at, sha256) VALUES (?, ?, ?, ?)", rows)

    def due(self, limit: int, now: float | None = None) -> list[Queued]:
        """Up to `limit` events whose back-off has passed: new ones first (in arrival order), then
        those taken before, by the end of their back-off."""
        with self._lock:
            rows = self._db.execute(
                # In the index's order (new events have due 0): no sort of a large backlog per batch.
                "SELECT seq, bucket, key, at, sha256, attempts FROM events WHERE due <= ? ORDER BY due, seq LIMIT ?",
                (time.time() if now is None else now, limit),
            ).fetchall()
        return [Queued(seq, ObjectEvent(b, k, datetime.fromisoformat(at), h), n) for seq, b, k, at, h, n in rows]

    def done(self, seqs: Iterable[int]) -> None:
        """Forget handled events."""
        with self._lock, self._db:
            self._db.executemany("DELETE FROM events WHERE seq = ?", [(seq,) for seq in seqs])

    def later(self, reasons: Mapping[Queued, str], now: float | None = None, soon: Set[int] = frozenset()) -> None:
        """Keep these taken events (-> why not now) and take them again after their back-off (the
        first one whatever the attempts for those whose seq is in `soon`: a cheap check, e.g. a
        document the uploader is about to index)."""
        now = time.time() if now is None else now
        rows = [
            (q.attempts + 1, now + retry_delay(1 if q.seq in soon else q.attempts + 1), reason[:500], q.seq)
            for q, reason in reasons.items()
        ]
        with self._lock, self._db:
            self._db.executemany("UPDATE events SET attempts = ?, due = ?, reason = ? WHERE seq = ?", rows)

    def waiting(self) -> dict:
        """{"events": how many are held, "oldest_s": the age of the oldest event's upload (0 if none),
        "next_due_s": seconds until one is due (0: now or none)}."""
        with self._lock:
            count, oldest, due = self._db.execute("SELECT count(*), min(at), min(due) FROM events").fetchone()
        age = (datetime.now(UTC) - datetime.fromisoformat(oldest)).total_seconds() if oldest else 0.0
        return {
            "events": count,
            "oldest_s": round(max(0.0, age), 3),
            "next_due_s": round(max(0.0, (due or 0) - time.time()), 3),
        }

    def close(self) -> None:
        """Close the database and let another process hold the inbox."""
        with self._lock:
            self._db.close()
        self._owner.close()  # releases the flock


def hold_exclusively(lock_path: Path) -> TextIO:
    """The open lock file, flock-ed by this process until closed (released by the kernel if the
    process dies); ConfigError naming ORCHARD_SERVE_INBOX if another process holds it."""
    owner = lock_path.open("a")
    try:
        fcntl.flock(owner, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        owner.close()
        inbox = lock_path.with_name(lock_path.name.removesuffix(".lock"))
        raise ConfigError(
            f"the events inbox {inbox} is held by another `orchard serve`: give this one its own ORCHARD_SERVE_INBOX"
        ) from None
    return owner
