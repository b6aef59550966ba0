"""The containers a checkpoint comes in, read into the unpickled top-level object: torch.save zip
archives and the legacy format, .pdparams pickles and .npz archives, with a memory budget so a
small file cannot make us allocate gigabytes. The pickles themselves: tvmzoo.io.unpickle.
"""
from __future__ import annotations

import io
import math
import struct
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CheckpointError, printable
from ..limits import CHECKPOINT_COPY_SLACK, gib
from .npz_read import NpzObjects, NpzProblem, read_array
from .unpickle import Corrupt, ElemType, Storage, int_tuple, unpickle

SUPPORTED = ("PyTorch .pth/.pt (torch.save, zip or legacy format), PaddlePaddle .pdparams (pickle "
             "of numpy arrays), NumPy .npz")
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch.serialization.MAGIC_NUMBER
_LEGACY_PROTOCOL = 1001


class TooBig(Corrupt):
    """Reading the file as it asks would take more memory than its size justifies."""


class Budget:
    """Bytes a checkpoint may make us allocate: twice its file size (bfloat16 becomes float32) plus
    CHECKPOINT_COPY_SLACK. Views of one storage and broadcast tensors are copied out when read, so a
    small file could otherwise ask for gigabytes."""

    def __init__(self, file_size: int) -> None:
        self.total = 2 * file_size + CHECKPOINT_COPY_SLACK
        self.left = self.total

    def take(self, nbytes: int, what: str) -> None:
        if nbytes > self.left:
            raise TooBig(f"{what} needs {gib(nbytes)}, more than the {gib(self.left)} left of the "
                         f"{gib(self.total)} this file may take (twice its size + {gib(CHECKPOINT_COPY_SLACK)})")
        self.left -= nbytes


def _storage_from_pid(pid) -> Storage:
    if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
        raise Corrupt(f"unknown persistent id {printable(pid, 80)}")
    _, elem, key, _location, numel = pid[:5]
    if not isinstance(elem, ElemType) or not isinstance(key, str):
        raise Corrupt(f"malformed storage id {printable(pid, 80)}")
    return Storage(key, elem, int_tuple((numel,), "storage size")[0])


def _read_torch_zip(zf: zipfile.ZipFile, pkl_name: str, path: Path, budget: Budget) -> tuple[Any, str]:
    prefix = pkl_name[: -len("data.pkl")]
    names = set(zf.namelist())
    byteorder = zf.read(prefix + "byteorder").decode() if prefix + "byteorder" in names else "little"
    if byteorder not in ("little", "big"):
        raise Corrupt(f"unknown byteorder {byteorder!r}")
    storages: dict[str, Storage] = {}

    def load(pid) -> Storage:
        new = _storage_from_pid(pid)
        if new.key not in storages:
            member = f"{prefix}data/{new.key}"
            if member not in names:
                raise Corrupt(f"storage '{new.key}' is missing from the archive")
            budget.take(zf.getinfo(member).file_size, f"storage '{printable(new.key)}'")
            new.data = zf.read(member)
            _check_storage_size(new, len(new.data))
            storages[new.key] = new
        return storages[new.key]

    budget.take(zf.getinfo(pkl_name).file_size, pkl_name)
    obj = unpickle(io.BytesIO(zf.read(pkl_name)), path, load)
    return obj, "<" if byteorder == "little" else ">"


def _read_legacy(f: io.BytesIO, path: Path) -> tuple[Any, str]:
    """torch.save(..., _use_new_zipfile_serialization=False), after the magic number."""
    if unpickle(f, path) != _LEGACY_PROTOCOL:
        raise Corrupt("unsupported legacy protocol version")
    sys_info = unpickle(f, path)
    little = sys_info.get("little_endian", True) if isinstance(sys_info, dict) else True
    storages: dict[str, Storage] = {}

    def load(pid) -> Storage:
        new = _storage_from_pid(pid)
        root = storages.setdefault(new.key, new)
        view = pid[5] if len(pid) > 5 else None
        if view is None:
            return root
        view_key, offset, count = view  # old torch: storage views share their root's data
        sub = storages.setdefault(view_key, Storage(view_key, root.elem, count))
        sub.base, sub.view = root, int_tuple((offset, count), "storage view")
        return sub

    obj = unpickle(f, path, load)
    keys = unpickle(f, path)
    if not isinstance(keys, list):
        raise Corrupt("the storage key list is missing")
    order = "<" if little else ">"
    for key in keys:
        storage = storages.get(key) if isinstance(key, str) else None
        if storage is None:
            raise Corrupt(f"storage '{key}' has data but no tensor refers to it")
        head = f.read(8)
        if len(head) < 8:
            raise Corrupt(f"the file ends before storage '{key}'")
        (count,) = struct.unpack(order + "q", head)
        nbytes = count * np.dtype(storage.elem.dtype).itemsize
        storage.data = f.read(nbytes) if count >= 0 else b""
        if count < 0 or len(storage.data) < nbytes:
            raise Corrupt(f"the file ends inside storage '{key}' (truncated)")
        _check_storage_size(storage, len(storage.data))
    return obj, order


def _check_storage_size(storage: Storage, nbytes: int) -> None:
    need = storage.numel * np.dtype(storage.elem.dtype).itemsize
    if nbytes < need:
        raise Corrupt(f"storage '{storage.key}' holds {nbytes} bytes but claims {storage.numel} "
                      f"{storage.elem.name} elements ({need} bytes)")


def _read_npz(path: Path, names: list[str], budget: Budget) -> dict[str, np.ndarray]:
    """Each array's header checked against the budget before it is inflated (np.load allocates the claim)."""
    over: list[str] = []

    def fits(shape: tuple[int, ...], dtype: np.dtype) -> str | None:
        try:
            budget.take(math.prod(shape) * dtype.itemsize, "it")
        except TooBig as e:
            over.append(str(e))
            return str(e)
        return None

    state = {}
    for key in (name[:-len(".npy")] for name in names):
        try:
            state[key] = read_array(path, key, fits)
        except NpzObjects as e:   # not damage: say what to save instead (was: "truncated or corrupt")
            raise CheckpointError(f"cannot read checkpoint {path}: tensor '{printable(key, 120)}': {e} (they could "
                                  "run code). Save the weights as numeric arrays (np.savez with float32 / int64 "
                                  "arrays, or torch.save of a state dict).") from None
        except NpzProblem as e:
            raise (TooBig if over else Corrupt)(f"tensor '{printable(key, 120)}': {e}") from None
    return state


def read_any(path: Path, budget: Budget) -> tuple[Any, str]:
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
    first = unpickle(f, path)
    if isinstance(first, int) and first == LEGACY_MAGIC:
        return _read_legacy(f, path)
    return first, "<"  # a .pdparams: the pickle is the state dict itself

