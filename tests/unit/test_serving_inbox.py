"""The service's inbox of events (orchard.serving.events, a real SQLite file) and how a batch of
events is planned into document writes (orchard.serving.enrichment)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from orchard.core.errors import ConfigError
from orchard.serving.enrichment import ALREADY_PREDICTED, EVENT_PATIENCE, Outcomes, plan_writes
from orchard.serving.events import RETRY_FIRST_S, RETRY_MAX_S, Inbox, ObjectEvent, Queued, retry_delay

AT = datetime(2026, 12, 7, 10, 0, 0, 123456, tzinfo=UTC)


def event(key: str, at: datetime = AT) -> ObjectEvent:
    return ObjectEvent("images", key, at)


@pytest.fixture
def inbox(tmp_path):
    box = Inbox(tmp_path / "serve" / "inbox.sqlite3")
    yield box
    box.close()


def test_events_kept_survive_a_new_process_in_order(tmp_path):
    path = tmp_path / "serve" / "inbox.sqlite3"
    first = Inbox(path)
    first.add([event("ds/train/a/x y.jpg"), event("ds/train/b/é.png", AT + timedelta(seconds=1))])
    first.add([ObjectEvent("images", "ds/test/c/z.tif", AT, "ab" * 32)])
    first.close()  # as a killed service would leave it: nothing else written
    again = Inbox(path)
    queued = again.due(10)
    assert [q.event for q in queued] == [
        event("ds/train/a/x y.jpg"),
        event("ds/train/b/é.png", AT + timedelta(seconds=1)),
        ObjectEvent("images", "ds/test/c/z.tif", AT, "ab" * 32),
    ]
    assert [q.attempts for q in queued] == [0, 0, 0] and queued[0].seq < queued[1].seq < queued[2].seq
    assert [q.event.key for q in again.due(2)] == ["ds/train/a/x y.jpg", "ds/train/b/é.png"]
    again.close()


def test_one_service_per_inbox_until_it_closes(tmp_path):
    path = tmp_path / "inbox.sqlite3"
    held = Inbox(path)
    with pytest.raises(ConfigError, match="ORCHARD_SERVE_INBOX"):
        Inbox(path)
    held.close()
    Inbox(path).close()


def test_an_event_kept_for_later_waits_a_growing_bounded_back_off(inbox):
    inbox.add([event("a.jpg"), event("b.jpg")])
    a, b = inbox.due(10)
    inbox.later({a: "no document yet"}, now=1000.0)
    assert [q.seq for q in inbox.due(10, now=1000.0)] == [b.seq]
    [again] = [q for q in inbox.due(10, now=1000.0 + RETRY_FIRST_S) if q.seq == a.seq]
    assert again.attempts == 1
    inbox.later({again: "no document yet"}, now=2000.0)
    assert a.seq not in [q.seq for q in inbox.due(10, now=2000.0 + RETRY_FIRST_S)]
    [third] = [q for q in inbox.due(10, now=2000.0 + 2 * RETRY_FIRST_S) if q.seq == a.seq]
    inbox.later({third: "no document yet"}, now=3000.0, soon={a.seq})  # a cheap check: no back-off growth
    assert a.seq in [q.seq for q in inbox.due(10, now=3000.0 + RETRY_FIRST_S)]
    assert [q.attempts for q in inbox.due(10, now=4000.0) if q.seq == a.seq] == [3]
    assert [retry_delay(n) for n in (1, 2, 3)] == [RETRY_FIRST_S, 2 * RETRY_FIRST_S, 4 * RETRY_FIRST_S]
    assert retry_delay(60) == RETRY_MAX_S


def test_done_events_are_forgotten_and_waiting_says_what_is_left(inbox):
    assert inbox.waiting() == {"events": 0, "oldest_s": 0.0, "next_due_s": 0.0}
    old = datetime.now(UTC) - timedelta(seconds=30)
    inbox.add([event("a.jpg", old), event("b.jpg"), event("c.jpg")])
    a, b, c = inbox.due(10)
    inbox.done([a.seq, c.seq])
    waiting = inbox.waiting()
    assert waiting["events"] == 1 and waiting["oldest_s"] > 0  # b's upload time, long past
    assert [q.seq for q in inbox.due(10)] == [b.seq]


def hit(prediction: dict | None = None, seq_no: int = 7) -> dict:
    return {"_seq_no": seq_no, "_primary_term": 1, "_source": {"prediction": prediction} if prediction else {}}


def test_a_batch_is_planned_into_one_conditional_write_per_image():
    now = datetime.now(UTC)
    batch = [
        Queued(1, event("fresh.jpg", now), 0),
        Queued(2, event("predicted.jpg", now), 0),
        Queued(3, event("young-orphan.jpg", now), 0),
        Queued(4, event("old-orphan.jpg", now - EVENT_PATIENCE - timedelta(seconds=1)), 0),
        Queued(5, event("copy-of-fresh.jpg", now), 0),
        Queued(6, event("gone.jpg", now), 0),
    ]
    ids = {1: "f", 2: "p", 3: "y", 4: "o", 5: "f"}  # 6 was deleted since: settled before planning
    out = Outcomes(done={6: "deleted since"})
    writes = plan_writes(batch, ids, {"f": hit(seq_no=11), "p": hit({"label": "lime"})}, out)
    assert [(w.queued.seq, w.image_id, w.seq_no, w.primary_term) for w in writes] == [(1, "f", 11, 1)]
    assert out.done == {6: "deleted since", 2: ALREADY_PREDICTED, 4: out.done[4], 5: ALREADY_PREDICTED}
    assert "not uploaded by `orchard upload`" in out.done[4]
    assert out.later == {3: "no document yet (the uploader indexes it after storing)"}
