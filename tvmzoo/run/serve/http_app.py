"""The HTTP/REST front end (tornado): the protocol's health, metadata, ready and infer endpoints,
Triton's model config, and Prometheus /metrics. Errors are {"error": "..."} with the status code."""
from __future__ import annotations

import json
import logging

import tornado.web

from .http_codec import HEADER_LENGTH, encode_response, parse_infer
from .state import EXTENSIONS, SERVER_NAME, AppState
from .tensors import ServeError

log = logging.getLogger(__name__)

MODEL = r"/v2/models/([^/]+)(?:/versions/([^/]+))?"


class Base(tornado.web.RequestHandler):
    public = False      # health endpoints answer without the token

    @property
    def state(self) -> AppState:
        return self.application.settings["state"]

    def prepare(self) -> None:
        if not self.public and not self.state.authorized(self.request.headers.get("Authorization")):
            self.set_header("WWW-Authenticate", 'Bearer realm="tvmzoo"')
            raise ServeError("UNAUTHENTICATED", "missing or wrong bearer token (Authorization: Bearer <token>)")

    def send_json(self, doc: dict) -> None:
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(doc, separators=(",", ":")))

    def write_error(self, status_code: int, **kwargs) -> None:
        exc = kwargs.get("exc_info", (None, None))[1]
        if isinstance(exc, ServeError):  # raised by a handler: its status, not tornado's 500
            self.set_status(exc.http_code)
        self.send_json({"error": str(exc) if isinstance(exc, ServeError) else self._reason})

    def log_exception(self, typ, value, tb) -> None:
        if isinstance(value, ServeError):  # the client's error, not a server fault: no traceback
            log.info("%s %s -> %d: %s", self.request.method, self.request.path, value.http_code, value)
        else:
            super().log_exception(typ, value, tb)


class Live(Base):
    public = True

    def get(self) -> None:
        self.set_status(200)


class Ready(Base):
    public = True

    def get(self) -> None:
        self.set_status(200 if self.state.repository.ready and not self.state.draining else 400)


class ServerMetadata(Base):
    def get(self) -> None:
        self.send_json({"name": SERVER_NAME, "version": self.state.version, "extensions": EXTENSIONS})


class ModelMetadata(Base):
    def get(self, name: str, version: str | None) -> None:
        entry = self.state.repository.get(name, version or "")
        if entry.meta is None:
            raise ServeError("UNAVAILABLE", f"model '{name}' is not ready: {entry.problem}")
        self.send_json(entry.metadata())


class ModelReady(Base):
    def get(self, name: str, version: str | None) -> None:
        entry = self.state.repository.get(name, version or "")
        self.set_status(200 if entry.ready else 400)


class ModelConfig(Base):
    def get(self, name: str, version: str | None) -> None:
        entry = self.state.repository.get_ready(name, version or "")
        self.send_json(entry.config(entry.batcher.max_batch))


@tornado.web.stream_request_body
class Infer(Base):
    """POST .../infer. The body streams in; past --max-request-bytes it is read and dropped, then
    413 (answering before the client finished sending would break its connection)."""

    def prepare(self) -> None:
        super().prepare()
        if self.state.draining:
            self.set_header("Connection", "close")
            raise ServeError("UNAVAILABLE", "the server is shutting down")
        self._chunks: list[bytes] = []
        self._size = 0
        self.request.connection.set_max_body_size(4 * self.state.max_request_bytes)

    def data_received(self, chunk: bytes) -> None:
        self._size += len(chunk)
        if self._size <= self.state.max_request_bytes:
            self._chunks.append(chunk)
        else:
            self._chunks.clear()

    async def post(self, name: str, version: str | None) -> None:
        if self._size > self.state.max_request_bytes:
            raise ServeError("RESOURCE_EXHAUSTED", f"request body of {self._size} bytes is over the limit of "
                             f"{self.state.max_request_bytes} (--max-request-bytes)")
        header = self.request.headers.get(HEADER_LENGTH)
        try:
            header_length = None if header is None else int(header)
        except ValueError:
            raise ServeError("INVALID_ARGUMENT", f"{HEADER_LENGTH} must be an integer, got {header!r}") from None
        request = parse_infer(b"".join(self._chunks), header_length, name, version or "")
        self._chunks = []
        outputs = await self.state.inference.infer(request)
        body, json_length = encode_response(request, outputs)
        if json_length is None:
            self.set_header("Content-Type", "application/json")
        else:
            self.set_header("Content-Type", "application/octet-stream")
            self.set_header(HEADER_LENGTH, str(json_length))
        self.finish(body)


class Statistics(Base):
    def get(self, name: str | None = None, version: str | None = None) -> None:
        self.send_json(self.state.statistics(name or "", version or ""))


class MetricsHandler(Base):
    def get(self) -> None:
        body, content_type = self.state.metrics.exposition()
        self.set_header("Content-Type", content_type)
        self.finish(body)


class NotFound(Base):
    def prepare(self) -> None:
        super().prepare()
        raise ServeError("NOT_FOUND", f"no endpoint {self.request.method} {self.request.path}")


def make_app(state: AppState) -> tornado.web.Application:
    return tornado.web.Application([
        (r"/v2/health/live", Live),
        (r"/v2/health/ready", Ready),
        (r"/v2/?", ServerMetadata),
        (r"/v2/models/stats", Statistics),     # before the model routes: "stats" is not a model name here
        (MODEL + r"/?", ModelMetadata),
        (MODEL + r"/ready", ModelReady),
        (MODEL + r"/config", ModelConfig),
        (MODEL + r"/infer", Infer),
        (MODEL + r"/stats", Statistics),
        (r"/metrics", MetricsHandler),
    ], default_handler_class=NotFound, state=state)
