"""`tvmzoo serve` under load, as perf_analyzer reports it (throughput, p50 / p90 / p99 client latency,
server queue vs compute time from /metrics), against vamp's in-process images/s and latency of the same
build, measured in the same run (vamp before and after each model's sweep, averaged).

The load generator is tritonclient's asyncio clients (HTTP binary tensors, gRPC) at a fixed concurrency
in this process; the server is `tvmzoo serve` in another. Both share the machine's cores, as a
perf_analyzer run on the server host would, so each point also reports the CPU time per request of the
client and of the server: with the cores the bottleneck, served images/s can reach at most the in-process
CPU per image over (server + client) CPU per request of vamp's images/s.

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
from tvmzoo.run.serve.repository import POOL_SPIN_COUNT  # noqa: E402
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
    rows_per_exec: float
    client_cpu_ms: float    # per request, the load generator's process
    server_cpu_ms: float    # per request, the whole server process


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _load(protocol: str, url: str, model: str, x: np.ndarray, concurrency: int,
                seconds: float, server_pid: int) -> tuple[list[float], float, float, float]:
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
    cpu, server_cpu, start = time.process_time(), process_cpu_s(server_pid), time.perf_counter()
    await asyncio.gather(*(worker(start + seconds, True) for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    cpu, server_cpu = time.process_time() - cpu, process_cpu_s(server_pid) - server_cpu
    await client.close()
    return latencies, elapsed, cpu, server_cpu


def measure(server: ServerProcess, protocol: str, model: str, x: np.ndarray, concurrency: int,
            seconds: float) -> Row:
    before = scrape(server.http, model)
    url = server.grpc if protocol == "grpc" else server.http
    latencies, elapsed, cpu, server_cpu = asyncio.run(_load(protocol, url, model, x, concurrency, seconds,
                                                            server.proc.pid))
    after = scrape(server.http, model)
    done = after["nv_inference_request_success"] - before["nv_inference_request_success"]

    def per_request(name: str) -> float:
        return (after[name] - before[name]) / max(done, 1)

    ms = np.asarray(latencies) * 1e3
    return Row(model, protocol, concurrency, len(latencies) * len(x) / elapsed,
               *(float(np.percentile(ms, q)) for q in (50, 90, 99)),
               per_request("nv_inference_queue_duration_us"),
               per_request("nv_inference_compute_infer_duration_us"),
               (after["nv_inference_count"] - before["nv_inference_count"])
               / max(after["nv_inference_exec_count"] - before["nv_inference_exec_count"], 1),
               1e3 * cpu / max(len(latencies), 1), 1e3 * server_cpu / max(len(latencies), 1))


@dataclass(frozen=True)
class Setup:
    instances: int
    threads: int
    delay_us: int | None    # None: one batch's in-process time for fixed-batch builds > 1, else 0

    def flags(self, delay_us: int) -> list[str]:
        return ["--instances", str(self.instances), "--threads", str(self.threads),
                "--max-queue-delay-us", str(delay_us)]


def paired_latency(server: ServerProcess, protocol: str, model: str, compiled: CompiledModel, x: np.ndarray,
                   seconds: float, block: int = 20) -> tuple[float, float]:
    """Concurrency 1, robust to a shared machine's drift: blocks of served requests alternate with blocks
    of in-process runs of the same build (aligned input, as vamp feeds it); the first call of each block is
    dropped, since the other side's TVM pool is still spinning then. (p50 served ms, p50 in-process ms)."""
    module = grpcclient if protocol == "grpc" else httpclient
    client = module.InferenceServerClient(server.grpc if protocol == "grpc" else server.http)
    tensor = module.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    batch = stack_aligned(list(np.repeat(x, compiled.fixed_batch or 1, axis=0)))
    calls = {"served": lambda: client.infer(model, [tensor]), "local": lambda: compiled.run(batch)}
    times: dict[str, list[float]] = {"served": [], "local": []}
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or len(times["local"]) < 2 * block:
        for name, call in calls.items():
            for i in range(block):
                t0 = time.perf_counter()
                call()
                if i:
                    times[name].append(time.perf_counter() - t0)
    return float(np.median(times["served"]) * 1e3), float(np.median(times["local"]) * 1e3)


def _vamp_run(prefix: Path, batch: int, instances: int, threads: int, seconds: float):
    shape = tuple(CompiledModel.load(prefix).input_shape[1:])
    cfg = BenchConfig(instances=instances, batch=batch, iterations=3, warmup=2, shape=shape, threads=threads)
    probe = benchmark(prefix, cfg)
    iterations = max(10, int(seconds * probe.throughput_qps / batch / instances))
    cpu = time.process_time()
    report = benchmark(prefix, replace(cfg, iterations=iterations, warmup=3))
    return report, 1e3 * (time.process_time() - cpu) / report.samples   # loads and warm-up included


def vamp(prefix: Path, batch: int, setup: Setup, seconds: float) -> tuple[float, float, float]:
    """In this process, as vamp: images/s with the server's instances and threads (`vamp -i I -t T -b B`),
    p50 ms per call of one instance alone (`-i 1`), the latency a single client could get, and the CPU
    ms per image of the images/s run."""
    report, cpu_ms = _vamp_run(prefix, batch, setup.instances, setup.threads, seconds)
    alone = _vamp_run(prefix, batch, 1, setup.threads, seconds / 2)[0].latency_ms["p50"]
    return report.throughput_qps, alone, cpu_ms


def sweep(workspace: Path, model: str, setup: Setup, seconds: float) -> dict:
    """One build: vamp, a server of it alone, the load points, the alternated c1 latency, vamp again."""
    compiled = CompiledModel.load(workspace / model)
    x = apply(compiled.preprocessing, read_image(PHOTO))[None]
    batch = compiled.fixed_batch or 1
    before = vamp(workspace / model, batch, setup, seconds)
    delay = setup.delay_us if setup.delay_us is not None else int(1000 * before[1]) if batch > 1 else 0
    server = ServerProcess.start(workspace / model, *setup.flags(delay))
    try:
        rows = [measure(server, protocol, model, x, c, seconds) for c in CONCURRENCY for protocol in ("http", "grpc")]
        os.environ["TVM_NUM_THREADS"] = str(setup.threads)   # the in-process runs alternate with the served ones
        paired = {protocol: paired_latency(server, protocol, model, compiled, x, 2 * seconds)
                  for protocol in ("http", "grpc")}
    finally:
        server.stop()
    after = vamp(workspace / model, batch, setup, seconds)
    return {"rows": rows, "vamp_ips": (before[0] + after[0]) / 2, "vamp_p50": (before[1] + after[1]) / 2,
            "vamp_cpu_ms": (before[2] + after[2]) / 2,
            "batch": batch, "delay_us": delay, "paired": paired, "rows_per_request": len(x)}


def ceiling(res: dict, r: Row) -> str:
    """What the cores allow when vamp keeps them all busy: in-process CPU per image over the served CPU
    per image (server + client); served / vamp images/s cannot exceed it with the client on the same cores."""
    in_process = res["vamp_cpu_ms"]
    served = (r.server_cpu_ms + r.client_cpu_ms) / res["rows_per_request"]
    return (f"{r.protocol} CPU / image {served:.2f} ms (server {r.server_cpu_ms:.2f} + client {r.client_cpu_ms:.2f}) "
            f"vs {in_process:.2f} in-process: ceiling {100 * in_process / served:.0f} %")


def report(results: dict, setup: Setup, load: str) -> str:
    lines = [f"CPU: {cpu_name()}, {os.cpu_count()} cores; load average {load} (1 / 5 / 15 min) when the run began. "
             f"Server: {setup.instances} instance(s) x {setup.threads} TVM thread(s); vamp with the same instances "
             "and threads, in the load generator's process; TVM_THREAD_POOL_SPIN_COUNT="
             f"{os.environ['TVM_THREAD_POOL_SPIN_COUNT']} in both; client: tritonclient asyncio (HTTP binary / gRPC) "
             "in another process on the same cores. CPU ms / request: the client's process and the whole server's.", "",
             "| build | protocol | concurrency | images/s | p50 ms | p90 ms | p99 ms | server queue us | "
             "server compute us | rows / exec | client CPU ms / req | server CPU ms / req | served / vamp images/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for model, res in results.items():
        for r in res["rows"]:
            lines.append(f"| {model} | {r.protocol} | {r.concurrency} | {r.images_per_s:.1f} | {r.p50:.2f} | "
                         f"{r.p90:.2f} | {r.p99:.2f} | {r.queue_us:.0f} | {r.compute_us:.0f} | {r.rows_per_exec:.1f} | "
                         f"{r.client_cpu_ms:.2f} | {r.server_cpu_ms:.2f} | "
                         f"{100 * r.images_per_s / res['vamp_ips']:.0f} % |")
        lines.append(f"| {model} | vamp (-i {setup.instances} -t {setup.threads} -b {res['batch']}; p50: -i 1) | | "
                     f"{res['vamp_ips']:.1f} | {res['vamp_p50']:.2f} | | | | | | | | 100 % |")
    lines += ["", "Compact (images/s, p50 / p99 ms):", "",
              "| build | protocol | " + " | ".join(f"c{c}" for c in CONCURRENCY) + " | vamp in-process |",
              "|---|---|" + "---|" * (len(CONCURRENCY) + 1)]
    for model, res in results.items():
        for protocol in ("http", "grpc"):
            cells = [f"{r.images_per_s:.0f} ({r.p50:.1f} / {r.p99:.1f})" for r in res["rows"] if r.protocol == protocol]
            lines.append(f"| {model} | {protocol} | " + " | ".join(cells)
                         + f" | {res['vamp_ips']:.0f} ({res['vamp_p50']:.1f}) |")
    lines += ["", "Bars: concurrency 8 served >= 85 % of vamp images/s; concurrency 1 p50 within 1 ms of in-process."]
    for model, res in results.items():
        lines.append(f"- {model} (--max-queue-delay-us {res['delay_us']}): c8 " + ", ".join(
            f"{r.protocol} {100 * r.images_per_s / res['vamp_ips']:.1f} %" for r in res["rows"] if r.concurrency == 8)
            + " of vamp; c1 p50 with served and in-process runs alternated: " + ", ".join(
            f"{protocol} {served:.2f} ms vs {local:.2f} ms ({served - local:+.2f} ms)"
            for protocol, (served, local) in res["paired"].items()))
        lines.append("  - c8 " + "; ".join(ceiling(res, r)
                                          for r in res["rows"] if r.concurrency == 8))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workspace", type=Path)
    parser.add_argument("--models", default=None, help="comma-separated build names (default: every build)")
    parser.add_argument("--seconds", type=float, default=4.0, help="measured seconds per point")
    parser.add_argument("--delay-us", type=int, default=None,
                        help="server --max-queue-delay-us (default: one batch's in-process time for batch > 1 "
                             "builds; a batch waits only for as many requests as were in flight together)")
    parser.add_argument("--setups", default="1x2,2x1", help="instances x threads per instance, comma-separated")
    args = parser.parse_args()
    # this process's in-process runs alternate with served ones: its TVM pool must not spin through the
    # served blocks any more than the server's does (TVM reads it once, at the first pool's start)
    os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", POOL_SPIN_COUNT)
    load = " / ".join(f"{v:.2f}" for v in os.getloadavg())
    names = args.models.split(",") if args.models else sorted(p.parent.name for p in args.workspace.glob("*/mod.json"))
    for text in args.setups.split(","):
        instances, threads = (int(v) for v in text.split("x"))
        setup = Setup(instances, threads, args.delay_us)
        results = {name: sweep(args.workspace, name, setup, args.seconds) for name in names}
        print(report(results, setup, load), "\n", flush=True)


if __name__ == "__main__":
    main()
