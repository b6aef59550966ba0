"""http_server's receive path over a real socket: a body of known length is read into one buffer (partly
through the parser, the rest past it), whatever the sender's write sizes, with requests pipelined behind it;
the app gets exactly the bytes sent, and the tensor after the JSON header starts 64-byte aligned."""
from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from serve_client import loopback_http_server
from tvmzoo.run.runtime import ALIGNMENT
from tvmzoo.run.serve.http_app import Request, Response


async def _echo(request: Request) -> Response:
    """The body back, and where the byte after the JSON header sits in memory (mod ALIGNMENT)."""
    offset = int(request.headers.get("inference-header-content-length", "0"))
    body = request.body
    where = np.frombuffer(body, np.uint8)[offset:].ctypes.data % ALIGNMENT if isinstance(body, memoryview) else -1
    return Response(200, bytes(body), [("X-Kind", type(body).__name__), ("X-Align", str(where))])


def _post(body: bytes, json_length: int | None = None, chunked: bool = False) -> bytes:
    head = [b"POST /echo HTTP/1.1", b"Host: x"]
    if json_length is not None:
        head.append(b"Inference-Header-Content-Length: %d" % json_length)
    if chunked:
        pieces = [body[i:i + 70000] for i in range(0, len(body), 70000)]
        payload = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"
        return b"\r\n".join([*head, b"Transfer-Encoding: chunked"]) + b"\r\n\r\n" + payload
    return b"\r\n".join([*head, b"Content-Length: %d" % len(body)]) + b"\r\n\r\n" + body


def _exchange(data: bytes, writes: int, answers: int) -> list[tuple[dict, bytes]]:
    """Send `data` in `writes` pieces (each flushed before the next), read `answers` responses."""
    async def run() -> list[tuple[dict, bytes]]:
        async with loopback_http_server(_echo, 8 << 20) as address:
            reader, writer = await asyncio.open_connection(*address)
            step = -(-len(data) // writes)
            for start in range(0, len(data), step):
                writer.write(data[start:start + step])
                await writer.drain()
                await asyncio.sleep(0.005)   # let the server read what came so far
            got = []
            for _ in range(answers):
                status, *lines = (await reader.readuntil(b"\r\n\r\n")).decode().split("\r\n")
                headers = dict(line.lower().split(": ", 1) for line in lines if line)
                assert status.startswith("HTTP/1.1 200"), status
                got.append((headers, await reader.readexactly(int(headers["content-length"]))))
            writer.close()
        return got

    return asyncio.run(run())


@pytest.mark.parametrize("writes", [1, 3, 40])
def test_a_large_body_arrives_whole_and_aligned_with_requests_pipelined_behind_it(writes):
    rng = np.random.default_rng(writes)
    header = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3, 224, 224]}]}).encode()
    tensor = rng.standard_normal((1, 3, 224, 224)).astype(np.float32).tobytes()   # 602 KB, as Lite0's
    small = b'{"a": 1}'
    data = _post(header + tensor, len(header)) + _post(small) + _post(tensor[:50000]) + _post(tensor, chunked=True)
    answers = _exchange(data, writes, 4)
    assert [body for _, body in answers] == [header + tensor, small, tensor[:50000], tensor]
    assert [headers["x-kind"] for headers, _ in answers] == ["memoryview", "bytes", "memoryview", "bytes"]
    assert answers[0][0]["x-align"] == "0" and answers[2][0]["x-align"] == "0"
