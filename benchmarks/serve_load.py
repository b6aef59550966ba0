"""Load generators for benchmarks/serve_perf.py, one client per concurrency slot, each awaiting its answer
before it sends again (perf_analyzer's closed loop).

`raw` (the default) builds each request once, as perf_analyzer does: HTTP, the binary-tensor request (headers
and body) sent as-is over one keep-alive connection per slot with asyncio streams; gRPC, the serialized
ModelInferRequest sent through a bytes-in / bytes-out method on one grpc.aio channel. `stream` (gRPC only) sends
the same bytes on Triton's bidirectional ModelStreamInfer, one stream per slot, as perf_analyzer --streaming
does: no call to set up per request. Every answer is still checked: status, the request's own id (a tag per
slot), the output's shape and its top class against the reference answer. `tritonclient` is tritonclient's
asyncio clients, which encode 602 KB per request in Python.
"""
from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable

import grpc
import numpy as np
import tritonclient.grpc.aio as grpc_aio
import tritonclient.http.aio as http_aio
from tritonclient.grpc import service_pb2

GRPC_INFER = "/inference.GRPCInferenceService/ModelInfer"
GRPC_STREAM = "/inference.GRPCInferenceService/ModelStreamInfer"
Call = Callable[[], Awaitable[None]]


def _check(tag: str, got_tag: str, shape: list[int], logits: bytes, top: int) -> None:
    values = np.frombuffer(logits, np.float32)
    if got_tag != tag or values.size != int(np.prod(shape)) or int(values.reshape(shape)[0].argmax()) != top:
        raise AssertionError(f"wrong answer for {tag}: id {got_tag!r}, shape {shape}, {values.size} values")


class RawHttp:
    """One keep-alive connection sending one prebuilt binary-tensor request."""

    def __init__(self, address: str, model: str, x: np.ndarray, tag: str, top: int) -> None:
        self.address, self.tag, self.top = address, tag, top
        header = json.dumps({"id": tag, "parameters": {"binary_data_output": True}, "inputs": [
            {"name": "input", "datatype": "FP32", "shape": list(x.shape),
             "parameters": {"binary_data_size": x.nbytes}}]}).encode()
        self.request = (f"POST /v2/models/{model}/infer HTTP/1.1\r\nHost: {address}\r\n"
                        "Content-Type: application/octet-stream\r\n"
                        f"Inference-Header-Content-Length: {len(header)}\r\n"
                        f"Content-Length: {len(header) + x.nbytes}\r\n\r\n").encode() + header + x.tobytes()
        self.streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def __call__(self) -> None:
        if self.streams is None:
            host, port = self.address.rsplit(":", 1)
            self.streams = await asyncio.open_connection(host, int(port))
        reader, writer = self.streams
        writer.write(self.request)
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        fields = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in head[1:] if ":" in line)}
        body = await reader.readexactly(int(fields["content-length"]))
        if not head[0].startswith("HTTP/1.1 200"):
            raise AssertionError(f"{head[0]}: {body[:200]!r}")
        json_length = int(fields["inference-header-content-length"])
        doc = json.loads(body[:json_length])
        _check(self.tag, doc.get("id", ""), doc["outputs"][0]["shape"], body[json_length:], self.top)

    async def close(self) -> None:
        if self.streams is not None:
            self.streams[1].close()


def _infer_request(model: str, x: np.ndarray, tag: str) -> bytes:
    request = service_pb2.ModelInferRequest(model_name=model, id=tag, raw_input_contents=[x.tobytes()])
    request.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    return request.SerializeToString()


class RawGrpc:
    """One prebuilt, serialized ModelInferRequest sent through a bytes-in / bytes-out method."""

    def __init__(self, channel: grpc.aio.Channel, model: str, x: np.ndarray, tag: str, top: int) -> None:
        self.tag, self.top = tag, top
        self.request = _infer_request(model, x, tag)
        self.method = channel.unary_unary(GRPC_INFER)   # no serializers: the bytes go as they are

    async def __call__(self) -> None:
        answer = service_pb2.ModelInferResponse.FromString(await self.method(self.request))
        _check(self.tag, answer.id, list(answer.outputs[0].shape), answer.raw_output_contents[0], self.top)

    async def close(self) -> None:
        pass


class RawGrpcStream:
    """The same prebuilt request on one ModelStreamInfer stream: write it, read its answer, again."""

    def __init__(self, channel: grpc.aio.Channel, model: str, x: np.ndarray, tag: str, top: int) -> None:
        self.tag, self.top = tag, top
        self.request = _infer_request(model, x, tag)
        self.method = channel.stream_stream(GRPC_STREAM)
        self.stream: grpc.aio.StreamStreamCall | None = None

    async def __call__(self) -> None:
        if self.stream is None:
            self.stream = self.method()
        await self.stream.write(self.request)
        answer = service_pb2.ModelStreamInferResponse.FromString(await self.stream.read())
        if answer.error_message:
            raise AssertionError(f"{self.tag}: {answer.error_message}")
        out = answer.infer_response
        _check(self.tag, out.id, list(out.outputs[0].shape), out.raw_output_contents[0], self.top)

    async def close(self) -> None:
        if self.stream is not None:
            await self.stream.done_writing()
            await self.stream.code()   # the server ends the stream once our side is closed


class Tritonclient:
    """tritonclient's asyncio client, the request encoded on every call (the previous load generator)."""

    def __init__(self, client, model: str, x: np.ndarray, module) -> None:
        self.client, self.model = client, model
        self.tensor = module.InferInput("input", list(x.shape), "FP32")
        self.tensor.set_data_from_numpy(x)

    async def __call__(self) -> None:
        await self.client.infer(self.model, [self.tensor])

    async def close(self) -> None:
        pass


def grpc_channel(url: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(url, options=[("grpc.max_send_message_length", -1),
                                                   ("grpc.max_receive_message_length", -1)])


def streams(url: str) -> bool:
    """Whether the server answers ModelStreamInfer (servers before it answer UNIMPLEMENTED)."""
    async def probe() -> bool:
        async with grpc_channel(url) as channel:
            call = channel.stream_stream(GRPC_STREAM)()
            await call.done_writing()
            return await call.code() == grpc.StatusCode.OK
    return asyncio.run(probe())


def make_calls(kind: str, protocol: str, url: str, model: str, x: np.ndarray, top: int, n: int):
    """n callables (one per slot) and the shared connection to close after (or None)."""
    if kind == "tritonclient":
        module = grpc_aio if protocol == "grpc" else http_aio
        shared = module.InferenceServerClient(url) if protocol == "grpc" else \
            module.InferenceServerClient(url, conn_limit=n)
        return [Tritonclient(shared, model, x, module) for _ in range(n)], shared
    if protocol == "grpc":
        shared = grpc_channel(url)
        kind_class = RawGrpcStream if kind == "stream" else RawGrpc
        return [kind_class(shared, model, x, f"slot{i}", top) for i in range(n)], shared
    return [RawHttp(url, model, x, f"slot{i}", top) for i in range(n)], None


async def closed_loop(calls: list, seconds: float, warmup: float = 1.0) -> tuple[list[float], float, float]:
    """Each slot sends, awaits, sends again; (latencies of the measured part in s, its wall s, this process's CPU s)."""
    latencies: list[float] = []

    async def slot(call: Call, until: float, record: bool) -> None:
        while time.perf_counter() < until:
            start = time.perf_counter()
            await call()
            if record:
                latencies.append(time.perf_counter() - start)

    warm_end = time.perf_counter() + warmup
    await asyncio.gather(*(slot(call, warm_end, False) for call in calls))
    cpu, start = time.process_time(), time.perf_counter()
    await asyncio.gather(*(slot(call, start + seconds, True) for call in calls))
    return latencies, time.perf_counter() - start, time.process_time() - cpu
