"""The CPU a module is built for, from LLVM (TVM's `tvm.target.codegen.llvm_*` queries), not a table.

LLVM names the host from its family / model (`llvm_get_system_cpu`); the features a name implies come
from LLVM too (`llvm_get_cpu_features`). The host's real instruction sets come from CPUID as the kernel
reports it (/proc/cpuinfo flags, translated to LLVM's feature names): a VM often hides the model (this
Sapphire Rapids VM is named `rocketlake` by LLVM: no AMX, no AVX512-FP16), and an LLVM older than the
CPU names it after an older one. When the name and the flags disagree on the instruction sets our
kernels use, the nearest CPU LLVM knows whose vector ISA the host has is taken, and the log says why.
"""
from __future__ import annotations

import difflib
import functools
import logging
import platform
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from ..run.host import host_cpu_flags, llvm_names

log = logging.getLogger(__name__)

# Instruction sets (LLVM names) LLVM may emit for a CPU: what `mod.json` records, what the loader checks
# on the host, and what a CPU chosen for the host must not go beyond (scalar ones too: AMD's bdver* have
# XOP / FMA4 / TBM, which no Zen has). Not AMD's SSE4A: LLVM emits it only for its intrinsics, and a
# znver4 module runs on Intel CPUs with the rest of Zen 4's ISA.
ISA = frozenset({
    "sse3", "ssse3", "sse4.1", "sse4.2", "popcnt", "lzcnt", "bmi", "bmi2", "movbe", "adx", "f16c",
    "avx", "avx2", "fma", "fma4", "xop", "tbm", "aes", "pclmul", "sha", "gfni", "vaes", "vpclmulqdq",
    "avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl", "avx512vnni", "avx512vbmi", "avx512vbmi2",
    "avx512ifma", "avx512bitalg", "avx512vpopcntdq", "avx512bf16", "avx512fp16", "avx512vp2intersect",
    "avx512er", "avx512pf", "avxvnni", "avxifma", "avxvnniint8", "avxneconvert",
    "amx-tile", "amx-int8", "amx-bf16", "amx-fp16"})
# The subset that decides which kernels and precisions are fast: "the same vector ISA" for records.
KERNEL_ISA = frozenset({"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512vnni", "avx512bf16",
                        "avx512fp16", "avxvnni", "amx-int8", "amx-bf16", "amx-fp16"})
_AMD_PREFIXES = ("znver", "bdver", "btver", "athlon", "opteron", "amdfam", "barcelona", "k6", "k8")
_GENERIC = ("generic", "x86-64", "x86-64-v2", "x86-64-v3", "x86-64-v4")


def host_flags() -> frozenset[str] | None:
    """The host's instruction sets (LLVM names) from /proc/cpuinfo; None where there is none to read."""
    flags = host_cpu_flags()
    return llvm_names(flags) & ISA if flags else None


@functools.cache
def all_features_of(cpu: str, mattr: tuple[str, ...] = ()) -> frozenset[str]:
    """Every feature LLVM enables for `-mcpu=cpu -mattr=...` (tuning flags included)."""
    from tvm.target import Target
    from tvm.target.codegen import llvm_get_cpu_features

    target: dict = {"kind": "llvm", "mcpu": cpu}
    if mattr:
        target["mattr"] = list(mattr)
    return frozenset(str(f) for f in llvm_get_cpu_features(Target(target)))


def features_of(cpu: str, mattr: tuple[str, ...] = ()) -> frozenset[str]:
    """The instruction sets LLVM enables for `-mcpu=cpu -mattr=...`."""
    return all_features_of(cpu, mattr) & ISA


@functools.cache
def known_cpus() -> tuple[str, ...]:
    from tvm.target import Target
    from tvm.target.codegen import llvm_get_cpu_archlist

    return tuple(str(c) for c in llvm_get_cpu_archlist(Target({"kind": "llvm"})))


def is_amd(cpu: str) -> bool:
    return cpu.startswith(_AMD_PREFIXES)


@dataclass(frozen=True)
class CpuChoice:
    name: str      # the -mcpu given to LLVM
    reason: str    # why, for the log and mod.json


def choose_cpu(llvm_name: str, host: frozenset[str] | None, vendor: str = "",
               cpus: Iterable[str] | None = None,
               features: Callable[[str], frozenset[str]] = features_of) -> CpuChoice:
    """The -mcpu for a host LLVM calls `llvm_name` whose vector ISA is `host` (None: unknown, trust LLVM)."""
    if host is None:
        return CpuChoice(llvm_name, f"LLVM's name for this CPU ({llvm_name}); no CPU flags to check it against")
    named = features(llvm_name)
    lacks, extra = named - host, (host - named) & KERNEL_ISA
    if not lacks and not extra:
        return CpuChoice(llvm_name, f"LLVM's name for this CPU ({llvm_name}); its vector ISA matches the CPU flags")
    fitting = [c for c in (cpus if cpus is not None else known_cpus()) if features(c) <= host]
    if not fitting:
        return CpuChoice("generic", f"LLVM names this CPU {llvm_name} but no CPU LLVM knows fits its flags")

    def rank(cpu: str) -> tuple:
        # most of the host's ISA; then a real CPU of the host's vendor; then the fewest other LLVM
        # features (the least that could be missing); CPUs LLVM describes alike: the last name
        isa = features(cpu)
        return (len(isa & KERNEL_ISA), len(isa), cpu not in _GENERIC, cpu == llvm_name,
                is_amd(cpu) == (vendor == "amd"), -len(all_features_of(cpu)), "_" not in cpu, cpu)

    best = max(fitting, key=rank)
    why = (f"lacks {', '.join(sorted(lacks))}" if lacks else "") + \
          ("; " if lacks and extra else "") + (f"has {', '.join(sorted(extra))} too" if extra else "")
    return CpuChoice(best, f"LLVM names this CPU {llvm_name}, but the CPU flags differ (it {why}; a VM hiding "
                           f"the model, or a CPU newer than LLVM): {best} is the nearest CPU LLVM knows "
                           "with the vector ISA this CPU has")


@functools.cache
def host_cpu() -> CpuChoice:
    if platform.machine() not in ("x86_64", "AMD64"):
        return CpuChoice("generic", f"{platform.machine()} is not x86-64")
    from tvm.target.codegen import llvm_get_system_cpu, llvm_get_system_x86_vendor

    choice = choose_cpu(str(llvm_get_system_cpu()), host_flags(), str(llvm_get_system_x86_vendor()))
    log.info("host target: -mcpu=%s (%s)", choice.name, choice.reason)
    return choice


def check_cpu(cpu: str) -> str | None:
    """None when LLVM knows `cpu`; else a message naming the closest CPUs it knows."""
    from tvm.target.codegen import llvm_get_system_triple, llvm_is_valid_cpu

    if cpu in ("native", "generic") or llvm_is_valid_cpu(cpu, str(llvm_get_system_triple())):
        return None
    names = [c for c in known_cpus() if "_" not in c]  # LLVM spells some twice (icelake_server)
    close = [c for c in names if c.startswith(cpu) or cpu.startswith(c)]
    close += [c for c in difflib.get_close_matches(cpu, names, n=5, cutoff=0.5) if c not in close]
    hint = f"did you mean {', '.join(close[:5])}?" if close else f"LLVM knows: {', '.join(known_cpus())}"
    return (f"LLVM does not know the CPU '{cpu}' ({hint}). Omit backend.target to build for this CPU, "
            "or name one LLVM knows.")


def nearest_records(cpu: str, available: Iterable[str],
                    features: Callable[[str], frozenset[str]] = features_of) -> tuple[str | None, str]:
    """Which CPU's tuning records to use for a build for `cpu`: its own, else one with the same kernel ISA
    (records tuned there were measured on the same instructions). Returns (cpu or None, why)."""
    available = sorted(available)
    if cpu in available:
        return cpu, f"records tuned for {cpu}"
    isa = features(cpu) & KERNEL_ISA
    same = [c for c in available if features(c) & KERNEL_ISA == isa]
    if same:
        return same[0], f"no records for {cpu}; {same[0]} has the same vector ISA ({', '.join(sorted(isa))})"
    if not available:
        return None, "no CPU has tuning records for this build"
    diffs = "; ".join(f"{c}: {_isa_diff(features(c) & KERNEL_ISA, isa)}" for c in available)
    return None, f"no records for {cpu} or a CPU with its vector ISA ({diffs})"


def _isa_diff(other: frozenset[str], mine: frozenset[str]) -> str:
    parts = [f"+{f}" for f in sorted(other - mine)] + [f"-{f}" for f in sorted(mine - other)]
    return " ".join(parts)
