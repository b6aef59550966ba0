"""benchmarks/grpc_load.cc (C++, grpc::GenericStub, one completion-queue thread) as serve_perf's gRPC load
generator, the counterpart of wrk for HTTP: a fixed number of slots, each sending its next request when the answer
is in (perf_analyzer's closed loop), unary ModelInfer or one ModelStreamInfer stream per slot (perf_analyzer
--streaming). The Python clients (serve_load.py `raw` / `stream`, grpcio with prebuilt bytes) cost 0.3-0.56 ms of
CPU per 602 KB request on the cores the server shares with them; this one takes a fraction of it.

The request is serve_load's `raw` request (one serialized ModelInferRequest, built once here), written to a
file the program reads; with `shared_memory="system"` (perf_analyzer --shared-memory system) its input and output
are in one pair of registered regions that every slot shares (as wrk's), the request only their names. It checks
every answer (gRPC status, the stream's error_message, the request's id, the output's size against its shape, the
first row's top class; with shared memory the output region's after the run) and reports wrong ones as errors,
never as throughput. The program is compiled on first use with g++ and pkg-config's grpc++ (Debian: apt-get install
g++ pkg-config libgrpc++-dev) into ~/.cache/tvmzoo/grpc_load (XDG_CACHE_HOME), one binary per source version.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from serve_load import ShmRegions, _infer_request, on_cores

SOURCE = Path(__file__).with_name("grpc_load.cc")
FLAGS = ["-O2", "-std=c++17"]
INSTALL = "apt-get install g++ pkg-config libgrpc++-dev"


def missing() -> str | None:
    """Why the program cannot be built here (one line), or None."""
    for tool in ("g++", "pkg-config"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed ({INSTALL})"
    if subprocess.run(["pkg-config", "--exists", "grpc++"]).returncode:
        return f"libgrpc++ is not installed: pkg-config finds no grpc++ ({INSTALL})"
    return None


def available() -> bool:
    return missing() is None


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tvmzoo" / "grpc_load"


def build() -> Path:
    """The program, compiled once per source and flags into cache_dir() (temp path, then rename)."""
    if reason := missing():
        raise RuntimeError(f"cannot build {SOURCE.name}: {reason}")
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode()).hexdigest()[:12]
    binary = cache_dir() / f"grpc_load-{digest}"
    if binary.is_file():
        return binary
    binary.parent.mkdir(parents=True, exist_ok=True)
    libs = subprocess.run(["pkg-config", "--cflags", "--libs", "grpc++"], capture_output=True, text=True,
                          check=True).stdout.split()
    fd, tmp = tempfile.mkstemp(dir=binary.parent, prefix=".grpc_load-")
    os.close(fd)
    try:
        done = subprocess.run(["g++", *FLAGS, "-o", tmp, str(SOURCE), *libs], capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"g++ failed on {SOURCE}: {done.stderr.strip()[-1500:]}")
        os.replace(tmp, binary)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return binary


@dataclass
class GrpcLoadResult:
    requests: int               # answered and checked within the measured seconds
    errors: int                 # the whole run, warm-up included
    first_error: str
    latencies_s: np.ndarray     # one per counted request
    elapsed_s: float
    cpu_s: float                # the program's user + system CPU over the measured seconds
    user_s: float

    def raise_errors(self) -> None:
        if self.errors:
            raise AssertionError(f"grpc_load: {self.errors} errors ({self.requests} right answers); the first: "
                                 f"{self.first_error}")


class GrpcLoad:
    """One build's request, ready to be sent by grpc_load to `address` (host:port)."""

    def __init__(self, address: str, model: str, x: np.ndarray, top: int, stream: bool = False,
                 tag: str = "cpp", connections: int = 1, shared_memory: str = "none",
                 cpus: frozenset[int] | None = None) -> None:
        """`connections`: the slots share them (1: one, as tritonclient's cached channel); `cpus`: the cores
        grpc_load runs on (None: this process's)."""
        self.cpus = cpus
        self.address, self.top, self.stream, self.connections = address, top, stream, connections
        self.program = build()
        x = np.ascontiguousarray(x, np.float32)
        self.shm = ShmRegions("grpc", address, model, x, tag) if shared_memory == "system" else None
        self.dir = Path(tempfile.mkdtemp(prefix="serve_grpc_cpp_"))
        self.request = self.dir / "request.pb"
        self.request.write_bytes(_infer_request(model, x, tag, self.shm))

    def run(self, concurrency: int, seconds: float, warmup: float = 0.0, checked: bool = True) -> GrpcLoadResult:
        """`concurrency` slots for `warmup` + `seconds`; `checked`: a wrong answer raises AssertionError."""
        cmd = [*on_cores(self.cpus), str(self.program), "--address", self.address,
               "--request", str(self.request),
               "--concurrency", str(concurrency), "--seconds", str(seconds), "--warmup", str(warmup),
               "--top", str(self.top), "--channels", str(self.connections), *(["--stream"] if self.stream else []),
               *(["--output-in-shm"] if self.shm else [])]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + warmup + 120)
        if done.returncode:
            raise RuntimeError(f"grpc_load failed ({done.returncode}): {done.stderr.strip()[-500:]}")
        out = json.loads(done.stdout)
        result = GrpcLoadResult(out["requests"], out["errors"], out["first_error"],
                              np.asarray(out["latencies_us"], float) * 1e-6, out["seconds"], out["cpu_s"],
                              out["user_s"])
        if checked:
            result.raise_errors()
            if self.shm and result.requests and int(np.frombuffer(self.shm.logits(), np.float32).reshape(
                    self.shm.out_shape)[0].argmax()) != self.top:
                raise AssertionError("grpc_load: the output region's first row is not the expected class")
        return result

    def close(self) -> None:
        if self.shm is not None:
            self.shm.close()
        shutil.rmtree(self.dir, ignore_errors=True)
