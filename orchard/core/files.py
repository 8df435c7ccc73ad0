"""Small file readers shared by every layer: content digests, name lists and KEY=VALUE files."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

BLOCK = 1 << 20  # bytes read at a time when hashing


def sha256_file(path: Path) -> str:
    """The sha256 hex digest of a file's content, streamed (constant memory)."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def read_names(path: Path) -> list[str]:
    """Names (labels, classes) from a text file with one per line, or a JSON list / {"classes": [...]}.

    Raises ValueError naming the file when a JSON file holds neither.
    """
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        body = json.loads(text)
        names = body.get("classes") if isinstance(body, dict) else body
        if not isinstance(names, list):
            raise ValueError(f'{path}: expected a JSON list of names or {{"classes": [...]}}')
        return [str(name) for name in names]
    return [line.strip() for line in text.splitlines() if line.strip()]


def parse_assignments(lines: list[str] | tuple[str, ...], what: str = "line") -> dict[str, str]:
    """`KEY=VALUE` strings as a dict (blank lines and `#` comments skipped; the value is kept verbatim).

    Raises ValueError naming the `what` (e.g. "--conf") of the first string that is not KEY=VALUE.
    """
    pairs: dict[str, str] = {}
    for line in lines:
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{what} {line!r} is not KEY=VALUE")
        pairs[key.strip()] = value
    return pairs


def read_env_file(path: Path) -> dict[str, str]:
    """The KEY=VALUE pairs of a shell-style env file (no quoting, no expansion)."""
    return parse_assignments(path.read_text(encoding="utf-8").splitlines(), what=f"{path}:")
