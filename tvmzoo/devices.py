"""Remote devices over TVM's own RPC: a tracker, one `rpc_server` per device, the compiled module
uploaded to each and run there; a dataset sharded across every device registered under a key.

`tvmzoo device tracker` / `tvmzoo device serve` are thin wrappers over `python -m tvm.exec.rpc_tracker`
and `python -m tvm.exec.rpc_server`.
"""
from __future__ import annotations

import logging
import math
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from .errors import ConfigError, ModuleError
from .preprocess import Preprocessing
from .results import Prediction
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


@dataclass
class ShardedRun:
    predictions: list[Prediction]
    failed: list[tuple[str, str]]
    seconds: float
    devices: int
    reassigned: int             # shards re-run on another device after theirs dropped out


def classify_sharded(prefix: str | Path, paths: Sequence[Path], pre: Preprocessing, spec: RemoteSpec, *,
                     batch: int = 1, shard_size: int | None = None, progress: bool = True,
                     on_prediction: Callable[[Prediction], None] | None = None) -> ShardedRun:
    """Classify `paths` across every device of `spec`; results in input order. Shards are handed out
    from one queue; a device that fails puts its unfinished shard back for another device, and a
    shard's results count only once it completes, so nothing is lost or duplicated."""
    from .runner import classify

    sessions = open_sessions(spec)
    size = shard_size or max(batch, min(256, math.ceil(len(paths) / (4 * len(sessions)))))
    shards = [list(paths[i:i + size]) for i in range(0, len(paths), size)]
    log.info("%d images in %d shards on %d device(s) under %s", len(paths), len(shards), len(sessions),
             spec.describe())
    todo: queue.Queue[int] = queue.Queue()
    for index in range(len(shards)):
        todo.put(index)
    done: dict[int, object] = {}
    lock = threading.Lock()
    reassigned = 0
    bar = tqdm(total=len(paths), disable=not progress or len(paths) < 20, unit="img")

    def device_loop(number: int, session) -> None:
        nonlocal reassigned
        try:
            model = load_remote(prefix, session)
        except Exception as exc:  # noqa: BLE001 - a device that cannot load the module takes no shard
            log.warning("device %d: cannot load the module (%s); continuing without it", number, exc)
            return
        while len(done) < len(shards):
            try:
                index = todo.get(timeout=0.1)
            except queue.Empty:
                continue
            try:
                summary = classify(model, shards[index], pre, batch=batch, progress=False, isolate_failures=False)
            except Exception as exc:  # noqa: BLE001 - TVM's RPC errors have no common type
                with lock:
                    reassigned += 1
                todo.put(index)
                log.warning("device %d dropped out (%s); its shard of %d images goes to another device",
                            number, str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
                            len(shards[index]))
                return
            with lock:
                done[index] = summary
                bar.update(len(shards[index]))
                if on_prediction is not None:
                    for pred in summary.predictions:
                        on_prediction(pred)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=device_loop, args=(n, s), daemon=True) for n, s in enumerate(sessions)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    bar.close()
    if len(done) < len(shards):
        missing = sum(len(shards[i]) for i in range(len(shards)) if i not in done)
        raise ModuleError(f"every device under {spec.describe()} dropped out; {missing} images were not "
                          "classified. Restart the servers and run again with --resume to finish.")
    ordered = [done[i] for i in range(len(shards))]
    return ShardedRun([p for s in ordered for p in s.predictions], [f for s in ordered for f in s.failed],
                      time.perf_counter() - t0, len(sessions), reassigned)


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
