"""Write a state dict as torch.save does (the zip format), without torch.

The archive holds `archive/data.pkl` (protocol 2, tensors as `torch._utils._rebuild_tensor_v2` of a
persistent storage id), one `archive/data/<n>` file per tensor (raw little-endian bytes, aligned to
64 bytes in the file as torch aligns them, so torch.load(mmap=True) works), `byteorder` and `version`.
Only the globals torch.load(weights_only=True) allows are named: a dict of plain Python values and
tensors loads there.
"""
from __future__ import annotations

import os
import struct
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import numpy as np

from .atomic import atomic_path
from .pickling import Global, Reduce, dumps

ARCHIVE = "archive"
ALIGNMENT = 64
_REBUILD = Global("torch._utils", "_rebuild_tensor_v2")
_STORAGE = {  # numpy dtype -> torch storage class, as torch.save names them
    np.dtype("float32"): "FloatStorage", np.dtype("float64"): "DoubleStorage",
    np.dtype("float16"): "HalfStorage", np.dtype("int64"): "LongStorage", np.dtype("int32"): "IntStorage",
    np.dtype("int16"): "ShortStorage", np.dtype("int8"): "CharStorage", np.dtype("uint8"): "ByteStorage",
    np.dtype("bool"): "BoolStorage",
}
_ODICT = Global("collections", "OrderedDict")


class _Storage:
    def __init__(self, key: str, array: np.ndarray) -> None:
        self.key, self.array = key, array


def _tensor(array: np.ndarray, storages: list[_Storage]) -> Reduce:
    array = np.asarray(array, dtype=array.dtype.newbyteorder("<"), order="C")  # keeps 0-d arrays 0-d
    if array.dtype.newbyteorder("=") not in _STORAGE:
        raise TypeError(f"cannot write a {array.dtype} tensor in the torch format")
    storage = _Storage(str(len(storages)), array)
    storages.append(storage)
    stride = tuple(int(s // array.itemsize) for s in array.strides) if array.size else (1,) * array.ndim
    # (storage, offset, size, stride, requires_grad, backward_hooks): hooks are an empty OrderedDict
    return Reduce(_REBUILD, (storage, 0, tuple(array.shape), stride, False, Reduce(_ODICT, ())))


def _convert(obj: Any, storages: list[_Storage]) -> Any:
    """numpy arrays become tensors; dicts (an OrderedDict stays one), lists and plain values are kept."""
    if isinstance(obj, np.ndarray):
        return _tensor(obj, storages)
    if isinstance(obj, Mapping):
        kind = OrderedDict if isinstance(obj, OrderedDict) else dict
        return kind((k, _convert(v, storages)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_convert(v, storages) for v in obj)
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    raise TypeError(f"cannot write a {type(obj).__name__} in a torch checkpoint")


def _persistent_id(obj: Any):
    if isinstance(obj, _Storage):
        elem = Global("torch", _STORAGE[obj.array.dtype.newbyteorder("=")])
        return ("storage", elem, obj.key, "cpu", int(obj.array.size))
    return None


def _write_aligned(zf: zipfile.ZipFile, name: str, data: bytes) -> None:
    """A stored member whose data starts at a multiple of ALIGNMENT (padding in an extra field, as torch)."""
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    header = zipfile.sizeFileHeader + len(name.encode("utf-8")) + 4   # + the extra field's own header
    pad = -(zf.fp.tell() + header) % ALIGNMENT
    info.extra = struct.pack("<HH", 0x4246, pad) + b"Z" * pad        # 'FB': torch's padding field id
    zf.writestr(info, data)


def save_torch(obj: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Write `obj` (a state dict of numpy arrays, possibly inside a wrapper dict of plain values) as
    torch.save(obj, path) would, atomically."""
    storages: list[_Storage] = []
    pickled = dumps(_convert(obj, storages), protocol=2, persistent_id=_persistent_id)
    with atomic_path(path) as tmp, open(tmp, "wb") as f, zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as zf:
        _write_aligned(zf, f"{ARCHIVE}/data.pkl", pickled)
        _write_aligned(zf, f"{ARCHIVE}/byteorder", b"little")
        for storage in storages:
            _write_aligned(zf, f"{ARCHIVE}/data/{storage.key}", storage.array.tobytes())
        _write_aligned(zf, f"{ARCHIVE}/version", b"3\n")
