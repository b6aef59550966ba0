"""vamp's sizes checked before anything is allocated: counts >= 1, the input shape against the module's,
the input buffers against the memory available now."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from ..errors import ConfigError
from ..limits import MEMORY_SHARE, available_memory, gib

if TYPE_CHECKING:
    from .bench import BenchConfig
    from .runtime import CompiledModel

_FLAGS = {"instances": "-i/--instance", "batch": "-b/--batch", "iterations": "--iterations",
          "warmup": "--warmup", "threads": "-t/--threads"}


def check_counts(cfg: BenchConfig) -> None:
    for name, flag in _FLAGS.items():
        value, least = getattr(cfg, name), 0 if name == "warmup" else 1
        if value is None and name == "threads":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ConfigError(f"vamp: {flag} must be an integer >= {least}, got {value!r}.")
    if cfg.shape is not None and (len(cfg.shape) != 3 or min(cfg.shape) < 1):
        raise ConfigError(f"vamp: -s/--shape must be three sizes >= 1 (C,H,W), got "
                          f"{','.join(map(str, cfg.shape))}.")


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
