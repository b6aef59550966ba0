"""Remote devices over TVM's own RPC: a tracker, one `rpc_server` per device, the compiled module
uploaded to each and run there; a dataset sharded across every device registered under a key.

`tvmzoo device tracker` / `tvmzoo device serve` are thin wrappers over `python -m tvm.exec.rpc_tracker`
and `python -m tvm.exec.rpc_server`.
"""
from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError, ModuleError
from .runtime import CompiledModel, check_compatible, model_dir, read_meta

log = logging.getLogger(__name__)

DEFAULT_TRACKER_PORT = 9190
DEFAULT_SERVER_PORT = 9090


def parse_address(text: str, what: str) -> tuple[str, int]:
    host, sep, port = str(text).rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConfigError(f"{what} '{text}' is not host:port (e.g. 127.0.0.1:{DEFAULT_TRACKER_PORT}).")
    return host, int(port)


@dataclass(frozen=True)
class RemoteSpec:
    """Where the devices are: one server (`--rpc host:port`) or every server under a key at a tracker."""

    server: tuple[str, int] | None = None
    tracker: tuple[str, int] | None = None
    key: str | None = None

    @classmethod
    def from_args(cls, rpc: str | None = None, tracker: str | None = None,
                  key: str | None = None) -> RemoteSpec | None:
        if rpc is None and tracker is None:
            if key is not None:
                raise ConfigError("--rpc-key needs --rpc-tracker host:port (the tracker that knows the key).")
            return None
        if rpc is not None and tracker is not None:
            raise ConfigError("give --rpc host:port (one server) or --rpc-tracker host:port --rpc-key KEY, not both.")
        if tracker is not None and not key:
            raise ConfigError("--rpc-tracker needs --rpc-key KEY: the key the servers registered with "
                              "(tvmzoo device serve --key KEY).")
        if rpc is not None:
            return cls(server=parse_address(rpc, "--rpc"))
        return cls(tracker=parse_address(tracker, "--rpc-tracker"), key=key)

    def describe(self) -> str:
        if self.server:
            return f"rpc server {self.server[0]}:{self.server[1]}"
        return f"key '{self.key}' at tracker {self.tracker[0]}:{self.tracker[1]}"


def open_sessions(spec: RemoteSpec) -> list:
    """One RPC session per device: the server, or every free server under the key at the tracker."""
    from tvm import rpc

    where = spec.describe()
    try:
        if spec.server:
            return [rpc.connect(*spec.server)]
        tracker = rpc.connect_tracker(*spec.tracker)
        free = tracker.summary()["queue_info"].get(spec.key, {}).get("free", 0)
        if free == 0:
            raise ConfigError(f"no free device under {where}: start one with "
                              f"`tvmzoo device serve --tracker {spec.tracker[0]}:{spec.tracker[1]} --key {spec.key}`"
                              " (or wait for a busy one).")
        return [tracker.request(spec.key, max_retry=2) for _ in range(free)]
    except (OSError, RuntimeError) as exc:  # tvm's RPC raises RuntimeError / TVMError (a RuntimeError)
        raise ModuleError(f"cannot reach {where}: {str(exc).splitlines()[0]}. "
                          "Is the tracker / server running (tvmzoo device tracker / serve)?") from exc


def load_remote(prefix: str | Path, session) -> CompiledModel:
    """Upload the compiled module to the session's device and load it there."""
    from tvm import relax

    directory = model_dir(prefix)
    meta = read_meta(directory)
    check_compatible(meta, directory)
    session.upload(str(directory / "mod.so"))
    vm = relax.VirtualMachine(session.load_module("mod.so"), session.cpu())
    return CompiledModel(directory, meta, vm, device=session.cpu())


# ---------------------------------------------------------------- tvmzoo device tracker / serve


def tracker_command(host: str = "0.0.0.0", port: int = DEFAULT_TRACKER_PORT) -> list[str]:
    return [sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", host, "--port", str(port),
            "--port-end", str(port + 1)]


def serve_command(tracker: str | None, key: str | None, host: str = "0.0.0.0",
                  port: int = DEFAULT_SERVER_PORT) -> list[str]:
    # the server takes the first free port from `port` (several servers can share a host)
    cmd = [sys.executable, "-m", "tvm.exec.rpc_server", "--host", host, "--port", str(port),
           "--port-end", str(port + 100)]
    if tracker is not None:
        parse_address(tracker, "--tracker")
        if not key:
            raise ConfigError("--tracker needs --key KEY: the device kind clients ask the tracker for.")
        cmd += ["--tracker", tracker, "--key", key]
    return cmd


def exec_command(cmd: list[str]) -> None:
    """Become the TVM process (signals and exit code are its own)."""
    log.info("exec %s", " ".join(cmd))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(cmd[0], cmd)
