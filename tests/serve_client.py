"""Test helpers for `tvmzoo serve`: start the real CLI on free 127.0.0.1 ports (port 0, the server
prints what it got), wait for its ready line, and stop it; Prometheus scrapes as numbers."""
from __future__ import annotations

import os
import queue
import socket
import re
import signal
import subprocess
import sys
import threading
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

HOST, FUSED, BROKEN, OTHER_CPU = "tiny_b4", "tiny_fused", "broken", "other_cpu"   # the builds of serve_repo
READY = re.compile(r"HTTP \S+:(\d+), gRPC \S+:(\d+)")   # any --host; clients connect to 127.0.0.1


@dataclass
class ServerProcess:
    proc: subprocess.Popen
    http: str = ""
    grpc: str = ""
    lines: list[str] = field(default_factory=list)
    _queue: queue.Queue = field(default_factory=queue.Queue)

    @classmethod
    def start(cls, repository: Path, *flags: str, timeout: float = 60.0, executable: str | None = None,
              under: tuple[str, ...] = ()) -> ServerProcess:
        """`executable`: another checkout's `tvmzoo` (default: this interpreter's); `under`: a command it runs
        under (`("taskset", "-c", "1")`)."""
        cmd = [*under, executable or str(Path(sys.executable).parent / "tvmzoo"), "serve", str(repository),
               "--http-port", "0", "--grpc-port", "0", *flags]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "TVM_NUM_THREADS": os.environ.get("TVM_NUM_THREADS", "2")})
        server = cls(proc)
        threading.Thread(target=server._read, daemon=True).start()
        match = server.wait_for(READY, timeout)
        server.http, server.grpc = f"127.0.0.1:{match[1]}", f"127.0.0.1:{match[2]}"
        return server

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for(self, pattern: re.Pattern, timeout: float) -> re.Match:
        """The first output line matching `pattern` (all lines are kept in self.lines)."""
        while True:
            try:
                line = self._queue.get(timeout=timeout)
            except queue.Empty:
                self.stop()
                raise AssertionError(f"no line matching {pattern.pattern} in {timeout} s:\n" + "\n".join(self.lines))
            if line is None:
                raise AssertionError(f"server exited ({self.proc.wait()}):\n" + "\n".join(self.lines))
            self.lines.append(line)
            match = pattern.search(line)
            if match:
                return match

    def output(self) -> str:
        """Everything the server printed so far (for a failure's message)."""
        exited = self.proc.poll() is not None   # then the reader ends soon: wait for its last lines
        while True:
            try:
                line = self._queue.get(timeout=5.0) if exited else self._queue.get_nowait()
            except queue.Empty:
                break
            if line is None:
                break
            self.lines.append(line)
        return "\n".join(self.lines)

    def terminate(self) -> None:
        self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.terminate()
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()


def scrape(http: str, model: str, headers: dict | None = None) -> dict[str, float]:
    """Every sample of `model` on /metrics, by name (failures summed over reasons)."""
    request = urllib.request.Request(f"http://{http}/metrics", headers=headers or {})
    with urllib.request.urlopen(request, timeout=10) as response:
        text = response.read().decode()
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("model") == model:
                values[sample.name] = values.get(sample.name, 0.0) + sample.value
    return values


@asynccontextmanager
async def loopback_http_server(app, max_body: int) -> AsyncIterator[tuple[str, int]]:
    """http_server.HttpServer with `app`, in this process on a free 127.0.0.1 port: its (host, port)."""
    from tvmzoo.run.serve import http_server

    server = http_server.HttpServer(app, max_body=max_body)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    await server.listen([sock])
    try:
        yield sock.getsockname()
    finally:
        server.stop()
        await server.close_all_connections()
