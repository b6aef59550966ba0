"""What every family does with a state dict before reading it: drop framework keys, find the class
count, and name the first key that does not fit the architecture."""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from ..errors import printable

# Keys that hold no weights: torch's BN step counters, paddle's parameter-name table.
IGNORED_SUFFIXES = ("num_batches_tracked",)
IGNORED_KEYS = ("StructuredToParameterName@@",)


def strip_framework_keys(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Drop a DataParallel 'module.' prefix and the framework keys that hold no weights."""
    out = {}
    for k, v in state.items():
        if k in IGNORED_KEYS or k.endswith(IGNORED_SUFFIXES):
            continue
        out[k[len("module."):] if k.startswith("module.") else k] = v
    return out


def head_classes(state: Mapping[str, np.ndarray], head: str, transposed: bool) -> int | None:
    """The class count of the classifier `<head>.weight` ([out, in], or [in, out] when transposed),
    None when it is missing or not 2-D."""
    w = state.get(f"{head}.weight")
    if w is None or np.ndim(w) != 2:
        return None
    return int(w.shape[1] if transposed else w.shape[0])


def first_mismatch(state: Mapping[str, np.ndarray], expected: Mapping[str, tuple[int, ...]]) -> str | None:
    """The first difference between a state dict and the expected keys, as a sentence; None if it fits."""
    for key, shape in expected.items():
        if key not in state:
            return f"missing key '{key}' (expected shape {list(shape)})"
        if tuple(np.shape(state[key])) != shape:
            return f"key '{key}' has shape {list(np.shape(state[key]))}, expected {list(shape)}"
    extra = [k for k in state if k not in expected]
    if extra:
        more = f" and {len(extra) - 1} more" if len(extra) > 1 else ""
        return f"unexpected key '{printable(extra[0], 120)}' (shape {list(np.shape(state[extra[0]]))}){more}"
    return None
