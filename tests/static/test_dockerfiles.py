"""Dockerfiles (hadolint), the load balancer's nginx.conf (nginx -t) and the scripts (shellcheck).

Each validator is also run on a deliberately broken copy, which it must reject.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from compose_checks import IMAGES_DIR, run
from config_renderings import compose_nginx_conf
from orchard.core.toolchain import REPO_ROOT

HADOLINT_CONFIG = IMAGES_DIR / ".hadolint.yaml"
DOCKERFILES = sorted(IMAGES_DIR.glob("*/Dockerfile"))
SCRIPTS = sorted(
    [*IMAGES_DIR.rglob("*.sh"), *(REPO_ROOT / "compose").glob("*.sh"), REPO_ROOT / "deps" / "install-static-tools.sh"]
)


def hadolint_findings(hadolint: Path, dockerfile: Path) -> str:
    """hadolint's findings for `dockerfile` with the project's config; '' when it passes."""
    result = run([hadolint, "--no-color", "--config", HADOLINT_CONFIG, dockerfile])
    return "" if result.returncode == 0 else (result.stdout + result.stderr or f"exit {result.returncode}")


def test_there_are_dockerfiles():
    assert {p.parent.name for p in DOCKERFILES} >= {"minio", "minio-lb", "spark"}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_hadolint_passes(hadolint_bin, dockerfile):
    assert hadolint_findings(hadolint_bin, dockerfile) == ""


BROKEN_DOCKERFILES = {
    "unpinned base image": ("FROM python:3.11.13-slim-bookworm", "FROM python:latest"),
    "untrusted registry": ("FROM python:3.11.13-slim-bookworm", "FROM quay.io/someone/python:3.11"),
    "cd instead of WORKDIR": ("WORKDIR /opt/orchard\n", "RUN cd /opt/orchard\n"),
    "not a Dockerfile instruction": ("FROM python:3.11.13-slim-bookworm", "FORM python:3.11.13-slim-bookworm"),
    "pip with a cache": ("pip install --no-cache-dir", "pip install"),
}


@pytest.mark.parametrize("breakage", BROKEN_DOCKERFILES)
def test_hadolint_rejects_a_broken_copy(hadolint_bin, tmp_path, breakage):
    old, new = BROKEN_DOCKERFILES[breakage]
    text = (IMAGES_DIR / "spark" / "Dockerfile").read_text()
    assert old in text, f"the breakage {breakage!r} no longer applies: update the test"
    copy = tmp_path / "Dockerfile"
    copy.write_text(text.replace(old, new, 1))
    assert hadolint_findings(hadolint_bin, copy) != ""


def nginx_errors(conf_text: str, workdir: Path) -> str:
    """`nginx -t` on the config with the compose host names pointed at loopback; '' when valid.

    nginx resolves upstream names while testing, and minio1..4 exist only inside compose.
    """
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(nginx).exists():
        pytest.fail("nginx is not installed: run `make deps`", pytrace=False)
    conf = workdir / "nginx.conf"
    conf.write_text(re.sub(r"\bminio[1-4]:9000", "127.0.0.1:9000", conf_text))
    result = run([nginx, "-t", "-q", "-c", conf, "-p", workdir])
    return "" if result.returncode == 0 else result.stderr


def test_nginx_conf_is_valid(tmp_path, compose_config):
    """images/minio-lb/nginx.conf.template as the minio-lb container renders it."""
    assert nginx_errors(compose_nginx_conf(compose_config), tmp_path) == ""


def test_nginx_rejects_a_broken_copy(tmp_path, compose_config):
    broken = compose_nginx_conf(compose_config).replace("least_conn;", "least_conn", 1)
    assert nginx_errors(broken, tmp_path) != ""


def shellcheck_findings(shellcheck: Path, script: Path) -> str:
    """shellcheck's findings (all severities, sourced files followed); '' when it passes."""
    result = run([shellcheck, "--external-sources", "--severity=style", script], cwd=REPO_ROOT)
    return "" if result.returncode == 0 else (result.stdout + result.stderr or f"exit {result.returncode}")


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_shellcheck_passes(shellcheck_bin, script):
    assert shellcheck_findings(shellcheck_bin, script) == ""


BROKEN_SCRIPTS = {
    "unterminated loop": ("done\n", ""),
    "unquoted expansion": ('mc mb --ignore-existing "$ALIAS/$bucket"', "mc mb --ignore-existing $ALIAS/$bucket"),
    "variable in a printf format": ("printf '[minio-setup] %s\\n' \"$*\"", 'printf "[minio-setup] $*\\n"'),
}


@pytest.mark.parametrize("breakage", BROKEN_SCRIPTS)
def test_shellcheck_rejects_a_broken_copy(shellcheck_bin, tmp_path, breakage):
    old, new = BROKEN_SCRIPTS[breakage]
    text = (IMAGES_DIR / "minio" / "setup.sh").read_text()
    assert old in text, f"the breakage {breakage!r} no longer applies: update the test"
    broken = tmp_path / "setup.sh"
    broken.write_text(text.replace(old, new, 1))
    assert shellcheck_findings(shellcheck_bin, broken) != ""
