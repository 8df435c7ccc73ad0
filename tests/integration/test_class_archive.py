"""The Spark JVMs' class-data sharing archives on the real native stack: the ones `orchard stack up`
recorded from a real application (orchard.spark_app.class_archive; tests/run.sh starts the stack
with it, and a fresh machine records them there) are mapped by the driver and both executors of a
session built as every Orchard job builds one.

The session runs in a Python process of its own: JVM options apply only to a driver JVM the process
starts, and this pytest process may already have one (the unit tests' local sessions).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchard.core.settings import Settings
from orchard.core.toolchain import REPO_ROOT
from orchard.spark_app.class_archive import archives_of

pytestmark = pytest.mark.integration

# A session with the archives and a class-loading log per JVM; a job that runs on both executors.
USE = """
import sys
from orchard.core.settings import load_settings
from orchard.spark_app.session import spark_session
driver, executor, logs = sys.argv[1:4]
log = "-Xlog:class+load=info:file=" + logs + "/{}.log"
conf = {
    "spark.driver.extraJavaOptions": f"-XX:SharedArchiveFile={driver} " + log.format("driver"),
    "spark.executor.extraJavaOptions": f"-XX:SharedArchiveFile={executor} " + log.format("executor-{{EXECUTOR_ID}}"),
}
with spark_session(load_settings(), "it-class-archive", conf) as spark:
    print(spark.sparkContext.parallelize(range(64), 8).map(lambda x: x * 2).sum())
"""


def run_python(code: str, *args: str) -> str:
    """Run `code` in a new Python process of the repository; returns its stdout (fails the test on an error)."""
    done = subprocess.run(
        [sys.executable, "-c", code, *args], check=False, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def spark_classes(log: Path) -> tuple[int, int]:
    """(mapped from an archive, in all) of the org.apache.spark classes a JVM's class-loading log lists
    (the JDK's own archive has none of them)."""
    # Lambda classes are spun at run time (not archived by a static dump): the classes of the jars count.
    lines = [line for line in log.read_text().splitlines() if " org.apache.spark." in line and "$$Lambda" not in line]
    return sum("source: shared objects file" in line for line in lines), len(lines)


def executor_logs(logs: Path, timeout: float = 30.0) -> list[Path]:
    """The executors' class-loading logs, once both executors wrote one (they may outlive the app briefly)."""
    deadline = time.monotonic() + timeout
    while len(found := sorted(logs.glob("executor-*.log"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    return found


def test_recorded_archives_are_mapped_by_the_driver_and_the_executors(stack: Settings, tmp_path: Path):
    logs = tmp_path / "logs"
    logs.mkdir()
    driver, executor = archives_of(stack)
    assert driver.exists() and executor.exists(), f"`orchard stack up` made no archives in {driver.parent}"
    assert driver.stat().st_size > 10_000_000 and executor.stat().st_size > 10_000_000
    assert not list(driver.parent.glob("*.part"))  # every dump finished

    assert run_python(USE, str(driver), str(executor), str(logs)).strip() == str(sum(range(64)) * 2)

    shared, loaded = spark_classes(logs / "driver.log")
    assert loaded > 1000 and shared / loaded > 0.95, (shared, loaded)
    executors = executor_logs(logs)
    assert len(executors) == 2
    for log in executors:
        shared, loaded = spark_classes(log)
        assert loaded > 500 and shared / loaded > 0.95, (log.name, shared, loaded)
