"""Torch-free, safe checkpoint readers: .pth/.pt (torch.save zip and legacy formats), PaddlePaddle
.pdparams and NumPy .npz, each read into one flat {name: np.ndarray} dict.

Pickles are read by an Unpickler whose find_class resolves only a short allow-list of globals, each
to a stand-in defined in this module: loading a checkpoint never imports or runs code it names.
"""
from __future__ import annotations

import io
import logging
import math
import os
import pickle
import struct
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .atomic import atomic_path
from ..errors import CheckpointError, printable
from ..limits import CHECKPOINT_COPY_SLACK, MAX_PICKLE_DEPTH, gib
from .npz_read import NpzProblem, read_array

logger = logging.getLogger(__name__)

SUPPORTED = ("PyTorch .pth/.pt (torch.save, zip or legacy format), PaddlePaddle .pdparams (pickle "
             "of numpy arrays), NumPy .npz")
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch.serialization.MAGIC_NUMBER
_LEGACY_PROTOCOL = 1001
_WRAPPER_KEYS = ("state_dict", "model", "model_state", "module")
_MAX_BROADCAST = 1 << 24  # elements a stride-0 tensor may expand to beyond its storage


class _Corrupt(ValueError):
    """The file's content contradicts itself; becomes a CheckpointError naming the file."""


class _TooBig(_Corrupt):
    """Reading the file as it asks would take more memory than its size justifies."""


class _Budget:
    """Bytes a checkpoint may make us allocate: twice its file size (bfloat16 becomes float32) plus
    CHECKPOINT_COPY_SLACK. Views of one storage and broadcast tensors are copied out when read, so a
    small file could otherwise ask for gigabytes."""

    def __init__(self, file_size: int) -> None:
        self.total = 2 * file_size + CHECKPOINT_COPY_SLACK
        self.left = self.total

    def take(self, nbytes: int, what: str) -> None:
        if nbytes > self.left:
            raise _TooBig(f"{what} needs {gib(nbytes)}, more than the {gib(self.left)} left of the "
                          f"{gib(self.total)} this file may take (twice its size + {gib(CHECKPOINT_COPY_SLACK)})")
        self.left -= nbytes


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
        self._depths: dict[int, tuple[Any, int]] = {}  # id -> (object, nesting): objects kept alive

    def _depth_of(self, obj) -> int:
        entry = self._depths.get(id(obj))
        return entry[1] if entry is not None and entry[0] is obj else 0

    def _nest(self, load: Callable, inputs: Callable) -> None:
        """Run one opcode that puts `inputs` inside its result, refusing nesting deeper than
        MAX_PICKLE_DEPTH: hashing or freeing a tuple nested 100000 deep overflows the C stack."""
        depth = 1 + max(map(self._depth_of, inputs(self)), default=0)
        if depth > MAX_PICKLE_DEPTH:
            raise _Corrupt(f"the pickle nests containers more than {MAX_PICKLE_DEPTH} deep "
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
    _SafeUnpickler.dispatch[_op[0]] = \
        lambda self, _load=_SafeUnpickler.dispatch[_op[0]], _inputs=_inputs: self._nest(_load, _inputs)


def _unpickle(file, path: Path, persistent_load: Callable | None = None):
    return _SafeUnpickler(file, path, persistent_load).load()


# ---- containers ----------------------------------------------------------------------------

def _storage_from_pid(pid) -> _Storage:
    if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
        raise _Corrupt(f"unknown persistent id {printable(pid, 80)}")
    _, elem, key, _location, numel = pid[:5]
    if not isinstance(elem, _ElemType) or not isinstance(key, str):
        raise _Corrupt(f"malformed storage id {printable(pid, 80)}")
    return _Storage(key, elem, _int_tuple((numel,), "storage size")[0])


def _read_torch_zip(zf: zipfile.ZipFile, pkl_name: str, path: Path, budget: _Budget) -> tuple[Any, str]:
    prefix = pkl_name[: -len("data.pkl")]
    names = set(zf.namelist())
    byteorder = zf.read(prefix + "byteorder").decode() if prefix + "byteorder" in names else "little"
    if byteorder not in ("little", "big"):
        raise _Corrupt(f"unknown byteorder {byteorder!r}")
    storages: dict[str, _Storage] = {}

    def load(pid) -> _Storage:
        new = _storage_from_pid(pid)
        if new.key not in storages:
            member = f"{prefix}data/{new.key}"
            if member not in names:
                raise _Corrupt(f"storage '{new.key}' is missing from the archive")
            budget.take(zf.getinfo(member).file_size, f"storage '{printable(new.key)}'")
            new.data = zf.read(member)
            _check_storage_size(new, len(new.data))
            storages[new.key] = new
        return storages[new.key]

    budget.take(zf.getinfo(pkl_name).file_size, pkl_name)
    obj = _unpickle(io.BytesIO(zf.read(pkl_name)), path, load)
    return obj, "<" if byteorder == "little" else ">"


def _read_legacy(f: io.BytesIO, path: Path) -> tuple[Any, str]:
    """torch.save(..., _use_new_zipfile_serialization=False), after the magic number."""
    if _unpickle(f, path) != _LEGACY_PROTOCOL:
        raise _Corrupt("unsupported legacy protocol version")
    sys_info = _unpickle(f, path)
    little = sys_info.get("little_endian", True) if isinstance(sys_info, dict) else True
    storages: dict[str, _Storage] = {}

    def load(pid) -> _Storage:
        new = _storage_from_pid(pid)
        root = storages.setdefault(new.key, new)
        view = pid[5] if len(pid) > 5 else None
        if view is None:
            return root
        view_key, offset, count = view  # old torch: storage views share their root's data
        sub = storages.setdefault(view_key, _Storage(view_key, root.elem, count))
        sub.base, sub.view = root, _int_tuple((offset, count), "storage view")
        return sub

    obj = _unpickle(f, path, load)
    keys = _unpickle(f, path)
    if not isinstance(keys, list):
        raise _Corrupt("the storage key list is missing")
    order = "<" if little else ">"
    for key in keys:
        storage = storages.get(key) if isinstance(key, str) else None
        if storage is None:
            raise _Corrupt(f"storage '{key}' has data but no tensor refers to it")
        head = f.read(8)
        if len(head) < 8:
            raise _Corrupt(f"the file ends before storage '{key}'")
        (count,) = struct.unpack(order + "q", head)
        nbytes = count * np.dtype(storage.elem.dtype).itemsize
        storage.data = f.read(nbytes) if count >= 0 else b""
        if count < 0 or len(storage.data) < nbytes:
            raise _Corrupt(f"the file ends inside storage '{key}' (truncated)")
        _check_storage_size(storage, len(storage.data))
    return obj, order


def _check_storage_size(storage: _Storage, nbytes: int) -> None:
    need = storage.numel * np.dtype(storage.elem.dtype).itemsize
    if nbytes < need:
        raise _Corrupt(f"storage '{storage.key}' holds {nbytes} bytes but claims {storage.numel} "
                       f"{storage.elem.name} elements ({need} bytes)")


def _read_npz(path: Path, names: list[str], budget: _Budget) -> dict[str, np.ndarray]:
    """Each array's header checked against the budget before it is inflated (np.load allocates the claim)."""
    over: list[str] = []

    def fits(shape: tuple[int, ...], dtype: np.dtype) -> str | None:
        try:
            budget.take(math.prod(shape) * dtype.itemsize, "it")
        except _TooBig as e:
            over.append(str(e))
            return str(e)
        return None

    state = {}
    for key in (name[:-len(".npy")] for name in names):
        try:
            state[key] = read_array(path, key, fits)
        except NpzProblem as e:
            raise (_TooBig if over else _Corrupt)(f"tensor '{printable(key, 120)}': {e}") from None
    return state


def _read_any(path: Path, budget: _Budget) -> tuple[Any, str]:
    """The unpickled top-level object and the byte order its torch storages use."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith(b"PK"):
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            pkls = [n for n in names if n.endswith("data.pkl") and n.count("/") <= 1]
            if pkls:
                return _read_torch_zip(zf, pkls[0], path, budget)
            if names and all(n.endswith(".npy") for n in names):
                return _read_npz(path, names, budget), "<"
            raise CheckpointError(f"{path} is a zip archive but neither a torch.save file (no data.pkl) "
                                  f"nor an .npz (members: {', '.join(names[:5]) or 'none'}). "
                                  f"Supported formats: {SUPPORTED}.")
    if not head.startswith(b"\x80"):
        what = "is empty" if not head else f"starts with {head!r}, which is no format tvmzoo reads"
        raise CheckpointError(f"{path} {what} (suffix '{path.suffix}'). Supported formats: {SUPPORTED}; "
                              f"an .onnx model is given to the build YAML directly.")
    f = io.BytesIO(path.read_bytes())
    first = _unpickle(f, path)
    if isinstance(first, int) and first == _LEGACY_MAGIC:
        return _read_legacy(f, path)
    return first, "<"  # a .pdparams: the pickle is the state dict itself


# ---- from the unpickled object to {name: ndarray} ------------------------------------------

def _int_tuple(values, what: str) -> tuple[int, ...]:
    if not isinstance(values, (tuple, list)) or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise _Corrupt(f"malformed {what} {printable(values, 80)}")
    return tuple(values)


def _native(a: np.ndarray) -> np.ndarray:
    """A writable C-ordered copy in native byte order."""
    return a.astype(a.dtype.newbyteorder("="), order="C")


def _tensor_array(ref: _TensorRef, byteorder: str, budget: _Budget) -> np.ndarray:
    if not isinstance(ref.storage, _Storage):
        raise _Corrupt("tensor refers to no storage")
    elem = ref.elem or ref.storage.elem
    flat = ref.storage.array(elem, byteorder)
    (offset,) = _int_tuple((ref.offset,), "storage offset")
    size, stride = _int_tuple(ref.size, "size"), _int_tuple(ref.stride, "stride")
    if len(size) != len(stride):
        raise _Corrupt(f"size {size} and stride {stride} disagree")
    count = math.prod(size)
    if count == 0:
        out = np.zeros(size, dtype=flat.dtype.newbyteorder("="))
    else:
        extent = offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1
        if extent > flat.size or count > max(flat.size, _MAX_BROADCAST):
            raise _Corrupt(f"tensor of size {size} (stride {stride}, offset {offset}) needs "
                           f"{max(extent, count)} {elem.name} elements, its storage holds {flat.size}")
        strides = tuple(s * flat.itemsize for s in stride)
        budget.take(count * (4 if elem.bfloat16 else flat.itemsize), "it")  # the copy made below
        out = _native(np.lib.stride_tricks.as_strided(flat[offset:], size, strides))
    if elem.bfloat16:  # bfloat16 is the upper half of a float32
        out = (out.astype(np.uint32) << 16).view(np.float32)
    return out


def _to_array(value, byteorder: str, budget: _Budget) -> np.ndarray | None:
    if isinstance(value, _TensorRef):
        return _tensor_array(value, byteorder, budget)
    if isinstance(value, _NdarrayStub):
        array = value.array()
        budget.take(0 if array is None else array.nbytes, "it")
        return array
    if isinstance(value, np.ndarray):
        return value if value.dtype.kind in "biufc" else None
    return None


def _is_tensor(value) -> bool:
    return isinstance(value, (_TensorRef, _NdarrayStub, np.ndarray))


def _unwrap(obj, depth: int = 0):
    """The tensor dict inside {'state_dict': ...} / {'model': ...} / {'module': ...} wrappers."""
    if not isinstance(obj, dict) or depth > 3:
        return obj
    for key in _WRAPPER_KEYS:  # before the top level's own tensors, e.g. a best_acc1 tensor
        inner = _unwrap(obj.get(key), depth + 1)
        if isinstance(inner, dict) and any(_is_tensor(v) for v in inner.values()):
            return inner
    return obj


def _collect(obj, byteorder: str, path: Path, budget: _Budget) -> dict[str, np.ndarray]:
    top = _unwrap(obj)
    if not isinstance(top, dict):
        raise CheckpointError(f"{path} holds a '{type(top).__name__}' object, not a state dict "
                              f"({{name: tensor}}). Save model.state_dict() instead.")
    state: dict[str, np.ndarray] = {}
    for key, value in top.items():
        try:
            array = _to_array(value, byteorder, budget)
        except _Corrupt as e:
            raise type(e)(f"tensor '{printable(key, 120)}': {e}") from None
        if array is not None and isinstance(key, str):
            state[key] = array
        else:
            logger.debug("%s: dropping non-tensor entry %r", path, key)
    if not state:
        keys = ", ".join(repr(k) for k in list(top)[:8]) or "none"
        raise CheckpointError(f"{path} holds no tensors (top-level keys: {keys}). Expected a state dict "
                              f"{{name: tensor}}, possibly under 'state_dict', 'model' or 'module'.")
    while all(k.startswith("module.") for k in state):  # saved from nn.DataParallel
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _warn_non_finite(state: dict[str, np.ndarray], path: Path) -> None:
    bad = [k for k, v in state.items() if v.dtype.kind in "fc" and not np.isfinite(v).all()]
    if bad:
        logger.warning("%s: tensor '%s' contains NaN or Inf values (%d tensor(s) affected); the "
                       "checkpoint may come from a diverged training run", path, printable(bad[0]), len(bad))


def _describe(e: Exception) -> str:
    """One line for the terminal: names from the file (storage keys, tensor names) arrive escaped."""
    if isinstance(e, _Corrupt):
        return printable(e, 400)
    if isinstance(e, EOFError):
        return "the data ends unexpectedly"
    if isinstance(e, MemoryError):
        return "its tensors do not fit in memory"
    return printable(f"{type(e).__name__}: {e}", 400) if str(e) else type(e).__name__


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a checkpoint into {name: ndarray} without torch or paddle and without running its code.

    Reads torch.save files (zip and legacy), .pdparams pickles and .npz; unwraps 'state_dict' /
    'model' / 'module' wrappers, drops non-tensor entries and a common 'module.' prefix; bfloat16
    becomes float32. Raises CheckpointError for anything it cannot read safely.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist. Check the path "
                              f"(frontend.checkpoint in the build YAML, or the command line).")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is not a file. Give the path of the weights file.")
    try:
        budget = _Budget(path.stat().st_size)
        obj, byteorder = _read_any(path, budget)
        state = _collect(obj, byteorder, path, budget)
    except CheckpointError:
        raise
    except (_TooBig, MemoryError) as e:
        raise CheckpointError(f"refusing to read checkpoint {path}: {_describe(e)}. Views of one storage and "
                              f"expanded (stride 0) tensors are copied out when read, compressed arrays inflated; "
                              f"save real tensors (e.g. {{k: v.clone() for k, v in state_dict.items()}}).") from None
    except PermissionError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: permission denied. Make it readable "
                              f"(chmod) or copy it somewhere you can read.") from e
    except Exception as e:  # any other failure of a parser on bad bytes means a corrupt file
        raise CheckpointError(f"cannot read checkpoint {path}: {_describe(e)}. The file is truncated or "
                              f"corrupt: download or save it again.") from e
    _warn_non_finite(state, path)
    logger.info("%s: %d tensors, %d values", path, len(state), sum(v.size for v in state.values()))
    return state


_DROP = object()


def _plain(value, depth: int = 0):
    """JSON-like values (str, numbers, bools, None, lists, tuples, dicts with str keys); _DROP for others."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if depth > 8:
        return _DROP
    if isinstance(value, (list, tuple)):
        return type(value)(v for v in (_plain(x, depth + 1) for x in value) if v is not _DROP)
    if isinstance(value, dict):
        pairs = ((k, _plain(x, depth + 1)) for k, x in value.items() if isinstance(k, str))
        return {k: v for k, v in pairs if v is not _DROP}
    return _DROP


def read_metadata(path: str | os.PathLike, key: str = "meta") -> dict:
    """The plain values (strings, numbers, lists, dicts) of a wrapped checkpoint's `key` entry, e.g.
    mmpretrain's {'meta': {...}, 'state_dict': ...}; {} when there is none. Read as safely as the weights."""
    try:
        path = Path(path)
        obj, _ = _read_any(path, _Budget(path.stat().st_size))
    except Exception as e:  # noqa: BLE001 - a file load_state_dict read cannot fail here; metadata is optional
        logger.debug("%s: no metadata read (%s: %s)", path, type(e).__name__, e)
        return {}
    meta = obj.get(key) if isinstance(obj, dict) else None
    return _plain(meta) if isinstance(meta, dict) else {}


def save_npz(state: dict[str, np.ndarray], path: str | os.PathLike) -> None:
    """Write {name: ndarray} as an uncompressed .npz, atomically (temp file, then os.replace)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f, \
            zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for key, value in state.items():
            with zf.open(f"{key}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(value), allow_pickle=False)
