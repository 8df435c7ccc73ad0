"""The images table (Delta Lake) on the real native stack: sync, idempotence, odd names, a killed
sync, new uploads predicted by the next `orchard infer`, and training on an earlier version.

Every command runs as `bin/orchard ...` in a subprocess, as a user would run it. The table is read
back with a real Spark session (the test's own driver) to compare it with the bucket and the index.
"""

from __future__ import annotations

import hashlib
import io
import os
import secrets
import signal
import subprocess
import time
from pathlib import Path

import pytest
from lake_datasets import fresh_seed

from orchard.core.clients import es_client, s3_client
from orchard.core.lake import Column
from orchard.core.settings import Settings
from tests.integration.test_spark_app import ORCHARD, Dataset, clean_up, last_json, ok, orchard
from tests.integration.test_spark_app import synth as synth_tree

pytestmark = pytest.mark.integration

CLASSES, TRAIN_PER_CLASS, TEST_PER_CLASS = 3, 12, 4
ODD_NAMES = ("with space.jpg", "ünïcødé 名前.jpg")


def synth(root: Path, seed: int, per_class: int = TRAIN_PER_CLASS, test_per_class: int = TEST_PER_CLASS) -> Path:
    """A small synthetic dataset tree of CLASSES classes."""
    return synth_tree(root, CLASSES, per_class, test_per_class, seed)


def rename_some(root: Path) -> None:
    """Give two train images names with a space and with Unicode."""
    label_dir = sorted((root / "Training").iterdir())[0]
    for image, name in zip(sorted(label_dir.iterdir()), ODD_NAMES, strict=False):
        image.rename(label_dir / name)


def object_ids(s: Settings, dataset: str) -> dict[str, str]:
    """key -> sha256 of every object of the dataset in the images bucket."""
    client = s3_client(s)
    ids = {}
    for obj in client.list_objects(s.images_bucket, prefix=f"{dataset}/", recursive=True):
        response = client.get_object(s.images_bucket, obj.object_name)
        try:
            ids[obj.object_name] = hashlib.sha256(response.read()).hexdigest()
        finally:
            response.close()
            response.release_conn()
    return ids


def document_ids(s: Settings, dataset: str) -> set[str]:
    from elasticsearch.helpers import scan

    hits = scan(es_client(s), index=s.images_index, query={"query": {"term": {"dataset": dataset}}}, _source=False)
    return {h["_id"] for h in hits}


@pytest.fixture(scope="module")
def spark(stack: Settings):
    """A Spark session of the test itself, to read the table back: in local mode, so it holds none
    of the cluster's cores (a standalone app keeps its executors while it runs, and the commands
    under test need them)."""
    from orchard.spark_app.session import spark_session

    with spark_session(stack, "it-lake-reader", {"spark.master": "local[1]"}) as session:
        yield session


def table_rows(spark, s: Settings, dataset: str, version: int | None = None) -> dict[str, str]:
    """key -> id of the dataset's rows in the table (at `version`)."""
    from orchard.spark_app.table import read_images

    rows = read_images(spark, s, dataset, version=version).select(Column.KEY, Column.ID).collect()
    return {r[0]: r[1] for r in rows}


def history(*args: str) -> list[dict]:
    return last_json(ok(orchard("lake", "history", "--json", *args)))


def forget(spark, s: Settings, dataset: str) -> None:
    """Objects, documents, model versions and table rows of a test dataset."""
    clean_up(Dataset(dataset, s, corrupt_key=""))


@pytest.fixture(scope="module")
def lake_dataset(stack: Settings, spark, tmp_path_factory):
    token = secrets.token_hex(3)
    name = f"it-lake-{token}"
    root = synth(tmp_path_factory.mktemp("lake") / "fruits", int(token, 16) % 100_000)
    rename_some(root)
    try:
        ok(orchard("upload", str(root), "--dataset", name, "--no-table"))  # the table is left to the sync tested
        yield name
    finally:
        forget(spark, stack, name)


@pytest.fixture(scope="module")
def first_sync(lake_dataset: str) -> dict:
    return last_json(ok(orchard("lake", "sync", "--dataset", lake_dataset, "--json")))


def test_sync_makes_table_ids_equal_objects_and_documents(stack: Settings, spark, lake_dataset: str, first_sync):
    images = CLASSES * (TRAIN_PER_CLASS + TEST_PER_CLASS)
    assert first_sync["listed"] == images and first_sync["added"] == images and first_sync["failed"] == 0
    objects = object_ids(stack, lake_dataset)
    rows = table_rows(spark, stack, lake_dataset)
    assert rows == objects  # same keys, each with the sha256 of its bytes
    assert set(rows.values()) == document_ids(stack, lake_dataset)
    for odd in ODD_NAMES:
        assert any(key.endswith("/" + odd) for key in rows), f"{odd!r} is missing from the table"


def test_a_second_sync_adds_nothing_and_commits_nothing(stack: Settings, lake_dataset: str, first_sync):
    """Neither the counts check (`lake sync`, no Spark application) nor the key-by-key listing
    (`lake sync --full`) finds anything to do."""
    checked = last_json(ok(orchard("lake", "sync", "--dataset", lake_dataset, "--json")))
    listed = last_json(ok(orchard("lake", "sync", "--dataset", lake_dataset, "--full", "--json")))
    assert (checked["checked"], listed["checked"]) == ("counts", "keys")
    for again in (checked, listed):
        assert again["listed"] == first_sync["listed"] and again["added"] == 0 and again["failed"] == 0, again
        assert again["table_version"] == first_sync["table_version"]
    latest = history("--limit", "1")[0]
    assert latest["version"] == first_sync["table_version"]
    assert latest["rows_added"] == first_sync["added"] and latest["files_added"] >= 1, latest  # the sync's commit


def test_the_driver_reads_the_log_as_delta_does_and_stages_scan_the_same_rows(
    stack: Settings, spark, lake_dataset: str, first_sync
):
    """The log read on the driver (delta-rs: version, rows, newest row) and a stage's scan of the
    snapshot's Parquet files agree with Delta's own reader at the same version; so does the
    fallback the stages take for a table with reader features (Delta's reader at that version)."""
    from dataclasses import replace
    from datetime import UTC, timedelta

    from delta.tables import DeltaTable

    from orchard.core.lake import COLUMN_NAMES
    from orchard.core.table_log import read_snapshot
    from orchard.spark_app.table import scan

    snapshot = read_snapshot(stack)
    assert snapshot.plain  # the table Orchard creates needs no reader feature
    assert snapshot.version == DeltaTable.forPath(spark, stack.images_table_uri).history(1).collect()[0]["version"]
    delta = spark.read.format("delta").option("versionAsOf", snapshot.version).load(stack.images_table_uri)
    want = sorted(delta.where(f"{Column.DATASET} = '{lake_dataset}'").select(*COLUMN_NAMES).collect())
    assert len(want) == first_sync["listed"]
    assert sorted(scan(spark, snapshot, lake_dataset).collect()) == want
    assert sorted(scan(spark, replace(snapshot, plain=False), lake_dataset).collect()) == want
    assert scan(spark, snapshot, lake_dataset, "test").count() == sum(r[Column.SPLIT] == "test" for r in want)
    rows, newest = snapshot.stats_of(lake_dataset)
    last = max(r[Column.INGESTED_AT] for r in want).replace(tzinfo=UTC)
    assert rows == len(want)
    assert newest is not None and timedelta(0) <= last - newest < timedelta(milliseconds=1)  # stats keep ms


def test_a_killed_sync_leaves_a_consistent_table_and_a_rerun_completes(stack: Settings, spark, tmp_path: Path):
    name = f"it-lake-kill-{secrets.token_hex(3)}"
    root = synth(tmp_path / "fruits", fresh_seed(), per_class=60, test_per_class=0)
    try:
        ok(orchard("upload", str(root), "--dataset", name, "--no-table"))
        before = history("--limit", "1")[0]["version"]
        proc = subprocess.Popen(
            [str(ORCHARD), "lake", "sync", "--dataset", name, "--json"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        wait_for_line(proc, "objects are new, reading them", timeout=300)
        time.sleep(2)  # inside the write: reading objects, or merging them
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        after = history("--limit", "1")[0]["version"]
        assert after in (before, before + 1)
        kept = table_rows(spark, stack, name, after)
        assert len(kept) in (0, CLASSES * 60)  # a version holds all of the commit or none of it
        rerun = last_json(ok(orchard("lake", "sync", "--dataset", name, "--json")))
        assert rerun["failed"] == 0
        assert table_rows(spark, stack, name) == object_ids(stack, name)
    finally:
        forget(spark, stack, name)


def wait_for_line(proc: subprocess.Popen, text: str, timeout: float) -> None:
    """Read the process's stderr until a line contains `text` (fails if it exits or times out first)."""
    deadline = time.monotonic() + timeout
    assert proc.stderr is not None
    seen: list[str] = []  # what it said instead, for the failure message
    for line in proc.stderr:
        if text in line:
            return
        seen = [*seen[-19:], line.rstrip()]
        assert time.monotonic() < deadline, f"no {text!r} within {timeout} s; its last lines:\n" + "\n".join(seen)
    pytest.fail(f"the process ended (exit {proc.wait()}) before logging {text!r}; its last lines:\n" + "\n".join(seen))


@pytest.fixture(scope="module")
def trained(lake_dataset: str, first_sync: dict) -> dict:
    """The summary of `orchard train` on the lake dataset (before the tests below add images)."""
    return last_json(ok(orchard("train", "--dataset", lake_dataset, "--epochs", "1", "--batch-size", "8", "--json")))


def test_new_uploads_are_predicted_by_the_next_infer_and_as_of_trains_on_the_older_rows(
    stack: Settings, spark, lake_dataset: str, trained: dict, tmp_path: Path
):
    version, old_table = trained["version"], trained["trained_on_version"]
    first = last_json(ok(orchard("infer", "--dataset", lake_dataset, "--model", version, "--json")))
    assert first["failed"] == 0 and first["table_version"] >= old_table  # versions count every dataset's commits
    # 10 more images (other seed: other bytes), uploaded and then predicted with no other command
    extra = synth(tmp_path / "more", fresh_seed(), per_class=4, test_per_class=0)
    files = sorted(extra.rglob("*.jpg"))
    for image in files[10:]:
        image.unlink()
    for image in files[:10]:  # new keys (synth names files 0_100.jpg, 1_100.jpg, ... in every tree)
        image.rename(image.with_name(f"extra-{image.name}"))
    ok(orchard("upload", str(extra), "--dataset", lake_dataset))
    second = last_json(ok(orchard("infer", "--dataset", lake_dataset, "--model", version, "--json")))
    total = CLASSES * (TRAIN_PER_CLASS + TEST_PER_CLASS) + 10
    assert second["images"] == total and second["failed"] == 0
    assert second["table_version"] > first["table_version"]  # the upload added the new images' rows
    es = es_client(stack)
    query = {"bool": {"filter": [{"term": {"dataset": lake_dataset}}, {"term": {"prediction.model_version": version}}]}}
    assert es.count(index=stack.images_index, query=query)["count"] == total
    # --as-of: training on the version before the new images sees the older train rows
    older = last_json(
        ok(orchard("train", "--dataset", lake_dataset, "--epochs", "1", "--as-of", str(old_table), "--json"))
    )
    assert older["trained_on_version"] == old_table
    assert older["train_images"] == CLASSES * TRAIN_PER_CLASS
    assert len(table_rows(spark, stack, lake_dataset, old_table)) == total - 10


PREDICTION_FIELDS = ("label", "confidence", "error", "predicted_at")


def as_compared(prediction, top5) -> tuple:
    """A prediction's compared fields, its top-5 as (label, confidence) pairs last."""
    return (*(prediction[f] for f in PREDICTION_FIELDS), [tuple(t) for t in top5])


def test_the_predictions_table_holds_what_the_documents_hold_and_a_rerun_adds_no_row(
    stack: Settings, spark, lake_dataset: str, trained: dict
):
    version = trained["version"]
    rerun = last_json(ok(orchard("infer", "--dataset", lake_dataset, "--model", version, "--json")))
    assert rerun["unchanged"] == rerun["images"] and rerun["failed"] == 0
    assert (rerun["lake"]["inserted"], rerun["lake"]["updated"]) == (0, 0)  # the earlier runs' rows stand
    table = spark.read.format("delta").load(stack.predictions_table_uri)
    mine = table.where((table.dataset == lake_dataset) & (table.model_version == version)).collect()
    rows = {r["id"]: as_compared(r, r["top5"]) for r in mine}
    by_version = {
        "bool": {"filter": [{"term": {"dataset": lake_dataset}}, {"term": {"prediction.model_version": version}}]}
    }
    hits = es_client(stack).search(
        index=stack.images_index, query=by_version, size=1000, source_includes=["prediction"]
    )["hits"]["hits"]
    docs = {
        h["_id"]: as_compared(p, [(t["label"], t["confidence"]) for t in p["top5"]])
        for h in hits
        for p in [h["_source"]["prediction"]]
    }
    assert len(mine) == len(rows) == rerun["images"]  # one row per image and version, no duplicate
    assert rows == docs  # field by field: the lake can rebuild the index


def upload_report(proc: subprocess.CompletedProcess) -> dict:
    """The JSON report an `orchard upload` wrote (its path is on the last line of stdout)."""
    import json

    return json.loads(Path(proc.stdout.strip().splitlines()[-1].removeprefix("report: ")).read_text())


def test_upload_brings_the_table_up_to_date_so_stages_and_syncs_find_nothing_to_do(
    stack: Settings, spark, tmp_path: Path
):
    from orchard.core.table_log import latest_version
    from orchard.spark_app.table import synced_snapshot

    name = f"it-lake-up-{secrets.token_hex(3)}"
    root = synth(tmp_path / "fruits", fresh_seed(), per_class=6, test_per_class=2)
    images = CLASSES * (6 + 2)
    try:
        first = upload_report(ok(orchard("upload", str(root), "--dataset", name)))
        assert first["table"]["inserted"] == images and first["table"]["error"] == "", first["table"]
        version = latest_version(stack)
        assert first["table"]["version"] == version
        assert table_rows(spark, stack, name) == object_ids(stack, name)  # same keys, same sha256
        # a stage reads this version as it is, and a sync finds every row it would make
        snapshot, rows = synced_snapshot(spark, stack, name)
        assert (snapshot.version, rows) == (version, images)
        synced = last_json(ok(orchard("lake", "sync", "--dataset", name, "--full", "--json")))
        assert (synced["added"], synced["updated"], synced["table_version"]) == (0, 0, version), synced
        # a re-run commits nothing; a file changed on disk replaces its row
        again = upload_report(ok(orchard("upload", str(root), "--dataset", name)))
        assert again["table"] == {**first["table"], "inserted": 0}
        assert latest_version(stack) == version
        changed = sorted(root.rglob("*.jpg"))[0]
        changed.write_bytes(sorted(root.rglob("*.jpg"))[-1].read_bytes() + b"\0")
        third = upload_report(ok(orchard("upload", str(root), "--dataset", name)))
        assert (third["table"]["inserted"], third["table"]["updated"]) == (0, 1), third["table"]
        assert table_rows(spark, stack, name) == object_ids(stack, name)
    finally:
        forget(spark, stack, name)


def put_copy(s: Settings, key: str, new_key: str) -> None:
    """Write the bytes of object `key` again, under `new_key` (may be `key` itself: a re-put)."""
    client = s3_client(s)
    response = client.get_object(s.images_bucket, key)
    try:
        data = response.read()
    finally:
        response.close()
        response.release_conn()
    client.put_object(s.images_bucket, new_key, io.BytesIO(data), len(data), content_type="image/jpeg")


def test_identical_bytes_are_predicted_once_and_a_same_bytes_reput_syncs_once(
    stack: Settings, spark, lake_dataset: str, trained: dict
):
    from orchard.core.table_log import latest_version, read_snapshot
    from orchard.spark_app.table import synced_marks, synced_snapshot

    version = trained["version"]
    key = sorted(table_rows(spark, stack, lake_dataset))[0]
    put_copy(stack, key, key.rsplit("/", 1)[0] + "/copy of the first.jpg")  # same bytes, second key
    copied = last_json(ok(orchard("infer", "--dataset", lake_dataset, "--model", version, "--json")))
    rows = table_rows(spark, stack, lake_dataset)
    assert len(rows) == len(object_ids(stack, lake_dataset))  # one row per object, the copy too
    assert copied["images"] == len(set(rows.values())) == len(rows) - 1  # each distinct image once
    assert copied["failed"] == 0
    # the same bytes put again: a newer object than any row, but nothing for a sync to do
    put_copy(stack, key, key)
    before = latest_version(stack)
    marked = synced_snapshot(spark, stack, lake_dataset)[0].version  # syncs (no rows change), records why
    assert marked == before + 1 == latest_version(stack)  # one metadata-only commit
    assert synced_marks(read_snapshot(stack))[lake_dataset] > copied["predicted_at"]
    again, known_rows = synced_snapshot(spark, stack, lake_dataset)  # no sync now
    assert (again.version, known_rows) == (marked, len(rows))
    assert latest_version(stack) == marked
