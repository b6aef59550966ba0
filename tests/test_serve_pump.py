"""`tvmzoo serve --native`'s HTTP pump (native/pump.cc, http_pump): a real server process, real tiny builds, real
photos. After Python answered a binary-tensor infer request on a keep-alive connection, the pump answers the requests
that repeat it (only the tensor differs); everything else on the connection is Python's again, answered as ever."""
from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import threading
import time

import numpy as np
import pytest

httpclient = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

from serve_client import FUSED, HOST, ServerProcess, scrape  # noqa: E402
from tvmzoo.preprocess import apply, read_image  # noqa: E402
from tvmzoo.preprocess.fused import fused_input  # noqa: E402
from tvmzoo.run.runtime import CompiledModel  # noqa: E402
from tvmzoo.run.serve.config import ServeConfig  # noqa: E402
from tvmzoo.run.serve.server import Server  # noqa: E402

pytestmark = pytest.mark.reliability
IDLE = 2   # --idle-timeout-seconds: a stalled request gets its 408 within ~IDLE + 1 s
PUMPED = "tvmzoo_http_pump_success"


@pytest.fixture(scope="module")
def server(serve_repo):
    proc = ServerProcess.start(serve_repo, "--native", "--instances", "2", "--threads", "1",
                               "--idle-timeout-seconds", str(IDLE))
    yield proc
    assert proc.stop() == 0, proc.output()


@pytest.fixture(scope="module")
def photos(serve_repo, sample_images):
    """Per model, the tensors of 24 photos, one row each, with what CompiledModel.run answers."""
    out = {}
    for name in (HOST, FUSED):
        model = CompiledModel.load(serve_repo / name)
        xs = [_tensor(model, p)[None] for p in sample_images[:24]]
        out[name] = [(x, model.run(x)) for x in xs]
    return out


def _tensor(model: CompiledModel, path) -> np.ndarray:
    image = read_image(path)
    return fused_input(model.preprocessing, image) if model.fused else apply(model.preprocessing, image)


def _request(model: str, x: np.ndarray, tag: str = "", binary: bool = True) -> bytes:
    """A binary-tensor infer request, as benchmarks/serve_load.py's raw client sends it (JSON data: binary=False)."""
    datatype = "UINT8" if x.dtype == np.uint8 else "FP32"
    tensor = {"name": "input", "datatype": datatype, "shape": list(x.shape)}
    if binary:
        tensor["parameters"] = {"binary_data_size": x.nbytes}
    else:
        tensor["data"] = x.ravel().tolist()
    doc = {**({"id": tag} if tag else {}), "inputs": [tensor],
           "outputs": [{"name": "output", "parameters": {"binary_data": binary}}]}
    header = json.dumps(doc).encode()
    body = header + x.tobytes() if binary else header
    extra = f"Inference-Header-Content-Length: {len(header)}\r\n" if binary else ""
    return (f"POST /v2/models/{model}/infer HTTP/1.1\r\nHost: test\r\nContent-Type: application/octet-stream\r\n"
            f"{extra}Content-Length: {len(body)}\r\n\r\n").encode() + body


class Raw:
    """One keep-alive connection, raw bytes."""

    def __init__(self, address: str) -> None:
        host, port = address.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=30)
        self.file = self.sock.makefile("rb")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def answer(self) -> tuple[int, dict[str, str], bytes]:
        status = self.file.readline()
        if not status:
            raise ConnectionError("the server closed the connection")
        headers = {}
        while (line := self.file.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        return int(status.split()[1]), headers, self.file.read(int(headers["content-length"]))

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def _logits(status: int, headers: dict[str, str], body: bytes) -> np.ndarray:
    assert status == 200, body[:300]
    json_length = int(headers["inference-header-content-length"])
    doc = json.loads(body[:json_length])
    return np.frombuffer(body[json_length:], np.float32).reshape(doc["outputs"][0]["shape"])


def _check(answer, expected: np.ndarray) -> None:
    np.testing.assert_allclose(_logits(*answer), expected, rtol=1e-5, atol=1e-6)


def _pumped(server, model: str) -> float:
    return scrape(server.http, model).get(PUMPED, 0.0)


@pytest.mark.parametrize("name", [FUSED, HOST])
def test_a_keep_alive_client_is_answered_by_the_pump_right(server, photos, name):
    before = scrape(server.http, name)
    raw = Raw(server.http)
    try:
        for x, expected in photos[name]:
            raw.send(_request(name, x, "client-1"))
            status, headers, body = raw.answer()
            _check((status, headers, body), expected)
            assert json.loads(body[:int(headers["inference-header-content-length"])])["id"] == "client-1"
            assert re.fullmatch(r"\w{3}, \d\d \w{3} \d{4} \d\d:\d\d:\d\d GMT", headers["date"])
    finally:
        raw.close()
    after = scrape(server.http, name)
    n = len(photos[name])
    # the first is Python's, which hands the connection over; the pump answers the rest, counted in the same series
    assert after[PUMPED] - before.get(PUMPED, 0) == n - 1
    assert after["nv_inference_request_success"] - before["nv_inference_request_success"] == n
    assert after["nv_inference_count"] - before["nv_inference_count"] == n   # the engine ran each


def test_pipelined_requests_are_answered_in_order(server, photos):
    raw = Raw(server.http)
    try:
        first, expected = photos[FUSED][0]
        raw.send(_request(FUSED, first))
        python_answer = raw.answer()
        _check(python_answer, expected)
        before = _pumped(server, FUSED)
        raw.send(b"".join(_request(FUSED, x) for x, _ in photos[FUSED]))
        answers = [raw.answer() for _ in photos[FUSED]]
        for answer, (_, expected) in zip(answers, photos[FUSED]):
            _check(answer, expected)
        status, headers, body = answers[0]   # the same tensor: the pump's answer is Python's, but for its Date
        assert (status, body) == python_answer[::2]
        assert {**headers, "date": ""} == {**python_answer[1], "date": ""}
    finally:
        raw.close()
    assert _pumped(server, FUSED) - before == len(photos[FUSED])


def test_requests_of_several_rows(server, serve_repo, photos):
    """Three photos a request on the batch-4 build: the engine pads the batch, each answer is the model's."""
    model = CompiledModel.load(serve_repo / HOST)
    before = _pumped(server, HOST)
    raw = Raw(server.http)
    try:
        for start in range(0, 12, 3):
            x = np.concatenate([x for x, _ in photos[HOST][start:start + 3]])
            raw.send(_request(HOST, x))
            _check(raw.answer(), model.run(x))
    finally:
        raw.close()
    assert _pumped(server, HOST) - before == 3


def test_after_the_hand_over_everything_else_is_answered_by_python(server, photos):
    """Metadata, JSON tensors, a NaN tensor, another model and another id on the pump's connection: each gets
    Python's answer, and the connection keeps going."""
    (x, expected), (y, expected_y) = photos[HOST][:2]
    raw = Raw(server.http)
    try:
        def pumped_twice() -> None:   # Python's answer hands the connection over; the pump answers the second
            before = _pumped(server, HOST)
            for _ in range(2):
                raw.send(_request(HOST, x))
                _check(raw.answer(), expected)
            assert _pumped(server, HOST) - before == 1

        pumped_twice()
        raw.send(f"GET /v2/models/{HOST} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
        status, _, body = raw.answer()
        assert status == 200 and json.loads(body)["name"] == HOST
        pumped_twice()
        raw.send(_request(HOST, y, binary=False))
        status, headers, body = raw.answer()
        assert status == 200
        np.testing.assert_allclose(np.array(json.loads(body)["outputs"][0]["data"]).reshape(expected_y.shape),
                                   expected_y, rtol=1e-5, atol=1e-6)
        pumped_twice()
        bad = x.copy()
        bad.flat[7] = np.nan
        raw.send(_request(HOST, bad))
        status, _, body = raw.answer()
        assert status == 400
        assert "holds 1 NaN or infinite values (the first at flat index 7)" in json.loads(body)["error"]
        pumped_twice()
        fused_x, fused_expected = photos[FUSED][0]
        raw.send(_request(FUSED, fused_x))
        _check(raw.answer(), fused_expected)
        raw.send(_request(HOST, y, "another-id"))
        _check(raw.answer(), expected_y)
    finally:
        raw.close()


def test_a_client_with_per_request_ids_stays_with_python_after_a_few(server, photos):
    raw = Raw(server.http)
    try:
        raw.send(_request(FUSED, photos[FUSED][0][0], "id-0"))   # handed over: the pump expects "id-0" again
        _check(raw.answer(), photos[FUSED][0][1])
        before = _pumped(server, FUSED)
        for i, (x, expected) in enumerate(photos[FUSED][1:12], 1):
            raw.send(_request(FUSED, x, f"id-{i}"))
            _check(raw.answer(), expected)
        assert _pumped(server, FUSED) == before   # every one differed: the pump answered none
        raw.send(_request(FUSED, photos[FUSED][0][0], "id-11"))   # repeats the last: Python's (no more hand-overs)
        _check(raw.answer(), photos[FUSED][0][1])
        assert _pumped(server, FUSED) == before
    finally:
        raw.close()


def test_a_request_stalled_on_the_pump_gets_408_and_idle_connections_close(server, photos):
    x, expected = photos[FUSED][0]
    raw = Raw(server.http)
    try:
        raw.send(_request(FUSED, x))
        _check(raw.answer(), expected)
        request = _request(FUSED, x)
        raw.send(request[:len(request) - 100])   # the pump's, stalled before the tensor's end
        start = time.monotonic()
        status, _, body = raw.answer()
        assert status == 408 and "stalled" in json.loads(body)["error"]
        assert IDLE - 0.5 < time.monotonic() - start < IDLE + 3
    finally:
        raw.close()
    raw = Raw(server.http)
    try:
        for _ in range(2):
            raw.send(_request(FUSED, x))
            _check(raw.answer(), expected)
        start = time.monotonic()
        assert raw.file.read(1) == b""   # the pump closes it, idle, as Python does
        assert IDLE - 0.5 < time.monotonic() - start < IDLE + 3
    finally:
        raw.close()


def test_tritonclient_http_works_unchanged(server, photos):
    client = httpclient.InferenceServerClient(server.http)
    before = _pumped(server, HOST)
    for x, expected in photos[HOST][:8]:
        tensor = httpclient.InferInput("input", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        out = client.infer(HOST, [tensor], outputs=[httpclient.InferRequestedOutput("output")])
        np.testing.assert_allclose(out.as_numpy("output"), expected, rtol=1e-5, atol=1e-6)
    assert _pumped(server, HOST) - before == 7
    client.close()


def test_connections_on_the_pump_count_toward_max_connections(serve_repo, photos):
    server = ServerProcess.start(serve_repo, "--native", "--max-connections", "2", "--instances", "1", "--threads", "1")
    x, expected = photos[FUSED][0]
    held = [Raw(server.http) for _ in range(2)]
    try:
        for raw in held:   # Python answers the first and hands the connection over, the pump the second
            for _ in range(2):
                raw.send(_request(FUSED, x))
                _check(raw.answer(), expected)
        third = Raw(server.http)
        status, _, body = third.answer()   # refused on connecting, before any request
        assert status == 503 and "--max-connections" in json.loads(body)["error"]
        third.close()
        held.pop().close()   # the pump sees it closed and tells Python: room for one
        deadline = time.monotonic() + 10
        while True:
            raw = Raw(server.http)
            try:
                raw.send(_request(FUSED, x))
                answer = raw.answer()
            except OSError:   # refused: its 503 came and the connection closed while we sent
                answer = (503, {}, b"")
            finally:
                raw.close()
            if answer[0] == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        _check(answer, expected)
    finally:
        for raw in held:
            raw.close()
        assert server.stop() == 0, server.output()


def test_sigterm_with_connections_on_the_pump_loses_no_accepted_request(serve_repo, photos):
    """Four keep-alive clients loop on the pump when SIGTERM comes: every answer they get is right, each loop
    ends refused (503 from Python, or the connection closed between requests), and the server exits 0."""
    server = ServerProcess.start(serve_repo, "--native", "--instances", "2", "--threads", "1")
    outcomes: list[str] = []
    answered = [0] * 4

    def loop(i: int) -> None:
        x, expected = photos[FUSED][i]
        raw = Raw(server.http)
        try:
            while True:
                raw.send(_request(FUSED, x))
                status, headers, body = raw.answer()
                if status != 200:
                    outcomes.append(f"refused {status} {body[:80]!r}")
                    return
                _check((status, headers, body), expected)
                answered[i] += 1
        except (ConnectionError, OSError) as exc:
            outcomes.append(f"closed {exc!r}")
        except AssertionError as exc:
            outcomes.append(f"WRONG {exc!r}")
        finally:
            raw.close()

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (min(answered) < 5 or _pumped(server, FUSED) < 20):
        time.sleep(0.02)
    server.terminate()
    for t in threads:
        t.join(60)
    assert server.proc.wait(30) == 0
    assert len(outcomes) == 4 and not [o for o in outcomes if "WRONG" in o], outcomes
    assert min(answered) >= 5, answered
    server.wait_for(re.compile(r"stopped \(\d+ requests were in flight"), 10)


def test_the_hand_over_and_back_on_plain_asyncio(serve_repo, photos):
    """The server runs on uvloop; on asyncio's own loop (no uvloop installed) the hand-over and the way back keep
    the TCP connection too: no FIN, no reset, no byte lost."""
    cfg = ServeConfig(serve_repo, http_port=0, grpc_port=0, instances=1, threads=1, native=True)

    def client(address: str) -> None:
        raw = Raw(address)
        try:
            for round_ in range(2):   # the second round after the connection came back (a metadata GET)
                for y, expected_y in photos[FUSED][:6]:
                    raw.send(_request(FUSED, y))
                    _check(raw.answer(), expected_y)
                raw.send(f"GET /v2/models/{FUSED} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
                assert raw.answer()[0] == 200
        finally:
            raw.close()

    async def main() -> float:
        assert type(asyncio.get_running_loop()).__module__.startswith("asyncio")   # not uvloop's
        server = Server(cfg)
        http_port, _ = await server.start()
        await asyncio.to_thread(client, f"127.0.0.1:{http_port}")
        pumped = server.metrics.fronts["http_pump"].value(FUSED, "1")
        await server.drain()
        return pumped

    assert asyncio.run(main()) == 10   # 5 of each round's 6


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="no /dev/shm: no POSIX shared memory here")
def test_shared_memory_requests_are_answered_by_the_pump_and_their_errors_by_python(server, photos):
    """tritonclient.http with the input, the output or both in registered regions: after Python's first answer the
    pump reads / writes the regions (the request bytes repeat, the region's contents change); a region unregistered
    or truncated under the pump sends the request back to Python, which answers its error."""
    shm = pytest.importorskip("tritonclient.utils.shared_memory")
    client = httpclient.InferenceServerClient(server.http)
    x0, e0 = photos[HOST][0]
    span = x0.nbytes + e0.nbytes
    key = f"/tvmzoo-pump-{os.getpid()}"
    region = shm.create_shared_memory_region("pump_io", key, span)
    try:
        client.register_system_shared_memory("pump_io", key, span)
        for in_shm, out_shm in ((True, True), (True, False), (False, True)):
            before = _pumped(server, HOST)
            for x, expected in photos[HOST][:6]:
                tensor = httpclient.InferInput("input", list(x.shape), "FP32")
                if in_shm:
                    shm.set_shared_memory_region(region, [x])
                    tensor.set_shared_memory("pump_io", x.nbytes)
                else:
                    tensor.set_data_from_numpy(x)
                out = httpclient.InferRequestedOutput("output", binary_data=True)
                if out_shm:
                    out.set_shared_memory("pump_io", e0.nbytes, offset=x0.nbytes)
                result = client.infer(HOST, [tensor], outputs=[out])
                got = (shm.get_contents_as_numpy(region, np.float32, expected.shape, offset=x0.nbytes) if out_shm
                       else result.as_numpy("output"))
                np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
            # the first is Python's (it hands the connection over); with the socket's tensors changing, every later
            # request's bytes before the tensor repeat, so the pump answers them
            assert _pumped(server, HOST) - before == 5, (in_shm, out_shm)

        client.close()   # a connection changing its requests 3 times stays with Python (MAX_MISMATCHES): a new one
        client = httpclient.InferenceServerClient(server.http)
        before = _pumped(server, HOST)
        tensor = httpclient.InferInput("input", list(x0.shape), "FP32")
        tensor.set_shared_memory("pump_io", x0.nbytes)
        shm.set_shared_memory_region(region, [x0])
        binary = [httpclient.InferRequestedOutput("output", binary_data=True)]
        for _ in range(2):
            np.testing.assert_allclose(client.infer(HOST, [tensor], outputs=binary).as_numpy("output"), e0,
                                       rtol=1e-5, atol=1e-6)
        os.truncate(f"/dev/shm/{key.lstrip('/')}", 100)   # the client shrinks its object under the pump
        with pytest.raises(InferenceServerException) as err:
            client.infer(HOST, [tensor], outputs=binary)
        assert err.value.status() == "400" and "truncated" in err.value.message()
        client.unregister_system_shared_memory("pump_io")
        with pytest.raises(InferenceServerException) as err:
            client.infer(HOST, [tensor], outputs=binary)
        assert err.value.status() == "404" and "Unable to find shared memory region" in err.value.message()
        assert _pumped(server, HOST) - before == 1   # the second only
        assert server.proc.poll() is None
    finally:
        shm.destroy_shared_memory_region(region)
    client.close()
