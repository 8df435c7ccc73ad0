"""Class-data sharing archives of the Spark JVMs: which files an archive is valid for, when a session
uses them, what is kept of a class list a killed JVM left unfinished. Making and mapping them for
real: tests/integration/test_class_archive.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from orchard.core.toolchain import Toolchain, read_versions
from orchard.spark_app import class_archive
from orchard.spark_app.session import class_archive_options, spark_conf
from spark_app_settings import CFG


@pytest.fixture
def tools(tmp_path: Path, monkeypatch) -> Toolchain:
    jdk = tmp_path / "jdk"
    jdk.mkdir()
    (jdk / "release").write_text('JAVA_VERSION="17.0.15"\n')
    monkeypatch.setenv("JAVA_HOME", str(jdk))
    return Toolchain(cache_dir=tmp_path / "cache", versions=read_versions())


def jars(folder: Path, *sizes: int) -> str:
    folder.mkdir(exist_ok=True)
    for i, size in enumerate(sizes):
        (folder / f"j{i}.jar").write_bytes(b"x" * size)
    return f"{folder / 'j0.jar'}:{folder / '*'}"


def test_an_archive_is_named_after_the_jdk_and_the_exact_jars(tools: Toolchain, tmp_path: Path):
    classpath = jars(tmp_path / "jars", 10, 20)
    driver, executor = tools.class_archives(classpath)
    assert driver.parent == executor.parent and driver.parent.parent == tools.cache_dir / "class-archives"
    assert tools.class_archives(classpath) == (driver, executor)  # stable
    replaced = tmp_path / "jars" / "j1.jar"
    times = replaced.stat().st_atime_ns, replaced.stat().st_mtime_ns
    replaced.write_bytes(b"x" * 21)  # a jar of the wildcard replaced
    assert tools.class_archives(classpath)[0] != driver
    replaced.write_bytes(b"x" * 20)
    os.utime(replaced, ns=(times[0], times[1] + 1_000_000_000))  # the same jar reinstalled (a new venv)
    assert tools.class_archives(classpath)[0] != driver  # the JVM would refuse the archive
    os.utime(replaced, ns=times)
    assert tools.class_archives(classpath)[0] == driver
    (tmp_path / "jdk" / "release").write_text('JAVA_VERSION="17.0.16"\n')  # another JDK
    assert tools.class_archives(classpath)[0] != driver


def test_a_session_maps_the_archives_only_when_both_are_recorded(tools: Toolchain, tmp_path: Path):
    classpath = jars(tmp_path / "jars", 10)
    driver, executor = tools.class_archives(classpath)
    assert class_archive_options(tools, classpath) == {}
    driver.parent.mkdir(parents=True)
    driver.write_bytes(b"x")
    assert class_archive_options(tools, classpath) == {}  # the executors' is still missing
    executor.write_bytes(b"x")
    assert class_archive_options(tools, classpath) == {
        "spark.driver.extraJavaOptions": f"-XX:SharedArchiveFile={driver}",
        "spark.executor.extraJavaOptions": f"-XX:SharedArchiveFile={executor}",
    }


def test_the_classpath_ends_with_sparks_own_jars_so_they_come_before_its_conf_dir(tools: Toolchain):
    entries = tools.spark_classpath.split(":")
    assert entries[-1] == str(tools.spark_home / "jars" / "*")


def test_a_class_list_loses_only_an_unfinished_last_line(tmp_path: Path):
    killed = tmp_path / "killed.classlist"
    killed.write_text("# header\njava/lang/Object\norg/apache/spark/Spark")  # the JVM died mid-line
    assert class_archive.trimmed(killed).read_text() == "# header\njava/lang/Object\n"
    whole = tmp_path / "whole.classlist"
    whole.write_text("java/lang/Object\norg/apache/spark/SparkConf\n")
    assert class_archive.trimmed(whole).read_text() == "java/lang/Object\norg/apache/spark/SparkConf\n"


def test_every_session_maps_the_archives_once_they_are_made(tools: Toolchain):
    s = CFG.model_copy(update={"cache_dir": tools.cache_dir})
    for jar in tools.jars:
        jar.parent.mkdir(parents=True, exist_ok=True)
        jar.write_bytes(b"jar")
    before = spark_conf(s, "t")
    assert before["spark.driver.extraClassPath"] == before["spark.executor.extraClassPath"] == tools.spark_classpath
    assert "spark.driver.extraJavaOptions" not in before
    driver, executor = tools.class_archives(tools.spark_classpath)
    driver.parent.mkdir(parents=True)
    driver.write_bytes(b"x")
    executor.write_bytes(b"x")
    after = spark_conf(s, "t")
    assert after["spark.driver.extraJavaOptions"] == f"-XX:SharedArchiveFile={driver}"
    assert after["spark.executor.extraJavaOptions"] == f"-XX:SharedArchiveFile={executor}"
    assert spark_conf(s, "t", {"spark.driver.extraJavaOptions": "-Xmx2g"})["spark.driver.extraJavaOptions"] == "-Xmx2g"
