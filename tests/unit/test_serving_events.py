"""MinIO event notifications as the service reads them (orchard.serving.events): which objects
an event names, and which of them need a prediction."""

from __future__ import annotations

from datetime import UTC, datetime

from orchard.serving.events import ObjectEvent, object_events, skip_reason


def record(key: str, name: str = "s3:ObjectCreated:Put", bucket: str = "images", when: str | None = None) -> dict:
    """One record of a MinIO notification body (S3 event format), the key URL-encoded as MinIO sends it."""
    body: dict = {"eventName": name, "s3": {"bucket": {"name": bucket}, "object": {"key": key, "size": 10}}}
    if when is not None:
        body["eventTime"] = when
    return body


def test_keys_are_decoded_and_only_creations_kept():
    body = {
        "Records": [
            record("ds/train/apple+red/caf%C3%A9+1.jpg", when="2026-12-03T12:00:00.123Z"),
            record("ds/train/x.jpg", name="s3:ObjectRemoved:Delete"),
            record("ds/test/y.png", name="s3:ObjectCreated:CompleteMultipartUpload", bucket="other"),
        ]
    }
    events = object_events(body)
    assert [e.key for e in events] == ["ds/train/apple red/café 1.jpg", "ds/test/y.png"]
    assert events[0].at == datetime(2026, 12, 3, 12, 0, 0, 123000, tzinfo=UTC)
    assert events[1].bucket == "other"


def test_a_body_without_records_or_with_odd_ones_names_nothing_or_uses_now():
    assert object_events({}) == [] and object_events({"Records": None}) == []
    before = datetime.now(UTC)
    [event] = object_events({"Records": [record("a.jpg", when="not a time")]})
    assert event.at >= before


def test_only_images_of_the_images_bucket_need_a_prediction():
    now = datetime.now(UTC)
    assert skip_reason(ObjectEvent("images", "ds/train/a/x.JPG", now), "images") is None
    assert skip_reason(ObjectEvent("images", "ds/train/a/x.npy", now), "images") is None
    assert skip_reason(ObjectEvent("images", "ds/notes.txt", now), "images") == "not an image (suffix)"
    assert "not the images bucket" in str(skip_reason(ObjectEvent("models", "v/x.jpg", now), "images"))


def test_the_sha256_declared_in_the_user_metadata_is_kept_when_it_is_one():
    digest = "AB" * 32
    body = {"Records": [record("a.jpg"), record("b.jpg"), record("c.jpg"), record("d.jpg")]}
    body["Records"][0]["s3"]["object"]["userMetadata"] = {"X-Amz-Meta-Sha256": digest, "content-type": "image/jpeg"}
    body["Records"][1]["s3"]["object"]["userMetadata"] = {"x-amz-meta-sha256": "not a digest"}
    body["Records"][2]["s3"]["object"]["userMetadata"] = ["odd"]
    assert [e.sha256 for e in object_events(body)] == [digest.lower(), "", "", ""]
