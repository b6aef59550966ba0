"""The Python side of the native HTTP pump (native/pump.cc, the native data path): the hand-over of a keep-alive
connection (which answers qualify: http_app.pump_hint), the connections it hands back, and its counts in /metrics.

After Python answered a binary-tensor infer request 200 for a model a native engine serves, with every output a
binary FP32 tensor, the connection goes to the pump with the exact bytes of that request before its tensor and of
the answer before its output tensor. The pump answers every following request whose bytes before the tensor are
the same (only the tensor differs). The input and the output may instead be in system shared memory regions
(shared_memory.py mirrors every registration to the pump): the request, or the answer, then has no tensor bytes,
and the pump reads the region, or writes it. Anything else (another head or JSON, a refused or failed request, a
stall, a region gone or truncated, the server draining) comes back here with every byte the pump did not answer,
and Python answers it as any request.

The hand-over duplicates the socket's descriptor and aborts the asyncio transport: the transport closes its own
descriptor (no FIN: the duplicate keeps the socket open, and neither uvloop nor asyncio shuts it down or resets it on
abort) after removing it from its event loop. The pump tells the loop that connections came back through an
eventfd (loop.add_reader): it never calls into Python from its thread."""
from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

from .metrics import native_counts
from .tensors import ShmRef

log = logging.getLogger(__name__)

CLOSED, MISMATCH, REFUSED, FAILED, STALLED, DRAINING, ENGINE_CLOSED = range(7)   # pump.cc's Reason
MAX_MISMATCHES = 3   # a connection whose requests keep changing (per-request ids) stays with Python after these


@dataclass(frozen=True)
class PumpHint:
    """What an answer tells its connection for the pump: the model's engine and the sizes around the tensors."""
    engine: int            # the engine's handle (native/engine.h EngineFromHandle)
    json_bytes: int        # the request's JSON header
    tensor_bytes: int      # the request's input tensor, after its JSON header (or in input_shm)
    output_bytes: int      # the answer's output tensor, its last bytes (or in output_shm)
    input_shm: ShmRef | None = None    # the input's shared memory region: no tensor bytes in the request
    output_shm: ShmRef | None = None   # the output's: none in the answer

    @property
    def answer_tensor_bytes(self) -> int:
        return 0 if self.output_shm else self.output_bytes


class Pump:
    """One pump thread for the server's HTTP connections."""

    def __init__(self, module, idle_timeout: float, adopt: Callable[[int, bytes, int, bool], None]) -> None:
        """`module`: the native module (native.load()); `adopt(fd, received, mismatches, stalled)` makes a
        handed-back connection Python's again."""
        self.module = module
        self.handle = module.pump_create(float(idle_timeout))
        self.notify_fd = module.pump_notify_fd(self.handle)
        self.adopt = adopt
        self.held: dict[int, int] = {}   # the pump's connections: id -> mismatches so far
        self.loop: asyncio.AbstractEventLoop | None = None
        self.closed = False

    def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.loop.add_reader(self.notify_fd, self._events)

    def hand_over(self, transport: asyncio.Transport, hint: PumpHint, request_head: bytes, body: memoryview,
                  answer: bytes, mismatches: int) -> bool:
        """Give the connection to the pump, after `answer` was written whole; False: it stays Python's."""
        sock = transport.get_extra_info("socket")
        if sock is None or transport.get_write_buffer_size():
            return False
        try:
            fd = os.dup(sock.fileno())
        except OSError as exc:   # out of descriptors: Python answers on
            log.warning("cannot hand a connection to the native pump: %s", exc)
            return False
        prefix = request_head + bytes(body[:hint.json_bytes])
        into, out = hint.input_shm, hint.output_shm
        conn = self.module.pump_adopt(self.handle, fd, hint.engine, prefix, hint.tensor_bytes,
                                      answer[:len(answer) - hint.answer_tensor_bytes], hint.output_bytes, b"",
                                      into.region if into else "", into.offset if into else 0,
                                      out.region if out else "", out.offset if out else 0,
                                      out.byte_size if out else 0)
        if not conn:
            os.close(fd)
            return False
        self.held[conn] = mismatches
        transport.abort()   # closes the transport's descriptor, not the connection: the pump holds a duplicate
        return True

    def _events(self) -> None:
        try:
            os.read(self.notify_fd, 8)
        except BlockingIOError:
            pass
        events = list(self.module.pump_events(self.handle))
        for i in range(0, len(events), 4):
            conn, fd, reason, received = events[i:i + 4]
            mismatches = self.held.pop(conn, 0) + (reason == MISMATCH)
            if reason == CLOSED:
                continue
            try:
                self.adopt(fd, bytes(received), mismatches, reason == STALLED)
            except Exception:  # noqa: BLE001 - one connection lost, not the others in this batch
                log.exception("cannot take back a connection from the native pump")
                os.close(fd)

    @property
    def connections(self) -> int:
        return len(self.held)

    def drain(self) -> None:
        """Stop taking requests: the pump answers those in flight, then hands every connection back."""
        self.module.pump_drain(self.handle)

    def close(self) -> None:
        if self.loop is not None:
            self.loop.remove_reader(self.notify_fd)
        self.closed = True
        self.module.pump_destroy(self.handle)

    def add_region(self, name: str, fd: int, offset: int, byte_size: int) -> None:
        """A system shared memory registration (SharedMemoryRegions.mirror); where the descriptor cannot be
        duplicated, the region's requests stay with Python."""
        if self.closed:
            return
        try:
            self.module.pump_add_region(self.handle, name, fd, offset, byte_size)
        except RuntimeError as exc:
            log.warning("%s: its HTTP infers stay with Python", exc)

    def remove_region(self, name: str) -> None:
        if not self.closed:   # at shutdown the regions are closed after the pump
            self.module.pump_remove_region(self.handle, name)

    def stats(self, engine: int) -> list[float]:
        """The pump's answers of one engine: success count, summed request duration (us), pending, last success
        (time.time()), as Metrics.count_elsewhere reads them."""
        return native_counts(self.module.pump_stats(self.handle, engine))
