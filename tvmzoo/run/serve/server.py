"""Start the model repository, the HTTP and gRPC front ends on one asyncio loop, and stop gracefully:
on SIGTERM (or SIGINT) stop listening, refuse new requests (503 / UNAVAILABLE), let every accepted
request finish (up to --drain-seconds), then stop the model instances and exit."""
from __future__ import annotations

import asyncio
import logging
import os
import resource
import signal
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import tornado.netutil

try:   # libuv's event loop: ~10 % less CPU per request in the loop (docs/serving-performance.md)
    import uvloop
except ImportError:   # not built for this platform (Windows): asyncio's own loop
    uvloop = None

from ... import __version__

from ...errors import ConfigError
from .config import ServeConfig
from .grpc_native import GrpcFront, load_module as load_grpc_front
from .grpc_service import make_server, receive_limit
from .http_app import HttpApp
from .http_pump import Pump
from .http_server import HttpServer
from .inference import Inference
from .metrics import Metrics
from .native import load as load_native
from .native.batcher import NativeBatcher
from .repository import Repository
from .shared_memory import SharedMemoryRegions
from .state import AppState

log = logging.getLogger(__name__)


DESCRIPTORS_BESIDES_CONNECTIONS = 64   # listening sockets, modules, pools' pipes, logs


def ensure_descriptors(max_connections: int) -> int:
    """Raise this process's soft open-file limit (up to the hard one) to what --max-connections can take:
    HTTP's connections and as many lingering refusals, gRPC's connections. Past the limit accept() fails
    (EMFILE) for every client, not only the one too many; a common soft limit is 1024. Returns the soft
    limit now in force (a warning says how to fix it when it stays short)."""
    needed = 3 * max_connections + DESCRIPTORS_BESIDES_CONNECTIONS
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        wanted = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        if wanted > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        if soft < needed:
            log.warning("open-file limit %d is under the %d that --max-connections %d can use (hard limit %d): "
                        "past it every new client fails to connect; raise `ulimit -n` or lower --max-connections",
                        soft, needed, max_connections, hard)
    return soft


def _grpc_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Server:
    def __init__(self, cfg: ServeConfig) -> None:
        self.cfg = cfg
        self.metrics = Metrics.create()
        self.repository = Repository.load(cfg, self.metrics)
        self.decode_pool = ThreadPoolExecutor(os.cpu_count() or 2, thread_name_prefix="decode")
        self.shared_memory = SharedMemoryRegions(cfg.max_request_bytes, cfg.shared_memory_on,
                                                 cfg.shared_memory_why)
        self.inference = Inference(self.repository, self.metrics, self.decode_pool, cfg.max_image_pixels,
                                   self.shared_memory)
        self.state = AppState(self.repository, self.inference, self.metrics, __version__, cfg.auth_token,
                              cfg.max_request_bytes, cfg.max_json_bytes, self.shared_memory)
        self.http = None
        self.pump: Pump | None = None
        self.grpc = None
        self.grpc_front: GrpcFront | None = None
        self.ports: tuple[int, int] = (0, 0)

    async def start(self) -> tuple[int, int]:
        """Listen on both front ends; returns the (HTTP, gRPC) ports (useful with port 0)."""
        ensure_descriptors(self.cfg.max_connections)
        self.http = HttpServer(HttpApp(self.state), self.cfg.max_request_bytes, self.cfg.idle_timeout_seconds,
                               self.cfg.max_connections)
        try:   # tornado binds every address of the host on one port (port 0 too)
            sockets = tornado.netutil.bind_sockets(self.cfg.http_port, address=self.cfg.host)
        except OSError as exc:
            raise ConfigError(f"cannot listen for HTTP on {self.cfg.host}:{self.cfg.http_port} ({exc.strerror}); "
                              "pick another --http-port (0: any free one) or --host.") from None
        self._start_pump()
        await self.http.listen(sockets)
        try:
            grpc_port = await self._start_grpc()
        except (OSError, RuntimeError) as exc:
            self.http.stop()
            raise ConfigError(f"cannot listen for gRPC on {self.cfg.host}:{self.cfg.grpc_port} ({exc}); "
                              "pick another --grpc-port (0: any free one) or --host.") from None
        self.ports = (sockets[0].getsockname()[1], grpc_port)
        return self.ports

    async def _start_grpc(self) -> int:
        """The Python gRPC server on the public port, or (--native, libgrpc++ at hand) on a private unix socket
        behind the native gRPC front."""
        cfg = self.cfg
        module = load_grpc_front() if self.state.native_engines else None
        if module is not None:
            self.grpc_front = GrpcFront(module, self.state.native_engines, self.repository, self.metrics,
                                        cfg.max_request_bytes, cfg.auth_token)
            self.shared_memory.mirror(self.grpc_front)
        address = self.grpc_front.private_address if self.grpc_front else _grpc_address(cfg.host, cfg.grpc_port)
        self.grpc, port = make_server(self.state, address, cfg.max_request_bytes, cfg.idle_timeout_seconds,
                                      cfg.max_connections)
        await self.grpc.start()
        if self.grpc_front:
            port = self.grpc_front.start(cfg.host, cfg.grpc_port, receive_limit(cfg.max_request_bytes),
                                         cfg.max_connections, cfg.idle_timeout_seconds)
        return port

    def _start_pump(self) -> None:
        """--native: the HTTP pump answers the repeated binary-tensor requests of the models native engines serve."""
        engines = {name: entry.batcher.handle for name, entry in self.repository.models.items()
                   if isinstance(entry.batcher, NativeBatcher)}
        if not engines:
            return
        self.pump = self.http.pump = Pump(load_native(), self.cfg.idle_timeout_seconds, self.http.adopt)
        self.shared_memory.mirror(self.pump)
        self.pump.start()
        self.state.native_engines.update(engines)
        for name, engine in engines.items():
            self.metrics.count_elsewhere(name, lambda engine=engine: self.pump.stats(engine))

    async def drain(self) -> int:
        """Graceful stop; returns how many requests were still in flight when it began."""
        in_flight = self.inference.in_flight + self._native_pending()   # before the flush runs the queued ones
        self.state.stopping.set()   # draining: new requests refused, open gRPC streams end
        self.http.stop()
        self.repository.flush()
        grpc_stopped = asyncio.ensure_future(self._stop_grpc())
        deadline = time.monotonic() + self.cfg.drain_seconds
        while self.inference.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if self.inference.in_flight:
            log.warning("%d requests still running after %.0f s: stopping anyway",
                        self.inference.in_flight, self.cfg.drain_seconds)
        await grpc_stopped
        try:   # idle keep-alive connections close at once; a client stalled mid-upload gets no longer
            await asyncio.wait_for(self.http.close_all_connections(), timeout=max(deadline - time.monotonic(), 1.0))
        except asyncio.TimeoutError:
            log.warning("closing HTTP connections timed out; stopping anyway")
            self.http.abort()
        if self.pump:
            self.pump.close()   # its connections were handed back (or are closed now, past the deadline)
        self.repository.close(timeout=self.cfg.drain_seconds)
        self.decode_pool.shutdown(wait=True, cancel_futures=True)
        self.shared_memory.close()   # every region: its descriptor closed
        return in_flight

    def _native_pending(self) -> int:
        """Requests the native fronts hold: they finish them before the pump hands connections back, the gRPC
        front before it stops."""
        fronts = [front for front in (self.pump, self.grpc_front) if front]
        return int(sum(front.stats(engine)[2] for front in fronts for engine in self.state.native_engines.values()))

    async def _stop_grpc(self) -> None:
        if self.grpc_front:   # first: its forwarded calls need the Python server until they are done
            await self.grpc_front.drain(self.cfg.drain_seconds)
            self.grpc_front.close()
        await self.grpc.stop(grace=self.cfg.drain_seconds)

    async def run(self, on_ready: Callable[[str], None]) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        http_port, grpc_port = await self.start()
        for name, entry in self.repository.models.items():
            if not entry.ready:
                on_ready(f"model {name}: NOT READY: {entry.problem}")
        on_ready(f"system shared memory: {'on' if self.cfg.shared_memory_on else 'off'} "
                 f"({self.cfg.shared_memory_why})")
        on_ready(f"data path: {'native (C++)' if self.repository.native_path else 'Python'} "
                 f"({self.repository.native_why})")
        ready = sorted(n for n, e in self.repository.models.items() if e.ready)
        on_ready(f"serving {', '.join(ready) or 'no ready model'}: HTTP {self.cfg.host}:{http_port}, "
                 f"gRPC {self.cfg.host}:{grpc_port}")
        await stop.wait()
        on_ready("stopping: finishing requests in flight")
        in_flight = await self.drain()
        on_ready(f"stopped ({in_flight} requests were in flight and finished)")


def serve(cfg: ServeConfig, say: Callable[[str], None]) -> None:
    """Serve until SIGTERM / SIGINT; `say` gets the ready line (with the ports) and the stop lines."""
    server = Server(cfg)
    if uvloop is None:
        asyncio.run(server.run(say))
    else:
        uvloop.run(server.run(say))
