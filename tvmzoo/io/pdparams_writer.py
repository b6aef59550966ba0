"""Write a state dict as paddle.save(state_dict, 'x.pdparams') does, without paddle.

paddle.save pickles {name: numpy.ndarray, ..., 'StructuredToParameterName@@': {name: parameter name}}
(protocol 4). The arrays are written with the `numpy.core.multiarray._reconstruct` global that every
numpy (1.x, and 2.x through its numpy.core alias) unpickles, whatever numpy writes this file.
"""
from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np

from .atomic import write_bytes
from .pickling import Global, Reduce, dumps

NAME_TABLE = "StructuredToParameterName@@"
_RECONSTRUCT = Global("numpy.core.multiarray", "_reconstruct")
_NDARRAY = Global("numpy", "ndarray")
_DTYPE = Global("numpy", "dtype")


def _array(a: np.ndarray) -> Reduce:
    """What ndarray.__reduce__ writes: _reconstruct(ndarray, (0,), b'b') then BUILD with
    (version, shape, dtype, is_fortran, raw bytes)."""
    a = np.asarray(a, dtype=a.dtype.newbyteorder("<") if a.dtype.itemsize > 1 else a.dtype, order="C")
    order = "|" if a.dtype.itemsize == 1 else "<"
    dtype = Reduce(_DTYPE, (a.dtype.newbyteorder("=").str[1:], False, True),
                   (3, order, None, None, None, -1, -1, 0))
    return Reduce(_RECONSTRUCT, (_NDARRAY, (0,), b"b"), (1, tuple(a.shape), dtype, False, a.tobytes()))


def save_pdparams(state: Mapping[str, np.ndarray], path: str | os.PathLike,
                  names: Mapping[str, str] | None = None) -> None:
    """Write `state` as a .pdparams, atomically. `names`: the parameter-name table paddle adds
    (structured name -> framework name); by default each key maps to itself."""
    table = dict(names) if names is not None else {k: k for k in state}
    obj = {k: _array(np.asarray(v)) for k, v in state.items()}
    obj[NAME_TABLE] = table
    write_bytes(path, dumps(obj, protocol=4))
