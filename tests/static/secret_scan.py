"""A focused secret scanner for what git would commit: private keys, cloud keys, filled-in secrets.

It scans `git ls-files` plus untracked files that are not ignored (what `git add -A` would take),
so a secret written into a file the project forgot to ignore is caught before it is committed.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

MAX_BYTES = 2_000_000  # larger files are data, not config

# Names whose value is a secret, in env files and YAML (case-insensitive).
SECRET_NAME = r"[A-Za-z0-9_.]*(?:password|passwd|secret|secret_key|secretkey|token|encryption_?key|api_?key)"
# A value that is only a reference to a variable, not the secret itself.
REFERENCE = r"(?:\$\{[^}]*\}|\$[A-Za-z_][A-Za-z0-9_]*|<[^>]*>|\"\"|'')"

ANYWHERE = {
    "private key": re.compile(r"-----BEGIN (?:[A-Z]+ )*PRIVATE KEY-----"),
    "AWS access key id": re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
    "AWS secret access key": re.compile(r"(?i)aws_secret_access_key\s*[=:]\s*['\"]?[A-Za-z0-9/+=]{40}"),
    "URL with a password": re.compile(r"[a-z][a-z0-9+.-]*://[^/\s:@]+:(?!\$\{)[^/\s:@]{6,}@"),
}
# [ \t] rather than \s: an empty value must not borrow the next line as its value.
ENV_ASSIGNMENT = re.compile(rf"(?im)^[ \t]*(?:export[ \t]+)?({SECRET_NAME})[ \t]*=[ \t]*(?!{REFERENCE}[ \t]*$)(\S+)")
YAML_ASSIGNMENT = re.compile(
    rf"(?im)^[ \t]*-?[ \t]*({SECRET_NAME})[ \t]*:[ \t]*(?!{REFERENCE}[ \t]*(?:#.*)?$)([^\s#{{\[][^\s#]*)"
)


@dataclass(frozen=True)
class Finding:
    """One suspected secret: where and what kind (the secret itself is never printed)."""

    path: str
    line: int
    kind: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.kind}"


def is_env_file(path: Path) -> bool:
    """.env, *.env, .env.* and env-like files (the .example templates included)."""
    name = path.name
    return name == ".env" or name.endswith(".env") or name.startswith(".env.")


def line_of(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def scan_text(path: Path, text: str) -> list[Finding]:
    """Findings in one file's text; the rules for assignments depend on the file type."""
    findings = [
        Finding(str(path), line_of(text, m.start()), kind) for kind, rx in ANYWHERE.items() for m in rx.finditer(text)
    ]
    if is_env_file(path):
        findings += [
            Finding(str(path), line_of(text, m.start()), f"{m.group(1)} has a value")
            for m in ENV_ASSIGNMENT.finditer(text)
        ]
    if path.suffix in {".yml", ".yaml"}:
        findings += [
            Finding(str(path), line_of(text, m.start()), f"{m.group(1)} is a literal")
            for m in YAML_ASSIGNMENT.finditer(text)
        ]
    return findings


def committable_files(repo: Path) -> list[Path]:
    """Tracked files plus untracked files git does not ignore, relative to `repo`."""
    out = subprocess.run(
        ["git", "-C", str(repo), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        check=True,
    ).stdout.decode()
    return sorted({Path(p) for p in out.split("\0") if p})


def read_text(path: Path) -> str | None:
    """The file as text, or None for binaries, huge files and files that vanished."""
    try:
        if path.stat().st_size > MAX_BYTES:
            return None
        data = path.read_bytes()
    except OSError:
        return None
    if b"\0" in data[:8192]:
        return None
    return data.decode("utf-8", errors="replace")


def scan_repo(repo: Path, extra_values: tuple[str, ...] = ()) -> list[Finding]:
    """Every finding in what git would commit, plus any occurrence of the given secret values."""
    findings = []
    for rel in committable_files(repo):
        text = read_text(repo / rel)
        if text is None:
            continue
        findings += scan_text(rel, text)
        findings += [
            Finding(str(rel), line_of(text, text.find(v)), "a generated secret")
            for v in extra_values
            if v and v in text
        ]
    return findings
