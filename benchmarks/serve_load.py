"""Load generators for benchmarks/serve_perf.py, one client per concurrency slot, each awaiting its answer
before it sends again (perf_analyzer's closed loop).

`raw` (the default) builds each request once, as perf_analyzer does: HTTP, the binary-tensor request (headers
and body) sent as-is over one keep-alive connection per slot with asyncio streams; gRPC, the serialized
ModelInferRequest sent through a bytes-in / bytes-out method on one grpc.aio channel. `stream` (gRPC only) sends
the same bytes on Triton's bidirectional ModelStreamInfer, one stream per slot, as perf_analyzer --streaming
does: no call to set up per request. Every answer is still checked: status, the request's own id (a tag per
slot), the output's shape and its top class against the reference answer. `tritonclient` is tritonclient's
asyncio clients, which encode 602 KB per request in Python.

`shared_memory="system"` (perf_analyzer's --shared-memory system) for raw and stream: each slot registers its
own input region, written once, and its own output region (tritonclient.utils.shared_memory in /dev/shm), so a
request carries only its JSON / protobuf header and the logits come back in the output region.
"""
from __future__ import annotations

import asyncio
import itertools
import json
import os
import time
from collections.abc import Awaitable, Callable

import grpc
import numpy as np
import tritonclient.grpc as grpc_sync
import tritonclient.grpc.aio as grpc_aio
import tritonclient.http as http_sync
import tritonclient.http.aio as http_aio
import tritonclient.utils.shared_memory as shm
from tritonclient.grpc import service_pb2

GRPC_INFER = "/inference.GRPCInferenceService/ModelInfer"
GRPC_STREAM = "/inference.GRPCInferenceService/ModelStreamInfer"
Call = Callable[[], Awaitable[None]]
_keys = itertools.count()


def on_cores(cpus: frozenset[int] | None) -> list[str]:
    """The prefix that runs a child program on `cpus` (None: where this process runs). util-linux's taskset, not
    a preexec_fn: a fork with grpc's threads running aborts the child in grpc's fork handler."""
    return [] if cpus is None else ["taskset", "-c", ",".join(map(str, sorted(cpus)))]


def _check(tag: str, got_tag: str, shape: list[int], logits: bytes, top: int) -> None:
    values = np.frombuffer(logits, np.float32)
    if got_tag != tag or values.size != int(np.prod(shape)) or int(values.reshape(shape)[0].argmax()) != top:
        raise AssertionError(f"wrong answer for {tag}: id {got_tag!r}, shape {shape}, {values.size} values")


class ShmRegions:
    """One client's system shared memory: its input region holding `x` (written once) and its output region,
    registered with the server at `url` (HTTP or gRPC by `protocol`), named after `tag`."""

    def __init__(self, protocol: str, url: str, model: str, x: np.ndarray, tag: str) -> None:
        module = grpc_sync if protocol == "grpc" else http_sync
        self.client = module.InferenceServerClient(url)
        meta = self.client.get_model_metadata(model, **({"as_json": True} if protocol == "grpc" else {}))
        self.input, self.output = meta["inputs"][0]["name"], meta["outputs"][0]["name"]
        self.out_shape = [len(x), int(meta["outputs"][0]["shape"][-1])]
        self.in_bytes, self.out_bytes = x.nbytes, 4 * int(np.prod(self.out_shape))
        self.names = [f"{tag}_{os.getpid()}_{next(_keys)}_{side}" for side in ("in", "out")]
        self.handles = []
        for name, size in zip(self.names, (self.in_bytes, self.out_bytes)):
            key = f"/serve_load_{name}"
            self.handles.append(shm.create_shared_memory_region(name, key, size, create_only=True))
            self.client.register_system_shared_memory(name, key, size)
        shm.set_shared_memory_region(self.handles[0], [np.ascontiguousarray(x, np.float32)])

    def logits(self) -> bytes:
        return shm.get_contents_as_numpy(self.handles[1], np.float32, self.out_shape).tobytes()

    def close(self) -> None:
        try:
            for name in self.names:
                self.client.unregister_system_shared_memory(name)
        finally:   # the objects go even when the server is gone
            for handle in self.handles:
                shm.destroy_shared_memory_region(handle)
            self.client.close()


class RawHttp:
    """One keep-alive connection sending one prebuilt binary-tensor request."""

    def __init__(self, address: str, model: str, x: np.ndarray, tag: str, top: int, shm: ShmRegions | None = None
                 ) -> None:
        self.address, self.tag, self.top, self.shm = address, tag, top, shm
        if shm is None:
            header = json.dumps({"id": tag, "parameters": {"binary_data_output": True}, "inputs": [
                {"name": "input", "datatype": "FP32", "shape": list(x.shape),
                 "parameters": {"binary_data_size": x.nbytes}}]}).encode()
            body = header + x.tobytes()
        else:   # the JSON header alone: the tensors are in shared memory
            body = header = json.dumps({"id": tag, "inputs": [
                {"name": shm.input, "datatype": "FP32", "shape": list(x.shape), "parameters": {
                    "shared_memory_region": shm.names[0], "shared_memory_byte_size": shm.in_bytes}}], "outputs": [
                {"name": shm.output, "parameters": {
                    "shared_memory_region": shm.names[1], "shared_memory_byte_size": shm.out_bytes}}]}).encode()
        self.request = (f"POST /v2/models/{model}/infer HTTP/1.1\r\nHost: {address}\r\n"
                        "Content-Type: application/octet-stream\r\n"
                        f"Inference-Header-Content-Length: {len(header)}\r\n"
                        f"Content-Length: {len(body)}\r\n\r\n").encode() + body
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
        json_length = int(fields.get("inference-header-content-length", len(body)))
        doc = json.loads(body[:json_length])
        logits = self.shm.logits() if self.shm else body[json_length:]
        _check(self.tag, doc.get("id", ""), doc["outputs"][0]["shape"], logits, self.top)

    async def close(self) -> None:
        if self.streams is not None:
            self.streams[1].close()
        if self.shm is not None:
            self.shm.close()


def _infer_request(model: str, x: np.ndarray, tag: str, shm: ShmRegions | None = None) -> bytes:
    if shm is None:
        request = service_pb2.ModelInferRequest(model_name=model, id=tag, raw_input_contents=[x.tobytes()])
        request.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
        return request.SerializeToString()
    request = service_pb2.ModelInferRequest(model_name=model, id=tag)
    tensors = (request.inputs.add(name=shm.input, datatype="FP32", shape=list(x.shape)),
               request.outputs.add(name=shm.output))
    for tensor, name, size in zip(tensors, shm.names, (shm.in_bytes, shm.out_bytes)):
        tensor.parameters["shared_memory_region"].string_param = name
        tensor.parameters["shared_memory_byte_size"].int64_param = size
    return request.SerializeToString()


class RawGrpc:
    """One prebuilt, serialized ModelInferRequest sent through a bytes-in / bytes-out method."""

    def __init__(self, channel: grpc.aio.Channel, model: str, x: np.ndarray, tag: str, top: int,
                 shm: ShmRegions | None = None) -> None:
        self.tag, self.top, self.shm = tag, top, shm
        self.request = _infer_request(model, x, tag, shm)
        self.method = channel.unary_unary(GRPC_INFER)   # no serializers: the bytes go as they are

    async def __call__(self) -> None:
        answer = service_pb2.ModelInferResponse.FromString(await self.method(self.request))
        logits = self.shm.logits() if self.shm else answer.raw_output_contents[0]
        _check(self.tag, answer.id, list(answer.outputs[0].shape), logits, self.top)

    async def close(self) -> None:
        if self.shm is not None:
            self.shm.close()


class RawGrpcStream:
    """The same prebuilt request on one ModelStreamInfer stream: write it, read its answer, again."""

    def __init__(self, channel: grpc.aio.Channel, model: str, x: np.ndarray, tag: str, top: int,
                 shm: ShmRegions | None = None) -> None:
        self.tag, self.top, self.shm = tag, top, shm
        self.request = _infer_request(model, x, tag, shm)
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
        logits = self.shm.logits() if self.shm else out.raw_output_contents[0]
        _check(self.tag, out.id, list(out.outputs[0].shape), logits, self.top)

    async def close(self) -> None:
        if self.stream is not None:
            await self.stream.done_writing()
            await self.stream.code()   # the server ends the stream once our side is closed
        if self.shm is not None:
            self.shm.close()


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


def make_calls(kind: str, protocol: str, url: str, model: str, x: np.ndarray, top: int, n: int,
               shared_memory: str = "none"):
    """n callables (one per slot) and the shared connection to close after (or None); `shared_memory`
    "system": raw and stream clients send their tensors by shared memory (ShmRegions)."""
    if shared_memory == "system" and kind not in ("raw", "stream"):
        raise ValueError(f"--shared-memory system is for the raw and stream clients, not {kind}")

    def regions(tag: str) -> ShmRegions | None:
        return ShmRegions(protocol, url, model, x, tag) if shared_memory == "system" else None

    if kind == "tritonclient":
        module = grpc_aio if protocol == "grpc" else http_aio
        shared = module.InferenceServerClient(url) if protocol == "grpc" else \
            module.InferenceServerClient(url, conn_limit=n)
        return [Tritonclient(shared, model, x, module) for _ in range(n)], shared
    if protocol == "grpc":
        shared = grpc_channel(url)
        kind_class = RawGrpcStream if kind == "stream" else RawGrpc
        return [kind_class(shared, model, x, f"slot{i}", top, regions(f"slot{i}")) for i in range(n)], shared
    return [RawHttp(url, model, x, f"slot{i}", top, regions(f"slot{i}")) for i in range(n)], None


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
