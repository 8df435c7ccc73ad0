"""Benchmark: a new Spark application with the JVMs' class-data sharing archives
(orchard.spark_app.class_archive) against the same application loading its classes from the jars.

Each round starts a new Python process (so a new driver JVM and two new executors) that builds the
session as every Orchard job does and runs the archives' own representative work on the running
native stack (a scratch Delta table written, MERGEd, read through Python; PCA and k-means), then
ends. The two variants alternate, same run; the baseline passes empty JVM options, which is what a
session gets without archives. Needs `orchard stack up` (which makes the archives) and an idle
cluster. Last line of stdout: one JSON object (seconds per round, medians, their ratio).

    PYTHONPATH=. ~/.cache/orchard/venv/bin/python bench/spark_start.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import time
from pathlib import Path

from orchard.core.settings import load_settings
from orchard.spark_app import class_archive

log = logging.getLogger("bench.spark_start")
REPO = Path(__file__).resolve().parents[1]

APPLICATION = """
import json, sys
from orchard.core.settings import load_settings
from orchard.spark_app.class_archive import exercise
from orchard.spark_app.session import spark_session
s = load_settings()
with spark_session(s, "bench-spark-start", json.loads(sys.argv[1])) as spark:
    exercise(spark, s)
"""
WITHOUT_ARCHIVES = {"spark.driver.extraJavaOptions": "", "spark.executor.extraJavaOptions": ""}


def run_application(conf: dict[str, str]) -> float:
    """Seconds of one new application (process start to exit) with `conf` on top of the session's."""
    began = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", APPLICATION, json.dumps(conf)], cwd=REPO, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise SystemExit(f"the benchmark application failed: {done.stderr.strip().splitlines()[-1:]}")
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    s = load_settings()
    if not class_archive.ensure(s) or not all(p.exists() for p in class_archive.archives_of(s)):
        raise SystemExit("no class archives: start the stack with `bin/orchard stack up` on an idle cluster")
    seconds: dict[str, list[float]] = {"archives": [], "jars": []}
    for round_ in range(args.rounds):
        for variant, conf in (("archives", {}), ("jars", WITHOUT_ARCHIVES)):
            seconds[variant].append(round(run_application(conf), 2))
            log.info("round %d %s: %.1f s", round_ + 1, variant, seconds[variant][-1])
    medians = {k: statistics.median(v) for k, v in seconds.items()}
    print(
        json.dumps(
            {
                "seconds": seconds,
                "median_s_archives": medians["archives"],
                "median_s_jars": medians["jars"],
                "speedup": round(medians["jars"] / medians["archives"], 3),
            }
        )
    )


if __name__ == "__main__":
    main()
