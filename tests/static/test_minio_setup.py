"""images/minio/setup.sh against a real (throwaway, single-node) MinIO server of the pinned build.

The script is the one the compose `minio-setup` service runs; here it runs with the native `minio`
and `mc` binaries of `make deps`, so its buckets, policies and keys are checked for real: each
service's key can do exactly what its policy says, and a second run changes nothing.
"""

from __future__ import annotations

import io
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest
from minio import Minio
from minio.error import S3Error

from compose_checks import IMAGES_DIR, cache_dir, run
from orchard.core.toolchain import Toolchain

ROOT = ("orchard-root", "root-password-for-tests")
UPLOADER = ("orchard-uploader", "uploader-secret-for-tests")
SPARK = ("orchard-spark", "spark-secret-for-tests")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_live(port: int, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    """Until /minio/health/live answers 200 (fails if the server exits or time runs out)."""
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "minio exited during startup"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/minio/health/live", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    pytest.fail("minio did not become live")


@pytest.fixture(scope="module")
def tools() -> Toolchain:
    tools = Toolchain.from_cache(cache_dir())
    for binary in (tools.minio, tools.mc):
        if not binary.exists():
            pytest.fail(f"{binary} is missing: run `make deps`", pytrace=False)
    return tools


@pytest.fixture(scope="module")
def minio_port(tools, tmp_path_factory):
    """A single-node MinIO on a free loopback port, stopped after the module."""
    data = tmp_path_factory.mktemp("minio-data")
    port, console = free_port(), free_port()
    env = {
        **os.environ,
        "MINIO_ROOT_USER": ROOT[0],
        "MINIO_ROOT_PASSWORD": ROOT[1],
        "MINIO_CI_CD": "on",
        "MINIO_UPDATE": "off",
    }
    proc = subprocess.Popen(
        [
            str(tools.minio),
            "server",
            "--quiet",
            "--address",
            f"127.0.0.1:{port}",
            "--console-address",
            f"127.0.0.1:{console}",
            str(data),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_live(port, proc)
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def run_setup(tools: Toolchain, port: int, tmp_path: Path) -> subprocess.CompletedProcess:
    """images/minio/setup.sh with the native mc first on PATH, as in the container."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    if not (bin_dir / "mc").exists():
        (bin_dir / "mc").symlink_to(tools.mc)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "MINIO_SETUP_ENDPOINT": f"http://127.0.0.1:{port}",
        "MINIO_ROOT_USER": ROOT[0],
        "MINIO_ROOT_PASSWORD": ROOT[1],
        "UPLOADER_S3_ACCESS_KEY": UPLOADER[0],
        "UPLOADER_S3_SECRET_KEY": UPLOADER[1],
        "SPARK_S3_ACCESS_KEY": SPARK[0],
        "SPARK_S3_SECRET_KEY": SPARK[1],
    }
    return run(["bash", IMAGES_DIR / "minio" / "setup.sh"], env=env)


@pytest.fixture(scope="module")
def setup_runs(tools, minio_port, tmp_path_factory):
    """Two runs of the setup script (the second proves it is re-runnable)."""
    work = tmp_path_factory.mktemp("minio-setup")
    return [run_setup(tools, minio_port, work) for _ in range(2)]


def client(port: int, creds: tuple[str, str]) -> Minio:
    return Minio(f"127.0.0.1:{port}", access_key=creds[0], secret_key=creds[1], secure=False)


def allowed(action) -> bool:
    """True if the S3 call succeeds, False if MinIO denies it."""
    try:
        action()
    except S3Error as exc:
        assert exc.code == "AccessDenied", exc
        return False
    return True


def put(c: Minio, bucket: str, key: str):
    return lambda: c.put_object(bucket, key, io.BytesIO(b"x"), 1)


def test_setup_succeeds_twice(setup_runs):
    for result in setup_runs:
        assert result.returncode == 0, result.stderr
    assert "already has policy" in setup_runs[1].stderr


def test_buckets_exist(setup_runs, minio_port):
    root = client(minio_port, ROOT)
    assert {b.name for b in root.list_buckets()} >= {"images", "features", "models"}


def test_uploader_may_only_write_images(setup_runs, minio_port):
    up = client(minio_port, UPLOADER)
    assert allowed(put(up, "images", "u/1.jpg"))
    assert allowed(lambda: up.stat_object("images", "u/1.jpg"))  # skip-if-present on re-runs
    assert allowed(lambda: list(up.list_objects("images", prefix="u/")))
    assert not allowed(put(up, "features", "u/1.parquet"))
    assert not allowed(put(up, "models", "u/model.keras"))
    assert not allowed(lambda: up.remove_object("images", "u/1.jpg"))


def test_spark_reads_images_and_writes_features_and_models(setup_runs, minio_port):
    root, spark = client(minio_port, ROOT), client(minio_port, SPARK)
    root.put_object("images", "s/2.jpg", io.BytesIO(b"img"), 3)
    assert spark.get_object("images", "s/2.jpg").read() == b"img"
    assert not allowed(put(spark, "images", "s/3.jpg"))
    for bucket in ("features", "models"):
        assert allowed(put(spark, bucket, "s/part-0"))
        assert allowed(lambda b=bucket: spark.get_object(b, "s/part-0").read())
        assert allowed(lambda b=bucket: spark.remove_object(b, "s/part-0"))  # s3a commit renames
    assert not allowed(lambda: spark.make_bucket("spark-made"))


def test_setup_fails_without_secrets():
    result = run(["bash", IMAGES_DIR / "minio" / "setup.sh"], env={**os.environ, "MINIO_ROOT_PASSWORD": ""})
    assert result.returncode == 2 and "make secrets" in result.stderr
