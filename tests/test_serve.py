"""`tvmzoo serve` as a user runs it: a real server process on 127.0.0.1, real tritonclient clients,
real compiled tiny builds (batch 4 with host preprocessing, batch 1 fused, one damaged) and real photos."""
from __future__ import annotations

import http.client
import json
import queue
import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

grpcclient = pytest.importorskip("tritonclient.grpc")
httpclient = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

from serve_client import BROKEN, FUSED, HOST, OTHER_CPU, ServerProcess, scrape  # noqa: E402
from tvmzoo.preprocess.fused import fused_input  # noqa: E402
from tvmzoo.preprocess import apply, read_image  # noqa: E402
from tvmzoo.run.runner import classify  # noqa: E402
from tvmzoo.run.runtime import CompiledModel  # noqa: E402

pytestmark = pytest.mark.reliability


@pytest.fixture(scope="module")
def repo(serve_repo):
    return serve_repo


@pytest.fixture(scope="module")
def models(repo):
    return {name: CompiledModel.load(repo / name) for name in (HOST, FUSED)}


@pytest.fixture(scope="module", params=["native", "python"])
def server(repo, request):
    """Both data paths: the default (native: C++ engine and HTTP pump) and --no-native (Python's)."""
    path = [] if request.param == "native" else ["--no-native"]
    proc = ServerProcess.start(repo, "--max-queue-delay-us", "20000", "--instances", "2", "--threads", "1",
                               "--max-request-bytes", "1000000", *path)
    assert f"data path: {'native' if path == [] else 'Python'}" in "\n".join(proc.lines)
    yield proc
    assert proc.stop() == 0, proc.output()


def _tensor(model: CompiledModel, path) -> np.ndarray:
    image = read_image(path)
    return fused_input(model.preprocessing, image) if model.fused else apply(model.preprocessing, image)


def _infer(client, module, name: str, x: np.ndarray, binary: bool = True, **kwargs):
    datatype = "UINT8" if x.dtype == np.uint8 else "FP32"
    tensor = module.InferInput("input", list(x.shape), datatype)
    tensor.set_data_from_numpy(x, **({"binary_data": binary} if module is httpclient else {}))
    return client.infer(name, [tensor], **kwargs)


def _images(client, module, name: str, paths, k: int):
    tensor = module.InferInput("input", [len(paths)], "BYTES")
    tensor.set_data_from_numpy(np.array([p.read_bytes() for p in paths], dtype=object))
    return client.infer(name, [tensor], outputs=[module.InferRequestedOutput("output", class_count=k)])


def test_metadata_readiness_and_the_damaged_build(server, repo):
    h, g = httpclient.InferenceServerClient(server.http), grpcclient.InferenceServerClient(server.grpc)
    meta = json.loads((repo / FUSED / "mod.json").read_text())
    for got in (h.get_model_metadata(FUSED), g.get_model_metadata(FUSED, as_json=True)):
        assert got["inputs"][0]["name"] == meta["input"]["name"]
        assert got["inputs"][0]["datatype"] == "UINT8"
        assert [int(d) for d in got["inputs"][0]["shape"]] == [-1, *meta["input"]["shape"][1:]]
        assert got["outputs"][0]["name"] == meta["outputs"][0]["name"]
        assert [int(d) for d in got["outputs"][0]["shape"]] == [-1, meta["outputs"][0]["shape"][1]]
    assert h.is_server_live() and g.is_server_live()
    assert h.is_model_ready(HOST) and g.is_model_ready(FUSED)
    assert not h.is_model_ready(BROKEN) and not g.is_model_ready(BROKEN)
    assert not h.is_model_ready(OTHER_CPU) and not g.is_model_ready(OTHER_CPU)
    assert not h.is_server_ready() and not g.is_server_ready()   # strict readiness, as Triton's default
    assert any("NOT READY" in line and "checksum" in line for line in server.lines)
    assert any(f"{OTHER_CPU}: NOT READY" in line and "avx10_9" in line for line in server.lines)
    with pytest.raises(InferenceServerException, match="checksum") as err:
        _infer(h, httpclient, BROKEN, np.zeros((1, 3, 32, 32), np.float32))
    assert err.value.status() == "503"


@pytest.mark.parametrize("name", [HOST, FUSED])
def test_tensor_inputs_equal_compiled_model_run(server, models, sample_images, name):
    model = models[name]
    x = np.stack([_tensor(model, p) for p in sample_images[:3]])
    expected = model.run(x)
    h, g = httpclient.InferenceServerClient(server.http), grpcclient.InferenceServerClient(server.grpc)
    for result in (_infer(h, httpclient, name, x, binary=True), _infer(h, httpclient, name, x, binary=False),
                   _infer(g, grpcclient, name, x)):
        np.testing.assert_array_equal(result.as_numpy("output"), expected)


@pytest.mark.parametrize("name", [HOST, FUSED])
def test_image_bytes_top_k_equal_the_runner(server, models, sample_images, name):
    model, photos = models[name], sample_images[10:14]
    runner = classify(model, photos, model.preprocessing, progress=False).predictions
    h, g = httpclient.InferenceServerClient(server.http), grpcclient.InferenceServerClient(server.grpc)
    for result in (_images(h, httpclient, name, photos, 5), _images(g, grpcclient, name, photos, 5)):
        rows = result.as_numpy("output")
        assert rows.shape == (4, 5)
        for row, pred in zip(rows, runner):
            fields = [item.decode().split(":", 2) for item in row]
            assert tuple(int(f[1]) for f in fields) == pred.ids
            np.testing.assert_allclose([float(f[0]) for f in fields], pred.probs, atol=1e-6)
            assert all(f[2] for f in fields)   # 1000 classes: ImageNet names as labels


def test_64_concurrent_clients_get_their_own_answers(server, models, sample_images):
    model, photos = models[HOST], sample_images[100:164]
    inputs = [_tensor(model, p)[None] for p in photos]
    expected = [model.run(x) for x in inputs]
    before = scrape(server.http, HOST)

    def one(i: int) -> np.ndarray:
        if i % 2:
            return _infer(grpcclient.InferenceServerClient(server.grpc), grpcclient, HOST, inputs[i]).as_numpy("output")
        return _infer(httpclient.InferenceServerClient(server.http), httpclient, HOST, inputs[i]).as_numpy("output")

    with ThreadPoolExecutor(64) as pool:
        results = list(pool.map(one, range(64)))
    for i, got in enumerate(results):
        np.testing.assert_allclose(got, expected[i], rtol=1e-5, atol=1e-6)
        others = [j for j in range(64) if not np.allclose(expected[j], expected[i], rtol=1e-5, atol=1e-6)]
        assert not any(np.allclose(got, expected[j], rtol=1e-5, atol=1e-6) for j in others)
    after = scrape(server.http, HOST)
    assert after["nv_inference_request_success"] - before["nv_inference_request_success"] == 64
    assert after["nv_inference_count"] - before["nv_inference_count"] == 64
    executions = after["nv_inference_exec_count"] - before["nv_inference_exec_count"]
    assert 16 <= executions < 64   # requests were batched (at most 4 rows per batch)
    assert after["nv_inference_queue_duration_us"] > before["nv_inference_queue_duration_us"]
    assert after["nv_inference_compute_infer_duration_us"] > before["nv_inference_compute_infer_duration_us"]
    stats = [httpclient.InferenceServerClient(server.http).get_inference_statistics(HOST)["model_stats"][0],
             grpcclient.InferenceServerClient(server.grpc).get_inference_statistics(HOST, as_json=True)["model_stats"][0]]
    for got in stats:   # the statistics extension perf_analyzer reads, from the same counters
        assert int(got["inference_stats"]["success"]["count"]) == after["nv_inference_request_success"]
        assert int(got["execution_count"]) >= after["nv_inference_exec_count"]
        assert int(got["inference_stats"]["compute_infer"]["ns"]) >= after["nv_inference_compute_infer_duration_us"] * 999


def _post(address: str, path: str, body: bytes, headers: dict | None = None) -> tuple[int, dict]:
    conn = http.client.HTTPConnection(address, timeout=30)
    conn.request("POST", path, body, headers or {})
    response = conn.getresponse()
    status, text = response.status, response.read()
    conn.close()
    return status, json.loads(text) if text else {}


def _binary_images(item: bytes) -> tuple[bytes, dict]:
    blob = len(item).to_bytes(4, "little") + item
    header = json.dumps({"inputs": [{"name": "input", "datatype": "BYTES", "shape": [1],
                                     "parameters": {"binary_data_size": len(blob)}}]}).encode()
    return header + blob, {"Inference-Header-Content-Length": str(len(header))}


def _binary_floats(x: np.ndarray) -> tuple[bytes, dict]:
    header = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3, 32, 32],
                                     "parameters": {"binary_data_size": x.nbytes}}]}).encode()
    return header + x.tobytes(), {"Inference-Header-Content-Length": str(len(header))}


def _bad_requests(sample_images) -> list[tuple[str, str, bytes, dict, int, bool]]:
    """(what, model, body, headers, HTTP status, counted as the model's failure)"""
    good = {"name": "input", "datatype": "FP32", "shape": [1, 3, 32, 32], "data": [0.0] * 3072}
    jpeg = sample_images[0].read_bytes()

    def body(item) -> bytes:
        return json.dumps({"inputs": [item]}).encode()

    return [
        ("wrong shape", HOST, body({**good, "shape": [1, 3, 31, 32], "data": [0.0] * 2976}), {}, 400, True),
        ("wrong datatype", HOST, body({**good, "datatype": "INT32", "data": [0] * 3072}), {}, 400, True),
        ("wrong input name", HOST, body({**good, "name": "images"}), {}, 400, True),
        ("undecodable image", HOST, *_binary_images(b"not an image"), 400, True),
        ("truncated JPEG", FUSED, *_binary_images(jpeg[:len(jpeg) // 2]), 400, True),
        ("shape and data disagree", HOST, body({**good, "data": [0.0] * 10}), {}, 400, False),
        ("over --max-request-bytes", HOST, body({**good, "shape": [100, 3, 32, 32], "data": [0.0] * 307200}),
         {}, 413, False),
        ("malformed JSON", HOST, b'{"inputs": [', {}, 400, False),
        ("no inputs", HOST, b'{"outputs": []}', {}, 400, False),
        ("binary size past the end", HOST, body({**good, "data": None, "parameters": {"binary_data_size": 12288}}),
         {"Inference-Header-Content-Length": "0"}, 400, False),
        # session 10 (was: 500, or 200 with meaningless scores)
        ("a boolean in the shape", HOST, body({**good, "shape": [True, 3, 32, 32]}), {}, 400, False),
        ("an integer beyond 64 bits as FP32 data", HOST, body({**good, "data": [10 ** 400]}), {}, 400, False),
        ("booleans as FP32 data", HOST, body({**good, "data": [True] * 3072}), {}, 400, False),
        ("300 as UINT8 data", HOST, body({**good, "datatype": "UINT8", "data": [300] * 3072}), {}, 400, False),
        ("JSON nested 100000 deep", HOST, b'{"inputs": ' + b"[" * 100000 + b"]" * 100000 + b"}", {}, 400, False),
        ("classification: true", HOST, json.dumps({"inputs": [good], "outputs": [
            {"name": "output", "parameters": {"classification": True}}]}).encode(), {}, 400, False),
        ("NaN in JSON data", HOST, body({**good, "data": [float("nan")] * 3072}), {}, 400, True),
        ("1e300 as FP32 (infinite)", HOST, body({**good, "data": [1e300] * 3072}), {}, 400, True),
        ("NaN in binary data", HOST, *_binary_floats(np.full(3072, np.nan, np.float32)), 400, True),
        ("unknown model", "nope", body(good), {}, 404, False),
        ("unknown version", f"{HOST}/versions/7", body(good), {}, 404, False),
    ]


def test_every_bad_input_gets_its_status_and_the_server_goes_on(server, models, sample_images):
    ok = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3, 32, 32],
                                 "data": [0.5] * 3072}]}).encode()
    expected_ok = models[HOST].run(np.full((1, 3, 32, 32), 0.5, np.float32))
    before = {name: scrape(server.http, name) for name in (HOST, FUSED)}
    cases = _bad_requests(sample_images)
    for what, model, body, headers, status, _ in cases:
        if headers.get("Inference-Header-Content-Length") == "0":
            headers = {"Inference-Header-Content-Length": str(len(body))}
        got, doc = _post(server.http, f"/v2/models/{model}/infer", body, headers)
        assert got == status, (what, doc)
        assert doc["error"], what
        got, doc = _post(server.http, f"/v2/models/{HOST}/infer", ok)
        assert got == 200, (what, doc)
        np.testing.assert_array_equal(np.array(doc["outputs"][0]["data"], np.float32), expected_ok.ravel())
    failures = sum(scrape(server.http, name).get("nv_inference_request_failure", 0)
                   - before[name].get("nv_inference_request_failure", 0) for name in (HOST, FUSED))
    assert failures == sum(counted for *_, counted in cases)


def _read_response(stream, head: bool = False) -> tuple[int, dict, bytes]:
    """One HTTP/1.1 response from a socket's file: (status, headers by lower-case name, body)."""
    status = int(stream.readline().split()[1])
    headers = {}
    while (line := stream.readline().rstrip(b"\r\n")):
        name, _, value = line.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, b"" if head else stream.read(int(headers.get("content-length", 0)))


def _raw(method: str, path: str, body: bytes = b"", **headers: str) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: test", f"Content-Length: {len(body)}"]
    lines += [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def test_http_keep_alive_pipelining_continue_and_refusals(server, models):
    """What curl and load balancers rely on, over raw sockets: 100-continue before a large body, many
    requests on one connection, pipelined answers in order, 405, and refusals that close the connection."""
    x = np.full((1, 3, 32, 32), 0.25, np.float32)
    header = json.dumps({"parameters": {"binary_data_output": True}, "inputs": [
        {"name": "input", "datatype": "FP32", "shape": [1, 3, 32, 32], "parameters": {"binary_data_size": x.nbytes}}]
    }).encode()
    infer = _raw("POST", f"/v2/models/{HOST}/infer", header + x.tobytes(),
                 Inference_Header_Content_Length=str(len(header)))
    expected = models[HOST].run(x)
    host, port = server.http.split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock, sock.makefile("rb") as stream:
        head, body = infer.split(b"\r\n\r\n", 1)
        sock.sendall(head + b"\r\nExpect: 100-continue\r\n\r\n")
        assert stream.readline() == b"HTTP/1.1 100 Continue\r\n" and stream.readline() == b"\r\n"
        sock.sendall(body)
        pipelined = [infer, _raw("GET", "/v2/health/live"), _raw("GET", f"/v2/models/{HOST}/infer"),
                     _raw("GET", "/v2/nothing"), infer, _raw("HEAD", f"/v2/models/{HOST}")]
        sock.sendall(b"".join(pipelined))   # all at once: answered in order on the same connection
        answers = [_read_response(stream, head=i == len(pipelined)) for i in range(len(pipelined) + 1)]
        assert [status for status, *_ in answers] == [200, 200, 200, 405, 404, 200, 200]
        for status, headers, data in (answers[0], answers[1], answers[5]):
            json_length = int(headers["inference-header-content-length"])
            assert json.loads(data[:json_length])["outputs"][0]["datatype"] == "FP32"
            np.testing.assert_array_equal(np.frombuffer(data[json_length:], np.float32), expected.ravel())
        assert int(answers[-1][1]["content-length"]) > 0   # HEAD: headers only (the next read would hang if not)
        assert all("connection" not in headers for _, headers, _ in answers)          # kept alive
    for request, status in ((b"NOT HTTP AT ALL\r\n\r\n", 400),
                            (_raw("POST", f"/v2/models/{HOST}/infer").replace(b"Length: 0", b"Length: 99999999"),
                             413)):   # over 4 x --max-request-bytes: refused before the body is sent
        with socket.create_connection((host, int(port)), timeout=30) as sock, sock.makefile("rb") as stream:
            sock.sendall(request)
            got, headers, data = _read_response(stream)
            assert (got, headers["connection"]) == (status, "close") and json.loads(data)["error"]
            assert stream.read() == b""     # the server closed it


def test_grpc_errors_have_protocol_codes(server):
    g = grpcclient.InferenceServerClient(server.grpc)
    cases = [(HOST, np.zeros((1, 3, 31, 32), np.float32), "StatusCode.INVALID_ARGUMENT"),
             (HOST, np.zeros((1, 3, 32, 32), np.uint8), "StatusCode.INVALID_ARGUMENT"),
             (HOST, np.full((1, 3, 32, 32), np.inf, np.float32), "StatusCode.INVALID_ARGUMENT"),   # the batcher's check
             ("nope", np.zeros((1, 3, 32, 32), np.float32), "StatusCode.NOT_FOUND"),
             (HOST, np.zeros((100, 3, 32, 32), np.float32), "StatusCode.RESOURCE_EXHAUSTED")]
    for name, x, status in cases:
        with pytest.raises(InferenceServerException) as err:
            _infer(g, grpcclient, name, x)
        assert err.value.status() == status, err.value
        assert _infer(g, grpcclient, HOST, np.zeros((1, 3, 32, 32), np.float32)).as_numpy("output").shape == (1, 1000)


def test_grpc_stream_answers_each_request_and_reports_a_bad_one_in_the_stream(server, models, sample_images):
    """Triton's ModelStreamInfer as tritonclient drives it: requests sent back to back on one stream are
    answered by id (exactly CompiledModel.run), a bad one gets its error_message and the stream goes on."""
    sent = {f"s{i}": (name, _tensor(models[name], p)[None])
            for i, (name, p) in enumerate(zip([HOST, FUSED] * 4, sample_images[300:308]))}
    answers: queue.Queue = queue.Queue()
    g = grpcclient.InferenceServerClient(server.grpc)
    g.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        for tag, (name, x) in [*list(sent.items())[:4], ("bad", (HOST, np.zeros((1, 3, 31, 32), np.float32))),
                               *list(sent.items())[4:]]:
            tensor = grpcclient.InferInput("input", list(x.shape), "UINT8" if x.dtype == np.uint8 else "FP32")
            tensor.set_data_from_numpy(x)
            g.async_stream_infer(name, [tensor], request_id=tag)
        got = [answers.get(timeout=60) for _ in range(len(sent) + 1)]
    finally:
        g.stop_stream()
    errors = [error for _, error in got if error is not None]
    assert len(errors) == 1 and "shape [1, 3, 31, 32]" in errors[0].message(), errors
    results = {result.get_response().id: result for result, error in got if error is None}
    assert sorted(results) == sorted(sent)
    for tag, (name, x) in sent.items():
        np.testing.assert_array_equal(results[tag].as_numpy("output"), models[name].run(x))


def test_sigterm_ends_an_open_grpc_stream_instead_of_waiting_for_it(repo, models, sample_images):
    """A client holding a stream open (idle after its answer) must not keep a draining server alive for
    --drain-seconds: the stream ends and the server exits at once."""
    server = ServerProcess.start(repo, "--drain-seconds", "60")
    answers: queue.Queue = queue.Queue()
    g = grpcclient.InferenceServerClient(server.grpc)
    try:
        g.start_stream(callback=lambda result, error: answers.put((result, error)))
        x = _tensor(models[FUSED], sample_images[310])[None]
        tensor = grpcclient.InferInput("input", list(x.shape), "UINT8")
        tensor.set_data_from_numpy(x)
        g.async_stream_infer(FUSED, [tensor], request_id="before")
        result, error = answers.get(timeout=60)
        assert error is None and result.get_response().id == "before"
        start = time.monotonic()
        server.terminate()
        assert server.proc.wait(30) == 0
        assert time.monotonic() - start < 15   # not the 60 s a stream left open would have held it
    finally:
        g.stop_stream()
        server.stop()


def test_bearer_token_and_sigterm_under_load_lose_no_accepted_request(repo, models, sample_images, tmp_path):
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    # the Python path's drain (test_serve_native runs _drain_under_load on the native path, the default)
    server = ServerProcess.start(repo, "--auth-token-file", str(token), "--max-queue-delay-us", "5000000",
                                 "--no-native")   # a long delay: the three queued stay queued until SIGTERM
    auth = {"Authorization": "Bearer s3cret"}
    h, g = httpclient.InferenceServerClient(server.http), grpcclient.InferenceServerClient(server.grpc)
    try:
        assert h.is_server_live() and g.is_server_live()            # health needs no token
        for call in (lambda: h.get_model_metadata(HOST), lambda: g.get_model_metadata(HOST),
                     lambda: h.get_model_metadata(HOST, headers={"Authorization": "Bearer wrong"})):
            with pytest.raises(InferenceServerException, match="bearer token"):
                call()
        assert h.get_model_metadata(HOST, headers=auth)["name"] == HOST
        assert g.get_model_metadata(HOST, headers={"authorization": auth["Authorization"]}).name == HOST
        _drain_under_load(server, models, sample_images[200:207], auth)
    finally:
        server.stop()


def _drain_under_load(server, models, photos, auth) -> None:
    """Three requests wait in the batch queue (a 5 s delay, batch 4) and four clients loop on the fused
    build when SIGTERM comes: the queued ones and every answered one are right, the rest are refused."""
    queued = [(_tensor(models[HOST], p)[None]) for p in photos[:3]]
    looped = [(_tensor(models[FUSED], p)[None]) for p in photos[3:7]]
    expected = {id(x): models[name].run(x) for name, xs in ((HOST, queued), (FUSED, looped)) for x in xs}
    outcomes: list[str] = []
    answered: list[int] = []

    def request(i: int, name: str, x: np.ndarray) -> None:
        if i % 2:
            out = _infer(grpcclient.InferenceServerClient(server.grpc), grpcclient, name, x,
                         headers={"authorization": auth["Authorization"]})   # gRPC metadata keys are lowercase
        else:
            out = _infer(httpclient.InferenceServerClient(server.http), httpclient, name, x, headers=auth)
        np.testing.assert_allclose(out.as_numpy("output"), expected[id(x)], rtol=1e-5, atol=1e-6)

    def once(i: int) -> None:
        try:
            request(i, HOST, queued[i])
            outcomes.append("queued ok")
        except Exception as exc:  # noqa: BLE001 - asserted below
            outcomes.append(f"queued FAILED {exc!r}")

    def loop(i: int) -> None:
        for _ in range(2000):
            try:
                request(i, FUSED, looped[i])
                answered.append(i)
            except InferenceServerException as exc:   # refused: server stopping or gone
                outcomes.append(f"refused {exc.status()} {exc.message()[:80]}")
                return
            except Exception as exc:  # noqa: BLE001 - a refused connection, or a wrong answer (asserted)
                outcomes.append(f"refused {exc!r}"[:120] if "assert" not in repr(exc).lower() else f"WRONG {exc!r}")
                return

    threads = [threading.Thread(target=once, args=(i,)) for i in range(3)]
    threads += [threading.Thread(target=loop, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    deadline, pending = time.monotonic() + 30, 0
    while time.monotonic() < deadline and (len(answered) < 4 or pending != 3):   # the three are accepted and
        time.sleep(0.02)                                                           # queued, the loops run
        pending = scrape(server.http, HOST, auth).get("nv_inference_pending_request_count")
    assert pending == 3 and len(answered) >= 4, f"{pending} queued, {len(answered)} answered: {outcomes}"
    server.terminate()
    for t in threads:
        t.join(60)
    assert server.proc.wait(30) == 0
    assert outcomes.count("queued ok") == 3, outcomes
    assert len(answered) >= 4 and len(outcomes) == 7, outcomes     # the loops ran, and each ended refused
    assert not [o for o in outcomes if "WRONG" in o or "FAILED" in o], outcomes
    drained = server.wait_for(re.compile(r"stopped \((\d+) requests were in flight"), 10)
    assert int(drained[1]) >= 3
