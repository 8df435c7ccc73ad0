"""The demo report: one self-contained HTML file (plots and thumbnails embedded) about one dataset.

Every figure is read back from the stack, not from the runs that produced it: counts, the
confusion matrix and accuracies are Elasticsearch aggregations; the training curve and metrics are
the model's document in the models index; thumbnails are fetched from the images bucket. Queries
are bounded by what the page shows (a grid of `GRID_SIZE` images, at most `SCATTER_POINTS` points),
so the report costs the same for a hundred images or a million.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import math
import os
import platform
import socket
import urllib.request
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import psutil
from elasticsearch.helpers import scan
from jinja2 import Environment, FileSystemLoader, select_autoescape
from minio import MinioAdmin
from minio.credentials import StaticProvider
from minio.error import S3Error
from PIL import Image, UnidentifiedImageError

from orchard.core.clients import es_client, s3_client
from orchard.core.errors import ConfigError
from orchard.core.lake import SPLITS, TEST, TRAIN, Field, Pca, Prediction, Tile, Tiles
from orchard.core.objects import get_bytes
from orchard.core.settings import Settings
from orchard.spark_app.registry import list_versions

log = logging.getLogger(__name__)

TEMPLATES = Path(__file__).parent / "templates"
GRID_SIZE = 48  # test images in the prediction grid
SCATTER_POINTS = 5000  # most points drawn in the PCA scatter
NEIGHBOURS = 8  # kNN neighbours shown beside the query image
THUMB_PX = 96
MAX_MODELS = 20  # versions in the report's model comparison
SAMPLE_SEED = 360  # the same sample of points and images on every render of the same data
COMPOSITE_PAGE = 1000
MAX_RASTERS = 4  # tiled rasters drawn as class maps
MAX_MAP_TILES = 250_000  # a larger tile grid is not drawn (the summary's counts still are)
NOT_A_TILE = {"exists": {"field": Field.TILE_PARENT}}  # a must_not clause
SOFTWARE = ("pyspark", "tensorflow", "keras", "elephas", "elasticsearch", "minio")


@dataclass(frozen=True)
class Stage:
    """One timed stage of a demo run (what the report's timing table shows)."""

    name: str
    seconds: float
    items: int | None = None  # what the stage processed: images, services, ...
    unit: str = "images"
    work: int | None = None  # items x passes (images x epochs) for the throughput; default items; 0: none
    command: str = ""  # the command that runs this stage alone

    @property
    def per_second(self) -> float | None:
        """Throughput in items (or work) per second, None when not meaningful."""
        done = self.work if self.work is not None else self.items
        if not done or self.seconds <= 0:
            return None
        return done / self.seconds


# --- pure pieces ------------------------------------------------------------------------------------


def confusion_matrix(cells: Iterable[tuple[str, str, int]], classes: Sequence[str]) -> np.ndarray:
    """Counts as a matrix: rows = true label, columns = predicted label, both in `classes` order.

    Labels outside `classes` raise ValueError (the caller builds `classes` from both axes).
    """
    index = {label: i for i, label in enumerate(classes)}
    matrix = np.zeros((len(classes), len(classes)), dtype=np.int64)
    for true, predicted, count in cells:
        try:
            matrix[index[true], index[predicted]] += count
        except KeyError as exc:
            raise ValueError(f"label {exc.args[0]!r} is not among the classes") from None
    return matrix


def per_class_accuracy(matrix: np.ndarray, classes: Sequence[str]) -> list[dict]:
    """One row per class: correct, total (true-label count) and accuracy (None when total is 0)."""
    rows = []
    for i, label in enumerate(classes):
        total = int(matrix[i].sum())
        correct = int(matrix[i, i])
        rows.append(
            {"label": label, "correct": correct, "total": total, "accuracy": correct / total if total else None}
        )
    return rows


def overall_accuracy(matrix: np.ndarray) -> float | None:
    """Correct / all predictions (the trace over the sum), None for an empty matrix."""
    total = int(matrix.sum())
    return int(np.trace(matrix)) / total if total else None


def class_axis(model_classes: Sequence[str], seen: Iterable[str]) -> list[str]:
    """The confusion matrix axis: the model's classes in output order, then any other label seen."""
    axis = list(dict.fromkeys(model_classes))
    axis += sorted(set(seen) - set(axis))
    return axis


def history_series(history: object) -> dict[str, list[float]]:
    """Per-epoch series {"epoch": [...], "loss": [...], ...} from a list of per-epoch dicts or a
    dict of lists (both shapes occur: Elephas' per-epoch records and Keras' History.history)."""
    if isinstance(history, dict):
        series = {k: [float(v) for v in vals] for k, vals in history.items() if isinstance(vals, list)}
        length = max((len(v) for v in series.values()), default=0)
        series.setdefault("epoch", [float(i + 1) for i in range(length)])
        return series
    records = history if isinstance(history, (list, tuple)) else []
    rows: list[dict] = [row for row in records if isinstance(row, dict)]
    keys = sorted({k for row in rows for k, v in row.items() if isinstance(v, (int, float))})
    series = {k: [float(row.get(k, math.nan)) for row in rows] for k in keys}
    if rows and "epoch" not in series:
        series["epoch"] = [float(i + 1) for i in range(len(rows))]
    return series


def split_rows(counts: dict[str, dict[str, int]], splits: Sequence[str]) -> list[dict]:
    """Rows label -> {split: count, total} in label order, plus the totals row last."""
    per_label = {label: [by_split.get(sp, 0) for sp in splits] for label, by_split in sorted(counts.items())}
    column_sums = [sum(column) for column in zip(*per_label.values(), strict=True)] or [0] * len(splits)

    def row(label: str, numbers: list[int]) -> dict:
        return {"label": label, **dict(zip(splits, numbers, strict=True)), "total": sum(numbers)}

    return [*(row(label, numbers) for label, numbers in per_label.items()), row("all classes", column_sums)]


def ordered_splits(found: Iterable[str]) -> list[str]:
    """Split names in reading order: train, val, test, then any other alphabetically."""
    known = list(SPLITS)
    found = set(found)
    return [s for s in known if s in found] + sorted(found - set(known))


def human_seconds(seconds: float | None) -> str:
    """`42.0 s`, `3 min 05 s`."""
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest:02d} s"


# --- Elasticsearch -------------------------------------------------------------------------------


def dataset_filter(dataset: str, *more: dict) -> dict:
    """A bool query: the dataset's images (not the tiles of its large rasters, which carry their
    raster's labels, not their own) plus extra filter clauses."""
    return {"bool": {"filter": [{"term": {Field.DATASET: dataset}}, *more], "must_not": [NOT_A_TILE]}}


def latest_model(es, s: Settings, dataset: str) -> dict | None:
    """The newest model document trained on `dataset` (None if there is none)."""
    if not es.indices.exists(index=s.models_index):
        return None
    response = es.search(
        index=s.models_index,
        size=1,
        query={"term": {"dataset": dataset}},
        sort=[{"created_at": {"order": "desc"}}, {"version": {"order": "desc"}}],
    )
    hits = response["hits"]["hits"]
    return hits[0]["_source"] if hits else None


def split_counts(es, s: Settings, dataset: str) -> dict[str, dict[str, int]]:
    """{label: {split: documents}} of a dataset, by a terms aggregation."""
    buckets = label_buckets(es, s, dataset, {"split": {"terms": {"field": Field.SPLIT, "size": 10}}})
    return {b["key"]: {sb["key"]: sb["doc_count"] for sb in b["split"]["buckets"]} for b in buckets}


def label_buckets(es, s: Settings, dataset: str, per_label: dict) -> list[dict]:
    """The buckets of a terms aggregation over the labels of a dataset, each with the `per_label` sub-aggregations."""
    response = es.search(
        index=s.images_index,
        size=0,
        query=dataset_filter(dataset),
        aggs={"label": {"terms": {"field": Field.LABEL, "size": 10_000}, "aggs": per_label}},
    )
    return response["aggregations"]["label"]["buckets"]


def class_examples(es, s: Settings, dataset: str) -> dict[str, str]:
    """{label: key of its first image by key}, one top hit per class."""
    first = {"top_hits": {"size": 1, "sort": [{Field.KEY: "asc"}], "_source": [Field.KEY]}}
    buckets = label_buckets(es, s, dataset, {"first": first})
    return {b["key"]: b["first"]["hits"]["hits"][0]["_source"][Field.KEY] for b in buckets}


def predicted_filter(version: str) -> list[dict]:
    """Filter clauses: documents predicted (without error) by model `version`."""
    return [{"term": {Field.PREDICTION_MODEL_VERSION: version}}, {"exists": {"field": Field.PREDICTION_LABEL}}]


def confusion_cells(es, s: Settings, dataset: str, split: str, version: str) -> Iterator[tuple[str, str, int]]:
    """(true label, predicted label, count) of one split's predictions, paged with a composite agg."""
    query = dataset_filter(dataset, {"term": {Field.SPLIT: split}}, *predicted_filter(version))
    after = None
    while True:
        composite = {
            "size": COMPOSITE_PAGE,
            "sources": [
                {"true": {"terms": {"field": Field.LABEL}}},
                {"pred": {"terms": {"field": Field.PREDICTION_LABEL}}},
            ],
        }
        if after:
            composite["after"] = after
        agg = es.search(index=s.images_index, size=0, query=query, aggs={"cells": {"composite": composite}})[
            "aggregations"
        ]["cells"]
        for bucket in agg["buckets"]:
            yield bucket["key"]["true"], bucket["key"]["pred"], bucket["doc_count"]
        after = agg.get("after_key")
        if not agg["buckets"] or not after:
            return


def tiled_rasters(es, s: Settings, dataset: str, limit: int = MAX_RASTERS) -> list[dict]:
    """Up to `limit` rasters of a dataset cut into tiles by `orchard infer`: id, key and `tiles` summary."""
    response = es.search(
        index=s.images_index,
        size=limit,
        source_includes=[Field.KEY, Field.TILES],
        query=dataset_filter(dataset, {"exists": {"field": Field.TILES_COUNT}}),
        sort=[{Field.KEY: "asc"}],
    )
    return [{"id": h["_id"], **h["_source"]} for h in response["hits"]["hits"]]


def tile_labels(es, s: Settings, parent: str) -> Iterator[tuple[int, int, str | None]]:
    """(grid row, grid column, predicted label or None) of every tile of a raster."""
    fields = [Field.TILE_ROW, Field.TILE_COL, Field.PREDICTION_LABEL]
    query = {"query": {"term": {Field.TILE_PARENT: parent}}, "_source": fields}
    for hit in scan(es, index=s.images_index, query=query, size=5000):
        tile, prediction = hit["_source"][Field.TILE], hit["_source"].get(Field.PREDICTION) or {}
        yield tile[Tile.ROW], tile[Tile.COL], prediction.get(Prediction.LABEL)


def class_maps(es, s: Settings, dataset: str) -> list[dict]:
    """Per tiled raster (up to MAX_RASTERS): key, summary, and its tiles' labels as a grid (None
    when it is larger than MAX_MAP_TILES)."""
    maps = []
    for raster in tiled_rasters(es, s, dataset):
        summary = raster[Field.TILES]
        rows, cols = summary[Tiles.ROWS], summary[Tiles.COLS]
        grid = None
        if rows * cols <= MAX_MAP_TILES:
            grid = np.full((rows, cols), "", dtype=object)
            for row, col, label in tile_labels(es, s, raster["id"]):
                if row < rows and col < cols:
                    grid[row, col] = label or ""
        maps.append({"key": raster[Field.KEY], "summary": summary, "grid": grid})
    return maps


def count(es, s: Settings, query: dict) -> int:
    """Number of image documents matching `query`."""
    return int(es.count(index=s.images_index, query=query)["count"])


def agreement(classes: Sequence[str]) -> dict:
    """A query matching documents whose predicted label equals their true label (one clause per class:
    no scripts, so it also runs on a minimal Elasticsearch without the painless module)."""
    return {
        "bool": {
            "should": [
                {"bool": {"filter": [{"term": {Field.LABEL: c}}, {"term": {Field.PREDICTION_LABEL: c}}]}}
                for c in classes
            ],
            "minimum_should_match": 1,
        }
    }


def grid_hits(
    es, s: Settings, dataset: str, split: str, version: str, classes: Sequence[str], size: int = GRID_SIZE
) -> list[dict]:
    """Up to `size` predicted images of a split: misclassified first (most confident first), then a
    fixed random sample of the correctly classified ones."""
    source = [Field.KEY, Field.LABEL, Field.SPLIT, Field.PREDICTION_LABEL, Field.PREDICTION_CONFIDENCE]
    base = [{"term": {Field.DATASET: dataset}}, {"term": {Field.SPLIT: split}}, *predicted_filter(version)]
    wrong = es.search(
        index=s.images_index,
        size=size,
        source_includes=source,
        query={"bool": {"filter": base, "must_not": [agreement(classes), NOT_A_TILE]}},
        sort=[{Field.PREDICTION_CONFIDENCE: "desc"}, {Field.KEY: "asc"}],
    )
    hits = wrong["hits"]["hits"]
    if len(hits) < size:
        right = es.search(
            index=s.images_index,
            size=size - len(hits),
            source_includes=source,
            query={
                "function_score": {
                    "query": {"bool": {"filter": [*base, agreement(classes)], "must_not": [NOT_A_TILE]}},
                    "random_score": {"seed": SAMPLE_SEED, "field": Field.ID},
                    "boost_mode": "replace",
                }
            },
        )
        hits += right["hits"]["hits"]
    return [flat_hit(h) for h in hits]


def flat_hit(hit: dict) -> dict:
    """key, label, predicted, confidence, correct, score of a search hit."""
    src = hit["_source"]
    pred = src.get(Field.PREDICTION) or {}
    predicted = pred.get(Prediction.LABEL)
    return {
        "key": src.get(Field.KEY),
        "label": src.get(Field.LABEL),
        "split": src.get(Field.SPLIT),
        "predicted": predicted,
        "confidence": pred.get(Prediction.CONFIDENCE),
        "correct": predicted == src.get(Field.LABEL) if predicted else None,
        "score": hit.get("_score"),
    }


def pca_points(es, s: Settings, dataset: str, version: str, limit: int = SCATTER_POINTS) -> tuple[list[dict], int]:
    """(a fixed random sample of at most `limit` {x, y, label, split}, number of documents with PCA)."""
    query = dataset_filter(dataset, {"term": {Field.EMBEDDING_MODEL: version}}, {"exists": {"field": Field.PCA_X}})
    total = count(es, s, query)
    response = es.search(
        index=s.images_index,
        size=min(limit, 10_000),
        source_includes=[Field.PCA, Field.LABEL, Field.SPLIT],
        query={
            "function_score": {
                "query": query,
                "boost_mode": "replace",
                "random_score": {"seed": SAMPLE_SEED, "field": Field.ID},
            }
        },
    )
    points = [
        {
            "x": h["_source"][Field.PCA][Pca.X],
            "y": h["_source"][Field.PCA][Pca.Y],
            "label": h["_source"][Field.LABEL],
            "split": h["_source"].get(Field.SPLIT),
        }
        for h in response["hits"]["hits"]
    ]
    return points, total


def knn_example(es, s: Settings, dataset: str, version: str, k: int = NEIGHBOURS) -> dict | None:
    """One test image (a fixed random pick) and its k nearest neighbours by embedding (cosine kNN)."""
    scope = [{"term": {Field.EMBEDDING_MODEL: version}}, {"exists": {"field": Field.EMBEDDING}}]
    shown = [Field.KEY, Field.LABEL, Field.SPLIT, Field.PREDICTION]
    pick = es.search(
        index=s.images_index,
        size=1,
        source_includes=[*shown, Field.EMBEDDING],
        query={
            "function_score": {
                "query": dataset_filter(dataset, {"term": {Field.SPLIT: TEST}}, *scope),
                "random_score": {"seed": SAMPLE_SEED, "field": Field.ID},
                "boost_mode": "replace",
            }
        },
    )["hits"]["hits"]
    if not pick:
        return None
    query_doc = pick[0]
    knn = {
        "field": Field.EMBEDDING,
        "query_vector": query_doc["_source"][Field.EMBEDDING],
        "k": k + 1,
        "num_candidates": max(100, 10 * (k + 1)),
        "filter": dataset_filter(dataset, *scope),
    }
    response = es.search(index=s.images_index, knn=knn, size=k + 1, source_includes=shown)
    neighbours = [flat_hit(h) for h in response["hits"]["hits"] if h["_id"] != query_doc["_id"]][:k]
    return {"query": flat_hit(query_doc), "neighbours": neighbours}


# --- the stack it ran on -----------------------------------------------------------------------------


def stack_facts(es, s: Settings) -> dict:
    """Versions, nodes and endpoints of the services, and the machine the report was made on."""
    nodes = es.cat.nodes(format="json", h="name,version,heap.max")  # not GET /: the minimal distribution lacks it
    health = es.cluster.health()
    return {
        "elasticsearch": {
            "version": ", ".join(sorted({n.get("version", "?") for n in nodes})),
            "cluster": health["cluster_name"],
            "nodes": len(nodes),
            "status": health["status"],
            "urls": s.es_urls,
            "heaps": sorted({n.get("heap.max") for n in nodes if n.get("heap.max")}),
        },
        "s3": {
            "endpoint": s.s3_url,
            "buckets": [s.images_bucket, s.features_bucket, s.models_bucket],
            "servers": minio_servers(s),
        },
        "spark": {"master": s.spark_master_url, **spark_cluster(s)},
        "indices": [s.images_index, s.models_index],
        "software": {name: package_version(name) for name in SOFTWARE},
        "machine": {
            "host": socket.gethostname(),
            "cpus": os.cpu_count(),
            "memory_gb": memory_gb(),
            "python": platform.python_version(),
            "os": platform.platform(terse=True),
        },
    }


def package_version(name: str) -> str:
    """Installed version of a distribution, or `-`."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "-"


def memory_gb() -> float:
    """Physical memory of this machine in GB."""
    return round(psutil.virtual_memory().total / 1e9, 1)


def minio_servers(s: Settings) -> int | None:
    """Number of MinIO servers behind the endpoint (admin API), None when it is not MinIO or not allowed."""
    try:
        url = urlparse(s.s3_url)
        admin = MinioAdmin(
            endpoint=url.netloc,
            secure=url.scheme == "https",
            credentials=StaticProvider(s.secret("s3_access_key"), s.secret("s3_secret_key")),
        )
        return len(json.loads(admin.info()).get("servers", []))
    except Exception as exc:
        log.debug("MinIO admin info unavailable: %s", exc)
        return None


def spark_cluster(s: Settings) -> dict:
    """Alive workers and cores from a standalone master's JSON page ({} when unreachable, e.g. EMR)."""
    host = urlparse(s.spark_master_url.replace("spark://", "http://")).hostname or s.bind_host
    try:
        with urllib.request.urlopen(f"http://{host}:{s.spark_ui_port}/json/", timeout=3) as response:
            body = json.loads(response.read())
    except (OSError, ValueError) as exc:
        log.debug("Spark master UI unavailable: %s", exc)
        return {}
    alive = [w for w in body.get("workers", []) if w.get("state") == "ALIVE"]
    return {
        "workers": len(alive),
        "cores": sum(w.get("cores", 0) for w in alive),
        "worker_memory_mb": sorted({w.get("memory") for w in alive}),
        "version": body.get("version", ""),
    }


# --- thumbnails ------------------------------------------------------------------------------------


def thumbnail_uri(s3, bucket: str, key: str, px: int = THUMB_PX) -> str | None:
    """A JPEG data URI of the image at `key`, shrunk to fit px x px (None if it cannot be read)."""
    try:
        image = Image.open(io.BytesIO(get_bytes(s3, bucket, key))).convert("RGB")
    except (S3Error, OSError, UnidentifiedImageError) as exc:
        log.warning("thumbnail of %s/%s: %s", bucket, key, exc)
        return None
    image.thumbnail((px, px))
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(out.getvalue()).decode()


def thumbnails(s3, bucket: str, keys: Iterable[str]) -> dict[str, str | None]:
    """{key: data URI} fetched in parallel."""
    unique = list(dict.fromkeys(k for k in keys if k))
    with ThreadPoolExecutor(max_workers=8) as pool:
        return dict(zip(unique, pool.map(lambda k: thumbnail_uri(s3, bucket, k), unique), strict=True))


# --- plots ---------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display: render to memory only
    import matplotlib.pyplot as plt

    plt.rcParams.update(
        {
            "font.size": 10,
            "axes.spines.top": False,
            "axes.spines.right": False,
            "axes.titleweight": "bold",
            "figure.dpi": 110,
        }
    )
    return plt


def png_uri(fig) -> str:
    """The figure as a base64 PNG data URI (the figure is closed)."""
    plt = _pyplot()
    out = io.BytesIO()
    fig.savefig(out, format="png", bbox_inches="tight", facecolor="white")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


def class_colours(classes: Sequence[str]) -> dict[str, tuple]:
    """A distinct colour per class (tab10/tab20, then a sampled continuous map)."""
    plt = _pyplot()
    n = len(classes)
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20" if n <= 20 else "turbo")
    return {c: cmap(i if n <= 20 else i / max(n - 1, 1)) for i, c in enumerate(classes)}


def plot_history(series: dict[str, list[float]], metrics: dict) -> str | None:
    """Loss and accuracy per epoch (train), with the final test figures as dashed lines."""
    if not series.get("epoch"):
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10.2, 3.3))
    for ax, name, test_key in ((axes[0], "loss", "test_loss"), (axes[1], "accuracy", "test_accuracy")):
        if name in series:
            ax.plot(series["epoch"], series[name], marker="o", color="#2b6cb0", label=f"train {name}")
        if metrics.get(test_key) is not None:
            ax.axhline(metrics[test_key], color="#dd6b20", linestyle="--", label=f"test {name} (final)")
        ax.set_title(name.capitalize())
        ax.set_xlabel("epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        ax.legend(frameon=False)
    axes[1].set_ylim(0, 1.02)
    fig.tight_layout()
    return png_uri(fig)


def plot_class_map(grid: np.ndarray, classes: Sequence[str]) -> str:
    """A raster's tiles coloured by predicted class (white: not predicted), with a legend."""
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    plt = _pyplot()
    colours = class_colours(classes)
    index = {label: i + 1 for i, label in enumerate(classes)}
    codes = np.vectorize(lambda label: index.get(label, 0), otypes=[np.int32])(grid)
    rows, cols = grid.shape
    fig, ax = plt.subplots(figsize=(min(6.0, 1.5 + cols * 0.25), min(6.0, 1.0 + rows * 0.25)))
    ax.imshow(codes, cmap=ListedColormap([(1, 1, 1, 1), *colours.values()]), vmin=0, vmax=len(classes))
    ax.set_xticks([])
    ax.set_yticks([])
    present = sorted({label for label in grid.flat if label}, key=lambda label: index.get(label, 0))
    ax.legend(
        handles=[Patch(color=colours[c], label=c) for c in present if c in colours],
        frameon=False,
        loc="upper left",
        bbox_to_anchor=(1.02, 1),
    )
    return png_uri(fig)


def plot_confusion(matrix: np.ndarray, classes: Sequence[str]) -> str | None:
    """The confusion matrix as a heatmap, counts annotated when it is small enough to read."""
    if not matrix.size:
        return None
    plt = _pyplot()
    n = len(classes)
    side = min(max(3.8, 0.42 * n + 2.2), 14)  # ~ the page column at 110 dpi for a few classes
    fig, ax = plt.subplots(figsize=(side + 0.8, side))
    shown = ax.imshow(matrix, cmap="Blues", interpolation="nearest")
    fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04)
    ticks = range(n)
    ax.set_xticks(ticks, [_short(c) for c in classes], rotation=60, ha="right", fontsize=8 if n > 12 else 9)
    ax.set_yticks(ticks, [_short(c) for c in classes], fontsize=8 if n > 12 else 9)
    ax.set_xlabel("predicted label")
    ax.set_ylabel("true label")
    if n <= 25:
        high = matrix.max() / 2 if matrix.max() else 1
        for (i, j), value in np.ndenumerate(matrix):
            if value:
                ax.text(
                    j, i, str(value), ha="center", va="center", fontsize=8, color="white" if value > high else "#1a202c"
                )
    ax.spines[:].set_visible(False)
    fig.tight_layout()
    return png_uri(fig)


def plot_per_class(rows: list[dict]) -> str | None:
    """Horizontal bars: accuracy per class, with the overall accuracy as a line."""
    rows = [r for r in rows if r["accuracy"] is not None]
    if not rows:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.1, max(2.0, 0.3 * len(rows) + 1)))
    labels = [_short(r["label"]) for r in rows][::-1]
    values = [r["accuracy"] for r in rows][::-1]
    colours = ["#38a169" if v >= 0.9 else "#d69e2e" if v >= 0.6 else "#e53e3e" for v in values]
    ax.barh(labels, values, color=colours)
    overall = sum(r["correct"] for r in rows) / max(sum(r["total"] for r in rows), 1)
    ax.axvline(overall, color="#2d3748", linestyle="--", linewidth=1)
    for y, v in enumerate(values):
        inside = v > 0.8  # label inside the bar's end, in white, when there is no room after it
        ax.text(
            v - 0.01 if inside else v + 0.01,
            y,
            f"{v:.0%}",
            va="center",
            ha="right" if inside else "left",
            fontsize=8,
            color="white" if inside else "#1a202c",
        )
    ax.set_title(f"Accuracy per class (dashed: overall {overall:.1%})", fontsize=10)
    ax.set_xlim(0, 1)
    ax.set_xlabel("accuracy on the test split")
    fig.tight_layout()
    return png_uri(fig)


SPLIT_MARKERS = {TRAIN: "o", TEST: "^"}


def plot_pca(points: list[dict], classes: Sequence[str]) -> str | None:
    """2-D PCA scatter coloured by true label; circles = train, triangles = test."""
    if not points:
        return None
    plt = _pyplot()
    colours = class_colours(classes)
    fig, ax = plt.subplots(figsize=(8.5, 6))
    size = 14 if len(points) < 2000 else 6
    groups: dict[tuple[str, str], list[dict]] = {}
    for p in points:  # circles = train, triangles = test, squares = any other split
        groups.setdefault((p["label"], SPLIT_MARKERS.get(p["split"], "s")), []).append(p)
    labelled: set[str] = set()
    for (label, marker), sel in sorted(groups.items(), key=lambda g: (g[0][0], "o^s".index(g[0][1]))):
        ax.scatter(
            [p["x"] for p in sel],
            [p["y"] for p in sel],
            s=size,
            marker=marker,
            alpha=0.75,
            linewidths=0,
            color=colours[label],
            label=None if label in labelled else _short(label),
        )
        labelled.add(label)
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.grid(alpha=0.25)
    if len(classes) <= 30:
        ax.legend(frameon=False, bbox_to_anchor=(1.01, 1), loc="upper left", fontsize=8, markerscale=1.6)
    fig.tight_layout()
    return png_uri(fig)


def _short(label: str, width: int = 22) -> str:
    return label if len(label) <= width else label[: width - 1] + "…"


# --- assembling -----------------------------------------------------------------------------------


@dataclass
class ReportData:
    """Everything the template shows (also written as summary.json, minus images)."""

    dataset: str
    generated_at: str
    splits: list[str]
    split_rows: list[dict]
    totals: dict[str, int]
    classes: int
    model: dict | None = None
    models: list[dict] = field(default_factory=list)  # every version trained on the dataset, newest first
    test_split: str = TEST
    predicted: int = 0  # test images predicted by the model (denominator of the accuracy)
    correct: int = 0
    accuracy: float | None = None
    per_class: list[dict] = field(default_factory=list)
    pca_total: int = 0
    pca_shown: int = 0
    stages: list[dict] = field(default_factory=list)
    stack: dict = field(default_factory=dict)
    rasters: list[dict] = field(default_factory=list)  # tiled rasters: key and `tiles` summary

    def to_json(self) -> str:
        """The figures as JSON (what the HTML shows, without plots and thumbnails)."""
        return json.dumps(asdict(self), indent=2, default=str)


def collect(es, s: Settings, dataset: str, stages: Sequence[Stage] = ()) -> tuple[ReportData, dict]:
    """Query the figures of a dataset; returns (report data, raw inputs of the plots)."""
    counts = split_counts(es, s, dataset)
    splits = ordered_splits({sp for by in counts.values() for sp in by})
    rows = split_rows(counts, splits)
    data = ReportData(
        dataset=dataset,
        generated_at=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        splits=splits,
        split_rows=rows,
        totals={k: v for k, v in rows[-1].items() if k != "label"},
        classes=len(counts),
        stack=stack_facts(es, s),
        stages=stage_rows(stages),
    )
    raw: dict = {
        "matrix": np.zeros((0, 0), dtype=np.int64),
        "axis": [],
        "points": [],
        "grid": [],
        "knn": None,
        "examples": class_examples(es, s, dataset),
        "series": {},
        "class_maps": class_maps(es, s, dataset),
    }
    data.rasters = [{"key": m["key"], **m["summary"]} for m in raw["class_maps"]]
    model = latest_model(es, s, dataset)
    if model is not None:
        data.models = list_versions(s, dataset, limit=MAX_MODELS)
        add_model_figures(es, s, data, raw, model)
    return data, raw


def add_model_figures(es, s: Settings, data: ReportData, raw: dict, model: dict) -> None:
    """Fill in what depends on the model: matrix, accuracies, grid, PCA points, kNN example."""
    version = model["version"]
    data.model = {k: v for k, v in model.items() if k != "history"}
    data.test_split = model.get("test_split") or TEST
    cells = list(confusion_cells(es, s, data.dataset, data.test_split, version))
    axis = class_axis(model.get("classes") or [], [c for cell in cells for c in cell[:2]])
    matrix = confusion_matrix(cells, axis)
    data.predicted, data.correct = int(matrix.sum()), int(np.trace(matrix))
    data.accuracy = overall_accuracy(matrix)
    seen_true = {true for true, _, _ in cells}
    data.per_class = [r for r in per_class_accuracy(matrix, axis) if r["label"] in seen_true]
    points, data.pca_total = pca_points(es, s, data.dataset, version)
    data.pca_shown = len(points)
    raw.update(
        matrix=matrix,
        axis=axis,
        points=points,
        series=history_series(model.get("history")),
        grid=grid_hits(es, s, data.dataset, data.test_split, version, axis),
        knn=knn_example(es, s, data.dataset, version),
    )


def render_html(data: ReportData, plots: dict, grid: list[dict], knn: dict | None, examples: dict) -> str:
    """The self-contained page (Jinja2 template, autoescaped)."""
    env = Environment(
        loader=FileSystemLoader(TEMPLATES),
        autoescape=select_autoescape(["html", "j2"]),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["pct"] = lambda v, digits=1: "-" if v is None else f"{v * 100:.{digits}f}%"
    env.filters["secs"] = human_seconds
    env.filters["num"] = lambda v: "-" if v is None else f"{v:,}"
    return env.get_template("report.html.j2").render(d=data, plots=plots, grid=grid, knn=knn, examples=examples)


@dataclass
class Page:
    """A report ready to render: its figures, plots (data URIs), grid, kNN example, class thumbnails."""

    data: ReportData
    plots: dict
    grid: list[dict]
    knn: dict | None
    examples: dict


def stage_rows(stages: Sequence[Stage]) -> list[dict]:
    """Stages as template rows (with their throughput)."""
    return [{**asdict(st), "per_second": st.per_second} for st in stages]


def prepare(s: Settings, dataset: str, stages: Sequence[Stage] = ()) -> Page:
    """Query the stack, draw the plots and fetch the thumbnails of a dataset's report."""
    es = es_client(s)
    data, raw = collect(es, s, dataset, stages)
    if not data.totals.get("total"):
        raise ConfigError(
            f"dataset {dataset!r} has no documents in {s.images_index}: upload it first "
            f"(orchard upload DIR --dataset {dataset})"
        )
    keys = [h["key"] for h in raw["grid"]] + list(raw["examples"].values())
    if raw["knn"]:
        keys += [raw["knn"]["query"]["key"]] + [h["key"] for h in raw["knn"]["neighbours"]]
    thumbs = thumbnails(s3_client(s), s.images_bucket, keys)
    plots = {
        "history": plot_history(raw["series"], (data.model or {}).get("metrics") or {}),
        "confusion": plot_confusion(raw["matrix"], raw["axis"]),
        "per_class": plot_per_class(data.per_class),
        "pca": plot_pca(raw["points"], sorted({p["label"] for p in raw["points"]})),
        "class_maps": [
            plot_class_map(m["grid"], (data.model or {}).get("classes") or sorted({c for c in m["grid"].flat if c}))
            if m["grid"] is not None
            else None
            for m in raw["class_maps"]
        ],
    }

    def with_thumb(hit: dict) -> dict:
        return {**hit, "thumb": thumbs.get(hit["key"])}

    knn = raw["knn"] and {
        "query": with_thumb(raw["knn"]["query"]),
        "neighbours": [with_thumb(h) for h in raw["knn"]["neighbours"]],
    }
    return Page(
        data,
        plots,
        [with_thumb(h) for h in raw["grid"]],
        knn,
        {label: thumbs.get(key) for label, key in raw["examples"].items()},
    )


def write(page: Page, out_dir: Path) -> Path:
    """Write out_dir/index.html and out_dir/summary.json (the same figures); returns the page's path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "index.html"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(render_html(page.data, page.plots, page.grid, page.knn, page.examples), encoding="utf-8")
    tmp.replace(path)  # a reader never sees half a page
    (out_dir / "summary.json").write_text(page.data.to_json() + "\n", encoding="utf-8")
    log.info("report written to %s", path)
    return path


def build_report(s: Settings, dataset: str, out_dir: Path, stages: Sequence[Stage] = ()) -> tuple[Path, ReportData]:
    """prepare + write: returns (path of index.html, the figures it shows)."""
    page = prepare(s, dataset, stages)
    return write(page, out_dir), page.data
