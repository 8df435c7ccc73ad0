"""Windows of a large GeoTIFF read from the real MinIO by range requests (orchard.core.ranged over
orchard.core.rasters.read_tiff_window): each window equals the same pixels of the whole raster, and
what is fetched is the header plus the tiles a window overlaps, not the object (issue 16, the
ranged reads tiling is built on)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import pytest
import tifffile

from orchard.core.clients import s3_client
from orchard.core.objects import remove_prefix
from orchard.core.ranged import RangedObject
from orchard.core.rasters import Window, read_tiff_window
from orchard.core.settings import Settings
from orchard.uploader import raster_synth as rs

pytestmark = pytest.mark.integration

SPEC = rs.SceneSpec(2048, 3072, bands=6, tile=256, cell=512, seed=11)  # 72 MiB of pixels, 96 tiles


@pytest.fixture(scope="module")
def stored(stack: Settings, tmp_path_factory) -> Iterator[tuple[str, np.ndarray]]:
    """(key in the models bucket, the raster's pixels): a generated GeoTIFF uploaded as one object."""
    path = rs.write_scene(SPEC, tmp_path_factory.mktemp("windows") / "scene.tif")
    prefix = f"it-windows-{os.urandom(3).hex()}/"
    client = s3_client(stack)
    client.fput_object(stack.models_bucket, prefix + "scene.tif", str(path))
    try:
        yield prefix + "scene.tif", tifffile.imread(path)
    finally:
        remove_prefix(client, stack.models_bucket, prefix)


@pytest.mark.parametrize(
    "window", [Window(0, 0, 0, 0, 256, 256), Window(3, 5, 1000, 2000, 512, 512), Window(0, 0, 1900, 2900, 148, 172)]
)
def test_windows_read_by_ranges_equal_the_whole_raster(stack: Settings, stored, window: Window) -> None:
    key, whole = stored
    remote = RangedObject(s3_client(stack), stack.models_bucket, key)
    got = read_tiff_window(remote, window)
    assert np.array_equal(got, whole[window.top : window.top + window.height, window.left : window.left + window.width])
    overlapped = -(-(window.top % 256 + window.height) // 256) * -(-(window.left % 256 + window.width) // 256)
    tile_bytes = 256 * 256 * SPEC.bands * 2
    # the first block (header, tile tables) plus at most one block of read-ahead per overlapped tile
    assert remote.fetched <= 1024 * 1024 + overlapped * max(tile_bytes, 1024 * 1024), (remote.fetched, overlapped)
    assert remote.fetched < remote.size / 4, f"fetched {remote.fetched} of {remote.size} bytes"


def test_seek_and_read_behave_as_a_file(stack: Settings, stored) -> None:
    key, _ = stored
    remote = RangedObject(s3_client(stack), stack.models_bucket, key, block=4096)
    head = remote.read(8)
    assert head[:4] in (b"II*\x00", b"MM\x00*")
    remote.seek(-10, os.SEEK_END)
    assert len(remote.read(100)) == 10 and remote.read(5) == b""
    remote.seek(2)
    assert remote.read(2) == head[2:4] and remote.tell() == 4
    with pytest.raises(ValueError, match="negative"):
        remote.seek(-1)
