"""Python 3.12's cheap `zipimport` cache invalidation, for the executors' Python 3.11 workers.

Before every task, a PySpark worker calls `importlib.invalidate_caches()` (pyspark.worker_util.
setup_spark_files), and Python 3.11's zipimporter answers it by re-reading the whole central
directory of its archive, once per importer. The workers' sys.path holds zips (pyspark.zip, py4j,
Orchard's own package zip) and Spark's core jar (15 MB, ~10,000 entries; Spark puts the jar of
its Python bridge on PYTHONPATH), with an importer per package imported from them: measured here,
0.12-0.14 s of CPU per task spent re-reading archives that never change during a job, on every task
of every stage. CPython 3.12 made the invalidation lazy (gh-103200); this module gives 3.11 the
same effect: an archive is read again only when its size or modification time changed, and
importers of one archive share one read. Installed on import of orchard.spark_app (every worker
that runs Orchard code imports it); a no-op on Python 3.12+.
"""

from __future__ import annotations

import os
import sys
import zipimport
from typing import Any

# archive path -> (mtime_ns, size) when its directory was last read by an invalidation
_read_signatures: dict[str, tuple[int, int]] = {}


def archive_signature(path: str) -> tuple[int, int] | None:
    """(modification time in ns, size) of an archive; None if it cannot be stat'ed."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


def invalidate_if_changed(importer: Any, reread: Any) -> None:
    """A zipimporter's invalidate_caches: `reread(importer)` (3.11's own) only if its archive changed
    since the last read, else the directory already cached for the archive."""
    archive = importer.archive
    signature = archive_signature(archive)
    cached = zipimport._zip_directory_cache.get(archive)  # type: ignore[attr-defined]
    if signature is not None and cached is not None and _read_signatures.get(archive) == signature:
        importer._files = cached
        return
    reread(importer)
    if signature is not None:
        _read_signatures[archive] = signature


def install() -> bool:
    """Make this interpreter's zipimporters invalidate lazily (3.11 only); True if installed now."""
    cls = zipimport.zipimporter
    if sys.version_info >= (3, 12) or not hasattr(zipimport, "_zip_directory_cache"):
        return False
    if getattr(cls.invalidate_caches, "_orchard_lazy", False):
        return False
    reread = cls.invalidate_caches

    def invalidate_caches(self: Any) -> None:
        invalidate_if_changed(self, reread)

    invalidate_caches._orchard_lazy = True  # type: ignore[attr-defined]
    cls.invalidate_caches = invalidate_caches  # type: ignore[method-assign]
    return True
