"""What every family does with a state dict: drop framework keys, find the class count, check it
against the architecture (naming the first key that does not fit), fold BatchNorm into convs, and
make random test checkpoints."""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol, TypeVar

import numpy as np

from ..errors import CheckpointError, ConfigError, did_you_mean, printable

T = TypeVar("T")

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


class Layout(Protocol):
    """What every family's checkpoint layout names: the classifier and the BN statistics."""

    head: str                      # classifier prefix: '<head>.weight', '<head>.bias'
    head_transposed: bool          # paddle's Linear weight is [in, out]
    bn_stats: tuple[str, str]      # (running mean, running variance)


@dataclass(frozen=True)
class TorchLayout:
    """A torch checkpoint's head and BN statistic names (families with one layout)."""

    head: str
    head_transposed: bool = False
    bn_stats: tuple[str, str] = ("running_mean", "running_var")


def check_state(state: Mapping[str, np.ndarray], lay: Layout, expected: Callable[[int], Mapping[str, tuple]],
                what: str, hint: Callable[[dict], str], fix: str) -> tuple[dict, int]:
    """(state without prefixes / framework keys, num_classes) if the checkpoint fits exactly (every key
    used, every shape right), else one CheckpointError naming the first problem. `expected(n)` gives
    the keys and shapes for n classes; `hint(state)` a guess of what the checkpoint is instead."""
    state = strip_framework_keys(state)
    num_classes = head_classes(state, lay.head, lay.head_transposed)
    if num_classes is None:
        w = state.get(f"{lay.head}.weight")
        found = "missing" if w is None else f"of shape {list(np.shape(w))}"
        raise CheckpointError(f"{what}: the classifier weight '{lay.head}.weight' is {found}; expected a 2-D "
                              f"Linear weight.{hint(state)} {fix}")
    problem = first_mismatch(state, expected(num_classes))
    if problem:
        raise CheckpointError(f"checkpoint does not fit {what}: {problem}.{hint(state)} {fix}")
    return state, num_classes


def guess_arch(state: Mapping[str, np.ndarray], layouts: Mapping[str, Layout], archs: Iterable[str],
               expected: Callable[[str, str, int, dict], Mapping[str, tuple]]) -> tuple[str, str] | None:
    """(arch, source) of the first arch and layout a state dict fits exactly, else None.
    `expected(arch, source, n, state)` gives the keys and shapes for n classes."""
    state = strip_framework_keys(state)
    for source, lay in layouts.items():
        n = head_classes(state, lay.head, lay.head_transposed)
        if n is None:
            continue
        for arch in archs:
            if first_mismatch(state, expected(arch, source, n, state)) is None:
                return arch, source
    return None


def guess_hint(guess: tuple[str, str] | None, model: str) -> str:
    """" This looks like <model>-<arch> in the <source> layout." for a guess_arch result, '' for None."""
    return f" This looks like {model}-{guess[0]} in the {guess[1]} layout." if guess else ""


def fold_bn(weight: np.ndarray, gamma: np.ndarray, beta: np.ndarray, mean: np.ndarray, var: np.ndarray,
            eps: float) -> tuple[np.ndarray, np.ndarray]:
    """conv followed by BatchNorm as one conv, in float64: (weight * t, beta - mean * t) with
    t = gamma / sqrt(var + eps) per output channel."""
    t = np.asarray(gamma, np.float64) / np.sqrt(np.asarray(var, np.float64) + eps)
    w = np.asarray(weight, np.float64)
    return w * t.reshape(-1, *([1] * (w.ndim - 1))), np.asarray(beta, np.float64) - np.asarray(mean, np.float64) * t


def random_state_dict(shapes: Mapping[str, tuple[int, ...]], lay: Layout, rng: np.random.Generator,
                      counters: bool = True) -> dict[str, np.ndarray]:
    """A checkpoint dict with `shapes` in layout `lay`: random weights and non-trivial BN statistics
    (float32; torch layouts also get the int64 num_batches_tracked counters real checkpoints carry)."""
    mean_key, var_key = (f".{s}" for s in lay.bn_stats)
    out: dict[str, np.ndarray] = {}
    f32 = np.float32

    def uniform(lo: float, hi: float, shape) -> np.ndarray:
        return (rng.random(shape, dtype=f32) * f32(hi - lo) + f32(lo)).astype(f32, copy=False)

    def normal(std: float, shape) -> np.ndarray:
        return rng.standard_normal(shape, dtype=f32) * f32(std)

    for key, shape in shapes.items():
        if key.endswith(var_key):
            v = uniform(0.5, 2.0, shape)
        elif key.endswith(mean_key):
            v = normal(0.2, shape)
        elif len(shape) >= 2:           # conv and Linear weights
            fan_in = shape[0] if lay.head_transposed and len(shape) == 2 else int(np.prod(shape[1:]))
            v = normal(np.sqrt(1.0 / fan_in), shape)
        elif key.endswith(".weight"):   # BN gamma
            v = uniform(0.5, 1.5, shape)
        else:                          # BN beta and conv / linear biases
            v = normal(0.1, shape)
        out[key] = v
        if counters and key.endswith(mean_key):
            out[key[: -len(mean_key)] + ".num_batches_tracked"] = np.array(1000, dtype=np.int64)
    return out


def lookup(table: Mapping[str, T], key: str, what: str, plural: str) -> T:
    """table[key], else one ConfigError: "unknown <what> '<key>'. Did you mean ...? Known <plural>: ..."."""
    if key not in table:
        raise ConfigError(f"unknown {what} '{key}'.{did_you_mean(key, table)} Known {plural}: {', '.join(table)}.")
    return table[key]
