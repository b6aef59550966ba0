"""Torch-free, safe checkpoint readers: .pth/.pt (torch.save zip and legacy formats), PaddlePaddle
.pdparams and NumPy .npz, each read into one flat {name: np.ndarray} dict.

Pickles are read by an Unpickler whose find_class resolves only a short allow-list of globals, each
to a stand-in (tvmzoo.io.unpickle): loading a checkpoint never imports or runs code it names. The
containers around them: tvmzoo.io.checkpoint_files. This module turns what they hold into arrays.
"""
from __future__ import annotations

import logging
import math
import os
import zipfile
from pathlib import Path

import numpy as np

from .atomic import atomic_path
from ..errors import CheckpointError, printable
from .checkpoint_files import Budget, TooBig, read_any
from .unpickle import Corrupt, NdarrayStub, Storage, TensorRef, int_tuple, native

logger = logging.getLogger(__name__)

_WRAPPER_KEYS = ("state_dict", "model", "model_state", "module")
_MAX_BROADCAST = 1 << 24  # elements a stride-0 tensor may expand to beyond its storage


def _tensor_array(ref: TensorRef, byteorder: str, budget: Budget) -> np.ndarray:
    if not isinstance(ref.storage, Storage):
        raise Corrupt("tensor refers to no storage")
    elem = ref.elem or ref.storage.elem
    flat = ref.storage.array(elem, byteorder)
    (offset,) = int_tuple((ref.offset,), "storage offset")
    size, stride = int_tuple(ref.size, "size"), int_tuple(ref.stride, "stride")
    if len(size) != len(stride):
        raise Corrupt(f"size {size} and stride {stride} disagree")
    count = math.prod(size)
    if count == 0:
        out = np.zeros(size, dtype=flat.dtype.newbyteorder("="))
    else:
        extent = offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1
        if extent > flat.size or count > max(flat.size, _MAX_BROADCAST):
            raise Corrupt(f"tensor of size {size} (stride {stride}, offset {offset}) needs "
                          f"{max(extent, count)} {elem.name} elements, its storage holds {flat.size}")
        strides = tuple(s * flat.itemsize for s in stride)
        budget.take(count * (4 if elem.bfloat16 else flat.itemsize), "it")  # the copy made below
        out = native(np.lib.stride_tricks.as_strided(flat[offset:], size, strides))
    if elem.bfloat16:  # bfloat16 is the upper half of a float32
        out = (out.astype(np.uint32) << 16).view(np.float32)
    return out


def _to_array(value, byteorder: str, budget: Budget) -> np.ndarray | None:
    if isinstance(value, TensorRef):
        return _tensor_array(value, byteorder, budget)
    if isinstance(value, NdarrayStub):
        array = value.array()
        budget.take(0 if array is None else array.nbytes, "it")
        return array
    if isinstance(value, np.ndarray):
        return value if value.dtype.kind in "biufc" else None
    return None


def _is_tensor(value) -> bool:
    return isinstance(value, (TensorRef, NdarrayStub, np.ndarray))


def _unwrap(obj, depth: int = 0):
    """The tensor dict inside {'state_dict': ...} / {'model': ...} / {'module': ...} wrappers."""
    if not isinstance(obj, dict) or depth > 3:
        return obj
    for key in _WRAPPER_KEYS:  # before the top level's own tensors, e.g. a best_acc1 tensor
        inner = _unwrap(obj.get(key), depth + 1)
        if isinstance(inner, dict) and any(_is_tensor(v) for v in inner.values()):
            return inner
    return obj


def _collect(obj, byteorder: str, path: Path, budget: Budget) -> dict[str, np.ndarray]:
    top = _unwrap(obj)
    if not isinstance(top, dict):
        raise CheckpointError(f"{path} holds a '{type(top).__name__}' object, not a state dict "
                              f"({{name: tensor}}). Save model.state_dict() instead.")
    state: dict[str, np.ndarray] = {}
    for key, value in top.items():
        try:
            array = _to_array(value, byteorder, budget)
        except Corrupt as e:
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
    if isinstance(e, Corrupt):
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
        budget = Budget(path.stat().st_size)
        obj, byteorder = read_any(path, budget)
        state = _collect(obj, byteorder, path, budget)
    except CheckpointError:
        raise
    except (TooBig, MemoryError) as e:
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
        obj, _ = read_any(path, Budget(path.stat().st_size))
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
