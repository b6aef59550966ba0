"""The host CPU as a compiled module sees it: its ISA flags and the cores to use. Shared by the
target (which CPU to compile for) and the runtime (can this module run here)."""
from __future__ import annotations

import ctypes
import functools
import logging
import os
import platform
from collections.abc import Iterable
from pathlib import Path

from .threads import tvm_num_threads, usable_cores

log = logging.getLogger(__name__)


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
    return tvm_num_threads() or len(usable_cores())


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


# Linux x86-64: a process may execute AMX instructions only after asking the kernel for the tile data
# state (arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)); without it the first tile load dies with
# SIGILL. TVM 0.27 has no `runtime.amx_init`, so tvmzoo asks itself (deploy/cpp/tvmzoo_deploy.h too).
_SYS_ARCH_PRCTL = 158
_ARCH_REQ_XCOMP_PERM = 0x1023
_XFEATURE_XTILEDATA = 18


def uses_amx(features: Iterable[str]) -> bool:
    """Does a module with these recorded features (LLVM or /proc/cpuinfo names) need AMX tile state?"""
    return any(f.startswith(("amx-", "amx_")) for f in features)


@functools.cache
def request_amx() -> bool:
    """Ask the kernel, once per process, for AMX tile state (all threads share it). True when granted;
    False (logged) where the CPU, the OS or the kernel (before Linux 5.16) has none: an AMX kernel
    would then crash, so the caller should not run one."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64") \
            or "amx_tile" not in host_cpu_flags():
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA) != 0:
        log.warning("the kernel refused AMX tile state (arch_prctl: %s); AMX kernels cannot run in this process",
                    os.strerror(ctypes.get_errno()))
        return False
    return True
