"""The HTTP/REST endpoints: the protocol's health, metadata, ready and infer, Triton's model config,
statistics and system shared memory regions, and Prometheus /metrics (connections are http_server's).
Errors are {"error": "..."} with the status code; every endpoint but health needs the bearer token when one
is set."""
from __future__ import annotations

import inspect
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import unquote

from .http_codec import HEADER_LENGTH, encode_response, parse_infer
from .http_pump import PumpHint
from .shared_memory import CUDA_UNSUPPORTED
from .state import SERVER_NAME, AppState
from .tensors import BYTES, InferRequest, OutputTensor, ServeError, ShmRef, invalid

log = logging.getLogger(__name__)

MODEL = r"/v2/models/([^/]+)(?:/versions/([^/]+))?"


@dataclass
class Request:
    method: str
    path: str
    query: str
    headers: dict[str, str]     # lower-case names
    body: bytes | memoryview    # empty when over the limit (read and dropped); a view of the received
                                # buffer when over http_server.SMALL_BODY
    size: int                   # body bytes received
    keep_alive: bool = True
    head: bytes | None = None   # the request's exact bytes before its body, when a native pump may take its
                                # connection (http_pump) and they are known


@dataclass
class Response:
    status: int = 200
    body: bytes = b""
    headers: list[tuple[str, str]] = field(default_factory=list)
    close: bool = False         # close the connection after it
    pump: PumpHint | None = None   # the native pump can answer the requests that repeat this one (http_pump)

    @classmethod
    def json(cls, doc: dict, status: int = 200, **kwargs) -> Response:
        return cls(status, json.dumps(doc, separators=(",", ":")).encode(),
                   [("Content-Type", "application/json"), *kwargs.pop("headers", [])], **kwargs)

    @classmethod
    def error(cls, status: int, message: str, **kwargs) -> Response:
        return cls.json({"error": message}, status, **kwargs)


def pump_hint(request: Request, parsed: InferRequest, input_shm: ShmRef | None, outputs: list[OutputTensor],
              header_length: int | None, engine: int | None) -> PumpHint | None:
    """The hint for a 200 infer answer the pump can repeat, else None: a request of a known length (no chunks, no
    100-continue) with one numeric input, a binary tensor after the JSON header or all in a shared memory region
    (`input_shm`: the input's, as sent), and one FP32 output, binary or written to a shared memory region (no
    classification)."""
    headers = request.headers
    if engine is None or not request.keep_alive or request.method != "POST" \
            or "expect" in headers or "transfer-encoding" in headers or "content-length" not in headers:
        return None
    if len(parsed.inputs) != 1 or len(outputs) != 1 or parsed.inputs[0].datatype == BYTES:
        return None
    json_bytes = len(request.body) if header_length is None else header_length
    if input_shm is not None:
        tensor_bytes = input_shm.byte_size if json_bytes == len(request.body) else 0
    else:
        tensor_bytes = 0 if header_length is None else len(request.body) - header_length
    out = outputs[0]
    if tensor_bytes <= 0 or out.datatype != "FP32" or not (out.binary or out.in_shared_memory):
        return None
    output_shm = parsed.outputs[0].shm if out.in_shared_memory else None
    return PumpHint(engine, json_bytes, tensor_bytes, out.data.nbytes, input_shm, output_shm)


Handler = Callable[..., Response]   # (state, request, *path groups); infer is async


def live(state: AppState, request: Request) -> Response:
    return Response(200)


def ready(state: AppState, request: Request) -> Response:
    return Response(200 if state.repository.ready and not state.draining else 400)


def server_metadata(state: AppState, request: Request) -> Response:
    return Response.json({"name": SERVER_NAME, "version": state.version, "extensions": state.extensions})


def model_metadata(state: AppState, request: Request, name: str, version: str) -> Response:
    entry = state.repository.get(name, version)
    if entry.meta is None:
        raise ServeError("UNAVAILABLE", f"model '{name}' is not ready: {entry.problem}")
    return Response.json(entry.metadata())


def model_ready(state: AppState, request: Request, name: str, version: str) -> Response:
    return Response(200 if state.repository.get(name, version).ready else 400)


def model_config(state: AppState, request: Request, name: str, version: str) -> Response:
    entry = state.repository.get_ready(name, version)
    return Response.json(entry.config(entry.batcher.max_batch))


def statistics(state: AppState, request: Request, name: str = "", version: str = "") -> Response:
    return Response.json(state.statistics(name, version))


def metrics(state: AppState, request: Request) -> Response:
    body, content_type = state.metrics.exposition()
    return Response(200, body, [("Content-Type", content_type)])


async def infer(state: AppState, request: Request, name: str, version: str) -> Response:
    if state.draining:
        raise ServeError("UNAVAILABLE", "the server is shutting down")
    if request.size > state.max_request_bytes:
        raise ServeError("RESOURCE_EXHAUSTED", f"request body of {request.size} bytes is over the limit of "
                         f"{state.max_request_bytes} (--max-request-bytes)")
    header = request.headers.get(HEADER_LENGTH.lower())
    try:
        header_length = None if header is None else int(header)
    except ValueError:
        raise ServeError("INVALID_ARGUMENT", f"{HEADER_LENGTH} must be an integer, got {header!r}") from None
    json_bytes = len(request.body) if header_length is None else header_length
    if json_bytes > state.max_json_bytes:   # checked before parsing: reading it would hold every other client
        raise ServeError("RESOURCE_EXHAUSTED", f"the request's JSON is {json_bytes} bytes, over the limit of "
                         f"{state.max_json_bytes} (--max-json-bytes): send the tensors as binary data (the binary "
                         "tensor extension; tritonclient: binary_data=True, its default) or raise the limit")
    parsed = parse_infer(request.body, header_length, name, version)
    input_shm = parsed.inputs[0].shm if len(parsed.inputs) == 1 else None   # inference reads it into the tensor
    outputs = await state.inference.infer(parsed)
    body, json_length = encode_response(parsed, outputs)
    engine = state.native_engines.get(parsed.model)
    hint = None if engine is None else pump_hint(request, parsed, input_shm, outputs, header_length, engine)
    if json_length is None:
        return Response(200, body, [("Content-Type", "application/json")], pump=hint)
    return Response(200, body, [("Content-Type", "application/octet-stream"), (HEADER_LENGTH, str(json_length))],
                    pump=hint)


def shm_status(state: AppState, request: Request, name: str) -> Response:
    return Response(200, json.dumps(state.shared_memory.status(name)).encode(), [("Content-Type", "application/json")])


def shm_register(state: AppState, request: Request, name: str) -> Response:
    """Body {"key": ..., "offset": ..., "byte_size": ...}, as Triton's system shared memory extension."""
    try:
        doc = json.loads(bytes(request.body) or b"{}")   # a body over 4 KB comes as a memoryview
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise invalid(f"malformed JSON in the register request: {exc}") from None
    if not isinstance(doc, dict) or "key" not in doc or "byte_size" not in doc:
        raise invalid('the register request must be a JSON object with "key", "byte_size" and optional "offset"')
    state.shared_memory.register(name, doc["key"], doc.get("offset", 0), doc["byte_size"])
    return Response(200, headers=[("Content-Type", "application/json")])


def shm_unregister(state: AppState, request: Request, name: str) -> Response:
    state.shared_memory.unregister(name)
    return Response(200, headers=[("Content-Type", "application/json")])


def cuda_shm(state: AppState, request: Request, name: str) -> Response:
    raise invalid(CUDA_UNSUPPORTED)


SHM = r"/v2/systemsharedmemory(?:/region/([^/]+))?"
CUDA_SHM = r"/v2/cudasharedmemory(?:/region/([^/]+))?"


@dataclass(frozen=True)
class Route:
    pattern: re.Pattern
    method: str
    handler: Handler
    public: bool = False        # health: answers without the token


ROUTES = [Route(re.compile(pattern + "$"), method, handler, public) for pattern, method, handler, public in (
    (MODEL + r"/infer", "POST", infer, False),   # first: tried on every request (no other route ends so)
    (r"/v2/health/live", "GET", live, True),
    (r"/v2/health/ready", "GET", ready, True),
    (r"/v2/?", "GET", server_metadata, False),
    (r"/v2/models/stats", "GET", statistics, False),   # before the model routes: "stats" is not a model name here
    (MODEL + r"/?", "GET", model_metadata, False),
    (MODEL + r"/ready", "GET", model_ready, False),
    (MODEL + r"/config", "GET", model_config, False),
    (MODEL + r"/stats", "GET", statistics, False),
    (r"/metrics", "GET", metrics, False),
    (SHM + r"/status", "GET", shm_status, False),
    (r"/v2/systemsharedmemory/region/([^/]+)/register", "POST", shm_register, False),
    (SHM + r"/unregister", "POST", shm_unregister, False),
    (CUDA_SHM + r"/status", "GET", cuda_shm, False),
    (CUDA_SHM + r"/(?:register|unregister)", "POST", cuda_shm, False),
)]


class HttpApp:
    """Request -> Response: route, token, handler; a ServeError becomes its status, anything else a 500."""

    def __init__(self, state: AppState) -> None:
        self.state = state

    async def __call__(self, request: Request) -> Response:
        try:
            return await self._handle(request)
        except ServeError as exc:   # the client's error, not a server fault: no traceback
            log.info("%s %s -> %d: %s", request.method, request.path, exc.http_code, exc)
            return self._error(exc, request)
        except Exception:
            log.exception("%s %s", request.method, request.path)
            return Response.error(500, "internal server error")

    async def _handle(self, request: Request) -> Response:
        route, match = next(((r, m) for r in ROUTES if (m := r.pattern.match(request.path))), (None, None))
        if (route is None or not route.public) and not self.state.authorized(request.headers.get("authorization")):
            raise ServeError("UNAUTHENTICATED", "missing or wrong bearer token (Authorization: Bearer <token>)")
        if route is None:
            raise ServeError("NOT_FOUND", f"no endpoint {request.method} {request.path}")
        if request.method not in (route.method, "HEAD" if route.method == "GET" else route.method):
            return Response.error(405, f"{request.method} {request.path}: use {route.method}",
                                  headers=[("Allow", route.method)])
        args = [unquote(group or "") for group in match.groups()]
        result = route.handler(self.state, request, *args)
        return await result if inspect.isawaitable(result) else result

    def _error(self, exc: ServeError, request: Request) -> Response:
        headers = [("WWW-Authenticate", 'Bearer realm="tvmzoo"')] if exc.status == "UNAUTHENTICATED" else []
        close = exc.status == "UNAVAILABLE" and self.state.draining   # the client should reconnect elsewhere
        return Response.error(exc.http_code, str(exc), headers=headers, close=close)
