"""Throughput mode (`vamp -i N -t T`): N model instances, each on its own T cores.

TVM keeps one thread pool per calling thread; by default every pool pins its threads to the same first
cores, so two instances would fight over core 0 while the others idle. Each instance's thread therefore
configures its own pool on its own cores (TVM's `runtime.config_threadpool`, one core per thread) before
its first run. TVM releases the GIL while a model runs, so the instances run in parallel in one process.

TVM also binds a thread's default pool to cores 0..T-1, whatever cores the process may use: under
`taskset -c 2,3`, `numactl -C` or a cpuset, a multi-threaded run would leave them for cores 0 and 1. A thread
that did not pin its pool therefore has it put on the cores it may use before its first run
(`keep_pool_within_affinity`).
"""
from __future__ import annotations

import os
import threading

from ..errors import ConfigError
from ..limits import PER_CORE


def tvm_num_threads() -> int | None:
    """TVM_NUM_THREADS when it is a positive integer (TVM's own reading: anything else means its default)."""
    text = os.environ.get("TVM_NUM_THREADS", "").strip()
    return int(text) if text.isdigit() and int(text) > 0 else None


def usable_cores() -> list[int]:
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))


def check_per_core(flag: str, value: int | None) -> None:
    """Instances or threads beyond PER_CORE x the usable cores are refused before any model loads: each
    instance is a loaded model with its threads (`vamp -i 1000000` hung the machine), and on fewer cores
    they only take turns."""
    cores = len(usable_cores())
    if value is not None and value > PER_CORE * cores:
        raise ConfigError(f"{flag} {value} is more than {PER_CORE} x the {cores} cores this process may use: "
                          f"instances and threads beyond the cores only take turns. Use at most {cores} "
                          "(instances x threads <= cores runs each on its own cores).")


def threads_per_instance(instances: int, threads: int | None) -> int:
    """-t, or the usable cores shared out among the instances (at least 1)."""
    return threads if threads else max(1, len(usable_cores()) // max(instances, 1))


def instance_cores(index: int, threads: int, cores: list[int] | None = None) -> list[int]:
    """The cores of instance `index`: consecutive blocks of `threads`, wrapping when N x T exceeds the cores."""
    cores = cores if cores is not None else usable_cores()
    return [cores[(index * threads + k) % len(cores)] for k in range(threads)]


def pin_this_thread_pool(cores: list[int]) -> None:
    """Configure the calling thread's TVM pool: len(cores) threads, one on each of `cores`."""
    import tvm

    specify_one_core_per_thread = -2  # TVM's ThreadGroup::AffinityMode::kSpecifyOneCorePerThread
    tvm.get_global_func("runtime.config_threadpool")(specify_one_core_per_thread, len(cores),
                                                    [str(c) for c in cores])
    _pool.cores = list(cores)


_pool = threading.local()   # .cores: where this thread's TVM pool runs, once pinned or checked


def keep_pool_within_affinity() -> None:
    """Before a thread's first run: when TVM's default binding (cores 0..T-1, T = TVM_NUM_THREADS or the usable
    cores) would put its pool on cores this process may not use, pin it to the first T usable ones (wrapping,
    as instance_cores). A single-thread pool runs in the calling thread and is never bound: left as it is."""
    if getattr(_pool, "cores", None) is not None:
        return
    cores = usable_cores()
    threads = tvm_num_threads() or len(cores)
    wanted = instance_cores(0, threads, cores)
    if threads > 1 and wanted != list(range(threads)):
        pin_this_thread_pool(wanted)
    else:
        _pool.cores = wanted
