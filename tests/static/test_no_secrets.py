"""No secret is committed: the repository scan is clean, and the scanner catches planted secrets.

The planted secrets are assembled at run time, so this file itself contains none.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from compose_checks import SECRET_KEYS, write_env
from orchard.core.toolchain import REPO_ROOT, read_versions
from secret_scan import scan_repo, scan_text

# Paths that hold secrets at run time and must never be committable.
MUST_BE_IGNORED = ("compose/.env", ".env", "credentials.env", "certs/ca/ca.key")

FAKE = "Zx9" * 11  # 33 characters that look random enough
PLANTED = {
    "key.pem": "-----BEGIN " + "RSA PRIVATE KEY-----\nMIIB\n-----END RSA PRIVATE KEY-----\n",
    "aws.txt": "id = " + "AKIA" + "Q" * 16 + "\n",
    "aws.ini": "aws_secret_access_key = " + "a" * 40 + "\n",
    "stack.env": "ELASTIC_PASSWORD=" + FAKE + "\n",
    ".env": "export ORCHARD_S3_SECRET_KEY=" + FAKE + "\n",
    "compose.yml": "services:\n  x:\n    environment:\n      MINIO_ROOT_PASSWORD: " + FAKE + "\n",
    "kibana.yml": "elasticsearch.password: " + FAKE + "\n",
    "notes.md": "endpoint: https://admin:" + FAKE + "@minio.example/\n",
}
CLEAN = {
    "template.env": "ELASTIC_PASSWORD=\nMINIO_ROOT_USER=orchard-root\n",
    "compose.yml": "environment:\n  ELASTIC_PASSWORD: ${ELASTIC_PASSWORD:?run make secrets}\n",
    "kibana.yml": "elasticsearch.password: ${KIBANA_SYSTEM_PASSWORD}\n",
}


def git(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=False)


def test_the_repository_has_no_secret():
    findings = scan_repo(REPO_ROOT)
    assert not findings, "secrets in committable files:\n" + "\n".join(map(str, findings))


def test_generated_secrets_appear_in_no_committable_file(tmp_path):
    """The values `make secrets` generates never leak into a file git would take."""
    values = read_versions(write_env(tmp_path / ".env"))
    secrets = tuple(values[k] for k in SECRET_KEYS)
    assert all(len(s) == 32 for s in secrets)
    user_env = REPO_ROOT / "compose" / ".env"
    if user_env.exists():  # the developer's real secrets, when there are some
        secrets += tuple(v for k, v in read_versions(user_env).items() if k in SECRET_KEYS)
    assert scan_repo(REPO_ROOT, secrets) == []


@pytest.mark.parametrize("path", MUST_BE_IGNORED)
def test_secret_files_are_git_ignored(path):
    result = git(REPO_ROOT, "check-ignore", "-q", "--no-index", path)
    assert result.returncode == 0, f"{path} is not git-ignored: add it to .gitignore"


@pytest.mark.parametrize("name", PLANTED)
def test_the_scanner_catches_a_planted_secret(name):
    assert scan_text(Path(name), PLANTED[name]), f"missed the secret planted in {name}"


@pytest.mark.parametrize("name", CLEAN)
def test_the_scanner_accepts_references_and_empty_values(name):
    assert scan_text(Path(name), CLEAN[name]) == []


def test_the_repository_scan_catches_an_unignored_file(tmp_path):
    """End to end on a throwaway repo: a committable secret is found, an ignored one is not."""
    assert git(tmp_path, "init", "-q").returncode == 0
    (tmp_path / ".gitignore").write_text(".env\n")
    (tmp_path / ".env").write_text(PLANTED["stack.env"])  # ignored: fine
    (tmp_path / "settings.env").write_text(PLANTED["stack.env"])  # not ignored: caught
    findings = scan_repo(tmp_path)
    assert [f.path for f in findings] == ["settings.env"]
