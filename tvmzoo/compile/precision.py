"""What a requested precision computes in on the target CPU, and which precisions are fastest there.

fp16 never loses to fp32: LLVM emulates fp16 arithmetic on a CPU without AVX512-FP16 (a convert on
every use: RepVGG-A0 116 ms / image on Zen 4, 7.5x its fp32 build), so there an fp16 build computes in
fp32. Its inputs and outputs stay what every tvmzoo build takes and returns (float32; ToMixedPrecision
casts at the edges); only the arithmetic differs, and fp32 is at least as accurate. bf16 is
faster than fp32 on AMX-BF16 CPUs but rounds more coarsely than fp16 (8 mantissa bits, not 11), so
a user who asked for fp16 accuracy gets fp32, and the log points at bf16 and int8 where they are faster.

bf16 never loses either: it computes in bf16 on AMX-BF16 CPUs (Sapphire Rapids: 0.43-0.61x of fp32).
On CPUs with AVX512-BF16 but no AMX (AMD Zen 4, Intel Cooper Lake) it depends on the core: tvmzoo's
`vdpbf16ps` kernels (schedules/bf16_dot.py) were 1.2-1.4x SLOWER than its fp32 kernels on the one such
CPU measured (Sapphire Rapids with AMX off in the target: vdpbf16ps retires 0.42x the multiply-adds of
fp32 FMAs there), while Zen 4 may differ. So a bf16 build for this host measures (tvmzoo.compile.bf16_probe:
a 3x3 and a 1x1 conv, both builds, ~2 s) and computes in bf16 only when the probe's bf16 / fp32 time is at
most BF16_MAX_RATIO; a cross-compile (or an RPC device) cannot measure and computes in fp32, unless
`backend.bf16_compute: bf16` says otherwise. The log names the precisions that are faster.
"""
from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from .bf16_probe import Bf16Probe
from .target import AMX_BF16_FEATURES, AMX_INT8_FEATURES, BF16_FEATURES

# A bf16 build on AVX512-BF16 without AMX computes in bf16 when the probe's bf16 / fp32 time is at most
# this: a clear win, beyond the probe's noise and the probe-to-model gap (benchmarks/results/bf16_dot_vs_fp32.md:
# models win about as much as the probe, and lose 0.45-0.67 as much, so 0.9 means a model at ~0.95x or under).
BF16_MAX_RATIO = 0.9

# Why each precision is fast, per feature: (precision, the features its kernels need (all), what to call
# it). Ordered fastest first, as measured side by side on Sapphire Rapids (benchmarks/results/vs_peers.md,
# 2026-12-03 20:09: int8 0.13-0.43x of fp32, AMX bf16 0.36-0.57x, fp16 0.58-0.70x, bf16 ahead of fp16 in every
# row) and Zen 4 (issue 15: OpenVINO int8 0.3x of fp32). AVX512-BF16 alone is not here: it is fast only where
# the probe measured it so (`bf16_fast`).
_FAST_PATHS: tuple[tuple[str, frozenset[str], str], ...] = (
    ("int8", frozenset(AMX_INT8_FEATURES), "AMX-INT8"),
    ("int8", frozenset({"avx512vnni"}), "AVX512-VNNI"),
    ("int8", frozenset({"avxvnni"}), "AVX-VNNI"),
    ("bf16", frozenset(AMX_BF16_FEATURES), "AMX-BF16"),
    ("fp16", frozenset({"avx512fp16"}), "AVX512-FP16"),
)
_FP32 = "same float32 inputs and outputs, fp32 accuracy, fp32 speed"


@dataclass(frozen=True)
class PrecisionPlan:
    requested: str   # backend.dtype
    compute: str     # what the kernels compute in
    note: str        # for the compile log and mod.json ("" when compute == requested, nothing to say)
    probe: Bf16Probe | None = None   # what was measured to decide (bf16 on AVX512-BF16 without AMX)


def fastest_precisions(features: Collection[str], accepted: Collection[str],
                       bf16_fast: bool = False) -> list[tuple[str, str]]:
    """(precision, the instructions that make it fast) for this CPU, fastest first, among `accepted`;
    fp32 last. fp16 without AVX512-FP16 is left out: it builds as fp32. `bf16_fast`: vdpbf16ps was
    measured faster than fp32 on this CPU (the probe)."""
    ranked: list[tuple[str, str]] = []
    for precision, needs, name in _FAST_PATHS:
        if precision in accepted and needs <= set(features) and precision not in dict(ranked):
            ranked.append((precision, name))
    if bf16_fast and "bf16" in accepted and "bf16" not in dict(ranked):
        ranked.append(("bf16", "AVX512-BF16, measured"))
    return [*ranked, ("fp32", "FMA" if "fma" in features else "SSE")]


def describe_fastest(features: Collection[str], accepted: Collection[str], bf16_fast: bool = False) -> str:
    return ", ".join(f"{p} ({how})" for p, how in fastest_precisions(features, accepted, bf16_fast))


def _avx512bf16_only(features: Collection[str]) -> bool:
    return set(BF16_FEATURES) <= set(features) and not set(AMX_BF16_FEATURES) <= set(features)


def bf16_needs_probe(features: Collection[str], choice: str = "auto") -> bool:
    """Whether a bf16 build's kernels depend on a measurement: AVX512-BF16 without AMX, choice 'auto'."""
    return choice == "auto" and _avx512bf16_only(features)


def bf16_plan(features: Collection[str], ratio: float | None = None, choice: str = "auto") -> str:
    """The kernels of a bf16 build on a CPU with LLVM features `features`, given the probe's bf16 / fp32
    time `ratio` (None: not measured) and backend.bf16_compute `choice`:
    - 'amx-bf16': AMX tiles (`tdpbf16ps`) where the CPU has AMX-BF16 (Sapphire Rapids);
    - 'avx512bf16': `vdpbf16ps` where the CPU has AVX512-BF16 but no AMX and they were measured at most
      BF16_MAX_RATIO of fp32 here (or the user chose bf16);
    - 'fp32' elsewhere: the float32 build (without AVX512-BF16 every bf16 operand would be converted on
      each use; not measured, or measured too slow, vdpbf16ps may lose: module doc)."""
    if choice == "fp32":
        return "fp32"
    if set(AMX_BF16_FEATURES) <= set(features):
        return "amx-bf16"
    if not _avx512bf16_only(features):
        return "fp32"
    if choice == "bf16" or (ratio is not None and ratio <= BF16_MAX_RATIO):
        return "avx512bf16"
    return "fp32"


def _bf16_note(cpu: str, features: Collection[str], kernels: str, probe: Bf16Probe | None, choice: str) -> str:
    """The compile log's line for a bf16 build that does not run on AMX tiles."""
    if choice == "fp32":
        return f"bf16: backend.bf16_compute is fp32, so this build computes in fp32 ({_FP32})"
    if not set(BF16_FEATURES) <= set(features):
        return (f"bf16: {cpu} has no AVX512-BF16 or AMX-BF16, so bf16 would be emulated (a conversion on every "
                "use); this build computes in fp32")
    head = f"bf16: {cpu} has AVX512-BF16 but no AMX-BF16; "
    if probe is not None:
        head += (f"measured on this CPU ({probe.net}): tvmzoo's vdpbf16ps kernels take {probe.ratio:.2f}x the "
                 f"time of its fp32 kernels (bf16 needs at most {BF16_MAX_RATIO}x), so ")
    elif choice == "bf16":
        head += "backend.bf16_compute is bf16 (not measured), so "
    else:
        head += ("not measured here (a cross-compile, an RPC device or a failed probe); tvmzoo's vdpbf16ps kernels "
                 "were 1.2-1.4x slower than its fp32 kernels on the one such CPU measured (Sapphire Rapids with AMX "
                 "off), so ")
    if kernels == "avx512bf16":
        return head + "this build computes in bf16 (vdpbf16ps)"
    faster = [f"{p} ({how})" for p, how in fastest_precisions(features, ("int8", "fp16")) if p != "fp32"]
    return (head + f"this build computes in fp32 ({_FP32})" + (f"; faster on {cpu}: {', '.join(faster)}" if faster
                                                               else "")
            + ("" if probe else "; backend.bf16_compute: bf16 builds the vdpbf16ps kernels anyway"))


def plan_precision(precision: str, cpu: str, features: Collection[str], probe: Bf16Probe | None = None,
                   bf16_choice: str = "auto") -> PrecisionPlan:
    """How a build of `precision` computes on `cpu` (with LLVM features `features`; `probe`: the bf16
    measurement on this host, if one was taken): the one place that decides; the pipeline then builds
    `compute` as asked (ToBf16 always rewrites a bf16 build)."""
    if precision == "fp16" and "avx512fp16" not in features:
        return PrecisionPlan(precision, "fp32",
                             f"fp16: {cpu} has no AVX512-FP16, so LLVM would emulate fp16 (a conversion on every "
                             f"use: 7.5x slower than fp32 on Zen 4); this build computes in fp32 ({_FP32})")
    if precision != "bf16":
        return PrecisionPlan(precision, precision, "")
    kernels = bf16_plan(features, probe.ratio if probe else None, bf16_choice)
    if kernels == "amx-bf16":
        return PrecisionPlan(precision, precision, "")
    return PrecisionPlan(precision, "fp32" if kernels == "fp32" else "bf16",
                         _bf16_note(cpu, features, kernels, probe, bf16_choice), probe)
