"""PyTorch state_dicts (.pth/.pt) as numpy arrays, without PyTorch and without running the file's code.

A .pth file is a pickle, and unpickling can call any importable function (`os.system` included), so
`torch.load` of an untrusted file is code execution. Here the pickle goes through `SafeUnpickler`,
whose `find_class` knows only the globals a state_dict uses (tensor rebuild functions, typed storage
classes, `collections.OrderedDict`), each mapped to a numpy-building stand-in; any other global
raises `ForbiddenGlobal` before anything is called.

Both of PyTorch's file formats are read:
- zip (torch >= 1.6): `<root>/data.pkl` plus one entry `<root>/data/<key>` of raw bytes per storage;
- legacy (torch < 1.6, e.g. the EfficientNet-Lite0 wheel): consecutive pickles (magic number,
  protocol version, system info, the state_dict, the list of storage keys), then each storage as an
  int64 element count followed by its raw bytes.
"""

from __future__ import annotations

import collections
import io
import logging
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

import numpy as np

from orchard.core.errors import CheckpointError, ForbiddenGlobal

log = logging.getLogger(__name__)

ByteOrder = Literal["<", ">"]

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch/serialization.py MAGIC_NUMBER
LEGACY_PROTOCOL = 1001  # torch/serialization.py PROTOCOL_VERSION

# torch.<Name>Storage -> element type (bfloat16 has no numpy dtype, so such files are refused).
STORAGE_DTYPES: dict[str, np.dtype] = {
    "FloatStorage": np.dtype(np.float32),
    "DoubleStorage": np.dtype(np.float64),
    "HalfStorage": np.dtype(np.float16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
}


@dataclass(frozen=True)
class StorageType:
    """Stand-in for a `torch.<Name>Storage` class: only its element type matters."""

    dtype: np.dtype


@dataclass(frozen=True)
class StorageRef:
    """A storage named by the pickle, whose bytes are read after (legacy) or beside (zip) it."""

    key: str
    dtype: np.dtype
    numel: int
    offset: int = 0  # elements into the root storage (legacy storage views)


@dataclass(frozen=True)
class TensorRef:
    """A tensor as the pickle describes it: a strided view of a storage."""

    storage: StorageRef
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


def rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any, *_ignored: Any) -> TensorRef:
    """Stand-in for torch._utils._rebuild_tensor(_v2): requires_grad, hooks and metadata are ignored."""
    if not isinstance(storage, StorageRef):
        raise CheckpointError(f"tensor over {type(storage).__name__}, not a storage")
    try:
        return TensorRef(storage, int(storage_offset), tuple(map(int, size)), tuple(map(int, stride)))
    except (TypeError, ValueError):
        raise CheckpointError(f"malformed tensor: offset {storage_offset!r} size {size!r} stride {stride!r}") from None


def rebuild_parameter(data: Any, *_ignored: Any) -> Any:
    """Stand-in for torch._utils._rebuild_parameter: a Parameter's data is its tensor."""
    return data


ALLOWED_FUNCTIONS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): rebuild_parameter,
}


class SafeUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals of a state_dict and records the storages it meets."""

    def __init__(self, file: IO[bytes], byteorder: ByteOrder = "<") -> None:
        super().__init__(file)
        self.byteorder = byteorder
        self.storages: dict[str, StorageRef] = {}

    def find_class(self, module: str, name: str) -> Any:
        """The stand-in for an allowed global; ForbiddenGlobal for anything else."""
        if module == "torch" and name in STORAGE_DTYPES:
            return StorageType(STORAGE_DTYPES[name].newbyteorder(self.byteorder))
        if (module, name) in ALLOWED_FUNCTIONS:
            return ALLOWED_FUNCTIONS[module, name]
        raise ForbiddenGlobal(f"refusing to load global {module}.{name}: a state_dict never needs it")

    def persistent_load(self, pid: Any) -> StorageRef:
        """A StorageRef for ('storage', type, key, location, numel[, view]); its bytes come later."""
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"):
            raise CheckpointError(f"unknown persistent id {pid!r:.80}")
        storage_type, key, _location, numel = pid[1:5]
        if not isinstance(storage_type, StorageType) or not isinstance(numel, int):
            raise CheckpointError(f"malformed storage id {pid!r:.80}")
        root = self.storages.setdefault(str(key), StorageRef(str(key), storage_type.dtype, numel))
        view = pid[5] if len(pid) == 6 else None
        if view is None:
            return root
        _view_key, offset, view_numel = view  # legacy: a slice of the root storage
        return StorageRef(root.key, root.dtype, int(view_numel), int(offset))


def materialise(ref: TensorRef, buffers: dict[str, np.ndarray]) -> np.ndarray:
    """The tensor's values as a new contiguous array (stride and offsets applied, bounds checked)."""
    flat = buffers.get(ref.storage.key)
    if flat is None:
        raise CheckpointError(f"storage {ref.storage.key} has no data")
    if 0 in ref.shape:
        return np.empty(ref.shape, dtype=flat.dtype)
    start = ref.storage.offset + ref.offset
    last = start + sum((n - 1) * s for n, s in zip(ref.shape, ref.stride, strict=True))
    if start < 0 or min(ref.stride, default=0) < 0 or last >= flat.size:
        raise CheckpointError(f"tensor {ref.shape} exceeds its storage {ref.storage.key} ({flat.size} elements)")
    strides = tuple(s * flat.itemsize for s in ref.stride)
    return np.lib.stride_tricks.as_strided(flat[start:], ref.shape, strides, writeable=False).copy()


def resolve(obj: Any, buffers: dict[str, np.ndarray]) -> Any:
    """`obj` with every TensorRef inside (dicts, lists, tuples) replaced by its array."""
    if isinstance(obj, TensorRef):
        return materialise(obj, buffers)
    if isinstance(obj, dict):
        return type(obj)((key, resolve(value, buffers)) for key, value in obj.items())
    if isinstance(obj, list | tuple):
        return type(obj)(resolve(value, buffers) for value in obj)
    return obj


def load_plain(fh: IO[bytes]) -> Any:
    """One pickle that must hold plain data only (legacy header and key list)."""
    unpickler = SafeUnpickler(fh)
    value = unpickler.load()
    if unpickler.storages:
        raise CheckpointError("unexpected storage in a legacy header pickle")
    return value


def read_legacy(fh: IO[bytes]) -> tuple[Any, dict[str, np.ndarray]]:
    """(pickled object with TensorRefs, storage key -> flat array) of a torch < 1.6 file."""
    if load_plain(fh) != LEGACY_MAGIC or load_plain(fh) != LEGACY_PROTOCOL:
        raise CheckpointError("not a PyTorch file: wrong magic number or protocol version")
    sys_info = load_plain(fh)
    byteorder: ByteOrder = "<" if not isinstance(sys_info, dict) or sys_info.get("little_endian", True) else ">"
    unpickler = SafeUnpickler(fh, byteorder)
    obj = unpickler.load()
    buffers = {}
    for key in load_plain(fh):
        ref = unpickler.storages.get(str(key))
        if ref is None:
            raise CheckpointError(f"storage {key} is listed but never used")
        numel = int.from_bytes(fh.read(8), "little" if byteorder == "<" else "big", signed=True)
        data = fh.read(numel * ref.dtype.itemsize)
        if numel < ref.numel or len(data) != numel * ref.dtype.itemsize:
            raise CheckpointError(f"storage {key}: file truncated or sizes disagree")
        buffers[str(key)] = np.frombuffer(data, dtype=ref.dtype)
    return obj, buffers


def read_zip(archive: zipfile.ZipFile) -> tuple[Any, dict[str, np.ndarray]]:
    """(pickled object with TensorRefs, storage key -> flat array) of a torch >= 1.6 zip file."""
    pickles = [name for name in archive.namelist() if name.endswith("/data.pkl")]
    if len(pickles) != 1:
        raise CheckpointError(f"expected one <root>/data.pkl in the archive, found {len(pickles)}")
    root = pickles[0].removesuffix("data.pkl")
    names = set(archive.namelist())
    order = archive.read(f"{root}byteorder").decode().strip() if f"{root}byteorder" in names else "little"
    unpickler = SafeUnpickler(io.BytesIO(archive.read(pickles[0])), "<" if order == "little" else ">")
    obj = unpickler.load()
    buffers = {}
    for key, ref in unpickler.storages.items():
        data = archive.read(f"{root}data/{key}")
        if len(data) < ref.numel * ref.dtype.itemsize:
            raise CheckpointError(f"storage {key}: {len(data)} bytes, fewer than {ref.numel} elements")
        buffers[key] = np.frombuffer(data, dtype=ref.dtype, count=ref.numel)
    return obj, buffers


def read_state_dict(path: Path) -> dict[str, np.ndarray]:
    """The tensors of a PyTorch state_dict file by name, as numpy arrays (either file format).

    Raises ForbiddenGlobal if the pickle names any other global, CheckpointError if the file is
    malformed or holds something other than a mapping of names to tensors.
    """
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                obj, buffers = read_zip(archive)
        else:
            with path.open("rb") as fh:
                obj, buffers = read_legacy(fh)
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable PyTorch state_dict: {exc}") from None
    state = resolve(obj, buffers)
    if not isinstance(state, dict) or not all(isinstance(v, np.ndarray) for v in state.values()):
        raise CheckpointError(f"{path}: holds a {type(state).__name__}, not a mapping of names to tensors")
    log.info("read %d tensors from %s", len(state), path)
    return dict(state)
