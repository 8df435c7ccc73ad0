"""Where `make deps` put things: pinned versions (deps/versions.env) and installed paths."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from orchard.core.errors import DependencyMissing
from orchard.core.files import read_env_file

REPO_ROOT = Path(__file__).resolve().parents[2]
VERSIONS_FILE = REPO_ROOT / "deps" / "versions.env"


def read_versions(path: Path = VERSIONS_FILE) -> dict[str, str]:
    """Parse the KEY=VALUE pins of deps/versions.env (comments and blanks skipped)."""
    return {key: value.strip() for key, value in read_env_file(path).items()}


@dataclass(frozen=True)
class Toolchain:
    """Paths of the binaries and distributions the native stack runs."""

    cache_dir: Path
    versions: dict[str, str]

    @classmethod
    def from_cache(cls, cache_dir: Path) -> Toolchain:
        """The toolchain installed under `cache_dir` at the pinned versions."""
        return cls(cache_dir=cache_dir, versions=read_versions())

    @property
    def minio(self) -> Path:
        return self.cache_dir / "bin" / f"minio-{self.versions['MINIO_VERSION']}" / "minio"

    @property
    def mc(self) -> Path:
        return self.cache_dir / "bin" / f"mc-{self.versions['MC_VERSION']}" / "mc"

    @property
    def es_home(self) -> Path:
        return self.cache_dir / f"elasticsearch-{self.versions['ES_VERSION']}"

    @property
    def jars(self) -> list[Path]:
        jar_dir = self.cache_dir / "jars"
        return [
            jar_dir / f"hadoop-aws-{self.versions['HADOOP_VERSION']}.jar",
            jar_dir / f"bundle-{self.versions['AWS_SDK_BUNDLE_VERSION']}.jar",
            jar_dir / f"delta-spark_2.13-{self.versions['DELTA_VERSION']}.jar",
            jar_dir / f"delta-storage-{self.versions['DELTA_VERSION']}.jar",
        ]

    @property
    def spark_classpath(self) -> str:
        """The extra classpath of Orchard's Spark JVMs: the pinned jars, then Spark's own jars.

        Spark's jars are on the classpath anyway (after its conf directory); listing them first too
        lets the JVMs use a class-data sharing archive, which refuses a classpath where a non-empty
        directory comes before a jar it loaded classes from (orchard.spark_app.class_archive)."""
        jars = [str(j) for j in self.jars if j.exists()]
        return ":".join([*jars, str(self.spark_home / "jars" / "*")])

    def class_archives(self, classpath: str) -> tuple[Path, Path]:
        """The (driver, executor) class-data sharing archives of Spark JVMs on `classpath`, under a
        folder named after what an archive is only valid for: this JDK and these exact jars (the JVM
        refuses an archive if a jar's size or modification time differs: a reinstalled venv has the
        same jars with new times, and needs new archives)."""
        release = self.java_home / "release"
        key = hashlib.sha256(release.read_bytes() if release.exists() else str(self.java_home).encode())
        for entry in classpath.split(":"):
            path = Path(entry)
            files = sorted(path.parent.glob("*.jar")) if path.name == "*" else [path]
            stats = ((f, f.stat()) for f in files if f.exists())
            key.update("".join(f"{f}:{st.st_size}:{st.st_mtime_ns}\n" for f, st in stats).encode())
        folder = self.cache_dir / "class-archives" / key.hexdigest()[:16]
        return folder / "driver.jsa", folder / "executor.jsa"

    @property
    def python(self) -> Path:
        """The venv interpreter (also used by Spark's Python workers)."""
        venv_python = self.cache_dir / "venv" / "bin" / "python"
        return venv_python if venv_python.exists() else Path(sys.executable)

    @property
    def spark_home(self) -> Path:
        """pyspark's own distribution: bin/spark-class, jars/ (located without importing pyspark)."""
        spec = importlib.util.find_spec("pyspark")
        if spec is None or spec.origin is None:
            raise DependencyMissing("pyspark is not installed in this Python: run `make deps`")
        return Path(spec.origin).resolve().parent

    @property
    def java_home(self) -> Path:
        """JAVA_HOME, or the JDK of the `java` on PATH."""
        if os.environ.get("JAVA_HOME"):
            return Path(os.environ["JAVA_HOME"])
        java = shutil.which("java")
        if not java:
            raise DependencyMissing("java is not on PATH (Java 17+ is required)")
        return Path(java).resolve().parent.parent

    @property
    def nginx(self) -> Path:
        found = shutil.which("nginx") or "/usr/sbin/nginx"
        return Path(found)

    def check(self) -> None:
        """Raise DependencyMissing naming the first missing piece."""
        needed = [self.minio, self.mc, self.es_home / "bin" / "elasticsearch", self.nginx, *self.jars]
        for path in needed:
            if not path.exists():
                raise DependencyMissing(f"{path} is missing: run `make deps`")
