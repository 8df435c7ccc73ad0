"""orchard.spark_app.zip_imports: zip archives are read again on invalidation only when they changed."""

from __future__ import annotations

import importlib
import os
import sys
import zipfile
import zipimport
from pathlib import Path

import pytest

from orchard.spark_app import zip_imports

pytestmark = pytest.mark.skipif(sys.version_info >= (3, 12), reason="Python 3.12+ invalidates lazily itself")


def write_zip(path: Path, modules: dict[str, str]) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        for name, source in modules.items():
            zf.writestr(f"{name}.py", source)


def test_an_unchanged_archive_is_not_read_again_and_a_changed_one_is(tmp_path: Path):
    archive = tmp_path / "pkgs.zip"
    write_zip(archive, {"zi_first": "X = 1\n"})
    importer = zipimport.zipimporter(str(archive))
    reads: list[str] = []

    def reread(imp) -> None:
        reads.append(imp.archive)
        zipimport._zip_directory_cache[imp.archive] = imp._files = {"read": True}

    zip_imports.invalidate_if_changed(importer, reread)  # never read by an invalidation yet
    zip_imports.invalidate_if_changed(importer, reread)
    zip_imports.invalidate_if_changed(zipimport.zipimporter(str(archive)), reread)  # another importer
    assert len(reads) == 1
    write_zip(archive, {"zi_first": "X = 1\n", "zi_second": "Y = 2\n"})
    os.utime(archive, ns=(1, 1))  # a different modification time even on a coarse clock
    zip_imports.invalidate_if_changed(importer, reread)
    assert len(reads) == 2


def test_invalidate_caches_still_finds_a_module_added_to_an_archive(tmp_path: Path):
    zip_imports.install()
    archive = tmp_path / "grow.zip"
    write_zip(archive, {"zi_grow_a": "A = 1\n"})
    sys.path.insert(0, str(archive))
    try:
        assert importlib.import_module("zi_grow_a").A == 1
        importlib.invalidate_caches()
        write_zip(archive, {"zi_grow_a": "A = 1\n", "zi_grow_b": "B = 2\n"})
        importlib.invalidate_caches()  # what a PySpark worker calls before each task
        assert importlib.import_module("zi_grow_b").B == 2
    finally:
        sys.path.remove(str(archive))
        for name in ("zi_grow_a", "zi_grow_b"):
            sys.modules.pop(name, None)


def test_install_is_idempotent():
    zip_imports.install()
    assert zip_imports.install() is False
    assert zipimport.zipimporter.invalidate_caches._orchard_lazy
