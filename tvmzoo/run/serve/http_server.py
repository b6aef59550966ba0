"""HTTP/1.1 connections of the REST front end: an asyncio.BufferedProtocol on httptools (the parser uvicorn runs).

Written on httptools rather than run under uvicorn: uvicorn's ASGI receive hands the app a 602 KB tensor body
in many chunks, each one a wake-up of the app's task, and cost ~0.3 ms more CPU per request at concurrency 1
(README, Serving). What this module does: parses each request (URL, headers, body; chunked bodies are decoded
by httptools), answers a connection's requests in order (pipelining), keeps connections alive unless the
client or the server says close, sends `100 Continue` to a client that waits for it, reads and drops a body
past the limit (the app answers 413: answering before the client finished sending would break its
connection; past 4 x the limit the connection is closed), refuses headers over 64 KB (431) and malformed
requests (400), closes a connection that sent nothing for --idle-timeout-seconds (408 when it stalled
mid-request: a stalled upload held its buffered body and its socket forever), and on shutdown stops listening, closes idle connections and closes busy ones after their
answer. The routes and the protocol's bodies are in http_app. With `--native`, a connection whose answered request
the native pump can repeat is handed to it, and comes back with the bytes it did not answer (http_pump).

A body of known length (Content-Length) is received into one buffer of that size: the part that came with
the head through the parser, the rest straight from the socket (recv_into), past the parser, which is
replaced by a fresh one for the next request. A 602 KB tensor is then copied once, by the kernel, instead of
three times (the kernel into a read buffer, httptools into a chunk, the join), and the buffer is placed so
that the tensor after the JSON header starts 64-byte aligned, which the model reads in place
(CompiledModel.stage). Chunked bodies and bodies over the limit go through the parser's chunks.
"""
from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable
from email.utils import formatdate

import httptools
import numpy as np

from ..runtime import ALIGNMENT
from .config import DEFAULT_IDLE_TIMEOUT_SECONDS, DEFAULT_MAX_CONNECTIONS
from .http_app import Request, Response
from .http_codec import HEADER_LENGTH
from .http_pump import MAX_MISMATCHES, Pump

log = logging.getLogger(__name__)

HEADER_LIMIT = 64 << 10
# bytes asked of each recv outside a known-length body: a head and small requests (pipelined ones too);
# what of a large body comes with them passes through the parser, the rest is read into the body's buffer
HEAD_READ = 16 << 10
REFUSAL_LINGER = 2.0   # seconds a refused connection may take to read its 503 and close
SMALL_BODY = 4 << 10   # bodies up to this size are handed over as bytes (what JSON endpoints get)
REASONS = {100: "Continue", 200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found",
           405: "Method Not Allowed", 408: "Request Timeout", 413: "Content Too Large", 431: "Request Header Fields Too Large",
           500: "Internal Server Error", 503: "Service Unavailable"}
App = Callable[[Request], Awaitable[Response]]


class _Refused(Exception):
    """Raised from a parser callback: answer `response` and close the connection."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.response = Response.error(status, message, close=True)


class _Date:
    """The Date header, formatted once a second."""
    second, value = 0, b""

    @classmethod
    def now(cls) -> bytes:
        second = int(time.time())
        if second != cls.second:
            cls.second, cls.value = second, formatdate(second, usegmt=True).encode()
        return cls.value


def encode(response: Response, head_only: bool, keep_alive: bool) -> bytes:
    lines = [b"HTTP/1.1 %d %s" % (response.status, REASONS.get(response.status, "Unknown").encode()),
             b"Server: tvmzoo", b"Date: " + _Date.now(), b"Content-Length: %d" % len(response.body)]
    lines += [f"{name}: {value}".encode("latin-1") for name, value in response.headers]
    if not keep_alive:
        lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n" + (b"" if head_only else response.body)


def body_buffer(length: int, tensor_offset: int) -> memoryview:
    """`length` uninitialized bytes, placed so that byte `tensor_offset` is ALIGNMENT-aligned."""
    raw = np.empty(length + ALIGNMENT, np.uint8)
    start = -(raw.ctypes.data + tensor_offset) % ALIGNMENT
    return memoryview(raw)[start:start + length]


class Connection(asyncio.BufferedProtocol):
    def __init__(self, server: HttpServer, received: bytes | None = None, mismatches: int = 0,
                 stalled: bool = False) -> None:
        """`received`: a connection the native pump handed back (http_pump), with the bytes it did not answer;
        `mismatches`: its requests that differed from the one it was handed over for; `stalled`: it handed it back
        because it stalled mid-request."""
        self.server = server
        self.adopted = None if received is None else (received, stalled)
        self.mismatches = mismatches
        self.raw: bytearray | None = None   # with a pump: the bytes of the request being parsed, from its start
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.pending: deque[Request | Response] = deque()   # complete requests, or a refusal, in order
        self.answering: asyncio.Task | None = None   # the task answering self.pending (referenced: not collected)
        self.in_message = False     # a request is partly received
        self.closing = False        # close after the pending answers
        self.broken = False         # the parser failed: ignore what follows
        self.paused = False
        self.writable = asyncio.Event()
        self.writable.set()
        self.head = memoryview(bytearray(HEAD_READ))   # the read buffer outside a body (reused)
        self.body: memoryview | None = None   # the request's body of known length, being filled
        self.filled = 0                       # bytes of self.body received
        self.direct = False                   # the rest of self.body is read into it, past the parser
        self.last_active = time.monotonic()   # last byte received or answer sent

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport   # type: ignore[assignment]
        if self.adopted is None and self.server.open_connections >= self.server.max_connections:
            _Refusal.take(transport, self.server)
            return
        self.server.connections.add(self)
        if self.adopted is not None:
            (received, stalled), self.adopted = self.adopted, None
            self._feed(received)
            if stalled:   # it sent nothing for the idle timeout already
                self.last_active -= self.server.idle_timeout
                self.expire(time.monotonic(), self.server.idle_timeout)
            if self.server.closing:
                self.shutdown()

    def _feed(self, data: bytes) -> None:
        """Take bytes as if they had come from the socket."""
        view, at = memoryview(data), 0
        while at < len(view) and not self.transport.is_closing():
            buffer = self.get_buffer(-1)
            n = min(len(buffer), len(view) - at)
            buffer[:n] = view[at:at + n]
            at += n
            self.buffer_updated(n)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        self.pending.clear()
        self.writable.set()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.body[self.filled:] if self.direct else self.head

    def buffer_updated(self, nbytes: int) -> None:
        self.last_active = time.monotonic()
        if self.direct:
            self.filled += nbytes
            if self.filled == len(self.body):
                self.direct = False
                self.parser = httptools.HttpRequestParser(self)   # the old one still waits for this body
                self._complete()
            return
        if self.server.pump is not None:
            self._record(self.head[:nbytes])
        self.data_received(self.head[:nbytes])
        if self.in_message and self.body is not None and not self.broken:   # the rest comes in the next reads
            self.direct = True

    def _record(self, data: memoryview) -> None:
        """Keep the bytes read outside a body since the current request began (its head and what of its body came
        with it): the pump compares the next requests with them."""
        if not self.in_message:
            self.raw = bytearray(data)
        elif self.raw is not None and len(self.raw) <= HEADER_LIMIT:
            self.raw += data
        else:
            self.raw = None

    def _head_bytes(self) -> bytes | None:
        """The completed request's exact bytes before its body, when what was recorded since it began is its head
        and the part of its body the parser saw, nothing more (no next request in the same read)."""
        raw, self.raw = self.raw, None
        if raw is None:
            return None
        end = raw.find(b"\r\n\r\n") + 4
        return bytes(raw[:end]) if end >= 4 and len(raw) - end == self.size else None

    def data_received(self, data: bytes | memoryview) -> None:
        if self.broken:
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, _Refused):
                self._refuse(cause.response)
            else:   # a fault of ours while reading the request: still an answer, not a silent close
                log.error("cannot read a request: %r", cause, exc_info=cause)
                self._refuse(Response.error(400, f"cannot read the HTTP request ({cause or exc})", close=True))
        except httptools.HttpParserUpgrade:
            self._refuse(Response.error(400, "protocol upgrades are not supported", close=True))
        except httptools.HttpParserError as exc:
            self._refuse(Response.error(400, f"malformed HTTP request: {exc}", close=True))

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.in_message = True
        self.url, self.headers, self.chunks, self.size, self.head_bytes = b"", {}, [], 0, 0
        self.body, self.filled = None, 0

    def on_url(self, url: bytes) -> None:
        self.url += url
        self._count_head(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_head(len(name) + len(value))
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        length = self.headers.get("content-length", "0")
        if length.isdigit() and int(length) > 4 * self.server.max_body:
            raise _Refused(413, f"request body of {length} bytes is over the limit of {self.server.max_body} "
                           "(--max-request-bytes)")
        if self.headers.get("expect", "").lower() == "100-continue" and not self.pending and not self.answering:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        self.method = self.parser.get_method().decode("latin-1")
        self.keep_alive = self.parser.should_keep_alive()
        if length.isdigit() and 0 < int(length) <= self.server.max_body and "transfer-encoding" not in self.headers:
            offset = self.headers.get(HEADER_LENGTH.lower(), "0")
            self.body = body_buffer(int(length), int(offset) if offset.isdigit() and int(offset) <= int(length) else 0)

    def on_body(self, body: bytes) -> None:
        self.size += len(body)
        if self.body is not None:
            self.body[self.filled:self.filled + len(body)] = body
            self.filled += len(body)
        elif self.size <= self.server.max_body:
            self.chunks.append(body)
        elif self.size > 4 * self.server.max_body:    # a chunked body has no Content-Length to refuse early
            raise _Refused(413, f"request body over 4 x the limit of {self.server.max_body} (--max-request-bytes)")
        else:
            self.chunks.clear()   # read and dropped: the app answers 413

    def on_message_complete(self) -> None:
        self._complete()

    def _complete(self) -> None:
        """The request is in: queue it."""
        self.in_message = False
        head = self._head_bytes() if self.server.pump is not None else None
        path, _, query = self.url.decode("latin-1").partition("?")
        if self.body is not None:
            body, self.size = self.body, len(self.body)
            if len(body) <= SMALL_BODY:
                body = bytes(body)
        else:
            body = self.chunks[0] if len(self.chunks) == 1 else b"".join(self.chunks)
        self.chunks, self.body = [], None
        self._enqueue(Request(self.method, path, query, self.headers, body, self.size, self.keep_alive, head))

    def _count_head(self, n: int) -> None:
        self.head_bytes += n
        if self.head_bytes > HEADER_LIMIT:
            raise _Refused(431, f"request line and headers over {HEADER_LIMIT} bytes")

    def expire(self, now: float, timeout: float) -> None:
        """Close the connection when nothing came for `timeout` seconds and no answer is due (or the client
        stopped reading its answers); a client stalled mid-request is told so (408)."""
        if self.transport.is_closing() or now - self.last_active < timeout:
            return
        if self.answering and not self.writable.is_set():   # the client reads no answer: it holds ours forever
            self.transport.abort()
            return
        if self.pending or self.answering:
            return
        if self.in_message:
            self._refuse(Response.error(408, f"the request stalled: nothing received for {timeout:g} s "
                                        "(--idle-timeout-seconds)", close=True))
        else:
            self.transport.close()

    def _refuse(self, response: Response) -> None:
        self.in_message = False
        self.closing = self.broken = True
        self.transport.pause_reading()
        self._enqueue(response)

    def _enqueue(self, item: Request | Response) -> None:
        self.pending.append(item)
        if self.answering:
            if not self.paused and not self.closing:   # a pipelining client waits until its turn
                self.paused = True
                self.transport.pause_reading()
        else:
            self.answering = asyncio.get_running_loop().create_task(self._answer())

    async def _answer(self) -> None:
        try:
            while self.pending:
                item = self.pending.popleft()
                response = item if isinstance(item, Response) else await self.server.app(item)
                last = self.closing and not self.pending and not self.in_message   # shutting down
                keep_alive = isinstance(item, Request) and item.keep_alive and not (response.close or last)
                if not self.writable.is_set():
                    await self.writable.wait()
                if self.transport.is_closing():
                    return
                answer = encode(response, isinstance(item, Request) and item.method == "HEAD", keep_alive)
                self.transport.write(answer)
                if not keep_alive:
                    self.closing = True
                    self.transport.close()
                    return
                if response.pump is not None and self._hand_over(item, response, answer):
                    return
        finally:
            self.answering = None
            self.last_active = time.monotonic()
        if self.paused and not self.transport.is_closing():
            self.paused = False
            self.transport.resume_reading()

    def _hand_over(self, request: Request, response: Response, answer: bytes) -> bool:
        """Give the connection to the native pump, when nothing else of it is here (http_pump)."""
        pump = self.server.pump
        if request.head is None or self.pending or self.in_message or self.closing or self.mismatches >= MAX_MISMATCHES:
            return False
        if not pump.hand_over(self.transport, response.pump, request.head, request.body, answer, self.mismatches):
            return False
        self.closing = True
        return True

    def shutdown(self) -> None:
        """Close now if idle, else after the answers due."""
        self.closing = True
        if not (self.in_message or self.pending or self.answering):
            self.transport.close()


class _Refusal(asyncio.Protocol):
    """A connection past --max-connections: answered 503 at once and closed. What the client sends meanwhile
    is read and dropped until it closes (or REFUSAL_LINGER s): closing a socket with unread bytes resets the
    connection, which can destroy the answer on its way. At most max_connections refusals linger (each holds a
    file descriptor); past that a connection is closed at once."""

    @classmethod
    def take(cls, transport: asyncio.Transport, server: HttpServer) -> None:
        if server.refusing >= server.max_connections:
            transport.abort()
            return
        refusal = cls(server)
        transport.set_protocol(refusal)
        refusal.answer(transport)

    def __init__(self, server: HttpServer) -> None:
        self.server = server
        server.refusing += 1
        self.timer: asyncio.TimerHandle | None = None

    def answer(self, transport: asyncio.Transport) -> None:
        server = self.server
        message = (f"the server has {server.max_connections} open connections, its limit (--max-connections): "
                   "retry later, or reuse a connection")
        transport.write(encode(Response.error(503, message, headers=[("Retry-After", "1")]), False, False))
        transport.write_eof()
        self.timer = asyncio.get_running_loop().call_later(REFUSAL_LINGER, transport.close)

    def data_received(self, data: bytes) -> None:
        pass

    def eof_received(self) -> bool:
        return False   # the transport closes

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer:
            self.timer.cancel()
        self.server.refusing -= 1


class HttpServer:
    """The listening sockets and their connections (stop listening, then close connections as they go idle)."""

    def __init__(self, app: App, max_body: int, idle_timeout: float = DEFAULT_IDLE_TIMEOUT_SECONDS,
                 max_connections: int = DEFAULT_MAX_CONNECTIONS) -> None:
        self.app, self.max_body, self.idle_timeout = app, max_body, idle_timeout
        self.max_connections = max_connections   # more are answered 503 and closed (_Refusal)
        self.refusing = 0                         # refused connections still open
        self.connections: set[Connection] = set()
        self.pump: Pump | None = None           # the native HTTP pump, when it answers some models (http_pump)
        self.adopting: set[asyncio.Task] = set()   # connections the pump handed back, being made Python's again
        self.closing = False                    # shutting down: connections close after their answers
        self.servers: list[asyncio.base_events.Server] = []
        self.reaper: asyncio.Task | None = None

    @property
    def open_connections(self) -> int:
        """Python's connections and the pump's."""
        return len(self.connections) + len(self.adopting) + (self.pump.connections if self.pump else 0)

    def adopt(self, fd: int, received: bytes, mismatches: int, stalled: bool) -> None:
        """A connection the pump handed back: Python's again, `received` read first."""
        loop = asyncio.get_running_loop()
        sock = socket.socket(fileno=fd)
        made = loop.connect_accepted_socket(lambda: Connection(self, received, mismatches, stalled), sock)
        task = loop.create_task(made)
        self.adopting.add(task)
        task.add_done_callback(lambda done: self._adopted(done, sock))

    def _adopted(self, task: asyncio.Task, sock: socket.socket) -> None:
        self.adopting.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("cannot take back a connection from the native pump: %r", task.exception())
            sock.close()

    async def listen(self, sockets: list[socket.socket]) -> None:
        loop = asyncio.get_running_loop()
        for sock in sockets:
            self.servers.append(await loop.create_server(lambda: Connection(self), sock=sock))
        self.reaper = loop.create_task(self._reap())

    async def _reap(self) -> None:
        """Close idle connections: one pass over them a second (a timer per connection would be reset on
        every read)."""
        while True:
            await asyncio.sleep(min(1.0, self.idle_timeout / 2))
            now = time.monotonic()
            for connection in list(self.connections):
                connection.expire(now, self.idle_timeout)

    def stop(self) -> None:
        """Stop accepting connections."""
        for server in self.servers:
            server.close()
        if self.reaper:
            self.reaper.cancel()
        if self.pump:
            self.pump.drain()   # it answers what it has in flight, then hands its connections back

    async def close_all_connections(self) -> None:
        """Close idle connections now and busy ones after their answers; returns when all are closed."""
        self.closing = True
        for connection in list(self.connections):
            connection.shutdown()
        while self.open_connections:
            await asyncio.sleep(0.01)

    def abort(self) -> None:
        for connection in list(self.connections):
            connection.transport.abort()
