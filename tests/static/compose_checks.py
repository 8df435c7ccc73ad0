"""Helpers of the static checks of the Docker compose deployment (no Docker engine needed).

The tools are the real ones `make deps` installs (deps/install-static-tools.sh): the compose CLI
built from source and hadolint. A missing tool fails the test with the command that installs it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from orchard.core.toolchain import REPO_ROOT

COMPOSE_FILE = REPO_ROOT / "compose" / "docker-compose.yml"
ENV_TEMPLATE = REPO_ROOT / "compose" / ".env.example"
MAKE_SECRETS = REPO_ROOT / "compose" / "make-secrets.sh"
IMAGES_DIR = REPO_ROOT / "images"
# The variables of compose/.env that `make secrets` generates.
SECRET_KEYS = (
    "MINIO_ROOT_PASSWORD",
    "UPLOADER_S3_SECRET_KEY",
    "SPARK_S3_SECRET_KEY",
    "SERVE_S3_SECRET_KEY",
    "ORCHARD_SERVE_API_KEY",
    "ELASTIC_PASSWORD",
    "KIBANA_SYSTEM_PASSWORD",
    "ORCHARD_ES_PASSWORD",
    "KIBANA_ENCRYPTION_KEY",
)
# Every profile, so the job services (uploader, spark-app) are validated too.
PROFILES = ("jobs",)


def cache_dir() -> Path:
    """~/.cache/orchard, or ORCHARD_CACHE_DIR: where `make deps` installs tools."""
    return Path(os.environ.get("ORCHARD_CACHE_DIR") or Path.home() / ".cache" / "orchard")


def find_tool(name: str) -> Path:
    """The installed tool `name` (cache bin dir first, then PATH); fails the test if missing."""
    candidate = cache_dir() / "bin" / name
    if candidate.exists():
        return candidate
    found = shutil.which(name)
    if found:
        return Path(found)
    pytest.fail(f"{name} is not installed: run `make deps` (deps/install-static-tools.sh)", pytrace=False)


def run(argv: list[str | Path], **kwargs) -> subprocess.CompletedProcess:
    """Run a command, capturing text output; never raises on a non-zero exit."""
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=120, check=False, **kwargs)


def write_env(path: Path) -> Path:
    """A compose .env written by the real `make secrets` script at `path`."""
    result = run(["bash", MAKE_SECRETS, path])
    assert result.returncode == 0, result.stderr
    return path


def compose_argv(
    compose: Path, env_file: Path, compose_file: Path = COMPOSE_FILE, project_dir: Path | None = None
) -> list[str | Path]:
    """`docker-compose -f FILE --env-file ENV [--project-directory DIR] --profile ...`."""
    argv: list[str | Path] = [compose, "-f", compose_file, "--env-file", env_file]
    if project_dir is not None:
        argv += ["--project-directory", project_dir]
    for profile in PROFILES:
        argv += ["--profile", profile]
    return argv
