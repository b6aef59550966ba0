"""The allow-listed unpickler: stand-ins for the few torch / numpy globals a checkpoint pickle names,
and an Unpickler whose find_class resolves only those. Loading a checkpoint never imports or runs
code it names; tvmzoo.io.checkpoint_files reads the containers around the pickles.
"""
from __future__ import annotations

import math
import pickle
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import CheckpointError, printable
from ..limits import MAX_PICKLE_DEPTH


class Corrupt(ValueError):
    """The file's content contradicts itself; becomes a CheckpointError naming the file."""


def int_tuple(values, what: str) -> tuple[int, ...]:
    if not isinstance(values, (tuple, list)) or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise Corrupt(f"malformed {what} {printable(values, 80)}")
    return tuple(values)


def native(a: np.ndarray) -> np.ndarray:
    """A writable C-ordered copy in native byte order."""
    return a.astype(a.dtype.newbyteorder("="), order="C")


# ---- stand-ins for torch -------------------------------------------------------------------

@dataclass(frozen=True)
class ElemType:
    """A torch storage class or torch dtype, as a numpy element type (bfloat16 read as uint16)."""

    name: str
    dtype: str
    bfloat16: bool = False


STORAGE_TYPES = {
    "FloatStorage": ElemType("float32", "f4"), "HalfStorage": ElemType("float16", "f2"),
    "BFloat16Storage": ElemType("bfloat16", "u2", True), "DoubleStorage": ElemType("float64", "f8"),
    "LongStorage": ElemType("int64", "i8"), "IntStorage": ElemType("int32", "i4"),
    "ShortStorage": ElemType("int16", "i2"), "CharStorage": ElemType("int8", "i1"),
    "ByteStorage": ElemType("uint8", "u1"), "BoolStorage": ElemType("bool", "b1"),
    "UntypedStorage": ElemType("uint8", "u1"),
}
TORCH_DTYPES = {t.name: t for t in STORAGE_TYPES.values()} | {
    "uint16": ElemType("uint16", "u2"), "uint32": ElemType("uint32", "u4"),
    "uint64": ElemType("uint64", "u8")}


class Storage:
    """One storage: its element type and size from the persistent id; `data` filled once read."""

    def __init__(self, key: str, elem: ElemType, numel: int) -> None:
        self.key, self.elem, self.numel = key, elem, numel
        self.data: bytes | None = None
        self.view: tuple[int, int] | None = None  # legacy view: (element offset, element count)
        self.base: Storage | None = None

    def array(self, elem: ElemType, byteorder: str) -> np.ndarray:
        base = self.base or self
        if base.data is None:
            raise Corrupt(f"storage '{base.key}' is referenced but its data is missing")
        dtype = np.dtype(elem.dtype).newbyteorder(byteorder)
        flat = np.frombuffer(base.data, dtype=dtype, count=len(base.data) // dtype.itemsize)
        if self.view is not None:
            start, count = self.view
            if start + count > flat.size:
                raise Corrupt(f"storage view '{self.key}' lies outside storage '{base.key}'")
            flat = flat[start:start + count]
        return flat


class TensorRef:
    """What torch._utils._rebuild_tensor_v2 would build: a strided view of a storage."""

    def __init__(self, storage, offset, size, stride, elem: ElemType | None = None) -> None:
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride
        self.elem = elem  # the dtype of _rebuild_tensor_v3; None: the storage's own


def _rebuild_tensor(storage, storage_offset, size, stride):
    return TensorRef(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
    return TensorRef(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks,
                       dtype, metadata=None):
    if not isinstance(dtype, ElemType):
        raise Corrupt(f"tensor dtype {dtype!r} is not a torch dtype")
    return TensorRef(storage, storage_offset, size, stride, dtype)


def _rebuild_parameter(data, requires_grad, backward_hooks, state=None):
    return data


# ---- stand-ins for numpy (.pdparams are pickles of numpy arrays) ---------------------------

class DtypeStub:
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


class NdarrayStub:
    """numpy.core.multiarray._reconstruct(ndarray, (0,), b'b') followed by BUILD with the data."""

    def __init__(self, *args) -> None:
        self.shape, self.dtype, self.fortran, self.data = (), None, False, b""

    def __setstate__(self, state) -> None:
        if len(state) == 5:  # (version, shape, dtype, is_fortran, rawdata); old pickles omit version
            state = state[1:]
        self.shape, self.dtype, self.fortran, self.data = state

    def array(self) -> np.ndarray | None:
        dtype = self.dtype.resolve() if isinstance(self.dtype, DtypeStub) else None
        if dtype is None:
            return None
        data = self.data.encode("latin1") if isinstance(self.data, str) else self.data
        if not isinstance(data, (bytes, bytearray)):
            return None
        shape = int_tuple(self.shape, "array shape")
        count = math.prod(shape)
        if len(data) < count * dtype.itemsize:
            raise Corrupt(f"array of shape {shape} needs {count * dtype.itemsize} bytes, "
                          f"the file holds {len(data)}")
        flat = np.frombuffer(data, dtype=dtype, count=count)
        return native(flat.reshape(shape, order="F" if self.fortran else "C"))


def _np_reconstruct(subtype, shape, dtype):
    return NdarrayStub()


def _np_frombuffer(buf, dtype, shape, order):
    if not isinstance(buf, (bytes, bytearray)):
        raise Corrupt("array data is not a byte string")
    stub = NdarrayStub()
    stub.__setstate__((shape, dtype, order == "F", bytes(buf)))
    return stub


def _np_scalar(dtype, data=None):
    return None  # a numpy scalar is metadata, never a weight


def _codecs_encode(text, encoding="latin1"):
    # protocol-2 pickles written by Python 3 store bytes as _codecs.encode(str, 'latin1')
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise Corrupt(f"unexpected _codecs.encode({encoding!r})")
    return text.encode("latin1")


_SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("_codecs", "encode"): _codecs_encode,
    ("numpy", "ndarray"): NdarrayStub,
    ("numpy", "dtype"): DtypeStub,
}
_SAFE_GLOBALS |= {("torch", name): elem for name, elem in STORAGE_TYPES.items()}
_SAFE_GLOBALS[("torch.storage", "UntypedStorage")] = STORAGE_TYPES["UntypedStorage"]
_SAFE_GLOBALS |= {("torch", name): elem for name, elem in TORCH_DTYPES.items()}
for _core in ("numpy.core", "numpy._core"):
    _SAFE_GLOBALS[(f"{_core}.multiarray", "_reconstruct")] = _np_reconstruct
    _SAFE_GLOBALS[(f"{_core}.multiarray", "scalar")] = _np_scalar
    _SAFE_GLOBALS[(f"{_core}.numeric", "_frombuffer")] = _np_frombuffer
for _builtins in ("builtins", "__builtin__"):
    _SAFE_GLOBALS |= {(_builtins, "set"): set, (_builtins, "frozenset"): frozenset,
                      (_builtins, "slice"): slice}


class SafeUnpickler(pickle._Unpickler):
    """Resolves globals from the allow-list only.

    The pure-Python unpickler is used on purpose: its memo is a dict, so a corrupt memo index
    cannot make it allocate gigabytes the way the C unpickler's memo array can.
    """

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file, path: Path, persistent_load: Callable | None = None) -> None:
        super().__init__(file, encoding="latin1")
        self._path, self._persistent = path, persistent_load
        self._depths: dict[int, tuple[Any, int]] = {}  # id -> (object, nesting): objects kept alive

    def _depth_of(self, obj) -> int:
        entry = self._depths.get(id(obj))
        return entry[1] if entry is not None and entry[0] is obj else 0

    def _nest(self, load: Callable, inputs: Callable) -> None:
        """Run one opcode that puts `inputs` inside its result, refusing nesting deeper than
        MAX_PICKLE_DEPTH: hashing or freeing a tuple nested 100000 deep overflows the C stack."""
        depth = 1 + max(map(self._depth_of, inputs(self)), default=0)
        if depth > MAX_PICKLE_DEPTH:
            raise Corrupt(f"the pickle nests containers more than {MAX_PICKLE_DEPTH} deep "
                          f"(a state dict needs about 6)")
        load(self)
        result = self.stack[-1]
        if not isinstance(result, (str, bytes, int, float, type(None))):
            self._depths[id(result)] = (result, max(depth, self._depth_of(result)))

    def find_class(self, module: str, name: str):
        try:
            return _SAFE_GLOBALS[(module, name)]
        except (KeyError, TypeError):
            raise CheckpointError(
                f"refusing to load {self._path}: it asks to import {printable(f'{module}.{name}')}, which a checkpoint "
                f"never needs; it may be malicious. If you trust it, load it with its own framework "
                f"and save only the weights (e.g. torch.save(model.state_dict(), 'weights.pth')).") from None

    def persistent_load(self, pid):
        if self._persistent is None:
            raise Corrupt("unexpected persistent id in a plain pickle")
        return self._persistent(pid)

    def _load_build(self) -> None:
        # BUILD may only fill in our own stand-ins; dict state (OrderedDict._metadata) is ignored
        state = self.stack.pop()
        inst = self.stack[-1]
        if isinstance(inst, (DtypeStub, NdarrayStub)):
            inst.__setstate__(state)
        elif not isinstance(inst, dict):
            raise Corrupt(f"the pickle sets the state of a {type(inst).__name__}")

    dispatch[pickle.BUILD[0]] = _load_build


def _since_mark(unpickler) -> list:
    return list(unpickler.stack)


def _top(count: int) -> Callable:
    return lambda unpickler: unpickler.stack[-count:]


_NESTING_OPS = {  # opcode: the objects it puts inside the object it leaves on top of the stack
    **{op: _since_mark for op in (pickle.TUPLE, pickle.LIST, pickle.DICT, pickle.FROZENSET, pickle.OBJ,
                                  pickle.INST, pickle.APPENDS, pickle.SETITEMS, pickle.ADDITEMS)},
    pickle.TUPLE1: _top(1), pickle.TUPLE2: _top(2), pickle.TUPLE3: _top(3), pickle.REDUCE: _top(2),
    pickle.NEWOBJ: _top(2), pickle.NEWOBJ_EX: _top(3), pickle.BINPERSID: _top(1), pickle.BUILD: _top(1),
    pickle.APPEND: _top(1), pickle.SETITEM: _top(2),
}
for _op, _inputs in _NESTING_OPS.items():
    SafeUnpickler.dispatch[_op[0]] = \
        lambda self, _load=SafeUnpickler.dispatch[_op[0]], _inputs=_inputs: self._nest(_load, _inputs)


def unpickle(file, path: Path, persistent_load: Callable | None = None):
    return SafeUnpickler(file, path, persistent_load).load()

