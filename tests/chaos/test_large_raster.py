"""A raster over 2 GiB predicted as its tiles by `orchard infer` on the real stack, in bounded
executor memory (issue 16, deliverables 4 and 5).

The scene: a generated, georeferenced 6-band 16-bit GeoTIFF of 13,400 x 13,400 pixels (2.0 GiB of
pixels, over Spark's 2 GiB limit for one binaryFile row), written as a stream, uploaded as one
object (the images table references it by key). `orchard infer` with the default tiling (256 x 256
tiles every 256 pixels, 25 Mpx threshold) must write one document per tile (53 x 53 = 2,809), no
failure, and the raster's summary; while it runs, every process of both Spark workers is sampled:
an executor's Python worker must peak under PYTHON_PEAK_BOUND (half the raster: it holds one strip,
13,400 x 256 x 6 x 2 bytes = 41 MB, and the model), its JVM under the chaos suite's 1g executors.
Tiles/s and the peaks are written into the chaos results.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import psutil
import pytest

from conftest import ChaosStack, Ledger, count_docs, dataset_query, infer_args, read_json_line, upload
from orchard.core.objects import remove_prefix
from orchard.core.rasters import tile_windows
from orchard.stack.process import peak_rss
from orchard.uploader import raster_synth as rs

pytestmark = pytest.mark.chaos
log = logging.getLogger("chaos.raster")

SPEC = rs.SceneSpec(13_400, 13_400, bands=6, tile=256, cell=512, seed=31)
TILE = 256  # the default ORCHARD_TILE_SIZE and ORCHARD_TILE_STRIDE
PYTHON_PEAK_BOUND = 1024 * 2**20  # bytes


class WorkerPeaks:
    """Samples every descendant of the Spark workers every 0.2 s: peak VmHWM of the Python workers,
    peak RSS of the executor JVMs."""

    def __init__(self, chaos: ChaosStack) -> None:
        self.roots = [psutil.Process(pid) for i in (1, 2) if (pid := chaos.pid(f"spark-worker-{i}"))]
        self.python = self.jvm = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for root in self.roots:
                self._sample(root)
            self._stop.wait(0.2)

    def _sample(self, root: psutil.Process) -> None:
        try:
            children = root.children(recursive=True)
        except psutil.Error:
            return
        for child in children:
            try:
                if "java" in child.name():
                    self.jvm = max(self.jvm, child.memory_info().rss)
                elif "python" in child.name():
                    self.python = max(self.python, peak_rss(child.pid))
            except psutil.Error:
                continue

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def test_a_raster_over_2_gib_is_tiled_in_bounded_executor_memory(
    chaos: ChaosStack, ledger: Ledger, model_version: str, tmp_path: Path
) -> None:
    path = rs.write_scene(SPEC, tmp_path / "tree" / "test" / "scene" / "big.tif")
    assert path.stat().st_size > 2**31, path.stat().st_size
    dataset = chaos.dataset("big-raster")
    upload(chaos, tmp_path / "tree", dataset, timeout=1200)
    path.unlink()  # 2 GiB of disk back before the job

    peaks = WorkerPeaks(chaos)
    try:
        run = chaos.cli(*infer_args(dataset, model_version), timeout=2400)
    finally:
        peaks.stop()
        # 2 GiB (x 1.33 erasure-coded) less for the suite's later MinIO kills and heals to go over
        remove_prefix(chaos.s3(), chaos.settings.images_bucket, f"{dataset}/")
    assert run.returncode == 0, run.tail()
    summary = read_json_line(run.stdout)
    want = len(tile_windows(SPEC.height, SPEC.width, TILE, TILE))
    assert want == 53 * 53
    assert summary["tiles"] == want and summary["tiled_rasters"] == 1, summary
    assert summary["failed"] == 0 and summary["errors"] == 0, summary

    es, index = chaos.es(), chaos.settings.images_index
    tiles = count_docs(es, index, dataset, {"exists": {"field": "tile.parent"}})
    query = dataset_query(dataset, {"exists": {"field": "tiles.count"}})
    rasters = [hit["_source"]["tiles"] for hit in es.search(index=index, query=query)["hits"]["hits"]]
    assert tiles == want and len(rasters) == 1 and rasters[0]["count"] == want, (tiles, rasters)
    assert (rasters[0]["rows"], rasters[0]["cols"]) == (53, 53)

    rate = want / summary["seconds"]
    mb = 2**20
    log.info(
        "%d tiles in %.1f s (%.1f tiles/s); peaks: python %d MB, jvm %d MB",
        want,
        summary["seconds"],
        rate,
        peaks.python // mb,
        peaks.jvm // mb,
    )
    ledger.record("raster over 2 GiB tiled", f"{want} tiles of a {SPEC.nbytes / 2**30:.2f} GiB GeoTIFF", want - tiles)
    ledger.figures["tiling: tiles/s (2 GiB GeoTIFF, end to end)"] = round(rate, 1)
    ledger.figures["tiling: executor Python worker peak RSS (MB)"] = peaks.python // mb
    ledger.figures["tiling: executor JVM peak RSS (MB)"] = peaks.jvm // mb
    assert 0 < peaks.python < PYTHON_PEAK_BOUND, peaks.python
