"""One array out of an .npz with its header checked before its data is read: an npz is a zip, and a
few kilobytes of deflated zeros can claim an array of any size (numpy allocates the claim first)."""
from __future__ import annotations

import math
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..limits import MAX_NPZ_ARRAY_BYTES, gib, special_file

_BROKEN = (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile, zlib.error, RuntimeError,
           NotImplementedError, MemoryError)  # what numpy and zipfile raise on a damaged file


class NpzProblem(ValueError):
    """Why the array cannot be read; the caller adds the path and what the file should be."""


class NpzObjects(NpzProblem):
    """The array holds Python objects (a pickle): refused whole, the file itself may be intact."""


def read_array(path: str | Path, key: str,
               check: Callable[[tuple[int, ...], np.dtype], str | None] | None = None) -> np.ndarray:
    """The array `key` of the npz at `path`. `check(shape, dtype)` returns a problem or None; the array
    is refused before it is read when it has one, when it holds objects, when it claims more bytes than
    its zip member holds or than MAX_NPZ_ARRAY_BYTES. Raises NpzProblem."""
    if special_file(path):   # zipfile would wait on a pipe forever
        raise NpzProblem(f"it is {special_file(path)}, not a regular file")
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            if f"{key}.npy" not in names:
                keys = ", ".join(n[:-4] for n in names if n.endswith(".npy"))[:200] or "none"
                raise NpzProblem(f"it has no array '{key}' (arrays: {keys})")
            info = zf.getinfo(f"{key}.npy")
            with zf.open(info) as member:
                version = np.lib.format.read_magic(member)
                header = np.lib.format.read_array_header_1_0 if version == (1, 0) \
                    else np.lib.format.read_array_header_2_0
                shape, fortran, dtype = header(member)
                _check_header(shape, dtype, info.file_size, check)
            with zf.open(info) as member:
                array = np.lib.format.read_array(member, allow_pickle=False)
    except NpzProblem:
        raise
    except _BROKEN as exc:
        raise NpzProblem(f"it is not a readable npz ({type(exc).__name__}: {str(exc)[:200]})") from None
    return array


def _check_header(shape: tuple[int, ...], dtype: np.dtype, member_bytes: int, check) -> None:
    if dtype.hasobject:
        raise NpzObjects(f"its '{dtype}' array holds Python objects, which are never loaded")
    problem = check(shape, dtype) if check else None
    if problem:
        raise NpzProblem(problem)
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > member_bytes:
        raise NpzProblem(f"its array of shape {shape} needs {nbytes} bytes, the file holds {member_bytes}")
    if nbytes > MAX_NPZ_ARRAY_BYTES:
        raise NpzProblem(f"its array of shape {shape} takes {gib(nbytes)}, above the limit of "
                         f"{gib(MAX_NPZ_ARRAY_BYTES)}")
