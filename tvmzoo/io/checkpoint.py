"""Torch-free, safe checkpoint readers: .pth/.pt (torch.save zip and legacy formats), PaddlePaddle
.pdparams and NumPy .npz, each read into one flat {name: np.ndarray} dict.

Pickles are read by tvmzoo.io.unpickle, whose find_class resolves only a short allow-list of globals,
each to a stand-in: loading a checkpoint never imports or runs code it names.
"""
from __future__ import annotations

import io
import logging
import math
import os
import struct
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import atomic_path
from .unpickle import _Corrupt, _ElemType, _int_tuple, _native, _NdarrayStub, _Storage, _TensorRef, _unpickle
from ..errors import CheckpointError

logger = logging.getLogger(__name__)

SUPPORTED = ("PyTorch .pth/.pt (torch.save, zip or legacy format), PaddlePaddle .pdparams (pickle "
             "of numpy arrays), NumPy .npz")
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch.serialization.MAGIC_NUMBER
_LEGACY_PROTOCOL = 1001
_WRAPPER_KEYS = ("state_dict", "model", "model_state", "module")
_MAX_BROADCAST = 1 << 24  # elements a stride-0 tensor may expand to beyond its storage


# ---- containers ----------------------------------------------------------------------------

def _storage_from_pid(pid) -> _Storage:
    if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
        raise _Corrupt(f"unknown persistent id {str(pid)[:80]}")
    _, elem, key, _location, numel = pid[:5]
    if not isinstance(elem, _ElemType) or not isinstance(key, str):
        raise _Corrupt(f"malformed storage id {str(pid)[:80]}")
    return _Storage(key, elem, _int_tuple((numel,), "storage size")[0])


def _read_torch_zip(zf: zipfile.ZipFile, pkl_name: str, path: Path) -> tuple[Any, str]:
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
            new.data = zf.read(member)
            _check_storage_size(new, len(new.data))
            storages[new.key] = new
        return storages[new.key]

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


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as npz:
        return {key: npz[key] for key in npz.files}


def _read_any(path: Path) -> tuple[Any, str]:
    """The unpickled top-level object and the byte order its torch storages use."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith(b"PK"):
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            pkls = [n for n in names if n.endswith("data.pkl") and n.count("/") <= 1]
            if pkls:
                return _read_torch_zip(zf, pkls[0], path)
            if names and all(n.endswith(".npy") for n in names):
                return _read_npz(path), "<"
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

def _tensor_array(ref: _TensorRef, byteorder: str) -> np.ndarray:
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
        out = _native(np.lib.stride_tricks.as_strided(flat[offset:], size, strides))
    if elem.bfloat16:  # bfloat16 is the upper half of a float32
        out = (out.astype(np.uint32) << 16).view(np.float32)
    return out


def _to_array(value, byteorder: str) -> np.ndarray | None:
    if isinstance(value, _TensorRef):
        return _tensor_array(value, byteorder)
    if isinstance(value, _NdarrayStub):
        return value.array()
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


def _collect(obj, byteorder: str, path: Path) -> dict[str, np.ndarray]:
    top = _unwrap(obj)
    if not isinstance(top, dict):
        raise CheckpointError(f"{path} holds a '{type(top).__name__}' object, not a state dict "
                              f"({{name: tensor}}). Save model.state_dict() instead.")
    state: dict[str, np.ndarray] = {}
    for key, value in top.items():
        try:
            array = _to_array(value, byteorder)
        except _Corrupt as e:
            raise _Corrupt(f"tensor '{key}': {e}") from None
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
                       "checkpoint may come from a diverged training run", path, bad[0], len(bad))


def _describe(e: Exception) -> str:
    if isinstance(e, _Corrupt):
        return str(e)
    if isinstance(e, EOFError):
        return "the data ends unexpectedly"
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


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
        obj, byteorder = _read_any(path)
        state = _collect(obj, byteorder, path)
    except CheckpointError:
        raise
    except PermissionError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: permission denied. Make it readable "
                              f"(chmod) or copy it somewhere you can read.") from e
    except Exception as e:  # any other failure of a parser on bad bytes means a corrupt file
        raise CheckpointError(f"cannot read checkpoint {path}: {_describe(e)}. The file is truncated or "
                              f"corrupt: download or save it again.") from e
    _warn_non_finite(state, path)
    logger.info("%s: %d tensors, %d values", path, len(state), sum(v.size for v in state.values()))
    return state


def save_npz(state: dict[str, np.ndarray], path: str | os.PathLike) -> None:
    """Write {name: ndarray} as an uncompressed .npz, atomically (temp file, then os.replace)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f, \
            zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for key, value in state.items():
            with zf.open(f"{key}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(value), allow_pickle=False)
