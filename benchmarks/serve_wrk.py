"""`wrk` (C, epoll) as serve_perf's HTTP load generator: Triton binary-tensor requests at a fixed number of
keep-alive connections, each sending its next request when the answer is in (perf_analyzer's closed loop),
so the client takes little of the cores the server shares with it (the Python clients cost ~0.2-0.3 ms of CPU
per request, wrk a fraction of it). The request (JSON header + tensor) is written once to a file the Lua
script loads; the script counts answers that are not 200 or not the size of the checked one, and reports
wrk's latency histogram (1 us buckets) so serve_perf takes the same percentiles as for its other clients.

wrk sends one body to every connection (no per-client tag), so before it is used `check` sends one request
and compares the answer's logits with `CompiledModel.run`'s. gRPC's counterpart is benchmarks/serve_grpc_cpp.py
(perf_analyzer is not installable here; ghz, a Go tool, is neither packaged nor buildable without a Go toolchain).

`shared_memory="system"` (perf_analyzer's --shared-memory system): the input and output are in regions registered
once (serve_load.ShmRegions), so every request is the JSON header alone. wrk sends one body on every connection,
so all connections share the one pair of regions (the server only reads the input; the answers are equal).
"""
from __future__ import annotations

import json
import math
import os
import resource
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from serve_load import ShmRegions, on_cores

SCRIPT = r"""
local dir = os.getenv("SERVE_WRK_DIR")
local f = assert(io.open(dir .. "/body", "rb"))
wrk.method = "POST"
wrk.body = f:read("*all")
f:close()
wrk.headers["Content-Type"] = "application/octet-stream"
wrk.headers["Inference-Header-Content-Length"] = os.getenv("SERVE_WRK_HEADER")
local expected = tonumber(os.getenv("SERVE_WRK_ANSWER_BYTES") or "-1")
local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  bad, answered = 0, 0
end

function response(status, headers, body)
  answered = answered + 1
  if answered == 1 and expected < 0 then   -- the check: keep the first answer
    local out = assert(io.open(dir .. "/answer", "wb"))
    out:write(tostring(status), "\n", headers["Inference-Header-Content-Length"] or "-1", "\n", body)
    out:close()
  elseif status ~= 200 or (expected >= 0 and #body ~= expected) then
    bad = bad + 1
  end
end

function done(summary, latency, requests)
  local n_bad = 0
  for _, t in ipairs(threads) do n_bad = n_bad + t:get("bad") end
  local buckets = {}
  for i = 1, #latency do   -- the distinct latencies (us) and how many requests took each
    local us, count = latency(i)
    table.insert(buckets, string.format("%d:%d", us, count))
  end
  local e = summary.errors
  io.write(string.format("SERVE_WRK %d %d %d %d %s\n", summary.requests, summary.duration, n_bad,
                         e.connect + e.read + e.write + e.status + e.timeout, table.concat(buckets, ",")))
end
"""


def available() -> bool:
    return shutil.which("wrk") is not None


@dataclass
class WrkResult:
    latencies_s: np.ndarray     # one per answered request
    elapsed_s: float
    cpu_s: float                # wrk's user + system CPU
    user_s: float


class Wrk:
    """One build's request, ready to be sent by wrk to `address` (host:port)."""

    def __init__(self, address: str, model: str, x: np.ndarray, shared_memory: str = "none",
                 cpus: frozenset[int] | None = None) -> None:
        """`cpus`: the cores wrk runs on (None: this process's)."""
        self.cpus = cpus
        self.url = f"http://{address}/v2/models/{model}/infer"
        self.dir = Path(tempfile.mkdtemp(prefix="serve_wrk_"))
        self.shm = ShmRegions("http", address, model, x, "wrk") if shared_memory == "system" else None
        if self.shm is None:
            header = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape),
                                             "parameters": {"binary_data_size": x.nbytes}}],
                                 "parameters": {"binary_data_output": True}}).encode()
            body = header + np.ascontiguousarray(x, np.float32).tobytes()
        else:
            body = header = json.dumps({"inputs": [{"name": self.shm.input, "datatype": "FP32", "shape": list(x.shape),
                                                    "parameters": {"shared_memory_region": self.shm.names[0],
                                                                   "shared_memory_byte_size": self.shm.in_bytes}}],
                                        "outputs": [{"name": self.shm.output, "parameters": {
                                            "shared_memory_region": self.shm.names[1],
                                            "shared_memory_byte_size": self.shm.out_bytes}}]}).encode()
        (self.dir / "body").write_bytes(body)
        (self.dir / "script.lua").write_text(SCRIPT)
        self.env = {"SERVE_WRK_DIR": str(self.dir), "SERVE_WRK_HEADER": str(len(header))}
        self.answer_bytes = -1

    def check(self, expected: np.ndarray) -> None:
        """One request; its logits must equal `expected` (CompiledModel.run on the same input) exactly."""
        self.run(1, 1.0, checked=False)
        status, json_length, body = (self.dir / "answer").read_bytes().split(b"\n", 2)
        if status != b"200":
            raise AssertionError(f"wrk's request was answered {status.decode()}: {body[:300]!r}")
        json_length = len(body) if self.shm else int(json_length)
        doc = json.loads(body[:json_length])
        logits = self.shm.logits() if self.shm else body[json_length:]
        logits = np.frombuffer(logits, np.float32).reshape(doc["outputs"][0]["shape"])
        np.testing.assert_array_equal(logits, expected)
        self.answer_bytes = len(body)

    def run(self, connections: int, seconds: float, checked: bool = True) -> WrkResult:
        """`connections` keep-alive clients for `seconds` (whole seconds: wrk's unit)."""
        if checked and self.answer_bytes < 0:
            raise RuntimeError("Wrk.check first: wrk's answers carry no tag")
        env = {**self.env, "SERVE_WRK_ANSWER_BYTES": str(self.answer_bytes if checked else -1)}
        cmd = [*on_cores(self.cpus), "wrk", "-t1", f"-c{connections}", f"-d{max(1, math.ceil(seconds))}s",
               "--timeout", "30s",
               "-s", str(self.dir / "script.lua"), self.url]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env}, timeout=seconds + 60)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        line = next((ln for ln in done.stdout.splitlines() if ln.startswith("SERVE_WRK ")), None)
        if done.returncode or line is None:
            raise RuntimeError(f"wrk failed ({done.returncode}): {done.stdout[-500:]} {done.stderr[-500:]}")
        _, count, duration_us, bad, errors, buckets = (line.split(" ") + [""])[:6]
        if int(bad) or int(errors):
            raise AssertionError(f"wrk: {bad} wrong answers, {errors} errors of {count} requests:\n{done.stdout}")
        pairs = [item.split(":") for item in buckets.split(",") if item]
        latencies = np.repeat([int(us) * 1e-6 for us, _ in pairs], [int(n) for _, n in pairs])
        return WrkResult(latencies, int(duration_us) * 1e-6,
                         after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime,
                         after.ru_utime - before.ru_utime)

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        if self.shm is not None:
            self.shm.close()

