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


def missing_features(required: list[str]) -> list[str]:
    """The recorded features the host CPU lacks (empty when the module can run here)."""
    flags = host_cpu_flags()
    return sorted(set(required) - flags) if flags else []
