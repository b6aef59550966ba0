"""The host CPU as a compiled module sees it: its ISA flags and the cores to use. Shared by the
target (which CPU to compile for) and the runtime (can this module run here)."""
from __future__ import annotations

import functools
import os
from pathlib import Path


@functools.cache
def host_cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def num_cores() -> int:
    env = os.environ.get("TVM_NUM_THREADS")
    if env and env.isdigit():
        return int(env)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


# /proc/cpuinfo flag -> LLVM feature name, where they differ (mod.json records LLVM's names).
_KERNEL_TO_LLVM = {
    "sse4_1": "sse4.1", "sse4_2": "sse4.2", "pni": "sse3", "abm": "lzcnt", "bmi1": "bmi", "sha_ni": "sha",
    "pclmulqdq": "pclmul", "avx512_vnni": "avx512vnni", "avx512_vbmi2": "avx512vbmi2",
    "avx512_bitalg": "avx512bitalg", "avx512_vpopcntdq": "avx512vpopcntdq", "avx512_bf16": "avx512bf16",
    "avx512_fp16": "avx512fp16", "avx512_vp2intersect": "avx512vp2intersect", "avx_vnni": "avxvnni",
    "avx_ifma": "avxifma", "avx_vnni_int8": "avxvnniint8", "avx_ne_convert": "avxneconvert",
    "amx_tile": "amx-tile", "amx_int8": "amx-int8", "amx_bf16": "amx-bf16", "amx_fp16": "amx-fp16"}


def llvm_names(flags) -> frozenset[str]:
    """Feature names as LLVM spells them (accepts /proc/cpuinfo flags or LLVM names)."""
    return frozenset(_KERNEL_TO_LLVM.get(f, f) for f in flags)


def missing_features(required: list[str]) -> list[str]:
    """The recorded features (LLVM or /proc/cpuinfo names) the host CPU lacks (empty when the module can
    run here)."""
    flags = host_cpu_flags()
    return sorted(llvm_names(required) - llvm_names(flags)) if flags else []
