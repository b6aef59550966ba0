"""The server's CPU per request in front of the model: `tvmzoo serve` (the real CLI, front ends, batcher,
metrics) with a stand-in for the compiled module, driven by wrk (HTTP) or the raw gRPC clients of
serve_load at a fixed concurrency. The stand-in's `run` answers at once with each row's first `classes`
values (so every answer is checked: it must echo the request's own tensor), and `stage` is the real
CompiledModel's (the copy into the batch buffer), so what is measured is the request path without the
model: reading and parsing the request, the hand-offs to the instance thread and back, metrics, encoding
and writing the answer.

    .venv/bin/python benchmarks/serve_frontend.py [--servers new=.venv/bin/python,main=../main/.venv/bin/python]
        [--batch 1,8] [--concurrency 1,8] [--clients wrk,raw,stream] [--rounds 4] [--seconds 2]

Each server is another checkout's interpreter running this file with `--fake-server` (its own tvmzoo is
imported); servers run side by side, idle while another is measured, points interleaved round by round.
Reported per request: the whole server process's CPU, its event loop thread's (the main thread), the
client's, the server's page faults; and the round trip p50.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

CLASSES = 1000
ROW = (3, 224, 224)


def fake_server(argv: list[str]) -> int:
    """`tvmzoo serve` of the interpreter's own tvmzoo, with CompiledModel.load giving the stand-in."""
    from tvmzoo.cli import main
    from tvmzoo.run.runtime import CompiledModel
    import tvmzoo.run.serve.repository as repository

    class StandIn(CompiledModel):
        def run(self, batch: np.ndarray) -> np.ndarray:
            return batch.reshape(len(batch), -1)[:, :CLASSES].astype(np.float32)

    def load(prefix) -> CompiledModel:
        meta = json.loads((Path(prefix) / "mod.json").read_text())
        return StandIn(Path(prefix), meta, None)

    repository.CompiledModel = type("Patched", (), {"load": staticmethod(load)})
    try:   # the stand-in's `run` is Python: the native engine (the default where it exists) calls the VM instead
        from tvmzoo.run.serve.native import choose  # noqa: F401
        argv = [*argv, "--no-native"]
    except ImportError:   # a checkout from before the native path was the default
        pass
    return main(argv)   # ["serve", repository, flags...]


def write_repository(root: Path, batches: list[int]) -> None:
    for b in batches:
        d = root / f"standin_b{b}"
        d.mkdir(parents=True)
        (d / "mod.json").write_text(json.dumps({"input": {"name": "input", "shape": [b, *ROW], "dtype": "float32"},
                                                "outputs": [{"name": "output", "shape": [b, CLASSES]}]}))


def minor_faults(pid: int) -> int:
    """Page faults (minor) of the whole process so far."""
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[7])


def cpu_by_thread(pid: int) -> dict[int, float]:
    """CPU seconds of each thread of `pid` (user + system)."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[int(task.name)] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out


def main() -> int:
    if sys.argv[1:2] == ["--fake-server"]:
        return fake_server(sys.argv[2:])
    root = Path(__file__).resolve().parents[1]
    sys.path[:0] = [str(root), str(root / "tests"), str(root / "benchmarks")]
    from serve_client import ServerProcess
    from serve_load import closed_loop, make_calls
    from serve_wrk import Wrk

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--servers", default=f"new={sys.executable}")
    parser.add_argument("--batch", default="1,8")
    parser.add_argument("--concurrency", default="1,8")
    parser.add_argument("--clients", default="wrk")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--flags", default="", help="extra `tvmzoo serve` flags, space-separated")
    args = parser.parse_args()
    batches = [int(b) for b in args.batch.split(",")]
    concurrency = [int(c) for c in args.concurrency.split(",")]
    clients = args.clients.split(",")
    tmp = Path(tempfile.mkdtemp(prefix="serve_frontend_"))
    write_repository(tmp / "repo", batches)
    servers = {}
    for item in args.servers.split(","):
        label, python = item.split("=", 1)
        wrapper = tmp / f"{label}.sh"
        wrapper.write_text(f'#!/bin/sh\nexec {python} {Path(__file__).resolve()} --fake-server "$@"\n')
        wrapper.chmod(0o755)
        servers[label] = ServerProcess.start(tmp / "repo", *args.flags.split(), executable=str(wrapper))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, *ROW)).astype(np.float32)
    expected = x.reshape(1, -1)[:, :CLASSES]
    results: dict[tuple, list] = {}
    try:
        for rnd in range(args.rounds):
            for b in batches:
                model = f"standin_b{b}"
                for c in concurrency:
                    for client in clients:
                        for label, server in servers.items():
                            row = measure(server, model, client, c, args.seconds, x, expected,
                                          Wrk, closed_loop, make_calls)
                            results.setdefault((model, client, c, label), []).append(row)
                            print(f"round {rnd} {model} {client} c{c} {label}: " + ", ".join(
                                f"{k} {v:.3f}" for k, v in row.items()), flush=True)
    finally:
        for server in servers.values():
            server.stop()
    print("\n| point | server | server CPU ms / req | loop thread ms / req | client CPU ms / req | "
          "p50 ms | requests/s |\n|---|---|---|---|---|---|---|")
    for (model, client, c, label), rows in results.items():
        def span(key: str) -> str:
            values = sorted(r[key] for r in rows)
            return f"{values[0]:.3f}-{values[-1]:.3f} (med {np.median(values):.3f})"
        print(f"| {model} {client} c{c} | {label} | {span('server_ms')} | {span('loop_ms')} | {span('client_ms')} | "
              f"{span('p50_ms')} | {span('rps')} |")
    return 0


def measure(server, model: str, client: str, c: int, seconds: float, x: np.ndarray, expected: np.ndarray,
            Wrk, closed_loop, make_calls) -> dict[str, float]:
    pid = server.proc.pid
    if client == "wrk":
        wrk = Wrk(server.http, model, x)
        wrk.check(expected)
        wrk.run(c, 1)   # warm-up
        before, faults = cpu_by_thread(pid), minor_faults(pid)
        result = wrk.run(c, seconds)
        after, faults = cpu_by_thread(pid), minor_faults(pid) - faults
        wrk.close()
        n, lat, client_s = len(result.latencies_s), result.latencies_s, result.cpu_s
        elapsed = result.elapsed_s
    else:
        protocol = "http" if client == "raw" else "grpc"
        url = server.http if protocol == "http" else server.grpc

        async def load() -> tuple:
            calls, shared = make_calls(client, protocol, url, model, x, int(expected[0].argmax()), c)
            await closed_loop(calls, 0.3, warmup=0.0)   # connections up, server warm
            before, faults = cpu_by_thread(pid), minor_faults(pid)
            latencies, wall, cpu = await closed_loop(calls, seconds, warmup=0.0)
            after, faults = cpu_by_thread(pid), minor_faults(pid) - faults
            for call in calls:
                await call.close()
            if shared is not None:
                await shared.close()
            return before, after, faults, latencies, wall, cpu

        before, after, faults, lat, elapsed, client_s = asyncio.run(load())
        n = len(lat)
    server_s = sum(after.values()) - sum(v for k, v in before.items() if k in after)
    loop_s = after[pid] - before[pid]
    return {"server_ms": server_s / n * 1e3, "loop_ms": loop_s / n * 1e3, "client_ms": client_s / n * 1e3,
            "p50_ms": float(np.median(lat)) * 1e3, "rps": n / elapsed, "faults": faults / n}


if __name__ == "__main__":
    sys.exit(main())
