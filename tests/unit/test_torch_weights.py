"""orchard.core.torch_weights: PyTorch state_dicts read as numpy, in both file formats, without running code.

The files are written here the way torch.save writes them (same pickle protocol, persistent ids and
layout), with this module's stand-in globals renamed to torch's in the pickled bytes.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import zipfile
from dataclasses import dataclass

import numpy as np
import pytest

from orchard.core.errors import CheckpointError, ForbiddenGlobal
from orchard.core.torch_weights import LEGACY_MAGIC, LEGACY_PROTOCOL, read_state_dict


def _rebuild_tensor_v2(*args):  # pickled as torch._utils._rebuild_tensor_v2
    raise AssertionError("never called")


class FloatStorage:  # pickled as torch.FloatStorage
    pass


class LongStorage:
    pass


class HalfStorage:
    pass


@dataclass(frozen=True, eq=False)  # hashed by identity: one storage, however many tensors view it
class Storage:
    cls: type
    key: str
    values: np.ndarray


@dataclass(frozen=True)
class Tensor:
    storage: Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


class TorchLikePickler(pickle.Pickler):
    """Pickles Storage/Tensor the way torch.save does (legacy ids carry a sixth, view, element)."""

    def __init__(self, file, legacy: bool):
        super().__init__(file, protocol=2)
        self.legacy = legacy

    def persistent_id(self, obj):
        if not isinstance(obj, Storage):
            return None
        pid = ("storage", obj.cls, obj.key, "cpu", obj.values.size)
        return (*pid, None) if self.legacy else pid

    def reducer_override(self, obj):
        if isinstance(obj, Tensor):
            hooks = collections.OrderedDict()
            return _rebuild_tensor_v2, (obj.storage, obj.offset, obj.shape, obj.stride, False, hooks)
        return NotImplemented


def torch_pickle(obj, legacy: bool) -> bytes:
    buffer = io.BytesIO()
    TorchLikePickler(buffer, legacy).dump(obj)
    data = buffer.getvalue()
    # Protocol 2 names globals as "module\nname\n": rename this module's stand-ins to torch's.
    data = data.replace(f"{__name__}\n_rebuild_tensor_v2\n".encode(), b"torch._utils\n_rebuild_tensor_v2\n")
    for cls in (FloatStorage, LongStorage, HalfStorage):
        data = data.replace(f"{__name__}\n{cls.__name__}\n".encode(), f"torch\n{cls.__name__}\n".encode())
    return data


def storages_of(state: dict) -> list[Storage]:
    return sorted({t.storage for t in state.values()}, key=lambda s: s.key)


def write_zip(path, state: dict, payload: bytes | None = None):
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", payload if payload is not None else torch_pickle(state, legacy=False))
        archive.writestr("archive/byteorder", "little")
        for storage in storages_of(state):
            archive.writestr(f"archive/data/{storage.key}", storage.values.tobytes())


def write_legacy(path, state: dict, payload: bytes | None = None, header: bytes | None = None):
    with path.open("wb") as fh:
        fh.write(header if header is not None else pickle.dumps(LEGACY_MAGIC, protocol=2))
        pickle.dump(LEGACY_PROTOCOL, fh, protocol=2)
        pickle.dump({"protocol_version": LEGACY_PROTOCOL, "little_endian": True, "type_sizes": {}}, fh, protocol=2)
        fh.write(payload if payload is not None else torch_pickle(state, legacy=True))
        pickle.dump([s.key for s in storages_of(state)], fh, protocol=2)
        for storage in storages_of(state):
            fh.write(np.int64(storage.values.size).tobytes())
            fh.write(storage.values.tobytes())


FLOATS = Storage(FloatStorage, "0", np.arange(12, dtype=np.float32))
LONGS = Storage(LongStorage, "1", np.array([7], dtype=np.int64))
HALVES = Storage(HalfStorage, "2", np.array([0.5, -2.0], dtype=np.float16))
STATE = {
    "conv.weight": Tensor(FLOATS, 0, (3, 4), (4, 1)),
    "conv.weight_t": Tensor(FLOATS, 0, (4, 3), (1, 4)),  # a transposed view: strides matter
    "fc.bias": Tensor(FLOATS, 10, (2,), (1,)),  # an offset into a shared storage
    "bn.num_batches_tracked": Tensor(LONGS, 0, (), ()),
    "half.weight": Tensor(HALVES, 0, (2,), (1,)),
}
WRITERS = {"zip": write_zip, "legacy": write_legacy}


@pytest.mark.parametrize("fmt", WRITERS)
def test_state_dict_round_trips_with_dtype_offset_and_stride(tmp_path, fmt):
    path = tmp_path / "weights.pth"
    WRITERS[fmt](path, STATE)
    state = read_state_dict(path)
    assert list(state) == list(STATE)
    grid = np.arange(12, dtype=np.float32).reshape(3, 4)
    np.testing.assert_array_equal(state["conv.weight"], grid)
    np.testing.assert_array_equal(state["conv.weight_t"], grid.T)
    np.testing.assert_array_equal(state["fc.bias"], [10, 11])
    assert state["bn.num_batches_tracked"].shape == () and int(state["bn.num_batches_tracked"]) == 7
    assert state["bn.num_batches_tracked"].dtype == np.int64
    assert state["half.weight"].dtype == np.float16 and state["half.weight"].tolist() == [0.5, -2.0]
    assert state["conv.weight_t"].flags.c_contiguous


class RunsCommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("where", ["zip data.pkl", "legacy state pickle", "legacy header"])
def test_a_pickle_naming_os_system_is_refused_before_anything_runs(tmp_path, where):
    marker = tmp_path / "pwned"
    evil = pickle.dumps({"conv.weight": RunsCommand(marker)}, protocol=2)
    path = tmp_path / "evil.pth"
    if where == "zip data.pkl":
        write_zip(path, {}, payload=evil)
    elif where == "legacy state pickle":
        write_legacy(path, {}, payload=evil)
    else:
        write_legacy(path, {}, header=evil)
    with pytest.raises(ForbiddenGlobal, match=r"refusing to load global (posix|os)\.system"):
        read_state_dict(path)
    assert not marker.exists()


def test_other_globals_are_refused_too(tmp_path):
    path = tmp_path / "evil.pth"
    write_zip(path, {}, payload=pickle.dumps(collections.Counter("ab"), protocol=2))
    with pytest.raises(ForbiddenGlobal, match=r"collections\.Counter"):
        read_state_dict(path)


def test_a_tensor_beyond_its_storage_is_refused(tmp_path):
    path = tmp_path / "weights.pth"
    write_zip(path, {"w": Tensor(FLOATS, 6, (2, 4), (4, 1))})  # ends at element 13 of 12
    with pytest.raises(CheckpointError, match="exceeds its storage"):
        read_state_dict(path)


def test_a_truncated_legacy_file_is_refused(tmp_path):
    path = tmp_path / "weights.pth"
    write_legacy(path, STATE)
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(CheckpointError, match="truncated"):
        read_state_dict(path)


def test_a_pickle_that_is_not_a_state_dict_is_refused(tmp_path):
    path = tmp_path / "weights.pth"
    write_zip(path, {}, payload=pickle.dumps([1, 2, 3], protocol=2))
    with pytest.raises(CheckpointError, match="not a mapping of names to tensors"):
        read_state_dict(path)
