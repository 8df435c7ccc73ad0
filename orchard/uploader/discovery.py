"""Turn a dataset on disk into work items: what to upload, under which key, with which label.

Layouts understood (DIR is the argument of `orchard upload`):

  DIR/<split>/<label>/<file>    split folders (Fruits-360: Training/, Test/), recognised by name
  DIR/<label>/<file>            no split folders: every file gets `--split` (default "train")
  DIR/[<split>/]<stack>.npy     with --labels FILE: an (N, H, W[, C]) array, one image per row
  FILE.npy                      with --labels FILE: the same, for a single stack file

Decisions (documented here because keys are forever):
- Object keys are `<dataset>/<split>/<label>/<file>` (the layout of orchard.core.lake). `split` is
  normalised (Training -> train, Test -> test, Validation -> val) so every dataset has the same split
  names; the original folder is still in the document's `source_path`. `label` is a slug of the class folder name
  ("Apple Red 2" -> "apple_red_2"; lowercase, runs of characters other than letters, digits,
  `.` and `-` become `_`), safe in S3 keys and s3a paths; the folder name itself is `label_text`.
- File names keep spaces and Unicode (normalised to NFC, so macOS and Linux checkouts of the same
  tree produce the same keys). Names that are not valid UTF-8 or contain control characters fail.
- Stack rows become `<stack stem>_<row, zero-padded>.npy` objects holding one image each.
- Symlinks (files and folders) are never followed: they are skipped with a reason, so a link can
  neither escape the tree nor upload the same file twice. Hidden files (".DS_Store", "._x.jpg")
  and files without an accepted suffix (orchard.core.formats) are ignored and only counted.
- Files deeper than `<split>/<label>/<file>`, or image files outside a class folder, fail with a
  reason naming the expected layout: guessing a label for them would silently mislabel data.
- Two files that would land on the same key (e.g. "Apple Red" and "apple_red" folders) fail
  except the first in path order.
"""

from __future__ import annotations

import logging
import os
import re
import unicodedata
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from orchard.core.files import read_names
from orchard.core.formats import ARRAY_SUFFIX, SUFFIXES
from orchard.core.lake import TRAIN, normalise_split, object_key
from orchard.core.rasters import read_npy_header
from orchard.uploader.report import Outcome, Problem

log = logging.getLogger(__name__)

MAX_KEY_BYTES = 1024  # the S3 limit
LAYOUT = "[<split>/]<label>/<file>"
_DATASET_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
_PLAIN_NAME = re.compile(r"^[A-Za-z0-9._-]+$")


@dataclass(frozen=True)
class WorkItem:
    """One object to upload: a file, or one row of an .npy stack (`row` is not None)."""

    path: Path
    key: str
    dataset: str
    split: str
    label: str
    label_text: str
    row: int | None = None

    @property
    def source(self) -> str:
        """Where the bytes come from, as stored in `source_path`."""
        return str(self.path) if self.row is None else f"{self.path}[{self.row}]"


@dataclass
class Discovery:
    """Everything found under the upload root."""

    items: list[WorkItem] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    ignored: int = 0

    def fail(self, path: Path | str, code: str, reason: str) -> None:
        self.problems.append(Problem(str(path), code, reason, Outcome.FAILED))

    def skip(self, path: Path | str, code: str, reason: str) -> None:
        self.problems.append(Problem(str(path), code, reason, Outcome.SKIPPED))


def label_slug(text: str) -> str:
    """The key-safe label of a class folder name ("Apple Red 2" -> "apple_red_2"); may be ''."""
    return re.sub(r"[^\w.-]+", "_", unicodedata.normalize("NFC", text).lower()).strip("_.")


def dataset_slug(text: str) -> str:
    """A valid dataset name derived from a folder name ("Fruits 360" -> "fruits-360")."""
    slug = re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-._")
    return slug[:63] or "dataset"


def check_dataset(name: str) -> str:
    """`name` if it is a valid dataset name (lowercase letters, digits, . _ -), else ValueError."""
    if not _DATASET_RE.match(name):
        raise ValueError(f"invalid dataset name {name!r}: use 1-63 of a-z 0-9 . _ - (starting alphanumeric)")
    return name


def name_problem(name: str) -> str | None:
    """Why a file or folder name cannot become part of a key, or None if it can."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return "name is not valid UTF-8"
    if any(unicodedata.category(ch) == "Cc" for ch in name):
        return "name contains control characters"
    return None


def read_labels(path: Path) -> list[str]:
    """Labels of an .npy stack, one per row: a 1-D .npy array, or a text (or JSON list) file."""
    if path.suffix.lower() == ARRAY_SUFFIX:
        array = np.load(path, allow_pickle=False)
        if array.ndim != 1:
            raise ValueError(f"{path}: labels must be a 1-D array, got shape {array.shape}")
        return [x.decode() if isinstance(x, bytes) else str(x) for x in array.tolist()]
    return read_names(path)


def npy_shape(path: Path) -> tuple[int, ...] | None:
    """The shape in an .npy header (reads only the header), or None if it is not an .npy."""
    try:
        with path.open("rb") as fh:
            return read_npy_header(fh)[0]
    except (OSError, ValueError, SyntaxError, EOFError):
        return None


def _scan(directory: Path, found: Discovery) -> list[os.DirEntry]:
    """Entries of `directory` sorted by name; an unreadable directory is recorded as a failure."""
    try:
        with os.scandir(directory) as it:
            return sorted(it, key=lambda e: e.name)
    except OSError as exc:
        found.fail(directory, "unreadable", f"unreadable directory: {exc.strerror or exc}")
        return []


def _kind(entry: os.DirEntry, found: Discovery) -> str:
    """dir | file | skip (already accounted: hidden, symlink, special or unsupported file)."""
    if entry.name.startswith("."):
        found.ignored += 1
        return "skip"
    if entry.is_symlink():
        found.skip(entry.path, "symlink", f"symlink, not followed (-> {os.readlink(entry.path)})")
        return "skip"
    if entry.is_dir(follow_symlinks=False):
        return "dir"
    suffix = Path(entry.name).suffix.lower()
    if suffix not in SUFFIXES:
        found.ignored += 1
        return "skip"
    if not entry.is_file(follow_symlinks=False):
        found.fail(entry.path, "not_regular", "not a regular file (fifo, socket or device)")
        return "skip"
    return "file"


class Walker:
    """Walks one upload root into a Discovery (see the module docstring for the rules)."""

    def __init__(
        self, dataset: str, default_split: str, labels: Sequence[str] | None = None, exclude: Sequence[Path] = ()
    ) -> None:
        self.dataset = dataset
        self.default_split = default_split
        self.labels = list(labels) if labels is not None else None
        self.exclude = {p.resolve() for p in exclude}
        self.found = Discovery()

    def walk(self, root: Path) -> Discovery:
        """Discover everything under `root` (a directory, or one .npy stack file)."""
        if root.is_file():
            self._loose_file(root, self.default_split)
        else:
            self._root(root)
        self._drop_key_collisions()
        return self.found

    def _root(self, root: Path) -> None:
        entries = _scan(root, self.found)
        splits = {  # split folder name -> its split
            e.name: split
            for e in entries
            if e.is_dir(follow_symlinks=False) and (split := normalise_split(e.name)) is not None
        }
        if not splits:
            self._split_dir(root, self.default_split, entries)
            return
        for entry in entries:
            kind = _kind(entry, self.found)
            if kind == "dir" and entry.name in splits:
                self._split_dir(Path(entry.path), splits[entry.name], _scan(Path(entry.path), self.found))
            elif kind == "dir":
                self._fail_tree(
                    Path(entry.path),
                    "not_split",
                    f"not a split folder ({', '.join(sorted(splits))} are): expected {LAYOUT}",
                )
            elif kind == "file":
                self._loose_file(Path(entry.path), self.default_split)

    def _split_dir(self, directory: Path, split: str, entries: list[os.DirEntry]) -> None:
        for entry in entries:
            kind = _kind(entry, self.found)
            if kind == "dir":
                self._label_dir(Path(entry.path), split)
            elif kind == "file":
                self._loose_file(Path(entry.path), split)

    def _label_dir(self, directory: Path, split: str) -> None:
        problem = name_problem(directory.name)
        label = label_slug(directory.name) if problem is None else ""
        if problem is None and not label:
            problem = "class folder name has no letters or digits"
        for entry in _scan(directory, self.found):
            kind = _kind(entry, self.found)
            path = Path(entry.path)
            if kind == "dir":
                self._fail_tree(path, "nested", f"folder nested too deep: expected {LAYOUT}")
            elif kind == "file" and problem:
                self.found.fail(path, "bad_name", f"class folder: {problem}")
            elif kind == "file":
                text = unicodedata.normalize("NFC", directory.name)
                self._add(path, split, label, text, entry.name)

    def _loose_file(self, path: Path, split: str) -> None:
        """A file outside any class folder: an .npy stack when --labels is given, else a failure."""
        if path.resolve() in self.exclude:
            self.found.ignored += 1
            return
        if self.labels is not None and path.suffix.lower() == ARRAY_SUFFIX:
            self._stack(path, split, self.labels)
            return
        self.found.fail(path, "no_label", f"not inside a class folder: expected {LAYOUT}")

    def _stack(self, path: Path, split: str, labels: list[str]) -> None:
        """The rows of an .npy stack, row i labelled `labels[i]`."""
        shape = npy_shape(path)
        if shape is None or len(shape) < 3:
            self.found.fail(path, "not_stack", f"not an image stack: expected an (N, H, W[, C]) .npy, got {shape}")
            return
        if shape[0] != len(labels):
            self.found.fail(path, "label_count", f"stack of {shape[0]} images but --labels has {len(labels)}")
            return
        width = max(6, len(str(shape[0] - 1)))
        stem = unicodedata.normalize("NFC", path.stem)
        for row, text in enumerate(labels):
            label = label_slug(text)
            if not label:
                self.found.fail(f"{path}[{row}]", "bad_label", f"label {text!r} has no letters or digits")
                continue
            self._add(path, split, label, text, f"{stem}_{row:0{width}d}.npy", row)

    def _add(self, path: Path, split: str, label: str, label_text: str, name: str, row: int | None = None) -> None:
        problem = name_problem(name)
        if problem:
            self.found.fail(path, "bad_name", problem)
            return
        key = object_key(self.dataset, split, label, unicodedata.normalize("NFC", name))
        if len(key.encode("utf-8")) > MAX_KEY_BYTES:
            self.found.fail(path, "bad_name", f"object key longer than {MAX_KEY_BYTES} bytes")
            return
        if not _PLAIN_NAME.match(name):  # accepted, but say so: such keys need quoting in shells and URLs
            log.info("%s: name with spaces or non-ASCII characters, stored as key %r", path, key)
        self.found.items.append(WorkItem(path, key, self.dataset, split, label, label_text, row))

    def _fail_tree(self, directory: Path, code: str, reason: str) -> None:
        """Account for every candidate file under a folder that does not fit the layout."""
        for path in _files_under(directory, self.found):
            self.found.fail(path, code, reason)

    def _drop_key_collisions(self) -> None:
        """Sort by key; of items sharing a key, keep the first by source path, fail the others."""
        self.found.items.sort(key=lambda item: (item.key, item.source))
        kept: list[WorkItem] = []
        for item in self.found.items:
            if kept and kept[-1].key == item.key:
                self.found.fail(item.source, "key_collision", f"same object key as {kept[-1].source}: {item.key}")
                continue
            kept.append(item)
        self.found.items = kept


def _files_under(directory: Path, found: Discovery) -> Iterator[Path]:
    """Candidate files under `directory` (recursively, symlinks not followed, others accounted)."""
    for entry in _scan(directory, found):
        kind = _kind(entry, found)
        if kind == "dir":
            yield from _files_under(Path(entry.path), found)
        elif kind == "file":
            yield Path(entry.path)


def discover(
    root: Path,
    dataset: str,
    default_split: str = TRAIN,
    labels: Sequence[str] | None = None,
    exclude: Sequence[Path] = (),
) -> Discovery:
    """Work items (sorted by key) and problems for everything under `root`."""
    check_dataset(dataset)
    found = Walker(dataset, default_split, labels, exclude).walk(root.absolute())
    log.info(
        "discovered %d items under %s (%d problems, %d ignored)",
        len(found.items),
        root,
        len(found.problems),
        found.ignored,
    )
    return found
