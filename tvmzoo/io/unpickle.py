"""Safe unpickling for checkpoints: an Unpickler whose find_class resolves only a short allow-list
of globals, each to a stand-in defined here (torch storages and tensor rebuilders, numpy arrays and
dtypes): loading a checkpoint never imports or runs code it names."""
from __future__ import annotations

import math
import pickle
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import CheckpointError


class _Corrupt(ValueError):
    """The file's content contradicts itself; becomes a CheckpointError naming the file."""


def _int_tuple(values, what: str) -> tuple[int, ...]:
    if not isinstance(values, (tuple, list)) or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise _Corrupt(f"malformed {what} {str(values)[:80]}")
    return tuple(values)


def _native(a: np.ndarray) -> np.ndarray:
    """A writable C-ordered copy in native byte order."""
    return a.astype(a.dtype.newbyteorder("="), order="C")



# ---- stand-ins for torch -------------------------------------------------------------------

@dataclass(frozen=True)
class _ElemType:
    """A torch storage class or torch dtype, as a numpy element type (bfloat16 read as uint16)."""

    name: str
    dtype: str
    bfloat16: bool = False


_STORAGE_TYPES = {
    "FloatStorage": _ElemType("float32", "f4"), "HalfStorage": _ElemType("float16", "f2"),
    "BFloat16Storage": _ElemType("bfloat16", "u2", True), "DoubleStorage": _ElemType("float64", "f8"),
    "LongStorage": _ElemType("int64", "i8"), "IntStorage": _ElemType("int32", "i4"),
    "ShortStorage": _ElemType("int16", "i2"), "CharStorage": _ElemType("int8", "i1"),
    "ByteStorage": _ElemType("uint8", "u1"), "BoolStorage": _ElemType("bool", "b1"),
    "UntypedStorage": _ElemType("uint8", "u1"),
}
_TORCH_DTYPES = {t.name: t for t in _STORAGE_TYPES.values()} | {
    "uint16": _ElemType("uint16", "u2"), "uint32": _ElemType("uint32", "u4"),
    "uint64": _ElemType("uint64", "u8")}


class _Storage:
    """One storage: its element type and size from the persistent id; `data` filled once read."""

    def __init__(self, key: str, elem: _ElemType, numel: int) -> None:
        self.key, self.elem, self.numel = key, elem, numel
        self.data: bytes | None = None
        self.view: tuple[int, int] | None = None  # legacy view: (element offset, element count)
        self.base: _Storage | None = None

    def array(self, elem: _ElemType, byteorder: str) -> np.ndarray:
        base = self.base or self
        if base.data is None:
            raise _Corrupt(f"storage '{base.key}' is referenced but its data is missing")
        dtype = np.dtype(elem.dtype).newbyteorder(byteorder)
        flat = np.frombuffer(base.data, dtype=dtype, count=len(base.data) // dtype.itemsize)
        if self.view is not None:
            start, count = self.view
            if start + count > flat.size:
                raise _Corrupt(f"storage view '{self.key}' lies outside storage '{base.key}'")
            flat = flat[start:start + count]
        return flat


class _TensorRef:
    """What torch._utils._rebuild_tensor_v2 would build: a strided view of a storage."""

    def __init__(self, storage, offset, size, stride, elem: _ElemType | None = None) -> None:
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride
        self.elem = elem  # the dtype of _rebuild_tensor_v3; None: the storage's own


def _rebuild_tensor(storage, storage_offset, size, stride):
    return _TensorRef(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
    return _TensorRef(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks,
                       dtype, metadata=None):
    if not isinstance(dtype, _ElemType):
        raise _Corrupt(f"tensor dtype {dtype!r} is not a torch dtype")
    return _TensorRef(storage, storage_offset, size, stride, dtype)


def _rebuild_parameter(data, requires_grad, backward_hooks, state=None):
    return data


# ---- stand-ins for numpy (.pdparams are pickles of numpy arrays) ---------------------------

class _DtypeStub:
    """numpy.dtype(obj, align, copy) followed by BUILD with (version, byteorder, ...)."""

    def __init__(self, obj, align=False, copy=False) -> None:
        self.obj, self.byteorder, self.structured = obj, "=", False

    def __setstate__(self, state) -> None:
        self.byteorder = state[1]
        self.structured = any(s is not None for s in state[2:5])

    def resolve(self) -> np.dtype | None:
        """The numeric numpy dtype, or None for anything else (strings, objects, records)."""
        if not isinstance(self.obj, str) or self.structured or self.byteorder not in "<>|=":
            return None
        try:
            dtype = np.dtype(self.obj)
        except TypeError:
            return None
        return dtype.newbyteorder(self.byteorder) if dtype.kind in "biufc" else None


class _NdarrayStub:
    """numpy.core.multiarray._reconstruct(ndarray, (0,), b'b') followed by BUILD with the data."""

    def __init__(self, *args) -> None:
        self.shape, self.dtype, self.fortran, self.data = (), None, False, b""

    def __setstate__(self, state) -> None:
        if len(state) == 5:  # (version, shape, dtype, is_fortran, rawdata); old pickles omit version
            state = state[1:]
        self.shape, self.dtype, self.fortran, self.data = state

    def array(self) -> np.ndarray | None:
        dtype = self.dtype.resolve() if isinstance(self.dtype, _DtypeStub) else None
        if dtype is None:
            return None
        data = self.data.encode("latin1") if isinstance(self.data, str) else self.data
        if not isinstance(data, (bytes, bytearray)):
            return None
        shape = _int_tuple(self.shape, "array shape")
        count = math.prod(shape)
        if len(data) < count * dtype.itemsize:
            raise _Corrupt(f"array of shape {shape} needs {count * dtype.itemsize} bytes, "
                           f"the file holds {len(data)}")
        flat = np.frombuffer(data, dtype=dtype, count=count)
        return _native(flat.reshape(shape, order="F" if self.fortran else "C"))


def _np_reconstruct(subtype, shape, dtype):
    return _NdarrayStub()


def _np_frombuffer(buf, dtype, shape, order):
    if not isinstance(buf, (bytes, bytearray)):
        raise _Corrupt("array data is not a byte string")
    stub = _NdarrayStub()
    stub.__setstate__((shape, dtype, order == "F", bytes(buf)))
    return stub


def _np_scalar(dtype, data=None):
    return None  # a numpy scalar is metadata, never a weight


def _codecs_encode(text, encoding="latin1"):
    # protocol-2 pickles written by Python 3 store bytes as _codecs.encode(str, 'latin1')
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise _Corrupt(f"unexpected _codecs.encode({encoding!r})")
    return text.encode("latin1")


_SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("_codecs", "encode"): _codecs_encode,
    ("numpy", "ndarray"): _NdarrayStub,
    ("numpy", "dtype"): _DtypeStub,
}
_SAFE_GLOBALS |= {("torch", name): elem for name, elem in _STORAGE_TYPES.items()}
_SAFE_GLOBALS[("torch.storage", "UntypedStorage")] = _STORAGE_TYPES["UntypedStorage"]
_SAFE_GLOBALS |= {("torch", name): elem for name, elem in _TORCH_DTYPES.items()}
for _core in ("numpy.core", "numpy._core"):
    _SAFE_GLOBALS[(f"{_core}.multiarray", "_reconstruct")] = _np_reconstruct
    _SAFE_GLOBALS[(f"{_core}.multiarray", "scalar")] = _np_scalar
    _SAFE_GLOBALS[(f"{_core}.numeric", "_frombuffer")] = _np_frombuffer
for _builtins in ("builtins", "__builtin__"):
    _SAFE_GLOBALS |= {(_builtins, "set"): set, (_builtins, "frozenset"): frozenset,
                      (_builtins, "slice"): slice}


class _SafeUnpickler(pickle._Unpickler):
    """Resolves globals from the allow-list only.

    The pure-Python unpickler is used on purpose: its memo is a dict, so a corrupt memo index
    cannot make it allocate gigabytes the way the C unpickler's memo array can.
    """

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file, path: Path, persistent_load: Callable | None = None) -> None:
        super().__init__(file, encoding="latin1")
        self._path, self._persistent = path, persistent_load

    def find_class(self, module: str, name: str):
        try:
            return _SAFE_GLOBALS[(module, name)]
        except (KeyError, TypeError):
            raise CheckpointError(
                f"refusing to load {self._path}: it asks to import {module}.{name}, which a checkpoint "
                f"never needs; it may be malicious. If you trust it, load it with its own framework "
                f"and save only the weights (e.g. torch.save(model.state_dict(), 'weights.pth')).") from None

    def persistent_load(self, pid):
        if self._persistent is None:
            raise _Corrupt("unexpected persistent id in a plain pickle")
        return self._persistent(pid)

    def _load_build(self) -> None:
        # BUILD may only fill in our own stand-ins; dict state (OrderedDict._metadata) is ignored
        state = self.stack.pop()
        inst = self.stack[-1]
        if isinstance(inst, (_DtypeStub, _NdarrayStub)):
            inst.__setstate__(state)
        elif not isinstance(inst, dict):
            raise _Corrupt(f"the pickle sets the state of a {type(inst).__name__}")

    dispatch[pickle.BUILD[0]] = _load_build


def _unpickle(file, path: Path, persistent_load: Callable | None = None):
    return _SafeUnpickler(file, path, persistent_load).load()
