"""The gRPC front end: the protocol's GRPCInferenceService on grpc.aio, with the servicer base class and
messages that tritonclient generates from Triton's grpc_service.proto (nothing copied here). ModelInfer and
Triton's bidirectional ModelStreamInfer (perf_analyzer --streaming, tritonclient's stream_infer) infer;
System shared memory regions are registered here (shared_memory.py); methods not implemented here (repository
control, CUDA shared memory, trace / log settings) answer UNIMPLEMENTED."""
from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Callable

import grpc
import numpy as np
from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc

from .config import DEFAULT_MAX_CONNECTIONS
from .grpc_wire import SplitRequest, split_request
from .shared_memory import CUDA_UNSUPPORTED, ShmRef, shm_ref
from .state import SERVER_NAME, AppState
from .tensors import (BYTES, InferRequest, InputTensor, RequestedOutput, ServeError, check_datatype, check_shape,
                      from_buffer, from_list, invalid, object_array, to_bytes)

_CONTENTS = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
             "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
             "UINT32": "uint_contents", "UINT64": "uint64_contents", "FP32": "fp32_contents",
             "FP64": "fp64_contents", BYTES: "bytes_contents"}


_FIELD_DTYPES = {"bool_contents": np.bool_, "int_contents": np.int32, "int64_contents": np.int64,
                 "uint_contents": np.uint32, "uint64_contents": np.uint64, "fp32_contents": np.float32,
                 "fp64_contents": np.float64}


# grpc's own receive limit is ours plus a quarter: a request up to it is refused by its size, unparsed, with
# the flag named (grpc's own refusal past its limit names neither the flag nor ours); it bounds what one call holds.
GRPC_LIMIT_SLACK = 4
GRPC_INT_MAX = 2 ** 31 - 1   # grpc's integer options


class TooLarge:
    """An infer request over --max-request-bytes, known by its size only (it is not parsed)."""
    message = service_pb2.ModelInferRequest()   # what a stream's error answer echoes: nothing

    def __init__(self, size: int, limit: int) -> None:
        self.error = ServeError("RESOURCE_EXHAUSTED", f"request of {size} bytes is over the limit of {limit} "
                                "(tvmzoo serve --max-request-bytes)")


def size_checked(parse: Callable[[bytes], object], limit: int) -> Callable[[bytes], object]:
    """A request deserializer that parses a message up to `limit` bytes and stands a TooLarge for a larger one."""
    def deserialize(data: bytes):
        return parse(data) if len(data) <= limit else TooLarge(len(data), limit)
    return deserialize


def _input(pb, raw: memoryview | None) -> InputTensor:
    name = pb.name
    datatype = check_datatype(name, pb.datatype)
    shape = check_shape(name, list(pb.shape))
    if raw is not None:
        return from_buffer(name, datatype, shape, raw)
    if datatype not in _CONTENTS:
        raise invalid(f"input '{name}': {datatype} must be sent in raw_input_contents")
    field = _CONTENTS[datatype]
    values = getattr(pb.contents, field)
    if len(values) != math.prod(shape):   # before any conversion (was: np.prod, which wraps around at 2**64)
        raise invalid(f"input '{name}': {len(values)} elements do not fill shape {list(shape)} "
                      f"({math.prod(shape)} elements)")
    if datatype == BYTES:
        return InputTensor(name, datatype, shape, object_array(list(values)))
    # one element at a time into an array of the field's own type: list(values) held a Python number
    # per element (a 60 MB message of FP32 contents took 930 MB)
    return from_list(name, datatype, shape, np.fromiter(values, _FIELD_DTYPES[field], len(values)))


def _shm(pb, where: str) -> ShmRef | None:
    """The tensor's shared memory parameters (None without: most requests have no parameters to convert)."""
    if not pb.parameters:
        return None
    return shm_ref({key: getattr(value, value.WhichOneof("parameter_choice") or "string_param")
                    for key, value in pb.parameters.items()}, where)


def _shm_input(pb, ref: ShmRef) -> InputTensor:
    if pb.HasField("contents"):
        raise invalid(f"input '{pb.name}': unexpected 'contents' when using shared memory")
    return InputTensor(pb.name, check_datatype(pb.name, pb.datatype), check_shape(pb.name, list(pb.shape)), None, ref)


def _output(pb) -> RequestedOutput:
    k = int(pb.parameters["classification"].int64_param) if "classification" in pb.parameters else 0
    shm = _shm(pb, f"output '{pb.name}'")
    if shm is not None and k:
        raise invalid(f"output '{pb.name}' can't set both 'shared_memory_region' and 'classification'")
    return RequestedOutput(pb.name, k, shm=shm)


def parse_request(pb, raw: list[memoryview]) -> InferRequest:
    """`raw`: the request's raw_input_contents (split off by grpc_wire.split_request)."""
    shm = [_shm(t, f"input '{t.name}'") for t in pb.inputs]
    if raw and len(raw) != sum(ref is None for ref in shm):
        raise invalid(f"{len(raw)} raw_input_contents for {len(pb.inputs)} inputs: send all inputs raw or none")
    raws = iter(raw)   # one for each input not in shared memory, in order
    inputs = [_shm_input(t, ref) if ref else _input(t, next(raws) if raw else None) for t, ref in zip(pb.inputs, shm)]
    return InferRequest(pb.model_name, pb.model_version, pb.id, inputs, [_output(o) for o in pb.outputs] or None)


def encode_response(request: InferRequest, outputs) -> service_pb2.ModelInferResponse:
    response = service_pb2.ModelInferResponse(model_name=request.model, model_version="1", id=request.id)
    for out in outputs:
        response.outputs.add(name=out.name, datatype=out.datatype, shape=list(out.shape))
        response.raw_output_contents.append(b"" if out.in_shared_memory else to_bytes(out.data))   # as Triton
    return response


class InferenceServicer(service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, state: AppState) -> None:
        self.state = state

    async def _guard(self, context) -> None:
        if self.state.auth_token is None:   # no token: skip building the call's metadata
            return
        if not self.state.authorized(dict(context.invocation_metadata()).get("authorization")):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token "
                                "(metadata authorization: Bearer <token>)")

    async def _call(self, context, fn: Callable):
        await self._guard(context)
        try:
            return await fn()
        except ServeError as exc:
            await context.abort(grpc.StatusCode[exc.status], str(exc))

    async def ServerLive(self, request, context):
        return service_pb2.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return service_pb2.ServerReadyResponse(ready=self.state.repository.ready and not self.state.draining)

    async def ModelReady(self, request, context):
        async def run():
            return service_pb2.ModelReadyResponse(
                ready=self.state.repository.get(request.name, request.version).ready)
        return await self._call(context, run)

    async def ServerMetadata(self, request, context):
        async def run():
            return service_pb2.ServerMetadataResponse(name=SERVER_NAME, version=self.state.version,
                                                      extensions=self.state.extensions)
        return await self._call(context, run)

    async def ModelMetadata(self, request, context):
        async def run():
            entry = self.state.repository.get(request.name, request.version)
            if entry.meta is None:
                raise ServeError("UNAVAILABLE", f"model '{request.name}' is not ready: {entry.problem}")
            return json_format.ParseDict(entry.metadata(), service_pb2.ModelMetadataResponse())
        return await self._call(context, run)

    async def ModelConfig(self, request, context):
        async def run():
            entry = self.state.repository.get_ready(request.name, request.version)
            config = json_format.ParseDict(entry.config(entry.batcher.max_batch), model_config_pb2.ModelConfig())
            return service_pb2.ModelConfigResponse(config=config)
        return await self._call(context, run)

    async def ModelStatistics(self, request, context):
        async def run():
            stats = self.state.statistics(request.name, request.version)
            return json_format.ParseDict(stats, service_pb2.ModelStatisticsResponse())
        return await self._call(context, run)

    async def SystemSharedMemoryStatus(self, request, context):
        async def run():
            response = service_pb2.SystemSharedMemoryStatusResponse()
            for region in self.state.shared_memory.status(request.name):
                response.regions[region["name"]].CopyFrom(
                    service_pb2.SystemSharedMemoryStatusResponse.RegionStatus(**region))
            return response
        return await self._call(context, run)

    async def SystemSharedMemoryRegister(self, request, context):
        async def run():
            self.state.shared_memory.register(request.name, request.key, request.offset, request.byte_size)
            return service_pb2.SystemSharedMemoryRegisterResponse()
        return await self._call(context, run)

    async def SystemSharedMemoryUnregister(self, request, context):
        async def run():
            self.state.shared_memory.unregister(request.name)
            return service_pb2.SystemSharedMemoryUnregisterResponse()
        return await self._call(context, run)

    async def _no_cuda(self, context):
        await self._guard(context)
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, CUDA_UNSUPPORTED)

    async def CudaSharedMemoryStatus(self, request, context):
        await self._no_cuda(context)

    async def CudaSharedMemoryRegister(self, request, context):
        await self._no_cuda(context)

    async def CudaSharedMemoryUnregister(self, request, context):
        await self._no_cuda(context)

    async def _infer(self, request: SplitRequest | TooLarge) -> service_pb2.ModelInferResponse:
        if isinstance(request, TooLarge):
            raise request.error
        if self.state.draining:
            raise ServeError("UNAVAILABLE", "the server is shutting down")
        parsed = parse_request(request.message, request.raw)
        return encode_response(parsed, await self.state.inference.infer(parsed))

    async def ModelInfer(self, request, context):
        return await self._call(context, lambda: self._infer(request))

    async def ModelStreamInfer(self, request_iterator: AsyncIterator, context) -> None:
        """One stream, many requests: each is answered as soon as it is done (requests in flight together
        batch like separate calls), a refused one by its `error_message` while the stream goes on, as
        Triton does. Cheaper per request than ModelInfer: no call to set up, no status to send. On SIGTERM
        the stream stops reading, answers what it took and ends (as idle HTTP connections are closed)."""
        await self._guard(context)
        writing = asyncio.Lock()
        pending: set[asyncio.Task] = set()

        async def answer(request) -> None:
            try:
                response = service_pb2.ModelStreamInferResponse(infer_response=await self._infer(request))
            except ServeError as exc:
                message = request.message
                response = service_pb2.ModelStreamInferResponse(error_message=str(exc), infer_response=dict(
                    model_name=message.model_name, model_version=message.model_version, id=message.id))
            async with writing:   # one message at a time on the stream
                await context.write(response)

        async def read() -> None:
            async for request in request_iterator:
                task = asyncio.ensure_future(answer(request))
                pending.add(task)
                task.add_done_callback(pending.discard)

        reader, stopping = asyncio.ensure_future(read()), asyncio.ensure_future(self.state.stopping.wait())
        try:
            await asyncio.wait((reader, stopping), return_when=asyncio.FIRST_COMPLETED)
            if reader.done():
                reader.result()   # a failed read ends the call with its error
            await asyncio.gather(*pending)
        finally:   # done, or the client went away: drop what is left
            for task in (reader, stopping, *pending):
                task.cancel()


class _Handlers:
    """Stands for the server in the generated add_..._to_server: keeps the service's method handlers."""

    def add_generic_rpc_handlers(self, handlers) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
        self.service, self.handlers = service, dict(handlers)


def _add_service(server: grpc.aio.Server, servicer: InferenceServicer, max_request_bytes: int) -> None:
    """The generated registration, with infer requests checked by size before they are split (grpc_wire)."""
    made = _Handlers()
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, made)
    checked = size_checked(split_request, max_request_bytes)
    for name in ("ModelInfer", "ModelStreamInfer"):
        made.handlers[name] = made.handlers[name]._replace(request_deserializer=checked)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(made.service, made.handlers),))
    server.add_registered_method_handlers(made.service, made.handlers)


def receive_limit(max_request_bytes: int) -> int:
    """grpc's own receive limit (see GRPC_LIMIT_SLACK)."""
    return min(max_request_bytes + max_request_bytes // GRPC_LIMIT_SLACK, GRPC_INT_MAX)


def make_server(state: AppState, address: str, max_request_bytes: int, idle_timeout: float,
                max_connections: int = DEFAULT_MAX_CONNECTIONS) -> tuple[grpc.aio.Server, int]:
    """The gRPC server bound to `address` (host:port, port 0 = any free one) and the port it got. A connection
    without a call for `idle_timeout` seconds gets GOAWAY (clients reconnect on their next call); past
    `max_connections` open ones grpc closes a new connection at once (it has no way to say why)."""
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", receive_limit(max_request_bytes)),
                                      ("grpc.max_allowed_incoming_connections", max_connections),
                                      ("grpc.max_connection_idle_ms", int(idle_timeout * 1000)),
                                      ("grpc.max_send_message_length", -1),
                                      ("grpc.so_reuseport", 0)])
    _add_service(server, InferenceServicer(state), max_request_bytes)
    port = server.add_insecure_port(address)   # grpc raises RuntimeError, or returns 0, when it cannot bind
    if port == 0:
        raise OSError(f"the port is in use or {address} is not an address here")
    return server, port
