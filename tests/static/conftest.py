"""Fixtures of the static checks of the Docker compose deployment (tests/static)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from compose_checks import compose_argv, find_tool, run, write_env
from orchard.core.toolchain import read_versions


@pytest.fixture(scope="session")
def versions() -> dict[str, str]:
    """deps/versions.env."""
    return read_versions()


@pytest.fixture(scope="session")
def compose_bin() -> Path:
    return find_tool("docker-compose")


@pytest.fixture(scope="session")
def hadolint_bin() -> Path:
    return find_tool("hadolint")


@pytest.fixture(scope="session")
def shellcheck_bin() -> Path:
    return find_tool("shellcheck")


@pytest.fixture(scope="session")
def env_file(tmp_path_factory) -> Path:
    """A throwaway compose .env with freshly generated secrets (never the user's compose/.env)."""
    return write_env(tmp_path_factory.mktemp("compose-env") / ".env")


@pytest.fixture(scope="session")
def env_values(env_file: Path) -> dict[str, str]:
    """The KEY=VALUE pairs of the generated .env."""
    return read_versions(env_file)


@pytest.fixture(scope="session")
def compose_config(compose_bin: Path, env_file: Path) -> dict:
    """The fully resolved compose model (`docker compose config --format json`), all profiles."""
    result = run([*compose_argv(compose_bin, env_file), "config", "--format", "json"])
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)
