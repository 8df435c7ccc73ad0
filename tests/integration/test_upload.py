"""`orchard upload` on the real stack: disk == MinIO == Elasticsearch, idempotence, resumption,
bad input, and a 1 GiB multipart upload in bounded memory.

Every test uses its own dataset name and a random synthesis seed (document ids are content
hashes, shared by the whole stack), and deletes its objects and documents afterwards.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from elasticsearch.helpers import bulk
from orchard_cli import peak_rss
from PIL import Image

from orchard.app.cli import main
from orchard.core.clients import es_client, s3_client
from orchard.core.objects import remove_prefix
from orchard.core.settings import Settings
from orchard.core.table_write import delete_rows
from orchard.uploader.synth import class_specs, encode_jpeg, image_rng, render, synthesize

pytestmark = pytest.mark.integration
log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
SPLITS = {"Training": "train", "Test": "test"}
RSS_LIMIT = 300 * 1000 * 1000


@dataclass(frozen=True)
class StoredObject:
    sha256: str | None
    size: int
    etag: str
    last_modified: object


class Lake:
    """Read-only views of one dataset in MinIO and Elasticsearch, plus cleanup."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.s3 = s3_client(settings)
        self.es = es_client(settings)
        self.bucket = settings.images_bucket
        self.index = settings.images_index
        self.datasets: list[str] = []

    def new_dataset(self) -> str:
        name = f"t-{uuid.uuid4().hex[:10]}"
        self.datasets.append(name)
        return name

    def objects(self, dataset: str) -> dict[str, StoredObject]:
        """key -> object under `<dataset>/`, with the sha256 user metadata."""
        found = {}
        for obj in self.s3.list_objects(self.bucket, prefix=f"{dataset}/", recursive=True, include_user_meta=True):
            meta = {k.lower(): v for k, v in (obj.metadata or {}).items()}
            found[obj.object_name] = StoredObject(meta.get("x-amz-meta-sha256"), obj.size, obj.etag, obj.last_modified)
        return found

    def settled_objects(self, dataset: str, quiet: float = 2.0, timeout: float = 60.0) -> dict[str, StoredObject]:
        """`objects(dataset)` once the listing has not changed for `quiet` seconds (writes still in flight
        from a killed client land, or are rolled back, first)."""
        deadline = time.monotonic() + timeout
        last = self.objects(dataset)
        while time.monotonic() < deadline:
            time.sleep(quiet)
            now = self.objects(dataset)
            if now == last:
                return now
            last = now
        raise AssertionError(f"the objects of {dataset} still changed after {timeout:.0f} s")

    def object_bytes(self, key: str) -> bytes:
        response = self.s3.get_object(self.bucket, key)
        try:
            return response.read()
        finally:
            response.close()
            response.release_conn()

    def docs(self, dataset: str) -> dict[str, dict]:
        """key -> hit (with _id, _seq_no and _source) of every document of `dataset`."""
        self.es.indices.refresh(index=self.index)
        response = self.es.search(
            index=self.index, query={"term": {"dataset": dataset}}, size=10_000, seq_no_primary_term=True
        )
        hits = response["hits"]["hits"]
        assert response["hits"]["total"]["value"] == len(hits)
        return {hit["_source"]["key"]: hit for hit in hits}

    def table_ids(self, dataset: str) -> dict[str, str]:
        """key -> id of the dataset's rows in the images table (read with delta-rs)."""
        from orchard.core.table_log import open_table

        rows = open_table(self.settings, None).to_pyarrow_table(
            filters=[("dataset", "=", dataset)], columns=["key", "id"]
        )
        return dict(zip(rows.column("key").to_pylist(), rows.column("id").to_pylist(), strict=True))

    def remove(self, dataset: str) -> None:
        # MinIO refuses deletes with SlowDown while it is short of write quorum: retried as any S3 write
        remove_prefix(self.s3, self.bucket, f"{dataset}/")
        delete_rows(self.settings, dataset)
        # by id: the integ-test distribution of Elasticsearch has no _delete_by_query (reindex module)
        actions = [
            {"_op_type": "delete", "_index": self.index, "_id": hit["_id"]} for hit in self.docs(dataset).values()
        ]
        bulk(self.es, actions, refresh=True)


@pytest.fixture
def lake(stack: Settings):
    view = Lake(stack)
    yield view
    for dataset in view.datasets:
        view.remove(dataset)


def random_seed() -> int:
    return uuid.uuid4().int % 2**31


def file_sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def expected_from_synth(root: Path, dataset: str) -> dict[str, Path]:
    """key -> file, derived independently of the uploader from the synthetic layout."""
    keys = {}
    for path in root.rglob("*.jpg"):
        split_dir, class_name = path.relative_to(root).parts[:2]
        keys[f"{dataset}/{SPLITS[split_dir]}/{class_name.lower().replace(' ', '_')}/{path.name}"] = path
    return keys


def assert_lake_matches(lake: Lake, dataset: str, expected: dict[str, Path], bucket: str) -> None:
    """Objects and documents are exactly the expected files, with matching content hashes."""
    objects, docs = lake.objects(dataset), lake.docs(dataset)
    assert set(objects) == set(expected), set(objects) ^ set(expected)
    assert set(docs) == set(expected), set(docs) ^ set(expected)
    for key, path in expected.items():
        sha = file_sha(path)
        assert objects[key].sha256 == sha and objects[key].size == path.stat().st_size, key
        assert hashlib.sha256(lake.object_bytes(key)).hexdigest() == sha, key
        doc = docs[key]["_source"]
        assert docs[key]["_id"] == doc["id"] == doc["sha256"] == sha, key
        split, label = key.split("/")[1:3]
        assert (doc["dataset"], doc["split"], doc["label"], doc["label_text"]) == (
            dataset,
            split,
            label,
            path.parent.name,
        )
        assert (doc["bucket"], doc["uri"], doc["bytes"]) == (bucket, f"s3a://{bucket}/{key}", path.stat().st_size)
        assert (doc["format"], doc["width"], doc["height"], doc["channels"], doc["color_mode"]) == (
            "jpeg",
            100,
            100,
            3,
            "RGB",
        )
        assert doc["source_path"] == str(path) and doc["etag"] == objects[key].etag and doc["uploaded_at"]
        assert "embedding" not in doc  # only `orchard features` writes embeddings
        # A prediction may be there already: the stack's `serve` predicts new uploads (auto-enrichment).
        assert doc.get("prediction") is None or doc["prediction"]["model_version"]


def upload(*args: str) -> int:
    """`orchard -q upload ...` in this process."""
    return main(["-q", "upload", *args])


def read_report(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def cli_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "orchard", "-q", *args]


def cli_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def test_upload_matches_disk_and_a_second_run_writes_nothing(lake: Lake, tmp_path: Path) -> None:
    dataset = lake.new_dataset()
    root = tmp_path / "fruits"
    synthesize(root, classes=4, per_class=12, test_per_class=4, seed=random_seed())
    expected = expected_from_synth(root, dataset)
    assert len(expected) == 64

    assert upload(str(root), "--dataset", dataset, "--report", str(tmp_path / "first.json")) == 0
    first = read_report(tmp_path / "first.json")
    assert first["counts"] == {"uploaded": 64, "present": 0, "skipped": 0, "failed": 0, "ignored": 0}
    assert_lake_matches(lake, dataset, expected, lake.bucket)
    objects_before, docs_before = lake.objects(dataset), lake.docs(dataset)

    assert upload(str(root), "--dataset", dataset, "--report", str(tmp_path / "second.json")) == 0
    second = read_report(tmp_path / "second.json")
    assert second["counts"] == {"uploaded": 0, "present": 64, "skipped": 0, "failed": 0, "ignored": 0}
    assert second["bytes_uploaded"] == 0
    assert lake.objects(dataset) == objects_before  # same etag and Last-Modified: nothing re-uploaded
    assert_not_rewritten(docs_before, lake.docs(dataset))


def assert_not_rewritten(before: dict[str, dict], after: dict[str, dict]) -> None:
    """No document was rewritten between the two snapshots (same _seq_no, same source), except where
    the stack's `serve` filled in a missing prediction meanwhile (auto-enrichment, asynchronous)."""
    assert after.keys() == before.keys()
    for key, hit in after.items():
        old, new = dict(before[key]["_source"]), dict(hit["_source"])
        if hit["_seq_no"] != before[key]["_seq_no"]:
            assert old.get("prediction") is None and new.get("prediction"), f"{key} rewritten"
            new.pop("prediction")
        assert new == old, key


def test_a_killed_run_resumes_to_the_same_state(lake: Lake, tmp_path: Path) -> None:
    dataset = lake.new_dataset()
    root = tmp_path / "fruits"
    synthesize(root, classes=6, per_class=40, test_per_class=0, seed=random_seed())
    expected = expected_from_synth(root, dataset)
    command = cli_command(
        "upload",
        str(root),
        "--dataset",
        dataset,
        "--workers",
        "2",
        "--batch-size",
        "8",
        "--report",
        str(tmp_path / "killed.json"),
    )
    with open(tmp_path / "killed.log", "wb") as out:
        process = subprocess.Popen(command, env=cli_env(), stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 120
            while len(lake.objects(dataset)) < 24 and process.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            process.send_signal(signal.SIGKILL)
            process.wait()
    assert process.returncode == -signal.SIGKILL, (tmp_path / "killed.log").read_text()
    at_kill = lake.settled_objects(dataset)
    assert 0 < len(at_kill) < len(expected), "the run must be killed half-way"
    docs_at_kill = lake.docs(dataset)
    assert set(lake.table_ids(dataset)) <= set(at_kill)  # never a row for an object not stored

    status = upload(str(root), "--dataset", dataset, "--report", str(tmp_path / "resumed.json"))
    resumed = read_report(tmp_path / "resumed.json")
    assert status == 0, resumed["failures"]
    counts = resumed["counts"]
    assert counts["failed"] == counts["skipped"] == 0
    assert counts["uploaded"] + counts["present"] == len(expected), counts
    # objects with documents were left alone (>=: a request in flight at the kill may still land)
    assert counts["present"] >= len(docs_at_kill) and counts["uploaded"] > 0, (counts, len(docs_at_kill))
    assert_lake_matches(lake, dataset, expected, lake.bucket)
    after = lake.objects(dataset)
    rewritten = {key: (obj, after[key]) for key, obj in at_kill.items() if after[key] != obj}
    assert not rewritten, rewritten  # stored before the kill: not re-uploaded
    # nothing stored before the kill was sent again
    assert resumed["bytes_uploaded"] <= sum(expected[k].stat().st_size for k in set(expected) - set(at_kill))
    # and the table has a row per object, with its bytes' sha256 (those stored before the kill too)
    assert lake.table_ids(dataset) == {key: doc["_source"]["sha256"] for key, doc in lake.docs(dataset).items()}
    assert resumed["table"]["error"] == "" and resumed["table"]["inserted"] > 0


def fruit_jpeg(seed: int, index: int) -> bytes:
    spec = class_specs(3, seed)[index % 3]
    return encode_jpeg(render(spec, image_rng(seed, index % 3, "train", index)))


def png_of(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def build_bad_corpus(root: Path, seed: int) -> tuple[dict[str, bytes], dict[str, str], dict[str, str]]:
    """A tree mixing good and bad files; returns (good name -> bytes, failed name -> code, skipped name -> code)."""
    kiwi = root / "Kiwi"
    (kiwi / "deeper").mkdir(parents=True)
    good = {f"good_{i}.jpg": fruit_jpeg(seed, i) for i in range(3)}
    good["with space.jpg"] = fruit_jpeg(seed, 3)
    good["ünïcødé фрукт.jpg"] = fruit_jpeg(seed, 4)
    for name, data in good.items():
        (kiwi / name).write_bytes(data)
    broken_png = bytearray(png_of(Image.open(io.BytesIO(fruit_jpeg(seed, 5)))))
    broken_png[len(broken_png) // 2] ^= 0xFF
    bad = {
        "truncated.jpg": fruit_jpeg(seed, 6)[:1500],
        "empty.jpg": b"",
        "notes.jpg": b"meeting notes, saved with the wrong suffix\n" * 30,
        "corrupt.png": bytes(broken_png),
        "bomb.png": png_of(Image.new("L", (2000, 1000))),
        "locked.jpg": fruit_jpeg(seed, 7),
    }
    for name, data in bad.items():
        (kiwi / name).write_bytes(data)
    (kiwi / "locked.jpg").chmod(0)
    (kiwi / "deeper" / "nested.jpg").write_bytes(fruit_jpeg(seed, 8))
    (root / "loose.jpg").write_bytes(fruit_jpeg(seed, 9))
    (kiwi / "zzz-duplicate.jpg").write_bytes(good["good_0.jpg"])
    (kiwi / "link.jpg").symlink_to(kiwi / "good_1.jpg")
    (kiwi / "readme.txt").write_text("not a candidate\n")
    failed = {
        "truncated.jpg": "truncated",
        "empty.jpg": "empty",
        "notes.jpg": "not_image",
        "corrupt.png": "corrupt",
        "bomb.png": "decompression_bomb",
        "locked.jpg": "unreadable",
        "nested.jpg": "nested",
        "loose.jpg": "no_label",
    }
    skipped = {"zzz-duplicate.jpg": "duplicate", "link.jpg": "symlink"}
    return good, failed, skipped


def without_file_permission_override() -> list[str]:
    """A command prefix under which root cannot read a mode-000 file (as for any other user)."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    assert setpriv, "setpriv (util-linux) is needed to test unreadable files as root"
    caps = "-dac_override,-dac_read_search"
    return [setpriv, f"--bounding-set={caps}", f"--inh-caps={caps}"]


def test_bad_input_gets_exactly_the_expected_reasons(lake: Lake, tmp_path: Path) -> None:
    dataset = lake.new_dataset()
    root = tmp_path / "corpus"
    good, failed, skipped = build_bad_corpus(root, random_seed())
    report_path = tmp_path / "bad.json"
    command = [
        *without_file_permission_override(),
        *cli_command(
            "upload", str(root), "--dataset", dataset, "--max-pixels", "1000000", "--report", str(report_path)
        ),
    ]
    run = subprocess.run(command, env=cli_env(), capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 1, run.stderr

    report = read_report(report_path)
    assert report["counts"] == {
        "uploaded": len(good),
        "present": 0,
        "skipped": len(skipped),
        "failed": len(failed),
        "ignored": 1,
    }
    assert {Path(f["path"]).name: f["code"] for f in report["failures"]} == failed
    assert {Path(s["path"]).name: s["code"] for s in report["skipped"]} == skipped
    for problem in report["failures"] + report["skipped"]:
        assert "\n" not in problem["reason"]
        assert f"{problem['path']}: {problem['reason']}" in run.stderr  # one log line naming the file
    duplicate = next(s for s in report["skipped"] if s["code"] == "duplicate")
    assert duplicate["reason"] == f"duplicate content of {root / 'Kiwi' / 'good_0.jpg'}"

    keys = {f"{dataset}/train/kiwi/{name}": data for name, data in good.items()}
    objects, docs = lake.objects(dataset), lake.docs(dataset)
    assert set(objects) == set(keys) == set(docs)
    for key, data in keys.items():
        assert lake.object_bytes(key) == data
        assert docs[key]["_id"] == hashlib.sha256(data).hexdigest()


def test_strict_stops_at_the_first_failure_before_writing(lake: Lake, tmp_path: Path) -> None:
    dataset = lake.new_dataset()
    root = tmp_path / "strict"
    (root / "Kiwi").mkdir(parents=True)
    seed = random_seed()
    for index in range(4):
        (root / "Kiwi" / f"{index}.jpg").write_bytes(fruit_jpeg(seed, index))
    (root / "Kiwi" / "2.jpg").write_bytes(b"")
    assert upload(str(root), "--dataset", dataset, "--strict", "--report", str(tmp_path / "s.json")) == 1
    report = read_report(tmp_path / "s.json")
    assert report["stopped_early"] is True
    assert report["counts"]["failed"] == 1 and report["counts"]["uploaded"] == 0
    assert [f["code"] for f in report["failures"]] == ["empty"]
    assert lake.objects(dataset) == {} and lake.docs(dataset) == {}
    # without --strict the good files go through
    assert upload(str(root), "--dataset", dataset, "--report", str(tmp_path / "s2.json")) == 1
    assert read_report(tmp_path / "s2.json")["counts"]["uploaded"] == 3
    assert len(lake.objects(dataset)) == 3


def test_npy_stack_with_labels_becomes_one_object_per_image(lake: Lake, tmp_path: Path) -> None:
    dataset = lake.new_dataset()
    rng = np.random.default_rng(random_seed())
    stack = rng.integers(0, 255, (6, 12, 10, 3), dtype=np.uint8)
    np.save(tmp_path / "tiles.npy", stack)
    names = ["Sea Lake", "Forest", "Sea Lake", "River", "Forest", "Forest"]
    (tmp_path / "labels.txt").write_text("\n".join(names) + "\n", encoding="utf-8")
    assert (
        upload(
            str(tmp_path / "tiles.npy"),
            "--labels",
            str(tmp_path / "labels.txt"),
            "--dataset",
            dataset,
            "--split",
            "test",
            "--report",
            str(tmp_path / "npy.json"),
        )
        == 0
    )
    docs = lake.docs(dataset)
    assert len(docs) == len(lake.objects(dataset)) == 6
    for row, name in enumerate(names):
        key = f"{dataset}/test/{name.lower().replace(' ', '_')}/tiles_{row:06d}.npy"
        array = np.load(io.BytesIO(lake.object_bytes(key)), allow_pickle=False)
        assert np.array_equal(array, stack[row])
        doc = docs[key]["_source"]
        assert (doc["label_text"], doc["format"], doc["width"], doc["height"], doc["channels"]) == (
            name,
            "npy",
            10,
            12,
            3,
        )
        assert doc["source_path"] == f"{tmp_path / 'tiles.npy'}[{row}]"


def write_large_npy(path: Path, shape: tuple[int, ...], dtype: str) -> str:
    """Write an .npy in 64 MiB chunks (never held in memory); returns its sha256."""
    digest = hashlib.sha256()
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": np.dtype(dtype).str, "fortran_order": False, "shape": shape})
    chunk = np.random.default_rng(random_seed()).integers(0, 255, 64 << 20, dtype=np.uint8).tobytes()
    remaining = int(np.prod(shape)) * np.dtype(dtype).itemsize
    with path.open("wb") as fh:
        for data in [header.getvalue()]:
            fh.write(data)
            digest.update(data)
        while remaining:
            data = chunk[: min(len(chunk), remaining)]
            fh.write(data)
            digest.update(data)
            remaining -= len(data)
    return digest.hexdigest()


def run_with_peak_rss(command: list[str], log_path: Path) -> tuple[int, int]:
    """Run `command`; returns (exit status, its peak RSS in bytes).

    Polls /proc VmHWM (a high-water mark, so sampling misses nothing but the last few ms).
    Not getrusage: a child forked from this big pytest process starts with the parent's
    high-water mark in ru_maxrss, which would measure pytest rather than the uploader.
    """
    peak = 0
    with log_path.open("wb") as out:
        process = subprocess.Popen(command, env=cli_env(), stdout=out, stderr=subprocess.STDOUT)
        while process.poll() is None:  # Popen returns after exec, so this is the uploader's own mm
            peak = max(peak, peak_rss(process.pid))
            time.sleep(0.02)
    return process.returncode, peak


def test_a_1gib_file_goes_multipart_with_bounded_memory(lake: Lake, tmp_path: Path) -> None:
    dataset = lake.new_dataset()
    big = tmp_path / "scenes" / "Farmland" / "scene.npy"
    big.parent.mkdir(parents=True)
    sha = write_large_npy(big, (8192, 8192, 8), "<u2")  # a 1 GiB 8-band satellite scene
    size = big.stat().st_size
    assert size >= 1 << 30
    started = time.monotonic()
    try:
        returncode, peak = run_with_peak_rss(
            cli_command(
                "upload", str(tmp_path / "scenes"), "--dataset", dataset, "--report", str(tmp_path / "big.json")
            ),
            tmp_path / "big.log",
        )
    finally:
        big.unlink()  # pytest keeps the temp dirs of recent sessions: do not leave 1 GiB behind
    log.info("1 GiB upload: %.1f s, peak RSS %.1f MB", time.monotonic() - started, peak / 1e6)
    print(f"\n1 GiB upload: {time.monotonic() - started:.1f} s, peak RSS {peak / 1e6:.1f} MB", file=sys.stderr)
    assert returncode == 0, (tmp_path / "big.log").read_text()
    assert 20e6 < peak < RSS_LIMIT, f"peak RSS {peak / 1e6:.0f} MB"

    key = f"{dataset}/train/farmland/scene.npy"
    stored = lake.objects(dataset)
    assert set(stored) == {key}
    assert stored[key].size == size and stored[key].sha256 == sha
    assert "-" in stored[key].etag.strip('"'), "a multipart upload has an etag of the form <md5>-<parts>"
    doc = lake.docs(dataset)[key]
    assert doc["_id"] == sha
    source = doc["_source"]
    assert (
        source["format"],
        source["width"],
        source["height"],
        source["channels"],
        source["color_mode"],
        source["bytes"],
    ) == ("npy", 8192, 8192, 8, "8xuint16", size)


def test_a_changed_file_replaces_its_object_and_document(lake: Lake, tmp_path: Path) -> None:
    dataset = lake.new_dataset()
    root = tmp_path / "changing"
    (root / "Kiwi").mkdir(parents=True)
    seed = random_seed()
    path = root / "Kiwi" / "a.jpg"
    path.write_bytes(fruit_jpeg(seed, 0))
    (root / "Kiwi" / "b.jpg").write_bytes(fruit_jpeg(seed, 1))
    assert upload(str(root), "--dataset", dataset, "--report", str(tmp_path / "1.json")) == 0
    old_sha = file_sha(path)
    path.write_bytes(fruit_jpeg(seed, 2))  # same name, new content
    assert upload(str(root), "--dataset", dataset, "--report", str(tmp_path / "2.json")) == 0
    assert read_report(tmp_path / "2.json")["counts"] == {
        "uploaded": 1,
        "present": 1,
        "skipped": 0,
        "failed": 0,
        "ignored": 0,
    }
    key = f"{dataset}/train/kiwi/a.jpg"
    assert lake.objects(dataset)[key].sha256 == file_sha(path) != old_sha
    docs = lake.docs(dataset)
    assert len(docs) == 2 and docs[key]["_id"] == file_sha(path)  # the stale document is gone
