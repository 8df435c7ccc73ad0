"""`orchard demo` end to end on the real stack (a tiny dataset), then its report checked two ways:

- every count and accuracy the HTML shows equals what Elasticsearch holds, counted here with
  independent queries (count API per class/split/prediction, not the report's aggregations);
- the page rendered by headless Chromium: every <img> decoded (naturalWidth > 0) and the plots and
  thumbnails visible in the screenshot (not blank: high pixel variance in their boxes).

The dataset has its own name and a random synthesis seed (document ids are content hashes shared by
the stack) and is deleted afterwards, with its model versions and features. About 4-6 minutes on
2 cores, almost all of it Spark (train, infer, features).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import uuid
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from elasticsearch.helpers import bulk
from PIL import Image

from orchard.core.clients import es_client, s3_client
from orchard.core.objects import remove_prefix
from orchard.core.settings import Settings
from orchard.core.table_write import delete_rows

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SCREENSHOT_DIR = REPO / "out" / "test-report"
CLASSES, PER_CLASS, TEST_PER_CLASS, EPOCHS = 3, 12, 6, 2
WIDTH = 1400
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--force-device-scale-factor=1",
]

# Appended to a copy of the page: after load, record on <body> whether every image decoded and where
# the plots and thumbnails are, so the screenshot can be checked box by box.
PROBE = """<script>
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var boxes = imgs.map(function (i) { var r = i.getBoundingClientRect();
    return {id: i.id || '', cls: i.className || '', alt: i.alt, x: r.left + window.scrollX,
            y: r.top + window.scrollY, w: r.width, h: r.height, nw: i.naturalWidth,
            ok: i.complete && i.naturalWidth > 0}; });
  document.body.setAttribute('data-probe',
    JSON.stringify({height: document.documentElement.scrollHeight, images: boxes}));
});
</script>"""


class Cells(HTMLParser):
    """Collects data-count cells, data-metric values and per-class accuracy rows of the report."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[str, str] = {}
        self.metrics: dict[str, str] = {}
        self.classes: dict[str, tuple[int, int]] = {}
        self._open: str | None = None

    def handle_starttag(self, tag, attrs) -> None:
        a = dict(attrs)
        if "data-count" in a:
            self._open = a["data-count"]
        if "data-metric" in a:
            self.metrics[a["data-metric"]] = a.get("data-value", "")
        if "data-class" in a:
            self.classes[a["data-class"]] = (int(a["data-correct"]), int(a["data-total"]))

    def handle_data(self, data) -> None:
        if self._open is not None:
            self.counts[self._open] = data.strip().replace(",", "")
            self._open = None


def chromium() -> str:
    """The Chromium binary (deps/install.sh installs it)."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.fail("Chromium is not installed: run `make deps` (apt-get install chromium)")


def run_chromium(*args: str) -> subprocess.CompletedProcess:
    """Chromium headless with a throw-away profile."""
    with tempfile.TemporaryDirectory(prefix="orchard-chromium-") as profile:
        return subprocess.run(
            [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )


def delete_ids(es, index: str, query: dict) -> list[dict]:
    """Delete the matching documents by id (the minimal Elasticsearch has no _delete_by_query);
    returns their sources."""
    es.indices.refresh(index=index)
    hits = es.search(index=index, query=query, size=10_000, source_includes=["version"])["hits"]["hits"]
    bulk(es, [{"_op_type": "delete", "_index": index, "_id": h["_id"]} for h in hits], refresh=True)
    return [h["_source"] for h in hits]


def delete_dataset(s: Settings, dataset: str) -> None:
    """Remove the dataset's objects, table rows, documents, model versions and features."""
    es, s3 = es_client(s), s3_client(s)
    delete_ids(es, s.images_index, {"term": {"dataset": dataset}})
    versions = [src["version"] for src in delete_ids(es, s.models_index, {"term": {"dataset": dataset}})]
    for bucket, prefixes in (
        (s.images_bucket, [f"{dataset}/"]),
        (s.features_bucket, [f"{dataset}/"]),
        (s.models_bucket, [f"{v}/" for v in versions]),
    ):
        for prefix in prefixes:
            remove_prefix(s3, bucket, prefix)  # DeletesRefused fails the teardown
    delete_rows(s, dataset)
    for tree in (s.home / "datasets").glob(f"{dataset}-*"):  # the synthetic tree the demo generated
        shutil.rmtree(tree)


@pytest.fixture(scope="module")
def demo_run(stack: Settings, tmp_path_factory):
    """`orchard demo --keep` on a fresh tiny dataset; yields (dataset, report dir, stdout)."""
    dataset = f"it-report-{uuid.uuid4().hex[:8]}"
    out = tmp_path_factory.mktemp("report")
    env = {**os.environ, "PYTHONPATH": str(REPO), "ORCHARD_HOME": str(stack.home)}
    argv = [
        sys.executable,
        "-m",
        "orchard",
        "demo",
        "--keep",
        "--dataset",
        dataset,
        "--classes",
        str(CLASSES),
        "--per-class",
        str(PER_CLASS),
        "--test-per-class",
        str(TEST_PER_CLASS),
        "--epochs",
        str(EPOCHS),
        "--seed",
        str(random.randrange(10**6, 10**9)),
        "--out",
        str(out),
    ]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=1800, check=False)
        assert proc.returncode == 0, f"demo exited {proc.returncode}:\n{proc.stderr[-3000:]}"
        yield dataset, out, proc.stdout
    finally:
        delete_dataset(stack, dataset)


def es_count(es, s: Settings, *clauses: dict) -> int:
    return int(es.count(index=s.images_index, query={"bool": {"filter": list(clauses)}})["count"])


def test_report_counts_and_accuracy_equal_elasticsearch(stack: Settings, demo_run) -> None:
    dataset, out, stdout = demo_run
    html = (out / "index.html").read_text()
    cells = Cells()
    cells.feed(html)
    es = es_client(stack)
    ds = {"term": {"dataset": dataset}}

    labels = [
        b["key"]
        for b in es.search(
            index=stack.images_index, size=0, query=ds, aggs={"l": {"terms": {"field": "label", "size": 100}}}
        )["aggregations"]["l"]["buckets"]
    ]
    assert len(labels) == CLASSES
    assert int(cells.metrics["classes"]) == len(labels)
    assert int(cells.metrics["images"]) == es_count(es, stack, ds) == CLASSES * (PER_CLASS + TEST_PER_CLASS)
    for label in labels:
        for split in ("train", "test"):
            expected = es_count(es, stack, ds, {"term": {"label": label}}, {"term": {"split": split}})
            assert int(cells.counts[f"{label}|{split}"]) == expected, (label, split)
    for split in ("train", "test"):
        assert int(cells.counts[f"all classes|{split}"]) == es_count(es, stack, ds, {"term": {"split": split}})

    model = es.search(index=stack.models_index, size=1, query=ds, sort=[{"created_at": "desc"}])["hits"]["hits"][0][
        "_source"
    ]
    assert model["version"] in html
    predicted = [
        ds,
        {"term": {"split": "test"}},
        {"term": {"prediction.model_version": model["version"]}},
        {"exists": {"field": "prediction.label"}},
    ]
    total = es_count(es, stack, *predicted)
    per_class = {
        label: (
            es_count(es, stack, *predicted, {"term": {"label": label}}, {"term": {"prediction.label": label}}),
            es_count(es, stack, *predicted, {"term": {"label": label}}),
        )
        for label in labels
    }
    correct = sum(c for c, _ in per_class.values())
    assert total == CLASSES * TEST_PER_CLASS  # every test image was predicted by the newest model
    assert int(cells.metrics["predicted"]) == total
    assert int(cells.metrics["correct"]) == correct
    assert float(cells.metrics["accuracy"]) == pytest.approx(correct / total)
    assert cells.classes == per_class
    assert float(cells.metrics["model_test_accuracy"]) == pytest.approx(model["metrics"]["test_accuracy"], abs=1e-6)
    # The same model on the same images: Spark's evaluation and the predictions in ES agree (within one image).
    assert abs(correct / total - model["metrics"]["test_accuracy"]) <= 1 / total + 1e-9

    summary = json.loads((out / "summary.json").read_text())
    assert summary["correct"] == correct and summary["predicted"] == total
    # the model comparison: every version trained on the dataset (one here), as the registry has it
    assert [(m["version"], m["family"], m["test_accuracy"]) for m in summary["models"]] == [
        (model["version"], "cnn", model["metrics"]["test_accuracy"])
    ]
    assert f'<tr data-version="{model["version"]}" data-accuracy="{model["metrics"]["test_accuracy"]}">' in html
    assert [st["name"] for st in summary["stages"]] == [
        "stack up",
        "synth",
        "upload",
        "spark",
        "train",
        "infer",
        "features",
        "report",
    ]
    assert f"{correct}/{total} predictions" in stdout and str(out / "index.html") in stdout


def test_report_renders_in_chromium_with_visible_images_and_plots(demo_run) -> None:
    _, out, _ = demo_run
    page = out / "index.html"
    probe_page = out / "probe.html"
    probe_page.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
    dom = run_chromium(f"--window-size={WIDTH},1000", "--virtual-time-budget=10000", "--dump-dom", probe_page.as_uri())
    match = re.search(r"data-probe=\"([^\"]*)\"", dom.stdout)
    assert match, f"no probe result in Chromium's DOM dump:\n{dom.stderr[-2000:]}"
    probe = json.loads(match.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    images = probe["images"]
    broken = [i["alt"] or i["id"] for i in images if not i["ok"]]
    assert not broken, f"images that did not decode: {broken}"
    plots = {i["id"] for i in images if "plot" in i["cls"]}
    assert plots == {"plot-history", "plot-confusion", "plot-per-class", "plot-pca"}
    assert sum(1 for i in images if "plot" not in i["cls"]) >= CLASSES * TEST_PER_CLASS  # grid + kNN + swatches

    SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
    shot = SCREENSHOT_DIR / "report.png"
    shot.unlink(missing_ok=True)
    height = min(int(probe["height"]) + 20, 16000)
    run_chromium(f"--screenshot={shot}", f"--window-size={WIDTH},{height}", page.as_uri())
    assert shot.is_file(), "Chromium wrote no screenshot"
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    assert pixels.shape[1] == WIDTH and pixels.std() > 20  # not a blank page
    for box in images:
        x, y, w, h = (round(box[k]) for k in ("x", "y", "w", "h"))
        assert w > 20 and h > 20, f"{box['id'] or box['alt']} is {w}x{h} px on the page"
        region = pixels[y : y + h, x : x + w]
        assert region.size and region.std() > 8, f"{box['id'] or box['alt']} looks blank in {shot}"
