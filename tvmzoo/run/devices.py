"""Remote devices over TVM's own RPC: a tracker, one `rpc_server` per device, the compiled module
uploaded to each and run there; a dataset sharded across every device registered under a key.

`tvmzoo device tracker` / `tvmzoo device serve` are thin wrappers over `python -m tvm.exec.rpc_tracker`
and `python -m tvm.exec.rpc_server` (through tvmzoo.run.rpc_server, which asks for AMX state first).
"""
from __future__ import annotations

import ipaddress
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError, ModuleError
from .runtime import MODULE_FILE, CompiledModel, check_compatible, check_module_file, model_dir, read_meta

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
                raise ConfigError("--rpc-key needs --rpc-tracker host:port (the tracker that knows the key) "
                                  "or --rpc host:port (a server started with that --key).")
            return None
        if rpc is not None and tracker is not None:
            raise ConfigError("give --rpc host:port (one server) or --rpc-tracker host:port --rpc-key KEY, not both.")
        if tracker is not None and not key:
            raise ConfigError("--rpc-tracker needs --rpc-key KEY: the key the servers registered with "
                              "(tvmzoo device serve --key KEY).")
        if rpc is not None:
            return cls(server=parse_address(rpc, "--rpc"), key=key)
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
            return [rpc.connect(*spec.server, key=spec.key or "")]
        tracker = rpc.connect_tracker(*spec.tracker)
        free = tracker.summary()["queue_info"].get(spec.key, {}).get("free", 0)
        if free == 0:
            raise ConfigError(f"no free device under {where}: start one with "
                              f"`tvmzoo device serve --tracker {spec.tracker[0]}:{spec.tracker[1]} --key {spec.key}`"
                              " (or wait for a busy one).")
        return [tracker.request(spec.key, max_retry=2) for _ in range(free)]
    except (OSError, RuntimeError) as exc:  # tvm's RPC raises RuntimeError / TVMError (a RuntimeError)
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if spec.server and "matches key" in first:  # TVM: "... cannot find server that matches key=client:..."
            raise ModuleError(f"cannot reach {where}: it refused the key; a server started with --key accepts "
                              "only clients with the same --rpc-key.") from exc
        raise ModuleError(f"cannot reach {where}: {first}. "
                          "Is the tracker / server running (tvmzoo device tracker / serve)?") from exc


def checked_module(prefix: str | Path) -> tuple[Path, dict, bytes]:
    """The module's directory, mod.json and mod.so bytes, refused like a local load (versions, CPU
    features, sha256) before anything is sent: the bytes uploaded are the bytes checked."""
    directory = model_dir(prefix)
    meta = read_meta(directory)
    check_compatible(meta, directory)
    check_module_file(meta, directory)           # missing or damaged: a clear error
    data = (directory / MODULE_FILE).read_bytes()
    check_module_file(meta, directory, data)     # and not replaced since
    return directory, meta, data


def load_remote(prefix: str | Path, session) -> CompiledModel:
    """Upload the compiled module to the session's device and load it there."""
    from tvm import relax

    directory, meta, data = checked_module(prefix)
    session.upload(bytearray(data), MODULE_FILE)
    vm = relax.VirtualMachine(session.load_module(MODULE_FILE), session.cpu())
    return CompiledModel(directory, meta, vm, device=session.cpu())


# ---------------------------------------------------------------- tvmzoo device tracker / serve


def warn_if_exposed(host: str, port: int, what: str) -> bool:
    """Log a warning when `host` is not a loopback address: a TVM RPC server runs what any client that
    reaches it sends (uploads, downloads, loads shared libraries); a tracker hands its servers out."""
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        log.warning("the %s listens on %s: any machine that can reach this port can %s. Use it only on a "
                    "trusted network, or keep the default 127.0.0.1 and reach it through an SSH tunnel "
                    "(ssh -N -L %d:127.0.0.1:%d user@this-host); see docs/runstream.md.", what, host,
                    "run code on this machine as this user" if what == "RPC server" else
                    "ask it for the devices registered here and use them", port, port)
    return not loopback


def tracker_command(host: str = "127.0.0.1", port: int = DEFAULT_TRACKER_PORT) -> list[str]:
    warn_if_exposed(host, port, "RPC tracker")
    return [sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", host, "--port", str(port),
            "--port-end", str(port + 1)]


def serve_command(tracker: str | None, key: str | None, host: str = "127.0.0.1",
                  port: int = DEFAULT_SERVER_PORT) -> list[str]:
    """Without a tracker, a --key makes TVM's server accept only clients that send the same key
    (`--rpc host:port --rpc-key KEY`); through a tracker the key only names the device kind."""
    # the server takes the first free port from `port` (several servers can share a host)
    cmd = [sys.executable, "-m", "tvmzoo.run.rpc_server", "--host", host, "--port", str(port),  # AMX allowed
           "--port-end", str(port + 100)]
    if tracker is not None:
        parse_address(tracker, "--tracker")
        if not key:
            raise ConfigError("--tracker needs --key KEY: the device kind clients ask the tracker for.")
        cmd += ["--tracker", tracker]
    if key:
        cmd += ["--key", key]
    warn_if_exposed(host, port, "RPC server")
    return cmd


def exec_command(cmd: list[str]) -> None:
    """Become the TVM process (signals and exit code are its own)."""
    log.info("exec %s", " ".join(cmd))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(cmd[0], cmd)
