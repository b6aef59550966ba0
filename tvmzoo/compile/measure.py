"""Where and how candidate schedules are measured: MetaSchedule's builder and runner, on this
machine or with a `RemoteSpec` on TVM RPC devices (through a tracker, one measurement per free
device at a time, or on one server)."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from tvm.s_tir import meta_schedule as ms

from ..errors import ConfigError, ModuleError
from ..run.host import request_amx

if TYPE_CHECKING:
    import tvm
    from tvm.ir import IRModule
    from tvm.target import Target

    from ..run.devices import RemoteSpec

log = logging.getLogger(__name__)

# MetaSchedule's 30 s default kills builds on a busy 2-core machine (a worker importing tvm
# alone takes ~5 s there).
BUILD_TIMEOUT_S = 120.0


def make_builder() -> ms.builder.LocalBuilder:
    """MetaSchedule's LocalBuilder (fresh worker processes for every batch of candidates), building
    with `build_candidate`."""
    return ms.builder.LocalBuilder(timeout_sec=BUILD_TIMEOUT_S, f_build=build_candidate)


def build_candidate(mod: IRModule, target: Target, _params: dict | None) -> tvm.runtime.Module:
    """MetaSchedule's default_build without its `import tvm.s_tir.tensor_intrin`: candidates arrive
    scheduled, tensorized and post-processed, so building needs no intrinsic registered. That import
    parses every target's intrinsics (CUDA, ROCm, Arm ...) from TVMScript and cost each fresh builder
    worker ~25 s of a 2-core machine's CPU, per batch. Module level: the workers import it by name."""
    from tvm.driver import build as tvm_build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    return tvm_build(RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod), target=target)


def make_runner(remote: RemoteSpec | None = None) -> ms.runner.Runner:
    """Where candidates are measured: this machine, or the RPC device(s) of `remote`."""
    if remote is None:
        # its worker processes run AMX kernels (the default schedules seeded into tuning) where the CPU has AMX
        return ms.runner.LocalRunner(timeout_sec=BUILD_TIMEOUT_S, initializer=request_amx)
    if remote.server is not None:  # no tracker: RPCConfig's tracker fields carry the server's address
        config = ms.runner.RPCConfig(*remote.server, "server", session_timeout_sec=int(BUILD_TIMEOUT_S))
        return ms.runner.RPCRunner(config, f_create_session=connect_server, max_workers=1)
    devices = _count_devices(remote)
    log.info("measuring on %d device(s) under %s", devices, remote.describe())
    config = ms.runner.RPCConfig(*remote.tracker, remote.key, session_timeout_sec=int(BUILD_TIMEOUT_S))
    return ms.runner.RPCRunner(config, max_workers=devices)  # one measurement per device at a time


def _count_devices(remote: RemoteSpec) -> int:
    """Servers registered under the key (busy or free), as MetaSchedule's RPCConfig counts them."""
    from tvm import rpc

    try:
        servers = rpc.connect_tracker(*remote.tracker).summary()["server_info"]
    except (OSError, RuntimeError) as exc:  # tvm's RPC raises RuntimeError / TVMError (a RuntimeError)
        raise ModuleError(f"cannot reach {remote.describe()}: {str(exc).splitlines()[0]}. "
                          "Is the tracker running (tvmzoo device tracker)?") from exc
    devices = sum(1 for server in servers if server["key"].partition(":")[2] == remote.key)
    if devices == 0:
        raise ConfigError(f"no device under {remote.describe()} to measure on: start one with "
                          f"`tvmzoo device serve --tracker {remote.tracker[0]}:{remote.tracker[1]} "
                          f"--key {remote.key}`.")
    return devices


def connect_server(config: ms.runner.RPCConfig):
    """RPCRunner's session factory for one server (`--rpc host:port`, no tracker); module level:
    MetaSchedule's worker processes import it by name."""
    from tvm import rpc

    return rpc.connect(config.tracker_host, config.tracker_port, session_timeout=config.session_timeout_sec)
