"""The bag-of-visual-words family on the real native stack: `orchard train --family bovw` (OpenCV
descriptors in the executors, Spark ML KMeans / IDF / PCA / perceptron), then `orchard infer` and
`orchard features` with the version, like any CNN version.

Data: 5 classes x 30 train + 10 test synthetic 100x100 JPEGs (a random synth seed per run) plus one
flat image per split (a random size and grey level, so its id is this run's own): flat images have
no keypoints. Some seeds also make a synthetic image too smooth for SIFT at the BoVW input size, so
the images without keypoints are found locally first, with the product's own decoding and
descriptor on the files (`keypointless`), and the Spark stages must flag exactly those. A second
dataset with 4x the train images checks the driver's memory.
Accuracy threshold asserted: test accuracy >= 3 x chance (0.60 with 5 classes); SIFT with 256 words
reached 0.88 on this data when written. The Keras form of the fitted pipeline (the registered
version) must agree with Spark ML's own test accuracy to within one test image.
"""

from __future__ import annotations

import re
import secrets
import subprocess
import threading
from pathlib import Path

import psutil
import pytest
from lake_datasets import Dataset, clean_up, count, docs_of, synth
from orchard_cli import ORCHARD, last_json, ok, orchard, peak_rss
from PIL import Image

from orchard.core.clients import es_client, s3_client
from orchard.core.errors import UnusableImage
from orchard.core.settings import Settings
from orchard.spark_app import bovw, descriptors
from orchard.spark_app.images import decode_image

pytestmark = pytest.mark.integration

CLASSES, TRAIN_PER_CLASS, TEST_PER_CLASS, LARGE_FACTOR = 5, 30, 10, 4
ACCURACY_FACTOR = 3.0  # x chance
MAX_RESULT = "16m"  # spark.driver.maxResultSize for the memory runs: a collect of descriptors would exceed it
RSS_GROWTH = 1.15  # driver peak RSS, large / small, at most (4x the images and descriptors)


def flat_image(path: Path) -> Path:
    """A uniform PNG of a random size and grey level (no keypoints; content unique to this run)."""
    level, extra = secrets.randbelow(200) + 20, secrets.randbelow(50)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (100 + extra, 100), (level, level, level)).save(path)
    return path


def uploaded(stack: Settings, root: Path, name: str) -> Dataset:
    """Upload `root` as dataset `name`; the Dataset record for clean-up."""
    ok(orchard("upload", str(root), "--dataset", name))
    return Dataset(name, stack, corrupt_key="")


FLATS = ("Training/Lime/flat.png", "Test/Lime/flat.png")  # below the dataset tree


def keypointless(root: Path) -> dict[str, set[str]]:
    """Per split folder of a dataset tree (Training, Test): the files in which SIFT finds no
    keypoint as the BoVW stages see them (the product's decoding at the BoVW input size, then its
    descriptor), computed locally."""
    found: dict[str, set[str]] = {"Training": set(), "Test": set()}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        try:
            descriptors.model_input(decode_image(path.read_bytes(), bovw.IMAGE_SIZE), "sift", 50)
        except UnusableImage:
            relative = path.relative_to(root).as_posix()
            found[relative.split("/")[0]].add(relative)
    return found


def count_of(found: dict[str, set[str]]) -> int:
    """How many images `keypointless` found, both splits."""
    return sum(map(len, found.values()))


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """The small dataset's local tree: synthetic images and one flat image per split."""
    root = tmp_path_factory.mktemp("bovw") / "fruits"
    synth(root, CLASSES, TRAIN_PER_CLASS, TEST_PER_CLASS, secrets.randbits(24))
    for flat in FLATS:
        flat_image(root / flat)
    return root


@pytest.fixture(scope="module")
def without_keypoints(tree: Path) -> dict[str, set[str]]:
    found = keypointless(tree)
    assert set(FLATS) <= found["Training"] | found["Test"], found  # the descriptor sees flat images as such
    print(f"images without SIFT keypoints: {found}")
    return found


@pytest.fixture(scope="module")
def dataset(stack: Settings, tree: Path):
    ds = uploaded(stack, tree, f"it-bovw-{secrets.token_hex(3)}")
    try:
        yield ds
    finally:
        clean_up(ds)


@pytest.fixture(scope="module")
def large(stack: Settings, tmp_path_factory):
    """(the large dataset, its train images with keypoints: what training must use)."""
    token = secrets.token_hex(3)
    per_class = TRAIN_PER_CLASS * LARGE_FACTOR
    root = synth(tmp_path_factory.mktemp("bovw-large") / "fruits", CLASSES, per_class, TEST_PER_CLASS, int(token, 16))
    trainable = CLASSES * per_class - len(keypointless(root)["Training"])
    ds = uploaded(stack, root, f"it-bovw-large-{token}")
    try:
        yield ds, trainable
    finally:
        clean_up(ds)


def driver_peak_mb(process: subprocess.Popen) -> float:
    """Peak RSS (MB) of the driver: the CLI's Python process plus its JVM, sampled until it exits
    (each one's VmHWM high-water mark, so sampling misses nothing but the last moments)."""
    peaks: dict[int, int] = {}
    while process.poll() is None:
        try:
            family = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
            for p in family:
                if p.pid == process.pid or "java" in p.name():
                    peaks[p.pid] = max(peaks.get(p.pid, 0), peak_rss(p.pid))
        except psutil.Error:
            pass
        threading.Event().wait(0.2)
    return sum(peaks.values()) / 2**20


def train_bovw(ds: Dataset, *flags: str) -> tuple[dict, str, float]:
    """(summary, stderr, driver peak RSS MB) of `orchard train --family bovw` on a dataset."""
    command = [str(ORCHARD), "train", "--dataset", ds.name, "--family", "bovw", "--json", *flags]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out: dict[str, str] = {}
    reader = threading.Thread(target=lambda: out.update(zip(("stdout", "stderr"), process.communicate(), strict=True)))
    reader.start()
    peak = driver_peak_mb(process)
    reader.join(timeout=1500)
    proc = subprocess.CompletedProcess(command, process.returncode, out["stdout"], out["stderr"])
    summary = last_json(ok(proc))
    ds.versions.append(summary["version"])
    return summary, out["stderr"], peak


@pytest.fixture(scope="module")
def trained(dataset: Dataset) -> dict:
    summary, log, peak = train_bovw(dataset, "--conf", f"spark.driver.maxResultSize={MAX_RESULT}")
    doc = es_client(dataset.settings).get(index=dataset.settings.models_index, id=summary["version"])["_source"]
    return {"summary": summary, "doc": doc, "log": log, "peak_mb": peak}


def test_bovw_reaches_accuracy_well_above_chance_and_agrees_with_spark_ml(
    dataset: Dataset, trained: dict, without_keypoints: dict[str, set[str]]
):
    doc, facts = trained["doc"], trained["doc"]["bovw"]
    chance = 1 / CLASSES
    print(
        f"bovw test accuracy {doc['metrics']['test_accuracy']:.3f} (Spark ML {facts['spark_test_accuracy']:.3f}, "
        f"chance {chance:.2f}, threshold {ACCURACY_FACTOR * chance:.2f}), {doc['training_seconds']} s"
    )
    assert doc["metrics"]["test_accuracy"] >= ACCURACY_FACTOR * chance
    # the registered Keras form computes what the fitted Spark ML pipeline computes
    assert abs(doc["metrics"]["test_accuracy"] - facts["spark_test_accuracy"]) <= 1 / doc["test_images"] + 1e-9
    assert re.fullmatch(r"bovw-\d{14}-[0-9a-f]{8}", trained["summary"]["version"])
    assert doc["family"] == "bovw" and doc["num_classes"] == CLASSES
    assert (facts["descriptor"], facts["words"], facts["keypoints"]) == ("sift", 256, 50)
    assert facts["descriptors_sampled"] >= facts["words"]
    # images without keypoints (the flat ones, and any found locally): counted, not trained or evaluated on
    synthetic = {split: len(found - set(FLATS)) for split, found in without_keypoints.items()}
    assert facts["images_without_keypoints"] == count_of(without_keypoints)
    assert doc["train_images"] == CLASSES * TRAIN_PER_CLASS - synthetic["Training"]
    assert doc["test_images"] == CLASSES * TEST_PER_CLASS - synthetic["Test"]
    assert "learning 256 visual words" in trained["log"]
    # the version's files: Keras model, card, and the fitted Spark ML pipeline beside them
    version = trained["summary"]["version"]
    names = {o.object_name for o in s3_client(dataset.settings).list_objects("models", f"{version}/", recursive=True)}
    assert {f"{version}/model.keras", f"{version}/labels.json"} <= names
    assert any(n.startswith(f"{version}/spark_pipeline/stages/") for n in names)


def test_infer_with_a_bovw_version_predicts_and_flags_images_without_keypoints(
    dataset: Dataset, trained: dict, without_keypoints: dict[str, set[str]]
):
    version = trained["summary"]["version"]
    first = last_json(ok(orchard("infer", "--dataset", dataset.name, "--model", version, "--json")))
    total = CLASSES * (TRAIN_PER_CLASS + TEST_PER_CLASS) + len(FLATS)
    flagged = count_of(without_keypoints)
    assert (first["images"], first["failed"], first["errors"]) == (total, 0, flagged)
    flats = docs_of(dataset, **{"prediction.model_version": version, "key": f"{dataset.name}/test/lime/flat.png"})
    assert len(flats) == 1
    prediction = flats[0]["_source"]["prediction"]
    assert prediction["label"] is None and "no sift keypoints" in prediction["error"]
    assert count(dataset, {"term": {"prediction.model_family": "bovw"}}) == total
    assert count(dataset, {"exists": {"field": "prediction.label"}}) == total - flagged
    # idempotent: a second run changes no document
    again = last_json(ok(orchard("infer", "--dataset", dataset.name, "--model", version, "--json")))
    assert (again["updated"], again["unchanged"], again["failed"]) == (0, total, 0)
    # the registry records the inference rate, which `orchard models list` and the report show
    listed = last_json(ok(orchard("models", "list", "--dataset", dataset.name, "--json")))
    row = next(r for r in listed if r["version"] == version)
    assert row["family"] == "bovw" and row["images_per_second"] > 0


def test_features_with_a_bovw_version_feed_knn_search(
    dataset: Dataset, trained: dict, without_keypoints: dict[str, set[str]]
):
    version = trained["summary"]["version"]
    summary = last_json(ok(orchard("features", "--dataset", dataset.name, "--model", version, "--json")))
    embedded = CLASSES * (TRAIN_PER_CLASS + TEST_PER_CLASS) + len(FLATS) - count_of(without_keypoints)
    assert summary["dims"] == 128 and summary["images"] == embedded
    key = docs_of(dataset, split="test", label="banana")[0]["_source"]["key"]
    hits = last_json(ok(orchard("search", "--dataset", dataset.name, "--similar", key, "--k", "5", "--json")))
    assert len(hits) == 5


def test_driver_memory_stays_flat_while_descriptors_grow(large: tuple[Dataset, int], trained: dict):
    dataset, trainable = large
    summary, _, peak = train_bovw(dataset, "--conf", f"spark.driver.maxResultSize={MAX_RESULT}")
    small_facts = trained["doc"]["bovw"]
    print(
        f"driver peak RSS: {trained['peak_mb']:.0f} MB with {small_facts['descriptors_sampled']} descriptors sampled, "
        f"{peak:.0f} MB with {summary['bovw']['descriptors_sampled']} ({summary['train_images']} train images)"
    )
    assert summary["train_images"] == trainable
    assert summary["bovw"]["descriptors_sampled"] >= 3 * small_facts["descriptors_sampled"]
    assert peak <= RSS_GROWTH * trained["peak_mb"]
