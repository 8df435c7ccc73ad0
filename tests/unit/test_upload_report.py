"""The run report and the document shape (pure logic, no services)."""

from __future__ import annotations

import json
from pathlib import Path

from orchard.core.quality import ImageQuality
from orchard.stack.setup import MAPPINGS_DIR, load_mapping
from orchard.uploader.discovery import WorkItem
from orchard.uploader.index import build_document
from orchard.uploader.inspection import Inspected
from orchard.uploader.report import Outcome, Problem, Report, write_report


def test_counts_summary_and_json_report(tmp_path: Path) -> None:
    report = Report("fruits", "/data/fruits", "images", "orchard-images")
    report.record(Outcome.UPLOADED)
    report.record(Outcome.UPLOADED)
    report.record(Outcome.PRESENT)
    report.record(Outcome.FAILED, Problem("/data/z.jpg", "empty", "empty file (0 bytes)"))
    report.record(Outcome.FAILED, Problem("/data/a.jpg", "truncated", "truncated image: x"))
    report.record(Outcome.SKIPPED, Problem("/data/l.jpg", "symlink", "symlink, not followed", Outcome.SKIPPED))
    report.ignored = 3
    assert report.summary() == (
        "fruits: uploaded 2, already present 1, skipped 1, failed 2 (ignored 3 non-image files)"
    )
    body = json.loads(write_report(report, tmp_path / "r" / "report.json").read_text())
    assert body["counts"] == {"uploaded": 2, "present": 1, "skipped": 1, "failed": 2, "ignored": 3}
    assert [(f["path"], f["code"]) for f in body["failures"]] == [
        ("/data/a.jpg", "truncated"),
        ("/data/z.jpg", "empty"),
    ]
    assert body["skipped"] == [
        {"path": "/data/l.jpg", "code": "symlink", "reason": "symlink, not followed", "outcome": "skipped", "key": None}
    ]
    assert body["not_attempted"] == 0


def test_items_a_stopped_run_never_reached_are_accounted() -> None:
    report = Report("fruits", "/data/fruits", "images", "orchard-images", discovered=10)
    report.record(Outcome.UPLOADED)
    report.record(Outcome.FAILED, Problem("/data/a.jpg", "upload_error", "upload failed: x"))
    report.interrupted = True
    assert report.not_attempted == 8
    assert (
        report.summary() == "fruits: uploaded 1, already present 0, skipped 0, failed 1, not attempted 8 - interrupted"
    )
    assert report.to_dict()["not_attempted"] == 8


def test_documents_fit_the_strict_mapping() -> None:
    """Every field the uploader writes is mapped; every mapped field but the Spark ones is written."""
    item = WorkItem(
        Path("/d/Training/Apple Red/0_100.jpg"), "f/train/apple_red/0_100.jpg", "f", "train", "apple_red", "Apple Red"
    )
    quality = ImageQuality(False, 0.1, 0.0, 0.2)  # measured: its pixels were decoded
    info = Inspected(item, "ab" * 32, 1234, "jpeg", 100, 100, 3, "RGB", quality=quality)
    doc = build_document(info, "images", "etag1", "2026-01-01T00:00:00.000Z")
    mapped = set(load_mapping(MAPPINGS_DIR / "images.json")["mappings"]["properties"])
    spark_fields = {"prediction", "embedding", "embedding_model", "pca", "pretrained", "tile", "tiles"}
    assert set(doc) == mapped - spark_fields
    assert doc["id"] == doc["sha256"] == "ab" * 32
    assert doc["uri"] == "s3a://images/f/train/apple_red/0_100.jpg"
    assert doc["source_path"] == "/d/Training/Apple Red/0_100.jpg"


def test_summary_says_what_the_run_did_to_the_images_table() -> None:
    from orchard.uploader.table_feed import TableUpdate

    report = Report("fruits", "/data/fruits", "images", "orchard-images")
    report.record(Outcome.UPLOADED)
    head = "fruits: uploaded 1, already present 0, skipped 0, failed 0"
    cases = [
        (TableUpdate(1, 0, 7), "; images table: 1 rows added, 0 replaced (version 7)"),
        (TableUpdate(0, 0, 7), "; images table up to date (version 7)"),
        (
            TableUpdate(error="cannot update the images table: timeout"),
            "; images table not updated (the next Spark stage syncs it)",
        ),
        (TableUpdate(skipped=True), "; images table left to `orchard lake sync` (--no-table)"),
    ]
    for update, tail in cases:
        report.table = update.as_dict()
        assert report.summary() == head + tail
    assert report.to_dict()["table"] == {"inserted": 0, "updated": 0, "version": None, "error": "", "skipped": True}


def test_table_rows_of_uploaded_items_inline_small_bytes_and_reference_large_ones(tmp_path: Path) -> None:
    import hashlib

    from PIL import Image

    from orchard.uploader.table_feed import row_of

    path = tmp_path / "a.png"
    Image.new("RGB", (4, 3)).save(path)
    data = path.read_bytes()
    item = WorkItem(path, "ds/train/red apple/a.png", "ds", "train", "red apple", "Red apple")
    sha = hashlib.sha256(data).hexdigest()
    kept = Inspected(item, sha, len(data), "PNG", 4, 3, 3, "RGB", data)
    row = row_of(kept, "etag-1", inline_max_bytes=len(data))
    assert (row["id"], row["content"], row["format"], row["etag"], row["label"]) == (
        sha,
        data,
        "png",
        "etag-1",
        "red apple",
    )
    assert row_of(Inspected(item, sha, len(data), "PNG", 4, 3, 3, "RGB"), "e", len(data))["content"] == data  # re-read
    path.unlink()  # too large to inline: the row comes from the inspection alone, the file is not read
    large = row_of(Inspected(item, sha, len(data), "TIFF", 4, 3, 1, "L"), "e", inline_max_bytes=len(data) - 1)
    assert (large["id"], large["content"], large["format"], large["channels"], large["bytes"]) == (
        sha,
        None,
        "tiff",
        1,
        len(data),
    )
