"""Class-data sharing (CDS) archives of Orchard's Spark JVMs: every new Spark application starts faster.

A new application loads, verifies and links the same ~20,000 classes (Spark SQL, Delta, s3a, the
AWS SDK) in its driver and in each executor: seconds of CPU on every `orchard infer`, `train`,
`features` or `lake sync`, on machines where there is no idle core to hide them. A CDS archive maps
them, already parsed and verified, into a new JVM instead (`-XX:SharedArchiveFile`,
orchard.spark_app.session.class_archive_options).

`record` makes the archives when the ones of this JDK and jar set are missing (`orchard stack up`
calls it): it runs an application that does what Orchard's jobs do — writes, MERGEs and reads a
scratch Delta table in the lake bucket through Python jobs, fits PCA and k-means — with its driver
and executors listing the classes they load (`-XX:DumpLoadedClassList`), then builds one static
archive per list with the JDK (`java -Xshare:dump`). Static, not recorded at exit
(`-XX:ArchiveClassesAtExit`): the standalone worker kills an executor 10 s after its application
ends, too soon for a loaded 2-core machine to write an archive; a class list is written as the
classes load, and the dump is a process of its own whose exit status says it is complete. An
archive is only valid for the JDK and the exact classpath it was made for (Toolchain.class_archives
names its folder after both); a JVM that cannot use it says so in one warning line and loads its
classes as usual.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchard.core.errors import OrchardError
from orchard.core.health import get_json
from orchard.core.settings import Settings
from orchard.core.toolchain import Toolchain
from orchard.spark_app.session import spark_session

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

log = logging.getLogger(__name__)

# How long the executors of the listing application may take to end after it stops.
EXECUTORS_END_TIMEOUT_S = 60.0
DUMP_TIMEOUT_S = 600.0
SCRATCH_SCHEMA = "id STRING, dataset STRING, label STRING, confidence DOUBLE"


def archives_of(s: Settings) -> tuple[Path, Path]:
    """The (driver, executor) archive paths of this machine's JDK and Orchard's Spark classpath."""
    tools = Toolchain.from_cache(s.cache_dir)
    return tools.class_archives(tools.spark_classpath)


def record(s: Settings) -> bool:
    """Make this machine's archives (archives_of) unless both exist; returns True if it made them.

    Needs the running cluster, idle, and write access to the lake bucket (the Spark key has it)."""
    driver, executor = archives_of(s)
    if driver.exists() and executor.exists():
        return False
    busy = cores_in_use(s)
    if busy:  # the listing application would queue behind the running one
        log.info("Spark runs an application (%d cores in use): class archives left to a later `stack up`", busy)
        return False
    started = time.monotonic()
    log.info("making the Spark JVMs' class archives (once per JDK and jar set, 1-2 min)")
    record_into(s, driver.parent)
    log.info("made the Spark JVMs' class archives in %.0f s: %s", time.monotonic() - started, driver.parent)
    return True


def cores_in_use(s: Settings) -> int:
    """The cores the standalone master has given to applications now (its UI's JSON)."""
    master = get_json(f"http://{s.bind_host}:{s.spark_ui_port}/json/")
    return int(master.get("coresused", 0))


def record_into(s: Settings, folder: Path) -> tuple[Path, Path]:
    """Make the (driver, executor) archives of one representative application in `folder` (emptied
    first: leftovers of an interrupted run); returns their paths."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    lists = list_classes(s, folder)
    tools = Toolchain.from_cache(s.cache_dir)
    archives = (folder / "driver.jsa", folder / "executor.jsa")
    dumps = [start_dump(tools, class_list, archive) for class_list, archive in zip(lists, archives, strict=True)]
    for dump, archive in zip(dumps, archives, strict=True):
        finish_dump(dump, archive)
    return archives


def ensure(s: Settings) -> bool:
    """`record` for callers that must not fail because of it (`orchard stack up`): an archive only
    saves time, so whatever stops its making is one warning line, and Spark applications start as
    they would without it. Returns True if the archives are there."""
    from py4j.protocol import Py4JError
    from pyspark.errors import PySparkException

    try:
        record(s)
    except (
        OrchardError,
        RuntimeError,
        OSError,
        ValueError,
        subprocess.SubprocessError,
        Py4JError,
        PySparkException,
    ) as exc:
        log.warning("Spark applications will start without class archives: %s", exc)
        return False
    return True


def list_classes(s: Settings, folder: Path) -> tuple[Path, Path]:
    """Run the representative application with its JVMs listing the classes they load; returns the
    (driver, executor) class lists, complete: the driver's JVM and the executors have ended."""
    conf = {
        "spark.driver.extraJavaOptions": f"-XX:DumpLoadedClassList={folder / 'driver.classlist'}",
        # {{EXECUTOR_ID}}: Spark's own placeholder, so that executors never write the same file.
        "spark.executor.extraJavaOptions": f"-XX:DumpLoadedClassList={folder}/executor-{{{{EXECUTOR_ID}}}}.classlist",
    }
    with spark_session(s, "orchard-class-archive", conf) as spark:
        exercise(spark, s)
        gateway = spark.sparkContext._gateway
    stop_driver_jvm(gateway)
    wait_for_executors_to_end(s)
    executor_lists = sorted(folder.glob("executor-*.classlist"), key=lambda p: p.stat().st_size)
    driver_list = folder / "driver.classlist"
    if not driver_list.exists() or not executor_lists:
        raise RuntimeError(f"the Spark JVMs listed no classes in {folder}")
    return trimmed(driver_list), trimmed(executor_lists[-1])


def trimmed(class_list: Path) -> Path:
    """`class_list` without an unfinished last line (a JVM killed while writing it); returns it."""
    text = class_list.read_text(encoding="utf-8", errors="replace")
    if text and not text.endswith("\n"):
        class_list.write_text(text[: text.rfind("\n") + 1], encoding="utf-8")
    return class_list


def wait_for_executors_to_end(s: Settings) -> None:
    """Wait (bounded) until the master has no cores in use: the workers have ended the executors."""
    deadline = time.monotonic() + EXECUTORS_END_TIMEOUT_S
    while cores_in_use(s) and time.monotonic() < deadline:
        time.sleep(0.5)


def start_dump(tools: Toolchain, class_list: Path, archive: Path) -> subprocess.Popen:
    """Start the JDK building a static archive of `class_list`'s classes on Orchard's Spark classpath
    (a prefix of every Orchard Spark JVM's classpath) into `archive`.part."""
    argv = [
        str(tools.java_home / "bin" / "java"),
        "-Xshare:dump",
        f"-XX:SharedClassListFile={class_list}",
        f"-XX:SharedArchiveFile={archive}.part",
        "-cp",
        tools.spark_classpath,
    ]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish_dump(dump: subprocess.Popen, archive: Path) -> None:
    """Wait for `dump`; its archive replaces `archive` if it succeeded, else RuntimeError with its last line."""
    output, _ = dump.communicate(timeout=DUMP_TIMEOUT_S)
    if dump.returncode != 0:
        last = (output or "").strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"java -Xshare:dump of {archive.name} exited {dump.returncode}: {last[0]}")
    log.debug("%s: %s", archive.name, output)
    archive.with_name(archive.name + ".part").replace(archive)


def exercise(spark: SparkSession, s: Settings) -> None:
    """What Orchard's jobs do, on a scratch Delta table in the lake bucket: a DataFrame from a Python
    RDD written as Delta, a MERGE, a filtered read, a Python pass over its rows, PCA and k-means;
    then the table is deleted."""
    from delta.tables import DeltaTable

    uri = f"s3a://{s.lake_bucket}/_orchard/class-archive-{uuid.uuid4().hex[:8]}"
    rows = spark.sparkContext.parallelize([(f"{i:04d}", f"d{i % 2}", f"l{i % 3}", i / 64) for i in range(64)], 2)
    try:
        spark.createDataFrame(rows, SCRATCH_SCHEMA).write.format("delta").partitionBy("dataset").save(uri)
        update = spark.createDataFrame(rows.map(lambda r: (r[0], r[1], r[2], 1.0)), SCRATCH_SCHEMA).alias("s")
        table = DeltaTable.forPath(spark, uri).alias("t")
        merge = table.merge(update, "t.id = s.id AND t.dataset = s.dataset")
        merge.whenMatchedUpdateAll().whenNotMatchedInsertAll().execute()
        kept = spark.read.format("delta").load(uri).where("dataset = 'd1'").rdd.map(lambda r: r.confidence).sum()
        log.debug("class-archive scratch table: %s rows, sum %.1f", table.toDF().count(), kept)
        fit_models(spark)
    finally:
        delete_path(spark, uri)


def fit_models(spark: SparkSession) -> None:
    """Fit the Spark ML models Orchard's jobs fit (PCA of `orchard features`, k-means of the BoVW
    vocabulary) on a few vectors."""
    from pyspark.ml.clustering import KMeans
    from pyspark.ml.feature import PCA
    from pyspark.ml.linalg import Vectors

    vectors = spark.createDataFrame([(Vectors.dense([i, i % 3, i % 5]),) for i in range(16)], ["features"])
    PCA(k=2, inputCol="features", outputCol="pca").fit(vectors).transform(vectors).count()
    KMeans(k=2, seed=1).fit(vectors).transform(vectors).count()


def delete_path(spark: SparkSession, uri: str) -> None:
    """Delete `uri` recursively through the session's Hadoop file system (s3a)."""
    jvm: Any = spark._jvm  # set while the session runs
    path = jvm.org.apache.hadoop.fs.Path(uri)
    path.getFileSystem(spark.sparkContext._jsc.hadoopConfiguration()).delete(path, True)


def stop_driver_jvm(gateway) -> None:
    """End the (stopped) session's driver JVM the way pyspark does when its Python exits — by closing
    the JVM's stdin — and wait for it, so that its class list is complete when this returns."""
    from pyspark import SparkContext

    proc = gateway.proc
    gateway.shutdown()
    proc.stdin.close()
    proc.wait(timeout=120)
    # A later session of this process must launch a JVM of its own, not call the one that exited.
    SparkContext._gateway = None
    SparkContext._jvm = None
