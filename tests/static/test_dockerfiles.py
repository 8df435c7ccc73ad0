"""Dockerfiles (hadolint), the load balancer's nginx.conf (nginx -t) and the scripts (shellcheck).

Each validator is also run on a deliberately broken copy, which it must reject.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from compose_checks import IMAGES_DIR, cache_dir, run
from config_renderings import compose_nginx_conf, dockerfile_instructions, expand
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


SPARK_DOCKERFILE = IMAGES_DIR / "spark" / "Dockerfile"
# The Delta Lake jars of the Spark image: file name, Maven Central directory, sha256 build arg.
DELTA_JARS = [
    ("delta-spark_2.13-${DELTA_VERSION}.jar", "io/delta/delta-spark_2.13/${DELTA_VERSION}", "DELTA_SPARK_SHA256"),
    ("delta-storage-${DELTA_VERSION}.jar", "io/delta/delta-storage/${DELTA_VERSION}", "DELTA_STORAGE_SHA256"),
]
SHA256_CHECK = re.compile(r'echo "\$\{(\w+)\}  ([^"]+)" \| sha256sum -c -')


def build_stage(dockerfile: Path, name: str) -> list[tuple[str, str]]:
    """The instructions of build stage `name` (`FROM ... AS name`), up to the next FROM."""
    stage: list[tuple[str, str]] = []
    inside = False
    for instruction, text in dockerfile_instructions(dockerfile):
        if instruction == "FROM":
            inside = text.lower().endswith(f" as {name}")
        elif inside:
            stage.append((instruction, text))
    assert stage, f"{dockerfile} has no build stage {name!r}"
    return stage


def test_spark_image_fetches_and_checks_the_pinned_delta_jars(compose_config, versions):
    """Like the s3a jars: from Maven Central, each checked against its sha256 of deps/versions.env."""
    stage = build_stage(SPARK_DOCKERFILE, "jars")
    declared = {text.partition("=")[0] for instruction, text in stage if instruction == "ARG"}
    runs = "\n".join(text for instruction, text in stage if instruction == "RUN")
    checks = {jar: arg for arg, jar in SHA256_CHECK.findall(runs)}
    for jar, directory, sha_arg in DELTA_JARS:
        assert {"DELTA_VERSION", sha_arg} <= declared, f"the jars stage does not declare {sha_arg}"
        assert f'curl -fsSLO "${{MAVEN_CENTRAL}}/{directory}/{jar}"' in runs, f"{jar} is not fetched"
        assert checks.get(jar) == sha_arg, f"{jar} is not checked against ${{{sha_arg}}}"
    # The build gets exactly the pins, and copies every checked jar into Spark's jars/ dir.
    args = compose_config["services"]["spark-master"]["build"]["args"]
    pins = ("DELTA_VERSION", "DELTA_SPARK_SHA256", "DELTA_STORAGE_SHA256")
    assert {k: args.get(k) for k in pins} == {k: versions[k] for k in pins}
    assert ("COPY", "--from=jars /jars/*.jar ${SPARK_HOME}/jars/") in dockerfile_instructions(SPARK_DOCKERFILE)


def test_spark_image_sha256_checks_pass_on_the_real_jars(versions):
    """Every `sha256sum -c` of the jars stage, with the pins, passes on the jars `make deps` fetched
    from Maven Central (deps/install.sh checks them against the same pins)."""
    runs = "\n".join(text for instruction, text in build_stage(SPARK_DOCKERFILE, "jars") if instruction == "RUN")
    checks = SHA256_CHECK.findall(runs)
    assert {jar for jar, _, _ in DELTA_JARS} <= {jar for _, jar in checks}
    jar_dir = cache_dir() / "jars"
    for sha_arg, jar in checks:
        name = expand(jar, versions)
        if not (jar_dir / name).exists():
            pytest.fail(f"{jar_dir / name} is missing: run `make deps`", pytrace=False)
        result = run(["sha256sum", "-c", "-"], input=f"{versions[sha_arg]}  {name}\n", cwd=jar_dir)
        assert result.returncode == 0, result.stdout + result.stderr


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
