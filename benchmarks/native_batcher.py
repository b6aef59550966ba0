"""The batcher alone, no network: CPU per request of DynamicBatcher (Python) and NativeBatcher (the C++ engine,
`tvmzoo serve --native`) on the same build, side by side, over the model's own CPU per image in-process.

`--concurrency` asyncio callers on one event loop (as the server's front ends are) each await `infer` on one
real photo row, for `--seconds`, rounds interleaved (python, native, python, ...); the process's CPU per
request minus the in-process CPU per image (vamp's throughput mode with the same instances, each on its share
of the cores, in this process) is what the batcher costs per request. Each batcher runs with the server's default (adaptive) instances and threads.

    TVM_NUM_THREADS=2 .venv/bin/python benchmarks/native_batcher.py BUILD [--concurrency 8] [--seconds 5] [--rounds 3]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_name  # noqa: E402
from tvmzoo.preprocess import apply, read_image  # noqa: E402
from tvmzoo.preprocess.fused import fused_input  # noqa: E402
from tvmzoo.run.bench import BenchConfig, benchmark  # noqa: E402
from tvmzoo.run.runtime import CompiledModel  # noqa: E402
from tvmzoo.run.serve.batcher import DynamicBatcher  # noqa: E402
from tvmzoo.run.serve.config import ServeConfig  # noqa: E402
from tvmzoo.run.serve.metrics import VERSION, Metrics  # noqa: E402
from tvmzoo.run.serve.native.batcher import NativeBatcher  # noqa: E402
from tvmzoo.run.serve.repository import POOL_SPIN_COUNT  # noqa: E402
from tvmzoo.run.serve.tensors import check_finite  # noqa: E402

PHOTO = Path(__file__).resolve().parents[1] / "tvmzoo" / "data" / "images" / "coffee.png"


def make(kind: str, build: Path, cfg: ServeConfig, delay_s: float) -> tuple[DynamicBatcher | NativeBatcher, Metrics]:
    models = [CompiledModel.load(build) for _ in range(cfg.instance_count)]
    batch, metrics = models[0].fixed_batch, Metrics.create()
    if kind == "native":
        return NativeBatcher(build.name, models, batch, delay_s, metrics, 1, cfg.cores, "input"), metrics
    return DynamicBatcher(build.name, models, batch, delay_s, metrics, 1, cfg.cores,
                          lambda rows: check_finite("input", rows)), metrics


def rows_per_execution(metrics: Metrics, model: str) -> float:
    return metrics.inference_count.value(model, VERSION) / max(1.0, metrics.exec_count.value(model, VERSION))


async def load(batcher, row: np.ndarray, concurrency: int, seconds: float) -> int:
    stop = time.perf_counter() + seconds
    done = 0

    async def client() -> None:
        nonlocal done
        while time.perf_counter() < stop:
            await batcher.infer(row)
            done += 1

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return done


def cpu_per_request_ms(batcher, row: np.ndarray, concurrency: int, seconds: float) -> tuple[float, float]:
    """CPU ms per request: the whole process's, and the event loop's (this thread: the callers' side)."""
    asyncio.run(load(batcher, row, concurrency, 0.5))   # warm-up
    cpu, loop = time.process_time(), time.thread_time()
    done = asyncio.run(load(batcher, row, concurrency, seconds))
    return 1e3 * (time.process_time() - cpu) / done, 1e3 * (time.thread_time() - loop) / done


def in_process_ms(build: Path, instances: int, seconds: float) -> float:
    """CPU ms per image of `vamp -i <instances>` (each instance on its share of the cores), in this process."""
    batch = CompiledModel.load(build).fixed_batch or 1
    saved = os.environ.get("TVM_NUM_THREADS")
    try:
        probe = benchmark(build, BenchConfig(instances=instances, batch=batch, iterations=3, warmup=2))
        iterations = max(10, int(seconds * probe.throughput_qps / batch / instances))
        cpu = time.process_time()
        report = benchmark(build, BenchConfig(instances=instances, batch=batch, iterations=iterations, warmup=3))
        return 1e3 * (time.process_time() - cpu) / report.samples
    finally:
        if saved is not None:
            os.environ["TVM_NUM_THREADS"] = saved


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("build", type=Path)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--delay-us", type=int, default=0, help="--max-queue-delay-us (default 0, the server's)")
    args = parser.parse_args()
    os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", POOL_SPIN_COUNT)
    cfg = ServeConfig(args.build)
    model = CompiledModel.load(args.build)
    image = read_image(PHOTO)
    row = (fused_input if model.fused else apply)(model.preprocessing, image)[None]
    made = {kind: make(kind, args.build, cfg, args.delay_us * 1e-6) for kind in ("python", "native")}
    batchers = {kind: batcher for kind, (batcher, _) in made.items()}
    load_avg = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    measured: dict[str, list[tuple[float, float]]] = {kind: [] for kind in batchers}
    model_ms = []
    for _ in range(args.rounds):
        model_ms.append(in_process_ms(args.build, cfg.instance_count, args.seconds))
        for kind, batcher in batchers.items():
            measured[kind].append(cpu_per_request_ms(batcher, row, args.concurrency, args.seconds))
    for batcher in batchers.values():
        batcher.close()
    model_cpu = statistics.median(model_ms)
    print(f"CPU: {cpu_name()}, {os.cpu_count()} cores; load average {load_avg} when the run began; "
          f"{args.build.name}, c{args.concurrency}, --max-queue-delay-us {args.delay_us}, "
          f"{cfg.instance_count} instance(s) adaptive on {len(cfg.cores)} cores, "
          f"{args.rounds} rounds of {args.seconds:g} s (median)")
    print(f"in-process CPU / image: {model_cpu:.3f} ms")
    cost = {}
    for kind, rounds in measured.items():
        cpu = statistics.median(r[0] for r in rounds)
        loop = statistics.median(r[1] for r in rounds)
        cost[kind] = cpu - model_cpu
        print(f"{kind:6s} CPU / request {cpu:.3f} ms [rounds {min(r[0] for r in rounds):.3f}-"
              f"{max(r[0] for r in rounds):.3f}]: {1e3 * cost[kind]:.0f} us over the model, of which the "
              f"event loop {1e3 * loop:.0f} us; {rows_per_execution(made[kind][1], args.build.name):.2f} rows / execution")
    print(f"batcher cost per request native / python: {cost['native'] / cost['python']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
