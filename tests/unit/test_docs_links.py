"""Every link in README.md and docs/ resolves, and so does every repository path they name.

Links: Markdown `[text](target)` with a relative target (the file must exist; an `#anchor` must be a
heading of that file). Paths: back-quoted names under a top-level folder of this repository
(`orchard/...`, `tests/...`, `docs/<page>.md`, ...) and back-quoted `.py`/`.sh` paths must exist,
so a moved module cannot leave the docs behind. Any tracked file that points at `docs/<name>.md`
is checked too (code comments included).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from orchard.core.toolchain import REPO_ROOT

DOCS = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
QUOTED = re.compile(r"`([^`\s]+)`")
DOC_MENTION = re.compile(r"\bdocs/[A-Za-z0-9_.-]+\.md\b")
# Files the docs name that are generated on a user's machine, never committed.
GENERATED = {"compose/.env"}


def top_level_dirs() -> set[str]:
    """Names of the repository's tracked top-level folders (e.g. orchard, tests, docs)."""
    files = subprocess.run(["git", "ls-files"], cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout
    return {line.split("/", 1)[0] for line in files.splitlines() if "/" in line}


def anchors(markdown: Path) -> set[str]:
    """GitHub-style anchors of a Markdown file's headings."""
    found = set()
    for line in markdown.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            found.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return found


def broken_links(doc: Path) -> list[str]:
    """The relative link targets of `doc` that do not resolve."""
    broken = []
    for target in LINK.findall(doc.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        path_part, _, anchor = target.partition("#")
        path = (doc.parent / path_part).resolve() if path_part else doc
        if not path.exists() or (anchor and path.suffix == ".md" and anchor not in anchors(path)):
            broken.append(target)
    return broken


def missing_paths(doc: Path, tops: set[str]) -> list[str]:
    """Back-quoted repository paths named in `doc` that do not exist."""
    missing = []
    for quoted in QUOTED.findall(doc.read_text(encoding="utf-8")):
        path = quoted.rstrip(".,:;")
        named = path.split("/", 1)[0] in tops or path.endswith((".py", ".sh"))  # code is always ours
        if "/" not in path or path.startswith(("/", "$", "~")) or not named or path in GENERATED or "*" in path:
            continue
        if not (REPO_ROOT / path).exists():
            missing.append(path)
    return missing


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_links_and_paths_resolve(doc: Path) -> None:
    assert broken_links(doc) == [], f"{doc.name}: links that do not resolve"
    assert missing_paths(doc, top_level_dirs()) == [], f"{doc.name}: paths that do not exist"


def test_every_docs_page_that_files_point_at_exists() -> None:
    files = subprocess.run(["git", "ls-files"], cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout
    missing = set()
    for name in files.splitlines():
        path = REPO_ROOT / name
        if not path.is_file() or path.suffix in {".png", ".jpg", ".ndjson"}:
            continue
        for mention in DOC_MENTION.findall(path.read_text(encoding="utf-8", errors="replace")):
            if not (REPO_ROOT / mention).exists():
                missing.add(f"{name} -> {mention}")
    assert not missing, sorted(missing)


def test_the_checker_finds_a_broken_link(tmp_path: Path) -> None:
    doc = tmp_path / "page.md"
    doc.write_text(
        "# Title\n[ok](page.md#title) [gone](nowhere.md) [bad anchor](page.md#nope)\n"
        "`tests/no_such_file.py` `gone_pkg/mod.py`\n"
    )
    assert broken_links(doc) == ["nowhere.md", "page.md#nope"]
    assert missing_paths(doc, {"tests"}) == ["tests/no_such_file.py", "gone_pkg/mod.py"]
