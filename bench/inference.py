"""Inference throughput and driver memory: Orchard's streaming `orchard infer` against three baselines.

Same model (the default CNN, randomly initialised, with a 1000-way head like an ImageNet classifier,
registered once), same images, same run, at two dataset sizes (default 2,000 and 8,000 synthetic
100x100 JPEGs, uploaded with the real uploader):

  (a) model_only  the Keras model alone on in-memory decoded, preprocessed batches (all cores):
                  the limit of this machine;
  (b) orchard     `orchard infer --force` end to end: s3a read -> decode -> model -> Elasticsearch;
  (c) elephas     stock Elephas `SparkModel.predict` on the same decoded RDD (collects everything);
  (d) pandas_udf  the usual published PySpark featurisation notebook: a scalar-iterator pandas UDF
                  over `binaryFile` content with broadcast weights, predictions written to Parquet.

Each measurement runs in its own child process; the parent samples the child's RSS (the Python
driver) and its JVM's RSS every 50 ms and keeps the peaks. Images/s is measured inside the child
over the job only (Spark session start-up excluded; executor model loading included).
Prints one JSON line per measurement and, last, one JSON object with everything.

    ~/.cache/orchard/venv/bin/python bench/inference.py [--sizes 2000 8000] [--classes 10]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import pandas as pd  # module level: pandas_udf resolves the UDF's type hints in these globals

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from orchard.core.settings import Settings, load_settings

log = logging.getLogger("bench.inference")
ORCHARD = REPO / "bin" / "orchard"
APPROACHES = ("model_only", "orchard", "elephas", "pandas_udf")
BATCH = 64
IMAGES_PER_PARTITION = 64


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


def child_argv(approach: str, dataset: str, version: str) -> list[str]:
    """The command measuring one approach."""
    if approach == "orchard":
        return [
            str(ORCHARD),
            "-q",
            "infer",
            "--dataset",
            dataset,
            "--model",
            version,
            "--force",
            "--json",
            "--batch-size",
            str(BATCH),
            "--images-per-partition",
            str(IMAGES_PER_PARTITION),
        ]
    return [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        approach,
        "--dataset",
        dataset,
        "--model",
        version,
    ]


def summarise(results: dict[int, dict[str, dict]]) -> dict:
    """The final JSON: per size the images/s and driver RSS of each approach, ratios, RSS growth."""
    final: dict = {"sizes": {}, "ratios": {}}
    for size, by_approach in results.items():
        row = {"images": size}
        for approach, r in by_approach.items():
            row[f"{approach}_ips"] = r["ips"]
            row[f"{approach}_driver_rss_mb"] = r["driver_rss_mb"]
            row[f"{approach}_driver_jvm_rss_mb"] = r["driver_jvm_rss_mb"]
            row[f"{approach}_images"] = r["images"]
        final["sizes"][str(size)] = row
        final["ratios"][str(size)] = {
            "orchard_over_model_only": round(row["orchard_ips"] / row["model_only_ips"], 3),
            "orchard_over_elephas": round(row["orchard_ips"] / row["elephas_ips"], 3),
            "orchard_over_pandas_udf": round(row["orchard_ips"] / row["pandas_udf_ips"], 3),
        }
    sizes = sorted(results)
    if len(sizes) > 1:
        small, big = str(sizes[0]), str(sizes[-1])
        final["driver_rss_growth_mb"] = {
            a: round(final["sizes"][big][f"{a}_driver_rss_mb"] - final["sizes"][small][f"{a}_driver_rss_mb"], 1)
            for a in APPROACHES
        }
    return final


def clean_up(s: Settings, datasets: list[str], version: str | None) -> None:
    """Delete the bench datasets (objects, documents, Parquet) and the registered model version."""
    from elasticsearch.helpers import bulk, scan
    from minio.deleteobjects import DeleteObject

    from orchard.core.clients import es_client, s3_client
    from orchard.core.lake import Field

    es, client = es_client(s), s3_client(s)
    prefixes = [(s.images_bucket, f"{d}/") for d in datasets] + [(s.features_bucket, "_bench/")]
    prefixes += [(s.models_bucket, f"{version}/")] if version else []
    for bucket, prefix in prefixes:
        names = (DeleteObject(o.object_name) for o in client.list_objects(bucket, prefix=prefix, recursive=True))
        for error in client.remove_objects(bucket, names):
            log.warning("cleanup: %s", error)
    for dataset in datasets:
        hits = scan(es, index=s.images_index, query={"query": {"term": {Field.DATASET: dataset}}}, _source=False)
        bulk(
            es, ({"_op_type": "delete", "_index": s.images_index, "_id": h["_id"]} for h in hits), raise_on_error=False
        )
    if version:
        es.options(ignore_status=404).delete(index=s.models_index, id=version)


def main_parent(args) -> None:
    s = load_settings()
    work = Path(args.work or tempfile.mkdtemp(prefix="orchard-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    datasets = {size: ensure_dataset(size, args.classes, work) for size in args.sizes}
    version = args.model or register_model(s, args.head, work)
    log.info("model %s, datasets %s", version, datasets)
    results: dict[int, dict[str, dict]] = {}
    for size, dataset in datasets.items():
        results[size] = {}
        for approach in args.approaches:
            r = measure(child_argv(approach, dataset, version))
            if approach == "orchard":
                r = {
                    "ips": r["images_per_second"],
                    "images": r["images"],
                    "seconds": r["seconds"],
                    "driver_rss_mb": r["driver_rss_mb"],
                    "driver_jvm_rss_mb": r["driver_jvm_rss_mb"],
                }
            results[size][approach] = r
            print(json.dumps({"size": size, "approach": approach, **r}), flush=True)
    final = summarise(results) if set(args.approaches) == set(APPROACHES) else {"results": results}
    final["model_version"] = version
    final["model_outputs"] = args.head
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
    from orchard.spark_app.images import decode_image

    client = s3_client(s)
    keys = [o.object_name for o in client.list_objects(s.images_bucket, prefix=f"{dataset}/", recursive=True)]

    def one(key: str):
        response = client.get_object(s.images_bucket, key)
        try:
            return decode_image(response.read(), size)
        finally:
            response.close()
            response.release_conn()

    with ThreadPoolExecutor(8) as pool:
        return np.stack(list(pool.map(one, keys)))


def child_model_only(s: Settings, dataset: str, version: str) -> dict:
    """(a): predict_on_batch over preprocessed in-memory batches, TensorFlow on every core."""
    from orchard.spark_app.preprocess import preprocessor

    model, card = load_driver_model(s, version, threads=None)
    x = preprocessor(card["preprocessing"])(fetch_decoded(s, dataset, tuple(card["input_size"])))
    model.predict_on_batch(x[:BATCH])  # trace once, outside the timing
    began = time.monotonic()
    for start in range(0, len(x), BATCH):
        model.predict_on_batch(x[start : start + BATCH])
    seconds = time.monotonic() - began
    return {"ips": round(len(x) / seconds, 1), "images": len(x), "seconds": round(seconds, 2)}


def decode_partition(bucket: str, preprocessing: str, size: tuple[int, int], rows):
    """Executor side of (c): preprocessed arrays of a partition's decodable images."""
    from orchard.spark_app.images import decode_rows
    from orchard.spark_app.preprocess import preprocessor

    prep = preprocessor(preprocessing)
    for _, array, error in decode_rows(rows, bucket, size):
        if error is None:
            yield prep(array)


def child_elephas(s: Settings, dataset: str, version: str) -> dict:
    """(c): stock Elephas SparkModel.predict (default num_workers=None) on the decoded RDD."""
    from orchard.spark_app import model as keras_model
    from orchard.spark_app.images import read_image_files
    from orchard.spark_app.session import spark_session

    net, card = load_driver_model(s, version)
    with spark_session(s, "bench-elephas") as spark:
        began = time.monotonic()
        files = read_image_files(spark, s.images_bucket, dataset, None, IMAGES_PER_PARTITION)
        body = partial(decode_partition, s.images_bucket, card["preprocessing"], tuple(card["input_size"]))
        predictions = keras_model.elephas_predict(net, files.rdd.mapPartitions(body))
        seconds = time.monotonic() - began
    return {"ips": round(len(predictions) / seconds, 1), "images": len(predictions), "seconds": round(seconds, 2)}


def child_pandas_udf(s: Settings, dataset: str, version: str) -> dict:
    """(d): scalar-iterator pandas UDF with broadcast weights, as in published featurisation notebooks."""
    from pyspark.sql.functions import pandas_udf

    from orchard.core.lake import s3a_uri
    from orchard.spark_app.images import read_image_files
    from orchard.spark_app.session import spark_session

    net, card = load_driver_model(s, version)
    model_json, size, prep_name = net.to_json(), tuple(card["input_size"]), card["preprocessing"]
    out = s3a_uri(s.features_bucket, f"_bench/pandas_udf/{dataset}/")
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
        files = read_image_files(spark, s.images_bucket, dataset, None, IMAGES_PER_PARTITION)
        files.select("path", predict_udf("content").alias("probabilities")).write.mode("overwrite").parquet(out)
        images = spark.read.parquet(out).count()
        seconds = time.monotonic() - began
    return {"ips": round(images / seconds, 1), "images": images, "seconds": round(seconds, 2)}


CHILDREN = {"model_only": child_model_only, "elephas": child_elephas, "pandas_udf": child_pandas_udf}


def parse_args(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 8000])
    parser.add_argument("--classes", type=int, default=10, help="classes of the synthetic images")
    parser.add_argument(
        "--head",
        type=int,
        default=1000,
        help="outputs of the benchmarked CNN (default 1000, an ImageNet classifier's: what "
        "collecting every prediction to the driver costs shows at this width)",
    )
    parser.add_argument("--approaches", nargs="+", choices=APPROACHES, default=list(APPROACHES))
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
        result = CHILDREN[args.child](load_settings(), args.dataset, args.model)
        print(json.dumps(result), flush=True)
        return
    main_parent(args)


if __name__ == "__main__":
    main()
