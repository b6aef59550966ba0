"""The Python side of the native gRPC front (native/grpcfront/front.cc, `tvmzoo serve --native`): the C++ server
listens on the public gRPC port and answers the plain tensor infers (raw, or in a registered system shared memory
region) of the models native engines serve; every other call, and every other stream message, it forwards
unchanged to the Python grpc.aio server (grpc_service.py), which listens on a unix socket in a private folder
instead. One implementation of auth, metadata, errors, shared memory registration, statistics and health:
Python's."""
from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
from pathlib import Path

from .metrics import Metrics, native_counts
from .native.grpcfront import Unavailable, engine_library
from .native.grpcfront import load as load_front
from .repository import Repository

log = logging.getLogger(__name__)
DATATYPE_BYTES = {"FP32": 4, "UINT8": 1}   # ModelEntry.input_datatype's


def load_module():
    """The front's module, or None (logged once, with why) where it cannot be built: Python keeps the port."""
    try:
        return load_front()
    except Unavailable as exc:
        log.warning("--native: gRPC stays on the Python server: the native gRPC front cannot be built: %s (%s)",
                    exc.reason, exc.fix)
        return None


class GrpcFront:
    """The C++ server on the public port, forwarding to a Python server at `private_address`."""

    def __init__(self, module, engines: dict[str, int], repository: Repository, metrics: Metrics,
                 max_request_bytes: int, auth_token: str | None) -> None:
        """`engines`: the native engines' handles by model (ServerState.native_engines)."""
        self.module = module
        self.folder = Path(tempfile.mkdtemp(prefix="tvmzoo-grpc-"))   # mode 0700: only this user reaches Python
        self.private_address = f"unix:{self.folder / 'grpc.sock'}"
        self.handle = module.grpc_front_create(self.private_address, max_request_bytes, auth_token is not None,
                                               auth_token or "")
        library = str(engine_library())
        for name, engine in engines.items():
            entry = repository.models[name]
            if not module.grpc_front_add_model(self.handle, library, engine, name, entry.input_name,
                                               entry.input_datatype, list(entry.row_shape),
                                               DATATYPE_BYTES[entry.input_datatype], entry.output_name):
                log.info("model %s: its %s tensors are converted for the module: gRPC infers stay with Python",
                         name, entry.input_datatype)
                continue
            metrics.count_elsewhere(name, lambda engine=engine: self.stats(engine), front="grpc_native")

    def start(self, host: str, port: int, receive_limit: int, max_connections: int, idle_timeout: float) -> int:
        """Listen on host:port (0: any free port); returns the port. OSError when it cannot."""
        try:
            return self.module.grpc_front_start(self.handle, host, port, receive_limit, max_connections,
                                                int(idle_timeout * 1000))
        except RuntimeError as exc:
            raise OSError(str(exc)) from None

    def add_region(self, name: str, fd: int, offset: int, byte_size: int) -> None:
        """A system shared memory registration (SharedMemoryRegions.mirror); where the descriptor cannot be
        duplicated, the region's requests stay with Python."""
        try:
            self.module.grpc_front_add_region(self.handle, name, fd, offset, byte_size)
        except RuntimeError as exc:
            log.warning("%s: its gRPC infers stay on the Python server", exc)

    def remove_region(self, name: str) -> None:
        self.module.grpc_front_remove_region(self.handle, name)

    def stats(self, engine: int) -> list[float]:
        """success count, summed request duration (us), pending, last success (time.time())."""
        return native_counts(self.module.grpc_front_stats(self.handle, engine))

    async def drain(self, seconds: float) -> None:
        """Stop accepting, end the streams, let every call finish (forwarded ones too: the Python server still
        answers them); past `seconds` grpc cancels what is left."""
        await asyncio.get_running_loop().run_in_executor(None, self.module.grpc_front_drain, self.handle,
                                                         float(seconds))

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
