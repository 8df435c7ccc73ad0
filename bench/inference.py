"""Throughput and driver memory of Orchard's Spark stages on the images table, against their former
binaryFile path and the usual PySpark baselines.

Same model (the default CNN, randomly initialised, with a 1000-way head like an ImageNet classifier,
registered once), same images, same run, at each dataset size (default 4,000 and 16,000 synthetic
100x100 JPEGs in 10 classes, all in split train, uploaded with the real uploader as datasets
`bench-inference-<N>`). Before measuring a size, the parent runs `orchard lake sync` on its dataset
once (its wall time is `sync_seconds`), so the table stages below measure their own work, not the
first copy of the bucket into the table. The approaches:

  (a) model_only          the Keras model alone on in-memory decoded, preprocessed batches (all
                          cores): the limit of this machine;
  (b) orchard             `orchard infer --force` end to end: images table -> decode -> model ->
                          Elasticsearch (its summary's images_per_second);
  (b0) binaryfile         the same pipeline (`run_inference`, force) with the former image source:
                          Spark's binaryFile source, one S3 object per image;
  (c) elephas             stock Elephas `SparkModel.predict` on the decoded binaryFile RDD (collects
                          every prediction to the driver);
  (d) pandas_udf          the usual published PySpark featurisation notebook: a scalar-iterator pandas
                          UDF over binaryFile content with broadcast weights, predictions to Parquet;
  (e) predict_batch_udf   Spark's own `pyspark.ml.functions.predict_batch_udf` over the table's content
                          column (decoded inside the predict function, batches of 64; the rows spread
                          over as many partitions as Orchard's stage), predictions to Parquet;
  (f) features            `orchard features` (embeddings -> Parquet -> PCA -> Elasticsearch) on the
                          table; features_binaryfile: `run_features` with the binaryFile source;
                          images/s = images / seconds of the summary;
  (g) train               Elephas training of the default CNN (10 classes) for --train-epochs epochs,
                          batch 32, one worker per executor, fed by the table (`train_ieps`) and by
                          binaryFile (`train_binaryfile_ieps`): image-epochs/s, `train_elephas` timed.

Each measurement runs in its own child process; the parent samples the child's RSS (the Python
driver) and its JVM's RSS every 50 ms and keeps the peaks. Rates are measured inside the child over
the job only (Spark session start-up excluded; executor model loading included). Every Spark
approach gets the same images per task (--images-per-partition, default the CLI's). The cluster is
shared: before each measurement the parent waits until no other Spark application runs, and records
the applications that ran during it (`<approach>_cluster_apps`; the final `contended` lists the
measurements that were not alone). Prints one JSON line per measurement and, last, one JSON object:
per size (`sizes`, keyed by str(size)) the rate and driver RSS of every approach, `ratios` per size,
and the driver RSS growth between the smallest and the largest size (`driver_rss_growth_pct`:
orchard's; `..._by_approach`: every approach's).

    ~/.cache/orchard/venv/bin/python bench/inference.py [--sizes 4000 16000] [--classes 10]
        [--approaches model_only orchard ...] [--train-epochs 1] [--images-per-partition 1024]
        [--idle-timeout 3600] [--work DIR] [--model VERSION] [--cleanup]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pandas as pd  # module level: pandas_udf resolves the UDF's type hints in these globals

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from orchard.core.settings import Settings, load_settings

log = logging.getLogger("bench.inference")
ORCHARD = REPO / "bin" / "orchard"
APPROACHES = (
    "model_only",
    "orchard",
    "binaryfile",
    "elephas",
    "pandas_udf",
    "predict_batch_udf",
    "features",
    "features_binaryfile",
    "train",
)
CLI_COMMANDS = {"orchard": ("infer", "--force"), "features": ("features",)}  # measured through the CLI
BATCH = 64
# Images per Spark task, the same for every Spark approach (so they differ only in what they do): the
# product's default (the CLI's --images-per-partition); the binaryFile baselines' former default was 64.
IMAGES_PER_PARTITION = 1024
TRAIN_BATCH = 32
# The final ratios: name -> (numerator, denominator) keys of a size's row.
RATIOS = {
    "orchard_over_model_only": ("orchard_ips", "model_only_ips"),
    "orchard_over_binaryfile": ("orchard_ips", "binaryfile_ips"),
    "orchard_over_elephas": ("orchard_ips", "elephas_ips"),
    "orchard_over_pandas_udf": ("orchard_ips", "pandas_udf_ips"),
    "orchard_over_predict_batch_udf": ("orchard_ips", "predict_batch_udf_ips"),
    "features_speedup": ("features_ips", "features_binaryfile_ips"),
    "train_speedup": ("train_ieps", "train_binaryfile_ieps"),
}


# --- parent: data, model, measurements --------------------------------------------------------------


def run_cli(*args: str) -> str:
    """Run `orchard ...`; its stdout (raises with stderr on failure)."""
    proc = subprocess.run([str(ORCHARD), *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"orchard {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc.stdout


def ensure_dataset(size: int, classes: int, work: Path) -> str:
    """A dataset of `size` train images (synthesised and uploaded once; re-runs reuse it)."""
    name = f"bench-inference-{size}"
    out = work / name
    per_class = -(-size // classes)
    run_cli(
        "dataset",
        "synth",
        str(out),
        "--classes",
        str(classes),
        "--per-class",
        str(per_class),
        "--test-per-class",
        "0",
        "--seed",
        str(90_000 + size),
    )
    run_cli("upload", str(out), "--dataset", name)
    return name


def sync_table(dataset: str) -> float:
    """`orchard lake sync` of a dataset (a no-op once the table has it); its wall seconds."""
    began = time.monotonic()
    run_cli("-q", "lake", "sync", "--dataset", dataset)
    return round(time.monotonic() - began, 1)


def register_model(s: Settings, head: int, work: Path) -> str:
    """The default CNN with a `head`-way softmax (random weights: throughput does not depend on
    them), registered as a version."""
    from orchard.spark_app import model as keras_model
    from orchard.spark_app.versions import import_model_file

    path = keras_model.save_model(keras_model.build_cnn(head, seed=7), work / f"bench-cnn-{head}.keras")
    return import_model_file(s, path, "scale01")


class PeakRss:
    """Samples a process and its JVM children in a thread; peak RSS of each in MB."""

    def __init__(self, pid: int):
        import psutil

        self.proc = psutil.Process(pid)
        self.python_mb = self.jvm_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                self.python_mb = max(self.python_mb, self.proc.memory_info().rss / 2**20)
                jvm = sum(c.memory_info().rss for c in self.proc.children(recursive=True) if "java" in c.name())
                self.jvm_mb = max(self.jvm_mb, jvm / 2**20)
            except psutil.Error:
                pass
            self._stop.wait(0.05)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def measure(argv: list[str]) -> dict:
    """Run one child, sampling its memory; the child's last JSON line plus the peaks."""
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}
    )
    peak = PeakRss(proc.pid)
    out, err = proc.communicate()
    peak.stop()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}):\n{err[-4000:]}")
    result = json.loads(out.strip().splitlines()[-1])
    return {**result, "driver_rss_mb": round(peak.python_mb, 1), "driver_jvm_rss_mb": round(peak.jvm_mb, 1)}


@dataclass(frozen=True)
class Job:
    """What a measurement runs on: dataset, model version, images per task, training epochs."""

    dataset: str
    version: str
    images_per_partition: int = IMAGES_PER_PARTITION
    epochs: int = 1


def child_argv(approach: str, job: Job) -> list[str]:
    """The command measuring one approach: the CLI for `orchard` and `features`, else a child of this script."""
    common = ["--dataset", job.dataset, "--model", job.version, "--images-per-partition", str(job.images_per_partition)]
    if approach in CLI_COMMANDS:
        command, *flags = CLI_COMMANDS[approach]
        return [str(ORCHARD), "-q", command, *common, "--json", "--batch-size", str(BATCH), *flags]
    script = str(Path(__file__).resolve())
    return [sys.executable, script, "--child", approach, *common, "--train-epochs", str(job.epochs)]


def run_figures(summary: dict) -> dict:
    """ips, images, seconds (and table version) of an `infer` or `features` run summary."""
    images, seconds = summary["images"], summary["seconds"]
    ips = summary.get("images_per_second") or (round(images / seconds, 1) if seconds else None)
    return {"ips": ips, "images": images, "seconds": seconds, "table_version": summary.get("table_version")}


def figures(approach: str, result: dict) -> dict:
    """One measurement as keys of its size's row: `<approach>_ips`, `_images`, `_seconds`, ... (the
    train child names its own keys) and `<approach>_driver_rss_mb`, `<approach>_driver_jvm_rss_mb`."""
    r = dict(result)
    rss = {f"{approach}_{k}": r.pop(k) for k in ("driver_rss_mb", "driver_jvm_rss_mb")}
    if approach == "train":
        return {**r, **rss}
    if approach in CLI_COMMANDS:
        r = run_figures(r)
    return {**{f"{approach}_{k}": v for k, v in r.items()}, **rss}


def master_state(s: Settings) -> dict | None:
    """The native standalone master's JSON status (None for another master, or if it does not answer)."""
    if s.spark_master:
        return None
    try:
        with urllib.request.urlopen(f"http://{s.bind_host}:{s.spark_ui_port}/json/", timeout=5) as response:
            return json.load(response)
    except (OSError, ValueError):
        return None


def wait_for_idle_cluster(s: Settings, timeout: float) -> float:
    """Wait (at most `timeout` s) until no application runs on the cluster: another one would hold
    its cores and share its CPU with the measurement. Seconds waited."""
    began = time.monotonic()
    while (state := master_state(s)) and state.get("activeapps") and time.monotonic() - began < timeout:
        log.info("cluster busy (%s): waiting", ", ".join(a["name"] for a in state["activeapps"]))
        time.sleep(10)
    return round(time.monotonic() - began, 1)


def apps_between(s: Settings, start_ms: float, end_ms: float) -> list[str] | None:
    """Names of the applications that ran on the cluster between two times (epoch ms): a clean
    measurement sees only its own (none for model_only)."""
    state = master_state(s)
    if state is None:
        return None
    apps = state.get("activeapps", []) + state.get("completedapps", [])
    return sorted(a["name"] for a in apps if a["starttime"] < end_ms and a["starttime"] + a["duration"] > start_ms)


def measure_approach(s: Settings, approach: str, job: Job, idle_timeout: float) -> dict:
    """One approach's keys of its size's row, with `<approach>_cluster_apps` (the applications that
    ran meanwhile); a failure is logged and recorded as `<approach>_error`."""
    waited = wait_for_idle_cluster(s, idle_timeout)
    began = time.time() * 1000
    try:
        r = figures(approach, measure(child_argv(approach, job)))
    except RuntimeError as exc:
        log.error("%s on %s failed: %s", approach, job.dataset, exc)
        r = {f"{approach}_error": str(exc)[-1000:]}
    r[f"{approach}_cluster_apps"] = apps_between(s, began, time.time() * 1000)
    return {**r, f"{approach}_waited_for_cluster_s": waited}


def measure_size(s: Settings, size: int, dataset: str, version: str, args) -> dict:
    """The row of one size: the table synced first (`sync_seconds`), then every approach measured."""
    wait_for_idle_cluster(s, args.idle_timeout)
    row: dict = {"images": size, "sync_seconds": sync_table(dataset)}
    print(json.dumps({"size": size, "sync_seconds": row["sync_seconds"]}), flush=True)
    job = Job(dataset, version, args.images_per_partition, args.train_epochs)
    for approach in args.approaches:
        r = measure_approach(s, approach, job, args.idle_timeout)
        print(json.dumps({"size": size, "approach": approach, **r}), flush=True)
        row.update(r)
    return row


def contended(rows: dict[int, dict]) -> list[str]:
    """`<size>:<approach>` of the measurements other applications ran during (their figures are not clean)."""
    found = []
    for size, row in sorted(rows.items()):
        for approach in APPROACHES:
            apps = row.get(f"{approach}_cluster_apps")
            if apps and len(apps) > (0 if approach == "model_only" else 1):
                found.append(f"{size}:{approach}")
    return found


def ratio(row: dict, numerator: str, denominator: str) -> float | None:
    """row[numerator] / row[denominator], or None when either is missing or zero."""
    a, b = row.get(numerator), row.get(denominator)
    return round(a / b, 3) if a and b else None


def rss_growth_pct(rows: dict[int, dict], approach: str) -> float | None:
    """Growth of an approach's peak driver RSS from the smallest to the largest size, in percent."""
    sizes = sorted(rows)
    key = f"{approach}_driver_rss_mb"
    small, big = rows[sizes[0]].get(key), rows[sizes[-1]].get(key)
    if len(sizes) < 2 or not small or big is None:
        return None
    return round(100 * (big - small) / small, 1)


def summarise(rows: dict[int, dict]) -> dict:
    """The final JSON: every size's row, the ratios per size, the driver RSS growth."""
    measured = [a for a in APPROACHES if any(f"{a}_driver_rss_mb" in row for row in rows.values())]
    return {
        "sizes": {str(size): row for size, row in sorted(rows.items())},
        "ratios": {
            str(size): {k: ratio(row, *keys) for k, keys in RATIOS.items()} for size, row in sorted(rows.items())
        },
        "driver_rss_growth_pct": rss_growth_pct(rows, "orchard"),
        "driver_rss_growth_pct_by_approach": {a: rss_growth_pct(rows, a) for a in measured},
    }


def clean_up(s: Settings, datasets: list[str], version: str | None) -> None:
    """Delete the bench datasets (objects, table rows, documents, Parquet) and the registered model version."""
    from elasticsearch.helpers import bulk, scan

    from orchard.core.clients import es_client, s3_client
    from orchard.core.lake import Field
    from orchard.core.objects import DeletesRefused, remove_prefix

    es, client = es_client(s), s3_client(s)
    prefixes = [(s.images_bucket, f"{d}/") for d in datasets] + [(s.features_bucket, "_bench/")]
    prefixes += [(s.features_bucket, f"{d}/") for d in datasets]
    prefixes += [(s.models_bucket, f"{version}/")] if version else []
    for bucket, prefix in prefixes:
        try:
            remove_prefix(client, bucket, prefix)
        except DeletesRefused as exc:
            log.warning("cleanup: %s", exc)
    for dataset in datasets:
        hits = scan(es, index=s.images_index, query={"query": {"term": {Field.DATASET: dataset}}}, _source=False)
        bulk(
            es, ({"_op_type": "delete", "_index": s.images_index, "_id": h["_id"]} for h in hits), raise_on_error=False
        )
    if version:
        es.options(ignore_status=404).delete(index=s.models_index, id=version)
    delete_table_rows(s, datasets)


def delete_table_rows(s: Settings, datasets: list[str]) -> None:
    """Delete the datasets' rows from the images table (one Delta commit; after every measurement,
    since a Spark app in this process would hold the cluster's cores)."""
    from orchard.core.lake import Column
    from orchard.core.table_log import table_exists
    from orchard.spark_app.session import spark_session

    quoted = ", ".join("'" + d.replace("\\", "\\\\").replace("'", "\\'") + "'" for d in datasets)
    with spark_session(s, "bench-cleanup") as spark:
        if table_exists(s):
            spark.sql(f"DELETE FROM delta.`{s.images_table_uri}` WHERE {Column.DATASET} IN ({quoted})")


def main_parent(args) -> None:
    s = load_settings()
    work = Path(args.work or tempfile.mkdtemp(prefix="orchard-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    datasets = {size: ensure_dataset(size, args.classes, work) for size in args.sizes}
    version = args.model or register_model(s, args.head, work)
    log.info("model %s, datasets %s", version, datasets)
    rows = {size: measure_size(s, size, dataset, version, args) for size, dataset in datasets.items()}
    final = summarise(rows)
    final["contended"] = contended(rows)
    final["model_version"] = version
    final["model_outputs"] = args.head
    final["train_epochs"] = args.train_epochs
    final["images_per_partition"] = args.images_per_partition
    final["cpu_count"] = os.cpu_count()
    final["load_average"] = [round(x, 1) for x in os.getloadavg()]
    if args.cleanup:
        clean_up(s, list(datasets.values()), None if args.model else version)
    print(json.dumps(final), flush=True)


# --- children: one approach each ------------------------------------------------------------------


def load_driver_model(s: Settings, version: str, threads: int | None = None):
    """(keras model, card) of a version, loaded in this process."""
    from orchard.spark_app import model as keras_model
    from orchard.spark_app.versions import load_version

    keras_model.configure_tf(threads)
    spark_model, card = load_version(s, version)
    return spark_model.master_network, card


def fetch_decoded(s: Settings, dataset: str, size: tuple[int, int]):
    """All images of a dataset, downloaded and decoded in memory (uint8 NHWC), with their count."""
    import numpy as np

    from orchard.core.clients import s3_client
    from orchard.core.formats import is_image_key
    from orchard.core.objects import read_object
    from orchard.spark_app.images import decode_image

    client = s3_client(s)
    objects = client.list_objects(s.images_bucket, prefix=f"{dataset}/", recursive=True)
    keys = [o.object_name for o in objects if is_image_key(o.object_name)]
    with ThreadPoolExecutor(8) as pool:
        return np.stack(list(pool.map(lambda key: decode_image(read_object(client, s.images_bucket, key), size), keys)))


def rate(images: int, seconds: float, **extra) -> dict:
    """A child's result: images/s, images, seconds (and anything else to report)."""
    return {
        "ips": round(images / seconds, 1) if seconds > 0 else None,
        "images": images,
        "seconds": round(seconds, 2),
    } | extra


def child_model_only(s: Settings, job: Job) -> dict:
    """(a): predict_on_batch over preprocessed in-memory batches, TensorFlow on every core."""
    from orchard.spark_app.preprocess import preprocessor

    model, card = load_driver_model(s, job.version, threads=None)
    x = preprocessor(card["preprocessing"])(fetch_decoded(s, job.dataset, tuple(card["input_size"])))
    model.predict_on_batch(x[:BATCH])  # trace once, outside the timing
    began = time.monotonic()
    for start in range(0, len(x), BATCH):
        model.predict_on_batch(x[start : start + BATCH])
    return rate(len(x), time.monotonic() - began)


def child_binaryfile(s: Settings, job: Job) -> dict:
    """(b0): Orchard's inference pipeline (`run_inference`, force) fed by the binaryFile source."""
    from orchard.spark_app.images import binaryfile_images
    from orchard.spark_app.infer import run_inference
    from orchard.spark_app.session import spark_session

    with spark_session(s, "bench-binaryfile") as spark:
        summary = run_inference(
            spark, s, job.dataset, job.version, None, BATCH, job.images_per_partition, True, binaryfile_images
        )
    return run_figures(summary)


def decode_partition(s: Settings, preprocessing: str, size: tuple[int, int], pairs):
    """Executor side of (c): preprocessed arrays of a partition's decodable images."""
    from orchard.spark_app.images import decode_rows
    from orchard.spark_app.preprocess import preprocessor

    prep = preprocessor(preprocessing)
    for _, array, error in decode_rows(pairs, s, size):
        if error is None:
            yield prep(array)


def child_elephas(s: Settings, job: Job) -> dict:
    """(c): stock Elephas SparkModel.predict (default num_workers=None) on the decoded binaryFile RDD."""
    from orchard.spark_app import model as keras_model
    from orchard.spark_app.images import binaryfile_images
    from orchard.spark_app.session import spark_session

    net, card = load_driver_model(s, job.version)
    with spark_session(s, "bench-elephas") as spark:
        began = time.monotonic()
        pairs, _ = binaryfile_images(spark, s, job.dataset, None, job.images_per_partition)
        body = partial(decode_partition, s, card["preprocessing"], tuple(card["input_size"]))
        predictions = keras_model.elephas_predict(net, pairs.mapPartitions(body))
        seconds = time.monotonic() - began
    return rate(len(predictions), seconds)


def child_pandas_udf(s: Settings, job: Job) -> dict:
    """(d): scalar-iterator pandas UDF with broadcast weights, as in published featurisation notebooks."""
    from pyspark.sql.functions import pandas_udf

    from orchard.core.lake import s3a_uri
    from orchard.spark_app.images import read_image_files
    from orchard.spark_app.session import spark_session

    net, card = load_driver_model(s, job.version)
    model_json, size, prep_name = net.to_json(), tuple(card["input_size"]), card["preprocessing"]
    out = s3a_uri(s.features_bucket, f"_bench/pandas_udf/{job.dataset}/")
    with spark_session(s, "bench-pandas-udf") as spark:
        weights = spark.sparkContext.broadcast(net.get_weights())

        @pandas_udf("array<float>")
        def predict_udf(batches: Iterator[pd.Series]) -> Iterator[pd.Series]:
            import numpy as np
            from tensorflow.keras.models import model_from_json

            from orchard.spark_app.images import decode_image
            from orchard.spark_app.preprocess import preprocessor

            model = model_from_json(model_json)  # once per task, as in the notebooks
            model.set_weights(weights.value)
            prep = preprocessor(prep_name)
            for contents in batches:
                x = prep(np.stack([decode_image(bytes(c), size) for c in contents]))
                probs = model.predict(x, batch_size=BATCH, verbose=0)
                yield pd.Series(list(probs.astype("float32")))

        began = time.monotonic()
        files = read_image_files(spark, s.images_bucket, job.dataset, None, job.images_per_partition)
        files.select("path", predict_udf("content").alias("probabilities")).write.mode("overwrite").parquet(out)
        images = spark.read.parquet(out).count()
        seconds = time.monotonic() - began
    return rate(images, seconds)


def make_keras_predict_fn(model_json: str, weights, size: tuple[int, int], prep_name: str):
    """(e)'s make_predict_fn (run once per executor Python worker, cached by Spark's ModelCache):
    the Keras model from JSON + broadcast weights, and a function from a batch of encoded images (a
    1-D object array of bytes) to their probabilities (float32, batch x classes)."""
    import numpy as np
    from tensorflow.keras.models import model_from_json

    from orchard.spark_app.images import decode_image
    from orchard.spark_app.preprocess import preprocessor

    model = model_from_json(model_json)
    model.set_weights(weights.value)
    prep = preprocessor(prep_name)

    def predict(contents: np.ndarray) -> np.ndarray:
        x = prep(np.stack([decode_image(bytes(c), size) for c in contents]))
        return np.asarray(model.predict(x, batch_size=BATCH, verbose=0), dtype=np.float32)

    return predict


def table_content(spark, s: Settings, job: Job):
    """The table's (key, content) rows of a dataset (content inline), in as many partitions as
    Orchard's stage spreads them over (orchard.spark_app.table.stage_images: two per core at least;
    the table has few files, so without it a few tasks would do all the work)."""
    from pyspark.sql import functions as F

    from orchard.core.lake import Column
    from orchard.spark_app.table import read_images

    df = read_images(spark, s, job.dataset).select(Column.KEY, Column.CONTENT)
    df = df.where(F.col(Column.CONTENT).isNotNull())
    rows = df.count()  # from the Delta log's statistics where it can
    cores = spark.sparkContext.defaultParallelism
    return df.repartition(max(2 * cores, math.ceil(rows / max(1, job.images_per_partition))))


def child_predict_batch_udf(s: Settings, job: Job) -> dict:
    """(e): Spark's own predict_batch_udf over the table's content column, predictions to Parquet.

    The binary column is a scalar column for predict_batch_udf (each value one `bytes`), so no
    input_tensor_shapes: the predict function gets the batch as a 1-D object array and decodes it."""
    from pyspark.ml.functions import predict_batch_udf
    from pyspark.sql.types import ArrayType, FloatType

    from orchard.core.lake import Column, s3a_uri
    from orchard.spark_app.session import spark_session

    net, card = load_driver_model(s, job.version)
    out = s3a_uri(s.features_bucket, f"_bench/predict_batch_udf/{job.dataset}/")
    with spark_session(s, "bench-predict-batch-udf") as spark:
        weights = spark.sparkContext.broadcast(net.get_weights())
        make_fn = partial(
            make_keras_predict_fn, net.to_json(), weights, tuple(card["input_size"]), card["preprocessing"]
        )
        predict = predict_batch_udf(make_fn, return_type=ArrayType(FloatType()), batch_size=BATCH)
        began = time.monotonic()
        rows = table_content(spark, s, job)
        rows.select(Column.KEY, predict(Column.CONTENT).alias("probabilities")).write.mode("overwrite").parquet(out)
        images = spark.read.parquet(out).count()
        seconds = time.monotonic() - began
    return rate(images, seconds)


def child_features_binaryfile(s: Settings, job: Job) -> dict:
    """(f) baseline: `run_features` (embeddings, PCA, documents) fed by the binaryFile source."""
    from orchard.spark_app.features import run_features
    from orchard.spark_app.images import binaryfile_images
    from orchard.spark_app.session import spark_session

    with spark_session(s, "bench-features-binaryfile") as spark:
        summary = run_features(
            spark, s, job.dataset, job.version, None, 0.95, BATCH, None, job.images_per_partition, binaryfile_images
        )
    return run_figures(summary)


def import_tensorflow(_rows) -> None:
    """foreachPartition body: import TensorFlow in the executor's (reused) Python worker."""
    import orchard.spark_app.model  # noqa: F401


def time_training(spark, s: Settings, job: Job, source, classes: list[str], workers: int) -> float:
    """Seconds of `train_elephas` (the default CNN, TRAIN_BATCH, `workers`) on the images of `source`."""
    from orchard.spark_app import model as keras_model
    from orchard.spark_app.train import train_rdd

    pairs, _ = source(spark, s, job.dataset, None, job.images_per_partition)
    net = keras_model.build_cnn(len(classes))
    began = time.monotonic()
    keras_model.train_elephas(net, train_rdd(pairs, s, classes), job.epochs, TRAIN_BATCH, workers)
    return time.monotonic() - began


def child_train(s: Settings, job: Job) -> dict:
    """(g): Elephas training on the table's images, then on the same images read with binaryFile."""
    from orchard.core.lake import Column
    from orchard.spark_app.images import binaryfile_images
    from orchard.spark_app.session import executor_count, spark_session
    from orchard.spark_app.table import read_images, stage_images

    with spark_session(s, "bench-train") as spark:
        workers = executor_count(spark)
        table = read_images(spark, s, job.dataset)
        images = table.count()  # the same images for both sources
        classes = sorted(r[0] for r in table.select(Column.LABEL).distinct().collect() if r[0])  # one row per class
        # Executors' Python workers are reused: import TensorFlow in them first, so that the first
        # source timed does not pay for it alone.
        spark.sparkContext.parallelize(range(2 * workers), 2 * workers).foreachPartition(import_tensorflow)
        result: dict = {"train_images": images, "train_epochs": job.epochs, "train_workers": workers}
        for name, source in (("train", stage_images), ("train_binaryfile", binaryfile_images)):
            seconds = time_training(spark, s, job, source, classes, workers)
            result[f"{name}_ieps"] = round(images * job.epochs / seconds, 1)
            result[f"{name}_seconds"] = round(seconds, 2)
    return result


CHILDREN = {
    "model_only": child_model_only,
    "binaryfile": child_binaryfile,
    "elephas": child_elephas,
    "pandas_udf": child_pandas_udf,
    "predict_batch_udf": child_predict_batch_udf,
    "features_binaryfile": child_features_binaryfile,
    "train": child_train,
}


def parse_args(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[4000, 16000])
    parser.add_argument("--classes", type=int, default=10, help="classes of the synthetic images")
    parser.add_argument(
        "--head",
        type=int,
        default=1000,
        help="outputs of the benchmarked CNN (default 1000, an ImageNet classifier's: what "
        "collecting every prediction to the driver costs shows at this width)",
    )
    parser.add_argument("--approaches", nargs="+", choices=APPROACHES, default=list(APPROACHES))
    parser.add_argument(
        "--images-per-partition",
        type=int,
        default=IMAGES_PER_PARTITION,
        help=f"images per Spark task, for every Spark approach (default {IMAGES_PER_PARTITION}, the CLI's)",
    )
    parser.add_argument("--train-epochs", type=int, default=1, help="epochs of the train approach (default 1)")
    parser.add_argument(
        "--idle-timeout",
        type=float,
        default=3600,
        help="before each measurement, wait at most this long (s) for other Spark applications to end",
    )
    parser.add_argument("--model", help="use this registered version instead of registering a fresh CNN")
    parser.add_argument("--work", help="directory for the synthetic images (default: a temp dir)")
    parser.add_argument(
        "--cleanup",
        action="store_true",
        help="delete the bench datasets and model afterwards (default: keep them for re-runs)",
    )
    parser.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    parser.add_argument("--dataset", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("elastic_transport", "urllib3", "py4j"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    args = parse_args(argv)
    if args.child:
        job = Job(args.dataset, args.model, args.images_per_partition, args.train_epochs)
        print(json.dumps(CHILDREN[args.child](load_settings(), job)), flush=True)
        return
    main_parent(args)


if __name__ == "__main__":
    main()
