"""`tvmzoo serve` under load, as perf_analyzer reports it (throughput, p50 / p90 / p99 client latency,
server queue vs compute time from /metrics), against vamp's in-process images/s and latency of the same
build, measured in the same run (vamp before and after each model's sweep, averaged).

The load generator is tritonclient's asyncio clients (HTTP binary tensors, gRPC) at a fixed concurrency
in this process; the server is `tvmzoo serve` in another. Both share the machine's cores, as a
perf_analyzer run on the server host would.

    .venv/bin/python benchmarks/serve_perf.py WORKSPACE [--models a,b] [--seconds 4] [--setups 1x2,2x1]

WORKSPACE holds compiled builds (<name>/mod.so + mod.json), e.g. Lite0 fp32 / int8 at batch 1 and 8.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpc_aio
import tritonclient.http as httpclient
import tritonclient.http.aio as http_aio

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from serve_client import ServerProcess, scrape  # noqa: E402
from tvmzoo.run.bench import BenchConfig, benchmark  # noqa: E402
from tvmzoo.preprocess import apply, read_image  # noqa: E402
from tvmzoo.run.runtime import CompiledModel, stack_aligned  # noqa: E402

PHOTO = ROOT.parent / "shared" / "data" / "imagenet-sample" / "n01440764_tench.JPEG"
CONCURRENCY = (1, 2, 4, 8, 16)


def cpu_name() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    names = [line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")]
    return names[0] if names else platform.processor()


@dataclass
class Row:
    model: str
    protocol: str
    concurrency: int
    images_per_s: float
    p50: float
    p90: float
    p99: float
    queue_us: float
    compute_us: float


async def _load(protocol: str, url: str, model: str, x: np.ndarray, concurrency: int,
                seconds: float) -> tuple[list[float], float]:
    module = grpc_aio if protocol == "grpc" else http_aio
    client = module.InferenceServerClient(url) if protocol == "grpc" else \
        module.InferenceServerClient(url, conn_limit=concurrency)
    tensor = module.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    latencies: list[float] = []

    async def worker(until: float, record: bool) -> None:
        while time.perf_counter() < until:
            start = time.perf_counter()
            await client.infer(model, [tensor])
            if record:
                latencies.append(time.perf_counter() - start)

    warm_end = time.perf_counter() + 1.0
    await asyncio.gather(*(worker(warm_end, False) for _ in range(concurrency)))
    start = time.perf_counter()
    await asyncio.gather(*(worker(start + seconds, True) for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    await client.close()
    return latencies, elapsed


def measure(server: ServerProcess, protocol: str, model: str, x: np.ndarray, concurrency: int,
            seconds: float) -> Row:
    before = scrape(server.http, model)
    url = server.grpc if protocol == "grpc" else server.http
    latencies, elapsed = asyncio.run(_load(protocol, url, model, x, concurrency, seconds))
    after = scrape(server.http, model)
    done = after["nv_inference_request_success"] - before["nv_inference_request_success"]

    def per_request(name: str) -> float:
        return (after[name] - before[name]) / max(done, 1)

    ms = np.asarray(latencies) * 1e3
    return Row(model, protocol, concurrency, len(latencies) * len(x) / elapsed,
               *(float(np.percentile(ms, q)) for q in (50, 90, 99)),
               per_request("nv_inference_queue_duration_us"),
               per_request("nv_inference_compute_infer_duration_us"))


@dataclass(frozen=True)
class Setup:
    instances: int
    threads: int
    delay_us: int

    def flags(self) -> list[str]:
        return ["--instances", str(self.instances), "--threads", str(self.threads),
                "--max-queue-delay-us", str(self.delay_us)]


def paired_latency(server: ServerProcess, protocol: str, model: str, compiled: CompiledModel, x: np.ndarray,
                   pairs: int = 150) -> tuple[float, float]:
    """Concurrency 1, robust to a shared machine's drift: served requests alternate with in-process runs
    of the same build (aligned input, as vamp feeds it); (p50 served ms, p50 in-process ms)."""
    module = grpcclient if protocol == "grpc" else httpclient
    client = module.InferenceServerClient(server.grpc if protocol == "grpc" else server.http)
    tensor = module.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    batch = stack_aligned(list(np.repeat(x, compiled.fixed_batch or 1, axis=0)))
    served, local = [], []
    for i in range(pairs + 10):
        t0 = time.perf_counter()
        client.infer(model, [tensor])
        t1 = time.perf_counter()
        compiled.run(batch)
        t2 = time.perf_counter()
        if i >= 10:
            served.append(t1 - t0)
            local.append(t2 - t1)
    return float(np.median(served) * 1e3), float(np.median(local) * 1e3)


def _vamp_run(prefix: Path, batch: int, instances: int, threads: int, seconds: float):
    cfg = BenchConfig(instances=instances, batch=batch, iterations=3, warmup=2, threads=threads)
    probe = benchmark(prefix, cfg)
    iterations = max(10, int(seconds * probe.throughput_qps / batch / instances))
    return benchmark(prefix, replace(cfg, iterations=iterations, warmup=3))


def vamp(prefix: Path, batch: int, setup: Setup, seconds: float) -> tuple[float, float]:
    """In this process, as vamp: images/s with the server's instances and threads (`vamp -i I -t T -b B`),
    and p50 ms per call of one instance alone (`-i 1`), the latency a single client could get."""
    throughput = _vamp_run(prefix, batch, setup.instances, setup.threads, seconds).throughput_qps
    alone = _vamp_run(prefix, batch, 1, setup.threads, seconds / 2).latency_ms["p50"]
    return throughput, alone


def sweep(server: ServerProcess, workspace: Path, model: str, setup: Setup,
          seconds: float) -> tuple[list[Row], tuple]:
    compiled = CompiledModel.load(workspace / model)
    x = apply(compiled.preprocessing, read_image(PHOTO))[None]
    batch = compiled.fixed_batch or 1
    before = vamp(workspace / model, batch, setup, seconds)
    rows = [measure(server, protocol, model, x, c, seconds) for c in CONCURRENCY for protocol in ("http", "grpc")]
    after = vamp(workspace / model, batch, setup, seconds)
    os.environ["TVM_NUM_THREADS"] = str(setup.threads)   # the in-process runs alternate with the served ones
    paired = {protocol: paired_latency(server, protocol, model, compiled, x) for protocol in ("http", "grpc")}
    return rows, ((before[0] + after[0]) / 2, (before[1] + after[1]) / 2, batch), paired


def report(results: dict, setup: Setup) -> str:
    lines = [f"CPU: {cpu_name()}, {os.cpu_count()} cores; shared machine (other developers' jobs ran at the same "
             f"time). Server: {setup.instances} instance(s) x {setup.threads} TVM thread(s), --max-queue-delay-us "
             f"{setup.delay_us}; vamp with the same instances and threads; client: tritonclient asyncio (HTTP binary "
             "/ gRPC) in another process on the same cores.", "",
             "| build | protocol | concurrency | images/s | p50 ms | p90 ms | p99 ms | server queue us | "
             "server compute us | served / vamp images/s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for model, (rows, (vamp_ips, vamp_p50, batch), _) in results.items():
        for r in rows:
            lines.append(f"| {model} | {r.protocol} | {r.concurrency} | {r.images_per_s:.1f} | {r.p50:.2f} | "
                         f"{r.p90:.2f} | {r.p99:.2f} | {r.queue_us:.0f} | {r.compute_us:.0f} | "
                         f"{100 * r.images_per_s / vamp_ips:.0f} % |")
        lines.append(f"| {model} | vamp in-process (-i {setup.instances} -t {setup.threads} -b {batch}; p50 of -i 1) | - | {vamp_ips:.1f} | {vamp_p50:.2f} | | | | | 100 % |")
    lines += ["", "Bars: concurrency 8 served >= 85 % of vamp images/s; concurrency 1 p50 within 1 ms of vamp p50."]
    for model, (rows, (vamp_ips, vamp_p50, _), paired) in results.items():
        for r in rows:
            if r.concurrency == 8:
                lines.append(f"- {model} {r.protocol} c8: {100 * r.images_per_s / vamp_ips:.1f} % of vamp")
        for protocol, (served, local) in paired.items():
            lines.append(f"- {model} {protocol} c1, served and in-process runs alternated: p50 {served:.2f} ms vs "
                         f"{local:.2f} ms in-process ({served - local:+.2f} ms)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workspace", type=Path)
    parser.add_argument("--models", default=None, help="comma-separated build names (default: every build)")
    parser.add_argument("--seconds", type=float, default=4.0, help="measured seconds per point")
    parser.add_argument("--delay-us", type=int, default=2000, help="server --max-queue-delay-us")
    parser.add_argument("--setups", default="1x2,2x1", help="instances x threads per instance, comma-separated")
    args = parser.parse_args()
    names = args.models.split(",") if args.models else sorted(p.parent.name for p in args.workspace.glob("*/mod.json"))
    for text in args.setups.split(","):
        instances, threads = (int(v) for v in text.split("x"))
        setup = Setup(instances, threads, args.delay_us)
        server = ServerProcess.start(args.workspace, *setup.flags())
        try:
            results = {name: sweep(server, args.workspace, name, setup, args.seconds) for name in names}
        finally:
            server.stop()
        print(report(results, setup), "\n", flush=True)


if __name__ == "__main__":
    main()
