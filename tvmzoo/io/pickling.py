"""Pickles that name another library's globals (torch, numpy) without importing it.

The writers need `torch._utils._rebuild_tensor_v2` or `numpy.core.multiarray._reconstruct` in the
pickle, the way torch.save / paddle.save write them, but tvmzoo never imports torch or paddle. The
pure-Python pickler is given a `Global` type it writes as a GLOBAL opcode by name, and `Reduce`
objects it writes as REDUCE (+ BUILD): the file then holds exactly the opcodes those libraries write.
"""
from __future__ import annotations

import io
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Global:
    """`module.name` as a pickle GLOBAL, written by name only."""

    module: str
    name: str

    def __call__(self, *args):  # pickle requires a callable; the real one lives in the library named
        raise TypeError(f"{self.module}.{self.name} is written by name, never called")


@dataclass(frozen=True, eq=False)
class Reduce:
    """`func(*args)`, then `__setstate__(state)` when state is not None."""

    func: Global
    args: tuple
    state: Any = None

    def __reduce__(self):
        return (self.func, self.args) if self.state is None else (self.func, self.args, self.state)


class _Pickler(pickle._Pickler):
    dispatch = dict(pickle._Pickler.dispatch)

    def __init__(self, file, protocol: int, persistent_id: Callable[[Any], Any] | None) -> None:
        super().__init__(file, protocol)
        self._pid = persistent_id

    def persistent_id(self, obj):
        return self._pid(obj) if self._pid is not None else None

    def _save_global_by_name(self, obj: Global) -> None:
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode("utf-8"))
        self.memoize(obj)

    dispatch[Global] = _save_global_by_name


def dumps(obj: Any, protocol: int = 2, persistent_id: Callable[[Any], Any] | None = None) -> bytes:
    """Pickle `obj`; Global / Reduce parts are written by name (their libraries are never imported)."""
    buf = io.BytesIO()
    _Pickler(buf, protocol, persistent_id).dump(obj)
    return buf.getvalue()
