"""`tvmzoo serve` under load, as perf_analyzer reports it (throughput, p50 / p90 / p99 client latency,
server queue vs compute time from /metrics), against vamp's in-process images/s and latency of the same
build, measured in the same run (vamp before and after each model's sweep, averaged).

The load generators run a fixed concurrency: `raw` (benchmarks/serve_load.py, in this process) builds each
request once, as perf_analyzer does; `stream` (gRPC only) sends the same request on Triton's ModelStreamInfer,
one stream per client, as perf_analyzer --streaming; `wrk` (benchmarks/serve_wrk.py, HTTP only, used by default when
installed) is a C client in a child process that takes about half the raw client's CPU per request;
`cpp` / `cppstream` (gRPC only, benchmarks/serve_grpc_cpp.py, used by default when g++ and libgrpc++ are
installed; built on first use) are gRPC's counterpart of wrk, a C++ client in a child process sending the `raw`
request unary (ModelInfer) / on one ModelStreamInfer stream per client; `tritonclient` is tritonclient's asyncio
clients. Several are interleaved point by point; the server is
`tvmzoo serve` in another process. Both share the machine's cores, as a
perf_analyzer run on the server host would, so each point also reports the CPU time per request of the
client and of the server: with the cores the bottleneck, served images/s can reach at most the in-process
CPU per image over (server + client) CPU per request of vamp's images/s.

    .venv/bin/python benchmarks/serve_perf.py WORKSPACE [--models a,b] [--seconds 4] [--rounds 1] [--setups auto,1x2,2x1]
        [--clients raw,stream,wrk,cpp,cppstream,tritonclient] [--protocols http,grpc] [--concurrency 1,8]
        [--servers new=.venv/bin/tvmzoo,main=../main/.venv/bin/tvmzoo] [--shared-memory none,system] [--client-cpus 1]

`--servers` runs several servers of the same build side by side (e.g. this branch's and main's), interleaved
point by point, each idle while another is measured; an executable may be followed by flags of its own
(`--servers "native=.venv/bin/tvmzoo,python=.venv/bin/tvmzoo --no-native"`; native is the default).
`--shared-memory none,system` runs each raw / stream / wrk / cpp / cppstream client both over the socket and with
perf_analyzer's `--shared-memory system` (client `raw+shm`, ...: the input and output in registered /dev/shm
regions, raw / stream one pair per slot, wrk / cpp / cppstream one pair for all; the request only its header),
interleaved. `--client-cpus 1` runs wrk / cpp / cppstream on core 1 and the server, vamp and the in-process runs on
the other cores: a client off the server's cores, as on another machine (the figure perf_analyzer gives from a
separate host); the ceiling is then the server's CPU per image alone.

WORKSPACE holds compiled builds (<name>/mod.so + mod.json), e.g. Lite0 fp32 / int8 at batch 1 and 8.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from machine import cpu_name  # noqa: E402
from serve_client import ServerProcess, scrape  # noqa: E402
from serve_load import Call, closed_loop, make_calls, streams  # noqa: E402
from serve_wrk import Wrk, available as wrk_available  # noqa: E402
from serve_grpc_cpp import GrpcLoad, missing as cpp_missing  # noqa: E402
from tvmzoo.run.serve.repository import POOL_SPIN_COUNT  # noqa: E402
from tvmzoo.run.bench import BenchConfig, benchmark  # noqa: E402
from tvmzoo.run.threads import usable_cores  # noqa: E402
from tvmzoo.preprocess import apply, read_image  # noqa: E402
from tvmzoo.run.runtime import CompiledModel, stack_aligned  # noqa: E402

PHOTO = ROOT.parent / "shared" / "data" / "imagenet-sample" / "n01440764_tench.JPEG"
CONCURRENCY = (1, 2, 4, 8, 16)
PROTOCOLS = ("http", "grpc")
CLIENTS = ("raw", "stream", "wrk", "cpp", "cppstream", "tritonclient")
ONLY = {"wrk": "http", "stream": "grpc", "cpp": "grpc", "cppstream": "grpc"}   # clients of one protocol
EXTERNAL = ("wrk", "cpp", "cppstream")     # programs in a child process
SHM_CLIENTS = ("raw", "stream", "wrk", "cpp", "cppstream")     # those that can send their tensors by system shared memory
SHM = "+shm"   # a client name's suffix: its tensors by system shared memory


def kind_of(client: str) -> tuple[str, str]:
    """"raw+shm" -> ("raw", "system"): the load generator and its shared memory mode."""
    return client.removesuffix(SHM), "system" if client.endswith(SHM) else "none"


@dataclass
class Row:
    model: str
    server: str             # --servers label
    protocol: str
    client: str             # serve_load: raw (requests built once), stream (gRPC), tritonclient; wrk, cpp, cppstream
    concurrency: int
    images_per_s: float
    p50: float
    p90: float
    p99: float
    request_us: float       # the server's receipt to response (/metrics); p50 minus it: front end, transport, client
    queue_us: float
    compute_us: float
    rows_per_exec: float
    client_cpu_ms: float    # per request, the load generator's process
    server_cpu_ms: float    # per request, the whole server process
    loop_cpu_ms: float = 0.0   # per request, the server's main thread: the asyncio event loop (HTTP, grpc.aio)


def process_cpu_s(pid: int, thread: int | None = None) -> float:
    """User + system CPU seconds of a process so far (all its threads), or of one of its threads, from /proc."""
    stat = f"/proc/{pid}/task/{thread}/stat" if thread else f"/proc/{pid}/stat"
    fields = Path(stat).read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def python_load(server: ServerProcess, protocol: str, client: str, model: str, x: np.ndarray, top: int,
                concurrency: int, seconds: float) -> tuple[list[float], float, float]:
    """serve_load's clients in this process: (latencies s, measured wall s, client CPU s)."""
    url = server.grpc if protocol == "grpc" else server.http

    async def load() -> tuple[list[float], float, float]:
        kind, shared_memory = kind_of(client)
        calls, shared = make_calls(kind, protocol, url, model, x, top, concurrency, shared_memory)
        result = await closed_loop(calls, seconds)
        for call in calls:
            await call.close()
        if shared is not None:
            await shared.close()
        return result

    return asyncio.run(load())


def external_load(load: Wrk | GrpcLoad, concurrency: int, seconds: float) -> tuple[list[float], float, float]:
    """wrk or grpc_load in a child process, 1 s of warm-up first: (latencies s, measured wall s, its CPU s)."""
    if isinstance(load, Wrk):   # wrk has no warm-up of its own: a run first
        load.run(concurrency, 1.0)
        result = load.run(concurrency, seconds)
    else:                       # grpc_load's warm-up keeps its connection for the measured part
        result = load.run(concurrency, seconds, warmup=1.0)
    return list(result.latencies_s), result.elapsed_s, result.cpu_s


def measure(label: str, server: ServerProcess, protocol: str, client: str, model: str, x: np.ndarray, top: int,
            concurrency: int, seconds: float, external: Wrk | GrpcLoad | None) -> Row:
    before = scrape(server.http, model)
    server_cpu = process_cpu_s(server.proc.pid)
    loop_cpu = process_cpu_s(server.proc.pid, server.proc.pid)
    if external is not None:
        latencies, elapsed, cpu = external_load(external, concurrency, seconds)
    else:
        latencies, elapsed, cpu = python_load(server, protocol, client, model, x, top, concurrency, seconds)
    server_cpu = process_cpu_s(server.proc.pid) - server_cpu   # warm-up included, as in `done`
    loop_cpu = process_cpu_s(server.proc.pid, server.proc.pid) - loop_cpu
    after = scrape(server.http, model)
    done = after["nv_inference_request_success"] - before["nv_inference_request_success"]

    def per_request(name: str) -> float:
        return (after[name] - before[name]) / max(done, 1)

    ms = np.asarray(latencies) * 1e3
    return Row(model, label, protocol, client, concurrency, len(latencies) * len(x) / elapsed,
               *(float(np.percentile(ms, q)) for q in (50, 90, 99)),
               per_request("nv_inference_request_duration_us"), per_request("nv_inference_queue_duration_us"),
               per_request("nv_inference_compute_infer_duration_us"),
               (after["nv_inference_count"] - before["nv_inference_count"])
               / max(after["nv_inference_exec_count"] - before["nv_inference_exec_count"], 1),
               1e3 * cpu / max(len(latencies), 1), 1e3 * server_cpu / max(done, 1), 1e3 * loop_cpu / max(done, 1))


@dataclass(frozen=True)
class Setup:
    instances: int          # 0 with threads 0: the server's default, adaptive threads (one instance per core)
    threads: int
    delay_us: int | None    # None: one batch's in-process time for fixed-batch builds > 1, else 0

    @classmethod
    def parse(cls, text: str, delay_us: int | None) -> Setup:
        """`IxT` (instances x threads) or `auto` (no --instances / --threads)."""
        return cls(0, 0, delay_us) if text == "auto" else cls(*(int(v) for v in text.split("x")), delay_us)

    @property
    def auto(self) -> bool:
        return self.threads == 0

    def flags(self, delay_us: int) -> list[str]:
        fixed = [] if self.auto else ["--instances", str(self.instances), "--threads", str(self.threads)]
        return [*fixed, "--max-queue-delay-us", str(delay_us)]

    def vamp_setups(self) -> list[tuple[int, int]]:
        """vamp's -i / -t to compare with: the same, or for `auto` both ends (-i 1 -t <cores>, -i <cores> -t 1)."""
        cores = len(usable_cores())
        return list(dict.fromkeys([(1, cores), (cores, 1)])) if self.auto else [(self.instances, self.threads)]

    def describe(self) -> str:
        if self.auto:
            return ("adaptive threads (the server's default: one instance per core, a batch on all cores when "
                    "nothing else runs or waits, else on its own core)")
        return f"{self.instances} instance(s) x {self.threads} TVM thread(s)"


def paired_latency(server: ServerProcess, protocol: str, client: str, model: str, compiled: CompiledModel,
                   x: np.ndarray, top: int, seconds: float, external: Wrk | GrpcLoad | None,
                   block: int = 20) -> tuple[float, float]:
    """Concurrency 1, robust to a shared machine's drift: blocks of served requests alternate with blocks
    of in-process runs of the same build (aligned input, as vamp feeds it); the first call of each block is
    dropped, since the other side's TVM pool is still spinning then (wrk's and grpc_load's blocks are 1 s runs,
    whose first request is one of 100-300). (p50 served ms, p50 in-process ms)."""
    batch = stack_aligned(list(np.repeat(x, compiled.fixed_batch or 1, axis=0)))

    async def alternate() -> dict[str, list[float]]:
        calls, shared = make_calls(kind_of(client)[0], protocol, server.grpc if protocol == "grpc" else server.http,
                                   model, x, top, 1, kind_of(client)[1]) if external is None else ([], None)

        async def local() -> None:
            compiled.run(batch)

        async def timed(call: Call) -> list[float]:
            times = []
            for i in range(block):
                t0 = time.perf_counter()
                await call()
                if i:
                    times.append(time.perf_counter() - t0)
            return times

        times: dict[str, list[float]] = {"served": [], "local": []}
        start = time.perf_counter()
        while time.perf_counter() - start < seconds or len(times["local"]) < 2 * block:
            times["served"] += list(external.run(1, 1.0).latencies_s) if external else await timed(calls[0])
            times["local"] += await timed(local)
        for call in calls:
            await call.close()
        if shared is not None:
            await shared.close()
        return times

    times = asyncio.run(alternate())
    return float(np.median(times["served"]) * 1e3), float(np.median(times["local"]) * 1e3)


def _vamp_run(prefix: Path, batch: int, instances: int, threads: int, seconds: float):
    shape = tuple(CompiledModel.load(prefix).input_shape[1:])
    cfg = BenchConfig(instances=instances, batch=batch, iterations=3, warmup=2, shape=shape, threads=threads)
    probe = benchmark(prefix, cfg)
    iterations = max(10, int(seconds * probe.throughput_qps / batch / instances))
    cpu = time.process_time()
    report = benchmark(prefix, replace(cfg, iterations=iterations, warmup=3))
    return report, 1e3 * (time.process_time() - cpu) / report.samples   # loads and warm-up included


def vamp(prefix: Path, batch: int, setup: Setup, seconds: float) -> tuple[float, float, float, dict[str, float]]:
    """In this process, as vamp: images/s with the server's instances and threads (`vamp -i I -t T -b B`;
    adaptive: the better of -i 1 -t <cores> and -i <cores> -t 1), p50 ms per call of one instance alone
    (`-i 1`, all the cores when adaptive), the latency a single client could get, and the CPU ms per image
    of the images/s run; and the images/s of each -i / -t."""
    runs = [_vamp_run(prefix, batch, i, t, seconds) for i, t in setup.vamp_setups()]
    report, cpu_ms = max(runs, key=lambda run: run[0].throughput_qps)
    threads = setup.vamp_setups()[0][1]
    alone = _vamp_run(prefix, batch, 1, threads, seconds / 2)[0].latency_ms["p50"]
    each = {f"-i {i} -t {t}": run[0].throughput_qps for (i, t), run in zip(setup.vamp_setups(), runs)}
    return report.throughput_qps, alone, cpu_ms, each


def median_round(rounds: list[Row]) -> Row:
    """A point's round with the median images/s (all its figures from that one measurement)."""
    return sorted(rounds, key=lambda r: r.images_per_s)[len(rounds) // 2]


def sweep(workspace: Path, model: str, setup: Setup, seconds: float, clients: list[str],
          concurrency: list[int], executables: dict[str, str | None], protocols: list[str],
          rounds: int = 1, grpc_connections: int = 1, client_cpus: frozenset[int] | None = None) -> dict:
    """One build: vamp, the servers of it alone, the load points (`rounds` times, interleaved; each point's
    median round is kept, the spread of its images/s too), the alternated c1 latency, vamp again."""
    compiled = CompiledModel.load(workspace / model)
    x = apply(compiled.preprocessing, read_image(PHOTO))[None]
    top = int(compiled.run(x)[0].argmax())   # every served answer must have it
    batch = compiled.fixed_batch or 1
    before = vamp(workspace / model, batch, setup, seconds)
    # vamp set it to its last run's threads; the servers (adaptive: their cores) and the in-process runs
    # alternated with the served ones read it
    os.environ["TVM_NUM_THREADS"] = str(setup.vamp_setups()[0][1])
    delay = setup.delay_us if setup.delay_us is not None else int(1000 * before[1]) if batch > 1 else 0
    servers: dict[str, ServerProcess] = {}
    externals: dict[tuple[str, str], Wrk | GrpcLoad] = {}   # (server label, client)
    try:
        for label, command in executables.items():
            executable, *flags = command.split() if command else [None]
            servers[label] = ServerProcess.start(workspace / model, *setup.flags(delay), *flags, executable=executable)
        ways = [(label, protocol, client) for protocol in protocols for client in clients
                for label in servers if ONLY.get(kind_of(client)[0], protocol) == protocol   # interleaved per point
                and (kind_of(client)[0] not in ("stream", "cppstream") or streams(servers[label].grpc))]
        for label, _, client in ways:
            kind, shared_memory = kind_of(client)
            if kind == "wrk":   # wrk's answers carry no tag: one is checked first
                externals[label, client] = Wrk(servers[label].http, model, x, shared_memory, cpus=client_cpus)
                externals[label, client].check(compiled.run(x))
            elif kind in EXTERNAL:   # grpc_load checks every answer's id, size and top class
                externals[label, client] = GrpcLoad(servers[label].grpc, model, x, top, stream=kind == "cppstream",
                                                    connections=grpc_connections, shared_memory=shared_memory,
                                                    cpus=client_cpus)
        points = [(c, way) for c in concurrency for way in ways]
        measured = [[measure(label, servers[label], protocol, client, model, x, top, c, seconds,
                             externals.get((label, client)))
                     for c, (label, protocol, client) in points] for _ in range(rounds)]
        rows = [median_round([runs[i] for runs in measured]) for i in range(len(points))]
        spread = {(r.server, r.protocol, r.client, r.concurrency): sorted(runs[i].images_per_s for runs in measured)
                  for i, r in enumerate(rows)}
        paired = {way: paired_latency(servers[way[0]], *way[1:], model, compiled, x, top, 2 * seconds,
                                      externals.get((way[0], way[2])))
                  for way in ways}
    finally:   # wrk's shared memory regions are unregistered while its server still runs
        for external in externals.values():
            external.close()
        for server in servers.values():
            server.stop()
    after = vamp(workspace / model, batch, setup, seconds)
    return {"rows": rows, "vamp_ips": (before[0] + after[0]) / 2, "vamp_p50": (before[1] + after[1]) / 2,
            "vamp_cpu_ms": (before[2] + after[2]) / 2,
            "vamp_each": {flags: (ips + after[3][flags]) / 2 for flags, ips in before[3].items()},
            "batch": batch, "delay_us": delay, "paired": paired, "rows_per_request": len(x), "spread": spread,
            "client_apart": client_cpus is not None}


def ceiling(res: dict, r: Row) -> str:
    """What the cores allow when vamp keeps them all busy: in-process CPU per image over the served CPU
    per image (server + client, or the server's alone when the client has cores of its own); served / vamp
    images/s cannot exceed it."""
    in_process = res["vamp_cpu_ms"]
    if res["client_apart"]:
        served = r.server_cpu_ms / res["rows_per_request"]
        return (f"{r.server} {r.protocol} {r.client} server CPU / image {served:.2f} ms (the client "
                f"{r.client_cpu_ms:.2f} on its own cores) vs {in_process:.2f} in-process: ceiling "
                f"{100 * in_process / served:.0f} %")
    served = (r.server_cpu_ms + r.client_cpu_ms) / res["rows_per_request"]
    return (f"{r.server} {r.protocol} {r.client} CPU / image {served:.2f} ms (server {r.server_cpu_ms:.2f} + client "
            f"{r.client_cpu_ms:.2f}) vs {in_process:.2f} in-process: ceiling {100 * in_process / served:.0f} %")


def report(results: dict, setup: Setup, load: str, grpc_connections: int = 1,
           client_cpus: frozenset[int] | None = None) -> str:
    apart = ("" if client_cpus is None else
             f"Cores: the server, vamp and the in-process runs on {cores_text(usable_cores())}, the load generators on "
             f"{cores_text(client_cpus)} (a client off the server's cores, as on another machine). ")
    lines = [f"CPU: {cpu_name()}, {os.cpu_count()} cores; load average {load} (1 / 5 / 15 min) when the run began. "
             + apart +
             f"Server: {setup.describe()}; vamp with the same instances and threads (adaptive: the better of "
             "-i 1 -t <cores> and -i <cores> -t 1), in the load generator's process; TVM_THREAD_POOL_SPIN_COUNT="
             f"{os.environ['TVM_THREAD_POOL_SPIN_COUNT']} in both; load generator (benchmarks/serve_load.py) in "
             "another process (on the same cores unless said above): raw = requests built once (HTTP binary tensors "
             "over keep-alive asyncio streams, gRPC serialized ModelInferRequest on grpc.aio), stream = the same on ModelStreamInfer, one "
             "stream per client, tritonclient = its asyncio clients; wrk (HTTP), cpp / cppstream (gRPC unary / stream, "
             f"benchmarks/grpc_load.cc): the raw request from a C / C++ program in a child process, its clients on "
             f"{grpc_connections} connection(s). "
             "CPU ms / request: the client's process, the whole server's and the server's event loop (its main "
             "thread).", "",
             "| build | server | protocol | client | concurrency | images/s | p50 ms | p90 ms | p99 ms | server request us | "
             "server queue us | server compute us | rows / exec | client CPU ms / req | server CPU ms / req | "
             "server loop CPU ms / req | served / vamp images/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for model, res in results.items():
        for r in res["rows"]:
            lines.append(f"| {model} | {r.server} | {r.protocol} | {r.client} | {r.concurrency} | {r.images_per_s:.1f} | "
                         f"{r.p50:.2f} | {r.p90:.2f} | {r.p99:.2f} | {r.request_us:.0f} | {r.queue_us:.0f} | "
                         f"{r.compute_us:.0f} | {r.rows_per_exec:.1f} | {r.client_cpu_ms:.2f} | "
                         f"{r.server_cpu_ms:.2f} | {r.loop_cpu_ms:.2f} | "
                         f"{100 * r.images_per_s / res['vamp_ips']:.0f} % |")
        flags = " or ".join(f"-i {i} -t {t}" for i, t in setup.vamp_setups())
        lines.append(f"| {model} | vamp ({flags} -b {res['batch']}; p50: -i 1) | | | | "
                     f"{res['vamp_ips']:.1f} | {res['vamp_p50']:.2f} | | | | | | | | | | 100 % |")
    return "\n".join(lines + compact(results) + bars(results))


def compact(results: dict) -> list[str]:
    concurrency = sorted({r.concurrency for res in results.values() for r in res["rows"]})
    lines = ["", "Compact (images/s, p50 / p99 ms):", "",
             "| build | server | protocol | client | " + " | ".join(f"c{c}" for c in concurrency) + " | vamp in-process |",
             "|---|---|---|---|" + "---|" * (len(concurrency) + 1)]
    for model, res in results.items():
        for label, protocol, client in res["paired"]:
            cells = [f"{r.images_per_s:.0f} ({r.p50:.1f} / {r.p99:.1f})" for r in res["rows"]
                     if (r.server, r.protocol, r.client) == (label, protocol, client)]
            lines.append(f"| {model} | {label} | {protocol} | {client} | " + " | ".join(cells)
                         + f" | {res['vamp_ips']:.0f} ({res['vamp_p50']:.1f}) |")
    return lines


def share(res: dict, r: Row) -> str:
    """A point's served images/s as a share of vamp's, with the way it was measured."""
    return f"{r.server} {r.protocol} {r.client} {100 * r.images_per_s / res['vamp_ips']:.1f} %"


def round_spread(res: dict, r: Row) -> str:
    """The point's spread over its rounds, when there were several."""
    runs = res["spread"][r.server, r.protocol, r.client, r.concurrency]
    if len(runs) < 2:
        return ""
    return f" [rounds {100 * runs[0] / res['vamp_ips']:.1f}-{100 * runs[-1] / res['vamp_ips']:.1f} %]"


def each(res: dict, r: Row) -> str:
    """Served images/s against each vamp setup, when there are several (the adaptive server)."""
    if len(res["vamp_each"]) < 2:
        return ""
    return " (" + ", ".join(f"{100 * r.images_per_s / ips:.0f} % of vamp {flags}"
                            for flags, ips in res["vamp_each"].items()) + ")"


def bars(results: dict) -> list[str]:
    lines = ["", "Bars: concurrency 8 served >= 85 % of vamp images/s; concurrency 1 p50 within 1 ms of in-process."]
    for model, res in results.items():
        c8 = [r for r in res["rows"] if r.concurrency == 8]
        lines.append(f"- {model} (--max-queue-delay-us {res['delay_us']}): c8 " + ", ".join(
            share(res, r) + round_spread(res, r) + each(res, r) for r in c8)
            + " of vamp; c1 p50 with served and in-process runs alternated: " + ", ".join(
            f"{label} {protocol} {client} {served:.2f} ms vs {local:.2f} ms ({served - local:+.2f} ms)"
            for (label, protocol, client), (served, local) in res["paired"].items()))
        if c8:
            lines.append("  - c8 " + "; ".join(ceiling(res, r) for r in c8))
        rule = [r for r in res["rows"] if r.concurrency == 2 * res["batch"] > 8]
        if rule:   # c8 on a batch-8 build holds one batch: the model idles while its 8 answers and requests travel
            lines.append(f"  - c{2 * res['batch']} (Triton's throughput rule, 2 x max batch per instance: a batch "
                         "gathers while one runs) " + ", ".join(share(res, r) for r in rule) + " of vamp")
    return lines


def cores_text(cores) -> str:
    return ("core " if len(cores) == 1 else "cores ") + ", ".join(map(str, sorted(cores)))


def keep_client_apart(text: str, clients: list[str], parser: argparse.ArgumentParser) -> frozenset[int]:
    """--client-cpus: the load generators' cores; this process (vamp, the in-process runs) and the servers it
    starts keep the others. Only the clients in child processes can be kept apart."""
    try:
        client = frozenset(int(c) for c in text.split(","))
    except ValueError:
        parser.error(f"--client-cpus takes comma-separated core numbers, got {text!r}")
    usable = set(usable_cores())
    server = usable - client
    if not client <= usable or not server:
        parser.error(f"--client-cpus {text}: give cores of {cores_text(usable)} and leave at least one for the server")
    if shutil.which("taskset") is None:
        parser.error("--client-cpus runs the clients under taskset, which is not installed (apt-get install util-linux)")
    if inside := [c for c in clients if kind_of(c)[0] not in EXTERNAL]:
        parser.error(f"--client-cpus keeps only wrk, cpp and cppstream apart; {', '.join(inside)} run in this "
                     "process, on the server's cores: leave them out (--clients)")
    for thread in os.listdir("/proc/self/task"):   # the threads started at import (BLAS) too; new ones inherit it:
        os.sched_setaffinity(int(thread), server)   # the servers, vamp's instances, TVM's pools
    os.environ["TVM_NUM_THREADS"] = str(len(server))
    return client


def default_clients() -> list[str]:
    return ["raw", "stream", *(["wrk"] if wrk_available() else []), *([] if cpp_missing() else ["cpp", "cppstream"])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workspace", type=Path)
    parser.add_argument("--models", default=None, help="comma-separated build names (default: every build)")
    parser.add_argument("--seconds", type=float, default=4.0, help="measured seconds per point")
    parser.add_argument("--rounds", type=int, default=1,
                        help="measure every point this many times, interleaved, and keep its median round (single "
                             "points move by +-5 %% of vamp between runs on 2 shared cores); the c8 bars show the spread")
    parser.add_argument("--delay-us", type=int, default=None,
                        help="server --max-queue-delay-us (default: one batch's in-process time for batch > 1 "
                             "builds; a batch waits only for as many requests as were in flight together)")
    parser.add_argument("--setups", default="auto,1x2,2x1",
                        help="instances x threads per instance, or auto (the server's default), comma-separated")
    parser.add_argument("--clients", default=",".join(default_clients()),
                        help="load generators, comma-separated, interleaved per point: raw, stream (gRPC only), "
                        "tritonclient (benchmarks/serve_load.py), wrk (HTTP only, benchmarks/serve_wrk.py), cpp, "
                        "cppstream (gRPC only, benchmarks/serve_grpc_cpp.py); default raw,stream and wrk / "
                        "cpp,cppstream when wrk / g++ and libgrpc++ are installed")
    parser.add_argument("--grpc-connections", type=int, default=1,
                        help="connections the cpp / cppstream clients share (default 1: every client on one, as "
                             "tritonclient's cached channel and perf_analyzer do)")
    parser.add_argument("--protocols", default=",".join(PROTOCOLS), help="http, grpc or both (comma-separated)")
    parser.add_argument("--concurrency", default=",".join(map(str, CONCURRENCY)), help="comma-separated")
    parser.add_argument("--shared-memory", default="none",
                        help="none, system or none,system: the raw / stream / wrk / cpp / cppstream clients send their "
                             "tensors over the "
                             "socket, by system shared memory (perf_analyzer --shared-memory system; client name "
                             "+shm), or both, interleaved per point")
    parser.add_argument("--client-cpus", default=None,
                        help="cores for the load generators (e.g. 1), the others for the server and vamp: the client "
                             "off the server's cores, as on another machine (wrk, cpp, cppstream only); default: "
                             "everything on every core, as perf_analyzer on the server's host")
    parser.add_argument("--servers", default="",
                        help="label=tvmzoo executable [its own flags], comma-separated, interleaved per point "
                             "(default: this checkout's alone)")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    clients = args.clients.split(",")
    if "wrk" in clients and not wrk_available():
        print("wrk is not installed (apt-get install wrk): measuring without it", file=sys.stderr)
        clients.remove("wrk")
    if {"cpp", "cppstream"} & set(clients) and (reason := cpp_missing()):
        print(f"the C++ gRPC client cannot be built: {reason}; measuring without cpp, cppstream", file=sys.stderr)
        clients = [c for c in clients if c not in ("cpp", "cppstream")]
    if unknown := set(clients) - set(CLIENTS):
        parser.error(f"unknown client(s) {', '.join(sorted(unknown))}: use {', '.join(CLIENTS)}")
    protocols = args.protocols.split(",")
    if unknown := set(protocols) - set(PROTOCOLS):
        parser.error(f"unknown protocol(s) {', '.join(sorted(unknown))}: use {', '.join(PROTOCOLS)}")
    modes = args.shared_memory.split(",")
    if set(modes) - {"none", "system"}:
        parser.error("--shared-memory takes none, system or none,system")
    clients = [client + ("" if mode == "none" else SHM) for client in clients for mode in modes
               if mode == "none" or client in SHM_CLIENTS]
    executables = dict(item.split("=", 1) for item in args.servers.split(",")) if args.servers else {"this": None}
    # `timeout` / kill send SIGTERM: exit through the `finally:` that stops the server child (the default
    # handler would leave it running)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    # this process's in-process runs alternate with served ones: its TVM pool must not spin through the
    # served blocks any more than the server's does (TVM reads it once, at the first pool's start)
    os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", POOL_SPIN_COUNT)
    client_cpus = keep_client_apart(args.client_cpus, clients, parser) if args.client_cpus else None
    load = " / ".join(f"{v:.2f}" for v in os.getloadavg())
    names = args.models.split(",") if args.models else sorted(p.parent.name for p in args.workspace.glob("*/mod.json"))
    for text in args.setups.split(","):
        setup = Setup.parse(text, args.delay_us)
        results = {name: sweep(args.workspace, name, setup, args.seconds, clients,
                               [int(c) for c in args.concurrency.split(",")], executables, protocols, args.rounds,
                               args.grpc_connections, client_cpus)
                   for name in names}
        print(report(results, setup, load, args.grpc_connections, client_cpus), "\n", flush=True)


if __name__ == "__main__":
    main()
