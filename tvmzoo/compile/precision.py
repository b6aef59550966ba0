"""What a requested precision computes in on the target CPU, and which precisions are fastest there.

fp16 never loses to fp32: LLVM emulates fp16 arithmetic on a CPU without AVX512-FP16 (a convert on
every use: RepVGG-A0 116 ms / image on Zen 4, 7.5x its fp32 build), so there an fp16 build computes in
fp32. Its inputs and outputs stay what every tvmzoo build takes and returns (float32; ToMixedPrecision
casts at the edges); only the arithmetic differs, and fp32 is at least as accurate. bf16 is
faster than fp32 on AMX-BF16 CPUs but rounds more coarsely than fp16 (8 mantissa bits, not 11), so
a user who asked for fp16 accuracy gets fp32, and the log points at bf16 and int8 where they are faster.

bf16 never loses either: it computes in bf16 only on AMX-BF16 CPUs (Sapphire Rapids: 0.43-0.61x of fp32).
On CPUs with AVX512-BF16 but no AMX (AMD Zen 4, Intel Cooper Lake) tvmzoo's `vdpbf16ps` kernels
(schedules/bf16_dot.py) measured 1.2-1.4x SLOWER than its fp32 kernels (Sapphire Rapids with AMX off in
the target, the only stand-in measured: benchmarks/bf16_dot_vs_fp32.py), so there a bf16 build computes
in fp32 and the log names the precision that is faster there (int8 on VNNI). The stand-in is pessimistic:
this Sapphire Rapids VM retires about half as many multiply-adds per second with vdpbf16ps as with fp32
FMAs (a microbenchmark), while Zen 4 is reported to do twice as many (not verified here): a Zen 4 run of
that benchmark decides.
"""
from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from .target import AMX_BF16_FEATURES, AMX_INT8_FEATURES, BF16_FEATURES

# Why each precision is fast, per feature: (precision, the features its kernels need (all), what to call
# it). Ordered fastest first, as measured on Sapphire Rapids (README speed table: int8 0.32-0.47x, fp16
# 0.54-0.66x of fp32; AMX int8 0.5x of VNNI int8 on RepVGG-A0, AMX bf16 0.47-0.64x of fp32: notes
# s7-wt-amx) and Zen 4 (issue 15: OpenVINO int8 0.3x of fp32). AMX-BF16 comes after AVX512-FP16: not
# measured side by side with it, and fp16 rounds more finely. AVX512-BF16 alone is not here: tvmzoo's
# vdpbf16ps kernels lose to its fp32 kernels (see the module doc), so bf16 builds as fp32 there.
_FAST_PATHS: tuple[tuple[str, frozenset[str], str], ...] = (
    ("int8", frozenset(AMX_INT8_FEATURES), "AMX-INT8"),
    ("int8", frozenset({"avx512vnni"}), "AVX512-VNNI"),
    ("int8", frozenset({"avxvnni"}), "AVX-VNNI"),
    ("fp16", frozenset({"avx512fp16"}), "AVX512-FP16"),
    ("bf16", frozenset(AMX_BF16_FEATURES), "AMX-BF16"),
)


@dataclass(frozen=True)
class PrecisionPlan:
    requested: str   # backend.dtype
    compute: str     # what the kernels compute in
    note: str        # for the compile log and mod.json ("" when compute == requested, nothing to say)


def fastest_precisions(features: Collection[str], accepted: Collection[str]) -> list[tuple[str, str]]:
    """(precision, the instructions that make it fast) for this CPU, fastest first, among `accepted`;
    fp32 last. fp16 without AVX512-FP16 is left out: it builds as fp32."""
    ranked: list[tuple[str, str]] = []
    for precision, needs, name in _FAST_PATHS:
        if precision in accepted and needs <= set(features) and precision not in dict(ranked):
            ranked.append((precision, name))
    return [*ranked, ("fp32", "FMA" if "fma" in features else "SSE")]


def describe_fastest(features: Collection[str], accepted: Collection[str]) -> str:
    return ", ".join(f"{p} ({how})" for p, how in fastest_precisions(features, accepted))


def bf16_plan(features: Collection[str]) -> str:
    """The kernels of a bf16 build on a CPU with LLVM features `features`:
    - 'amx-bf16': AMX tiles (`tdpbf16ps`) where the CPU has AMX-BF16 (Sapphire Rapids);
    - 'fp32' elsewhere: the float32 build. Without AVX512-BF16 every bf16 operand would be converted to
      float32 on each use; with AVX512-BF16 but no AMX (Zen 4, Cooper Lake) the `vdpbf16ps` kernels are
      slower than the fp32 ones (module doc). They stay in the schedules (a pipeline that runs ToBf16 on
      such a target uses them: benchmarks/bench_amx.py, tests/test_bf16.py) for when they win."""
    return "amx-bf16" if set(AMX_BF16_FEATURES) <= set(features) else "fp32"


def _bf16_as_fp32(cpu: str, features: Collection[str]) -> str:
    """The compile log's line for a bf16 build that computes in fp32 on `cpu`."""
    if not set(BF16_FEATURES) <= set(features):
        return (f"bf16: {cpu} has no AVX512-BF16 or AMX-BF16, so bf16 would be emulated (a conversion on every "
                "use); this build computes in fp32")
    faster = [f"{p} ({how})" for p, how in fastest_precisions(features, ("int8", "fp16")) if p != "fp32"]
    return (f"bf16: {cpu} has AVX512-BF16 but no AMX-BF16; tvmzoo's vdpbf16ps kernels are 1.2-1.4x slower than "
            "its fp32 kernels there (measured on Sapphire Rapids with AMX off), so this build computes in fp32 "
            "(same float32 inputs and outputs, fp32 accuracy, fp32 speed)"
            + (f"; faster on {cpu}: {', '.join(faster)}" if faster else ""))


def plan_precision(precision: str, cpu: str, features: Collection[str]) -> PrecisionPlan:
    """How a build of `precision` computes on `cpu` (with LLVM features `features`): the one place that
    decides; the pipeline then builds `compute` as asked (ToBf16 always rewrites a bf16 build)."""
    if precision == "fp16" and "avx512fp16" not in features:
        return PrecisionPlan(precision, "fp32",
                             f"fp16: {cpu} has no AVX512-FP16, so LLVM would emulate fp16 (a conversion on every "
                             "use: 7.5x slower than fp32 on Zen 4); this build computes in fp32 (same float32 "
                             "inputs and outputs, fp32 accuracy, fp32 speed)")
    if precision == "bf16" and bf16_plan(features) == "fp32":
        return PrecisionPlan(precision, "fp32", _bf16_as_fp32(cpu, features))
    return PrecisionPlan(precision, precision, "")
