"""vamp's input checked against the module and the machine before anything is allocated: the shape against
the module's, the input buffers against the memory available now. (BenchConfig checks its own counts.)"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from ..errors import ConfigError
from ..limits import MEMORY_SHARE, available_memory, gib

if TYPE_CHECKING:
    from .runtime import CompiledModel


def input_shape(model: CompiledModel, shape: tuple[int, ...] | None) -> tuple[int, ...]:
    """The per-sample input shape vamp feeds: the module's own; -s must agree with it when given."""
    own = tuple(model.input_shape[1:])
    if shape is not None and not model.fused and tuple(shape) != own:
        raise ConfigError(f"vamp: -s/--shape {','.join(map(str, shape))} does not match the module, which "
                          f"takes {','.join(map(str, own))}: leave -s out or pass -s {','.join(map(str, own))}.")
    return own


def check_memory(batch: int, shape: tuple[int, ...], dtype: np.dtype, copies: int = 2) -> None:
    """Refuse a batch whose input buffers (`copies` of them) would not fit in MEMORY_SHARE of the memory
    available now, before allocating any of it."""
    need = copies * batch * math.prod(shape) * np.dtype(dtype).itemsize
    free = available_memory()
    if free is not None and need > free * MEMORY_SHARE:
        raise ConfigError(f"vamp: batch {batch} of {'x'.join(map(str, shape))} {np.dtype(dtype)} inputs needs "
                          f"{gib(need)} for its input buffers, more than {MEMORY_SHARE:.0%} of the {gib(free)} "
                          f"available now: use a smaller -b/--batch.")
