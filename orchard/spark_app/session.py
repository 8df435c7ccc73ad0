"""The SparkSession of an Orchard job, built from Settings only (native, compose or a real cluster alike).

Executors do not have the repository on their PYTHONPATH: the packages they need (the core and the
Spark app, nothing of the uploader, the launcher or the CLI) are zipped and shipped with
`addPyFile`, so closures that reference them unpickle there.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

from orchard.core.clients import s3a_conf
from orchard.core.errors import DependencyMissing
from orchard.core.files import parse_assignments
from orchard.core.settings import Settings
from orchard.core.toolchain import REPO_ROOT, Toolchain

log = logging.getLogger(__name__)

# What executors import: the package root, its core layer and the Spark app (paths in the zip).
SHIPPED_PACKAGES = ("orchard/core", "orchard/spark_app")
SHIPPED_FILES = ("orchard/__init__.py",)

# Executors run one Keras model per core: keep TensorFlow and BLAS to one thread each, or two
# executors on two cores oversubscribe the CPU; no GPU probing noise in the logs.
EXECUTOR_ENV = {
    "OMP_NUM_THREADS": "1",
    "TF_NUM_INTRAOP_THREADS": "1",
    "TF_NUM_INTEROP_THREADS": "1",
    "TF_CPP_MIN_LOG_LEVEL": "3",
    "CUDA_VISIBLE_DEVICES": "-1",
    "PYTHONHASHSEED": "0",
}

DEFAULT_CONF = {
    "spark.executor.memory": "2g",
    "spark.python.worker.reuse": "true",  # the per-worker model cache relies on it
    "spark.task.maxFailures": "8",  # a killed worker must not fail the job
    "spark.sql.execution.arrow.pyspark.enabled": "true",
    "spark.ui.showConsoleProgress": "false",
    # Delta Lake, as in images/spark/spark-defaults.conf.template (a session may run without that file).
    "spark.sql.extensions": "io.delta.sql.DeltaSparkSessionExtension",
    "spark.sql.catalog.spark_catalog": "org.apache.spark.sql.delta.catalog.DeltaCatalog",
    # Delta rebuilds a table's state (its list of files) in this many tasks when a session first
    # reads it; the default 50 is sized for logs of millions of files: the images table has one
    # file per sync/optimize, and 50 tasks cost seconds on every job here.
    "spark.databricks.delta.snapshotPartitions": "4",
    # Timestamps (the table's ingested_at) read back as UTC whatever the machine's zone.
    "spark.sql.session.timeZone": "UTC",
    # Let adaptive execution coalesce the shuffle partitions of a cached frame too: with Spark's
    # default (false) a cached grouping or join keeps spark.sql.shuffle.partitions (200) partitions,
    # 200 tasks for every pass over it however small the data (`lake sync`'s key lists, `reindex`'s
    # documents); the price, an extra shuffle when a cached frame is joined on its grouping key, is
    # never paid here.
    "spark.sql.optimizer.canChangeCachedPlanOutputPartitioning": "true",
}


def package_zip(dest_dir: Path, root: Path = REPO_ROOT) -> Path:
    """Zip the Python packages executors need (no caches); returns the zip path."""
    target = dest_dir / "orchard-packages.zip"
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as zf:
        paths = [root / f for f in SHIPPED_FILES]
        for package in SHIPPED_PACKAGES:
            paths.extend(sorted((root / package).rglob("*.py")))
        for path in paths:
            zf.write(path, path.relative_to(root).as_posix())
    return target


def spark_conf(s: Settings, app_name: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Every conf key the session sets: master, s3a endpoint + credentials, classpath, Python, env."""
    access_key, secret_key = s.secret("s3_access_key"), s.secret("s3_secret_key")
    tools = Toolchain.from_cache(s.cache_dir)
    conf = {
        "spark.app.name": app_name,
        "spark.master": s.spark_master_url,
        **s3a_conf(s),
        "spark.hadoop.fs.s3a.access.key": access_key,
        "spark.hadoop.fs.s3a.secret.key": secret_key,
        "spark.pyspark.python": str(tools.python),
        "spark.pyspark.driver.python": str(tools.python),
        **DEFAULT_CONF,
        **{f"spark.executorEnv.{k}": v for k, v in EXECUTOR_ENV.items()},
    }
    if any(j.exists() for j in tools.jars):  # else the cluster's spark-defaults.conf has them (compose, EMR)
        classpath = tools.spark_classpath
        conf["spark.driver.extraClassPath"] = classpath
        conf["spark.executor.extraClassPath"] = classpath
        conf.update(class_archive_options(tools, classpath))
    conf.update(extra or {})
    return conf


def class_archive_options(tools: Toolchain, classpath: str) -> dict[str, str]:
    """The JVM options that map the recorded class-data sharing archives (orchard.spark_app.class_archive)
    into the driver and the executors, when both are there; none otherwise. A JVM that cannot use its
    archive (another JDK, changed jars) says so in one warning line and loads classes as usual."""
    try:
        driver, executor = tools.class_archives(classpath)
    except DependencyMissing:  # no JDK found here: spark-submit will say so itself
        return {}
    if not (driver.exists() and executor.exists()):
        return {}
    return {
        "spark.driver.extraJavaOptions": f"-XX:SharedArchiveFile={driver}",
        "spark.executor.extraJavaOptions": f"-XX:SharedArchiveFile={executor}",
    }


def build_session(s: Settings, app_name: str, extra_conf: dict[str, str] | None = None):
    """A new SparkSession on the configured master with the packages shipped to executors."""
    from pyspark.sql import SparkSession

    conf_dir = s.home / "conf" / "spark"
    if conf_dir.is_dir():
        os.environ.setdefault("SPARK_CONF_DIR", str(conf_dir))
    # pyspark takes the executors' Python from PYSPARK_PYTHON of the driver process (spark.pyspark.python
    # only reaches it through spark-submit): default it to the interpreter with the pinned packages.
    os.environ.setdefault("PYSPARK_PYTHON", str(Toolchain.from_cache(s.cache_dir).python))
    builder = SparkSession.builder
    for key, value in spark_conf(s, app_name, extra_conf).items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    zip_dir = Path(tempfile.mkdtemp(prefix="orchard-pyfiles-"))
    spark.sparkContext.addPyFile(str(package_zip(zip_dir)))
    log.info("spark session %s on %s (app id %s)", app_name, s.spark_master_url, spark.sparkContext.applicationId)
    return spark


@contextlib.contextmanager
def spark_session(s: Settings, app_name: str, extra_conf: dict[str, str] | None = None) -> Iterator:
    """build_session as a context manager that stops the session (and frees the cluster) on exit."""
    spark = build_session(s, app_name, extra_conf)
    try:
        yield spark
    finally:
        spark.stop()


def executor_count(spark, wait_seconds: float = 60.0, settle_seconds: float = 4.0) -> int:
    """Executors registered with the app, once their number has not changed for `settle_seconds`.

    Executors register a few seconds after the session starts, one by one; waits at most `wait_seconds`.
    """
    sc = spark.sparkContext
    deadline = time.monotonic() + wait_seconds
    last, since = -1, time.monotonic()
    while True:
        count = sc._jsc.sc().getExecutorMemoryStatus().size() - 1  # the driver is in the map too
        now = time.monotonic()
        if count != last:
            last, since = count, now
        if (count > 0 and now - since >= settle_seconds) or now >= deadline:
            return max(count, 1)
        time.sleep(0.5)


def parse_conf(pairs: tuple[str, ...]) -> dict[str, str]:
    """`--conf key=value` flags as a dict; ValueError naming a malformed one."""
    return parse_assignments(pairs, what="--conf")


def warm_delta(spark, uri: str, ensure: Callable[[], None]) -> threading.Thread:
    """Run `ensure()` (create the Delta table at `uri` if needed) and load the table's log, in a
    driver thread started now: Delta's first operation in a driver costs ~15 s (classes, log
    replay), which then overlaps the job running meanwhile instead of following it (measured: a cold
    MERGE of 200 rows 20 s, a warm one 6 s). Join the thread before writing; its errors are only
    logged (the write reports the one that matters)."""

    def run() -> None:
        try:
            ensure()
            spark.read.format("delta").load(uri).where("false").count()
        except Exception as exc:  # the write after it raises the error that matters
            log.debug("warming up the Delta table at %s failed: %s", uri, exc)

    thread = threading.Thread(target=run, name=f"warm-up {uri}", daemon=True)
    thread.start()
    return thread
