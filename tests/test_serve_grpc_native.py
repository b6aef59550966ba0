"""`tvmzoo serve --native`'s gRPC front (native/grpcfront/front.cc, grpc_native.py): a real server process, real tiny
builds, real photos, tritonclient.grpc unchanged. Plain raw-tensor ModelInfer / ModelStreamInfer messages of native
models are answered by the C++ server (its counter), everything else by the Python grpc.aio server behind it, through
the forwarding: the answers, codes and messages are Python's."""
from __future__ import annotations

import os
import queue
import re
import socket
import threading
import time

import grpc
import numpy as np
import pytest

grpcclient = pytest.importorskip("tritonclient.grpc")
httpclient = pytest.importorskip("tritonclient.http")
shm = pytest.importorskip("tritonclient.utils.shared_memory")
from tritonclient.grpc import service_pb2, service_pb2_grpc  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from serve_client import FUSED, HOST, ServerProcess, scrape  # noqa: E402
from test_serve import _tensor  # noqa: E402
from tvmzoo.run.runtime import CompiledModel  # noqa: E402
from tvmzoo.run.serve.native.grpcfront import Unavailable, load  # noqa: E402

pytestmark = pytest.mark.reliability
NATIVE = "tvmzoo_grpc_native_success"
INFER = "/inference.GRPCInferenceService/ModelInfer"
MAX_BYTES = 1_000_000


def _front_builds() -> bool:
    try:
        load()
        return True
    except Unavailable:
        return False


needs_grpcpp = pytest.mark.skipif(not _front_builds(), reason="libgrpc++ (pkg-config grpc++) is not installed")


@pytest.fixture(scope="module")
def server(serve_repo):
    flags = ["--native", "--instances", "2", "--threads", "1", "--max-request-bytes", str(MAX_BYTES)]
    proc = ServerProcess.start(serve_repo, *flags)
    yield proc
    assert proc.stop() == 0, proc.output()


@pytest.fixture(scope="module")
def photos(serve_repo, sample_images):
    """Per model, 12 photos' tensors (one row each) with CompiledModel.run's answers."""
    models = {name: CompiledModel.load(serve_repo / name) for name in (HOST, FUSED)}
    return {name: [(x, model.run(x)) for x in (_tensor(model, p)[None] for p in sample_images[400:412])]
            for name, model in models.items()}


def _native(server, model: str) -> float:
    return scrape(server.http, model).get(NATIVE, 0.0)


def _input(x: np.ndarray):
    tensor = grpcclient.InferInput("input", list(x.shape), "UINT8" if x.dtype == np.uint8 else "FP32")
    tensor.set_data_from_numpy(x)
    return tensor


def _close(got: np.ndarray, expected: np.ndarray) -> None:
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


@needs_grpcpp
@pytest.mark.parametrize("name", [HOST, FUSED])
def test_model_infer_is_answered_natively_and_equals_compiled_model_run(server, photos, name):
    client = grpcclient.InferenceServerClient(server.grpc)
    before = scrape(server.http, name)
    for i, (x, expected) in enumerate(photos[name]):
        result = client.infer(name, [_input(x)], request_id=f"r{i}" if i % 2 else "")
        response = result.get_response()
        assert (response.model_name, response.model_version, response.id) == (name, "1", f"r{i}" if i % 2 else "")
        assert [(o.name, o.datatype, list(o.shape)) for o in response.outputs] == [("output", "FP32", [1, 1000])]
        _close(result.as_numpy("output"), expected)
    batch = np.concatenate([x for x, _ in photos[name][:3]])   # three rows, the model's output requested by name
    result = client.infer(name, [_input(batch)], outputs=[grpcclient.InferRequestedOutput("output")])
    _close(result.as_numpy("output"), np.concatenate([e for _, e in photos[name][:3]]))
    after = scrape(server.http, name)
    n = len(photos[name]) + 1
    assert after[NATIVE] - before.get(NATIVE, 0) == n   # every one answered by the C++ front
    assert after["nv_inference_request_success"] - before["nv_inference_request_success"] == n
    client.close()


@needs_grpcpp
def test_the_answer_is_the_message_python_would_send(server, photos):
    """Field by field what grpc_service.encode_response builds, serialized as protobuf serializes it."""
    x, expected = photos[HOST][0]
    request = service_pb2.ModelInferRequest(model_name=HOST, id="same-bytes")
    request.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(x.tobytes())
    before = _native(server, HOST)
    with grpc.insecure_channel(server.grpc) as channel:
        raw = channel.unary_unary(INFER)(request.SerializeToString())
    assert _native(server, HOST) - before == 1
    answer = service_pb2.ModelInferResponse.FromString(raw)
    assert answer.SerializeToString() == raw   # protobuf's own field order and encoding
    python = service_pb2.ModelInferResponse(model_name=HOST, model_version="1", id="same-bytes")
    python.outputs.add(name="output", datatype="FP32", shape=[1, 1000])
    python.raw_output_contents.append(np.frombuffer(answer.raw_output_contents[0], np.float32).tobytes())
    assert python.SerializeToString() == raw
    _close(np.frombuffer(answer.raw_output_contents[0], np.float32).reshape(1, 1000), expected)


@needs_grpcpp
def test_stream_messages_are_answered_natively_and_the_rest_by_python_in_the_same_stream(server, photos):
    """Triton's ModelStreamInfer as tritonclient drives it: plain messages answered by the C++ front, a bad shape,
    a NaN tensor and one over --max-request-bytes by Python (its error_message in the stream), each by its id; the
    stream goes on."""
    sent = {f"s{i}": (name, *photos[name][i]) for i, name in enumerate([HOST, FUSED] * 4)}
    nan = photos[HOST][9][0].copy()
    nan[0, 1, 2, 3] = np.nan
    answers: queue.Queue = queue.Queue()
    before = {name: scrape(server.http, name) for name in (HOST, FUSED)}
    client = grpcclient.InferenceServerClient(server.grpc)
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        messages = list(sent.items())
        messages[3:3] = [("bad", (HOST, np.zeros((1, 3, 31, 32), np.float32))), ("nan", (HOST, nan)),
                         ("big", (HOST, np.zeros((100, 3, 32, 32), np.float32)))]
        for tag, (name, x, *_) in messages:
            client.async_stream_infer(name, [_input(x)], request_id=tag)
        got = [answers.get(timeout=60) for _ in messages]
    finally:
        client.stop_stream()
    errors = sorted(error.message() for _, error in got if error is not None)
    assert len(errors) == 3, errors
    assert "input 'input' has shape [1, 3, 31, 32]" in errors[0]                      # Python's check
    assert errors[1].startswith("input 'input' holds 1 NaN or infinite values (the first at flat index 1091)")
    assert re.fullmatch(r"request of 12\d{5} bytes is over the limit of 1000000 \(tvmzoo serve --max-request-bytes\)",
                        errors[2]), errors[2]
    results = {result.get_response().id: result for result, error in got if error is None}
    assert sorted(results) == sorted(sent)
    for tag, (_, _, expected) in sent.items():
        _close(results[tag].as_numpy("output"), expected)
    after = {name: scrape(server.http, name) for name in (HOST, FUSED)}
    assert sum(after[n].get(NATIVE, 0) - before[n].get(NATIVE, 0) for n in (HOST, FUSED)) == len(sent)
    failures = "nv_inference_request_failure"
    assert after[HOST].get(failures, 0) - before[HOST].get(failures, 0) == 2   # the over-size one is refused unparsed


@needs_grpcpp
def test_forwarded_calls_from_many_clients_are_each_answered_and_the_server_lives(server, photos):
    """Unary calls forwarded to Python from every thread the front has: a NaN tensor (refused by the engine on its
    thread), a UINT8 one (forwarded as it is read), a good one (answered natively), 8 clients at once. Python
    answers a forwarded call as soon as it has the message, often before the front half-closes the upstream call
    (from outside grpc's reactions): without a hold grpc could end that call under it and abort the server."""
    (x, expected), nan = photos[HOST][0], photos[HOST][1][0].copy()
    nan[0, 0, 0, 0] = np.nan
    cases = [(nan, "holds 1 NaN or infinite values"), (x.astype(np.uint8), "input 'input' is UINT8"), (x, None)]
    failures: list[str] = []

    def client_loop() -> None:
        client = grpcclient.InferenceServerClient(server.grpc)
        for i in range(60):
            data, message = cases[i % 3]
            try:
                out = client.infer(HOST, [_input(data)])
                if message is not None:
                    failures.append(f"answered, not refused: {message}")
                else:
                    _close(out.as_numpy("output"), expected)
            except InferenceServerException as err:
                if message is None or err.status() != "StatusCode.INVALID_ARGUMENT" or message not in err.message():
                    failures.append(f"{err.status()} {err.message()!r}, wanted {message!r}")
            except AssertionError as err:
                failures.append(f"wrong answer: {err}"[:200])
        client.close()

    threads = [threading.Thread(target=client_loop) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not failures, failures[:5]
    assert server.proc.poll() is None, server.output()
    assert grpcclient.InferenceServerClient(server.grpc).is_server_live()


@needs_grpcpp
def test_every_other_rpc_is_python_s_through_the_front(server, photos, sample_images):
    """Health, metadata, config, statistics, contents fields, encoded images, shared memory registration, errors:
    as the Python server answers them (its codes and messages), none counted by the front."""
    client = grpcclient.InferenceServerClient(server.grpc)
    before = _native(server, HOST)
    assert client.is_server_live() and client.is_model_ready(HOST)
    assert not client.is_server_ready()   # serve_repo's broken builds: Python's answer
    assert client.get_server_metadata().name == "tvmzoo"
    assert client.get_model_metadata(HOST).inputs[0].shape == [-1, 3, 32, 32]
    assert client.get_model_config(HOST).config.max_batch_size > 0
    assert client.get_inference_statistics(HOST).model_stats[0].name == HOST
    x, expected = photos[HOST][0]
    request = service_pb2.ModelInferRequest(model_name=HOST, id="contents")   # values in contents, no raw tensor
    request.inputs.add(name="input", datatype="FP32", shape=list(x.shape)).contents.fp32_contents.extend(x.ravel())
    with grpc.insecure_channel(server.grpc) as channel:
        answer = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
    _close(np.frombuffer(answer.raw_output_contents[0], np.float32).reshape(1, 1000), expected)
    tensor = grpcclient.InferInput("input", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([sample_images[400].read_bytes()], dtype=object))
    top = client.infer(FUSED, [tensor], outputs=[grpcclient.InferRequestedOutput("output", class_count=3)])
    assert top.as_numpy("output").shape == (1, 3)
    cases = [("nope", x, "StatusCode.NOT_FOUND", "unknown model 'nope'"),
             (HOST, x.astype(np.uint8), "StatusCode.INVALID_ARGUMENT", "input 'input' is UINT8"),
             (HOST, np.zeros((100, 3, 32, 32), np.float32), "StatusCode.RESOURCE_EXHAUSTED",
              "over the limit of 1000000 (tvmzoo serve --max-request-bytes)")]
    for name, data, status, message in cases:
        with pytest.raises(InferenceServerException) as err:
            client.infer(name, [_input(data)])
        assert err.value.status() == status and message in err.value.message(), err.value
    with pytest.raises(InferenceServerException, match="StatusCode.UNIMPLEMENTED"):
        client.get_cuda_shared_memory_status()
    assert _native(server, HOST) == before
    client.close()


def _shm_tensors(x: np.ndarray, region: str | None, out_region: str | None, out_bytes: int, offset: int = 0):
    tensor = grpcclient.InferInput("input", list(x.shape), "FP32")
    if region:
        tensor.set_shared_memory(region, x.nbytes, offset)
    else:
        tensor.set_data_from_numpy(x)
    out = grpcclient.InferRequestedOutput("output")
    if out_region:
        out.set_shared_memory(out_region, out_bytes, offset=offset + x.nbytes)
    return [tensor], [out]


@needs_grpcpp
def test_shared_memory_infers_are_answered_natively_and_their_errors_by_python(server, photos):
    """Inputs and outputs in registered regions (one each, both, unary and stream) are the front's, equal to
    CompiledModel.run; a missing region, a tensor past its region, a truncated object are Python's errors."""
    client = grpcclient.InferenceServerClient(server.grpc)
    (x, expected), (y, expected_y) = photos[HOST][0], photos[HOST][1]
    key = f"/tvmzoo-grpcnative-{os.getpid()}"
    span = x.nbytes + expected.nbytes
    region = shm.create_shared_memory_region("in_out", key, 2 * span)
    try:
        shm.set_shared_memory_region(region, [x])
        shm.set_shared_memory_region(region, [y], offset=span)
        client.register_system_shared_memory("in_out", key, 2 * span)
        assert client.get_system_shared_memory_status().regions["in_out"].byte_size == 2 * span
        before = _native(server, HOST)
        for offset, data, want in ((0, x, expected), (span, y, expected_y)):
            for in_region, out_region in (("in_out", None), (None, "in_out"), ("in_out", "in_out")):
                inputs, outputs = _shm_tensors(data, in_region, out_region, expected.nbytes, offset)
                result = client.infer(HOST, inputs, outputs=outputs, request_id="shm")
                if out_region:   # as Triton: the answer names the output, its bytes are in the region
                    assert result.get_response().raw_output_contents == [b""]
                    got = shm.get_contents_as_numpy(region, np.float32, want.shape, offset=offset + x.nbytes)
                else:
                    got = result.as_numpy("output")
                _close(got, want)
                shm.set_shared_memory_region(region, [np.zeros_like(want)], offset=offset + x.nbytes)
        assert _native(server, HOST) - before == 6

        answers: queue.Queue = queue.Queue()
        client.start_stream(callback=lambda result, error: answers.put((result, error)))
        for offset, want in ((0, expected), (span, expected_y)):
            inputs, outputs = _shm_tensors(x, "in_out", "in_out", expected.nbytes, offset)
            client.async_stream_infer(HOST, inputs, outputs=outputs)
            result, error = answers.get(timeout=30)
            assert error is None
            _close(shm.get_contents_as_numpy(region, np.float32, want.shape, offset=offset + x.nbytes), want)
        client.stop_stream()
        assert _native(server, HOST) - before == 8

        bad = [("nope", 0, "StatusCode.NOT_FOUND", "Unable to find shared memory region: 'nope'"),
               ("in_out", 2 * span - 4, "StatusCode.INVALID_ARGUMENT", "outside region")]
        for name, offset, status, words in bad:
            tensor = grpcclient.InferInput("input", list(x.shape), "FP32")
            tensor.set_shared_memory(name, x.nbytes, offset)
            with pytest.raises(InferenceServerException) as err:
                client.infer(HOST, [tensor])
            assert err.value.status() == status and words in err.value.message(), err.value
        os.truncate(f"/dev/shm/{key.lstrip('/')}", span)   # the second half is gone
        for in_region, out_region in (("in_out", None), (None, "in_out")):
            with pytest.raises(InferenceServerException) as err:
                inputs, outputs = _shm_tensors(y, in_region, out_region, expected.nbytes, span)
                client.infer(HOST, inputs, outputs=outputs)
            assert err.value.status() == "StatusCode.INVALID_ARGUMENT" and "truncated" in err.value.message(), (
                in_region, err.value.message())
        assert _native(server, HOST) - before == 8
        inputs, _ = _shm_tensors(x, "in_out", None, 0)
        _close(client.infer(HOST, inputs).as_numpy("output"), expected)
        client.unregister_system_shared_memory("in_out")
        with pytest.raises(InferenceServerException, match="Unable to find shared memory region"):
            client.infer(HOST, inputs)
        assert _native(server, HOST) - before == 9
    finally:
        shm.destroy_shared_memory_region(region)
    client.close()


@needs_grpcpp
def test_bearer_token_holds_on_the_native_front_and_sigterm_under_load_loses_no_request(serve_repo, photos, tmp_path):
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    server = ServerProcess.start(serve_repo, "--native", "--auth-token-file", str(token),
                                 "--max-queue-delay-us", "5000000")   # long: the three queued stay queued
    auth = {"authorization": "Bearer s3cret"}
    client = grpcclient.InferenceServerClient(server.grpc)
    x, expected = photos[FUSED][0]
    try:
        assert client.is_server_live()   # health needs no token
        for headers in (None, {"authorization": "Bearer wrong"}, {"authorization": "Basic s3cret"}):
            for call in (lambda: client.infer(FUSED, [_input(x)], headers=headers),
                         lambda: client.get_model_metadata(FUSED, headers=headers)):
                with pytest.raises(InferenceServerException) as err:
                    call()
                assert err.value.status() == "StatusCode.UNAUTHENTICATED"
                assert err.value.message() == "missing or wrong bearer token (metadata authorization: Bearer <token>)"
        request = service_pb2.ModelInferRequest(model_name=FUSED)   # a stream without the token: refused whole
        request.inputs.add(name="input", datatype="UINT8", shape=list(x.shape))
        request.raw_input_contents.append(x.tobytes())
        with grpc.insecure_channel(server.grpc) as channel, pytest.raises(grpc.RpcError) as err:
            list(service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(iter([request])))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED and "bearer token" in err.value.details()
        http_auth = {"Authorization": auth["authorization"]}
        before = scrape(server.http, FUSED, http_auth).get(NATIVE, 0)
        _close(client.infer(FUSED, [_input(x)], headers=auth).as_numpy("output"), expected)
        assert scrape(server.http, FUSED, http_auth)[NATIVE] - before == 1
        _sigterm_under_load(server, photos, auth)
    finally:
        client.close()
        server.stop()


def _sigterm_under_load(server, photos, auth) -> None:
    """Three requests wait in the batch queue (5 s, batch 4) and two clients loop (unary, stream) when SIGTERM
    comes: the queued ones are answered right, every answer is right, the loops end refused, the server exits 0."""
    queued = [x for x, _ in photos[HOST][:3]]
    outcomes: list[str] = []
    answered: list[int] = []

    def once(x: np.ndarray, expected: np.ndarray) -> None:
        try:
            out = grpcclient.InferenceServerClient(server.grpc).infer(HOST, [_input(x)], headers=auth)
            _close(out.as_numpy("output"), expected)
            outcomes.append("queued ok")
        except Exception as exc:  # noqa: BLE001 - asserted below
            outcomes.append(f"queued FAILED {exc!r}")

    def unary() -> None:
        client = grpcclient.InferenceServerClient(server.grpc)
        for i in range(100_000):
            x, expected = photos[FUSED][i % 12]
            try:
                out = client.infer(FUSED, [_input(x)], headers=auth).as_numpy("output")
            except InferenceServerException as exc:   # refused: the server is stopping or gone
                outcomes.append(f"refused {exc.status()}")
                return
            np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
            answered.append(i)

    def stream() -> None:
        answers: queue.Queue = queue.Queue()
        client = grpcclient.InferenceServerClient(server.grpc)
        client.start_stream(callback=lambda result, error: answers.put((result, error)), headers=auth)
        for i in range(100_000):
            x, expected = photos[FUSED][i % 12]
            try:
                client.async_stream_infer(FUSED, [_input(x)], request_id=str(i))
                result, error = answers.get(timeout=5)
            except (InferenceServerException, queue.Empty) as exc:   # sent after the stream stopped reading: the
                # stream ended (OK, as Python's streams end on SIGTERM) without reading it
                outcomes.append(f"stream ended {exc!r}"[:80])
                break
            if error is not None:
                outcomes.append(f"stream ended {error.status()}")
                break
            assert result.get_response().id == str(i)
            _close(result.as_numpy("output"), expected)
            answered.append(i)
        client.stop_stream()

    threads = [threading.Thread(target=t) for t in (unary, stream)]
    for t in threads:
        t.start()
    while len(answered) < 20:
        time.sleep(0.01)
    threads += [threading.Thread(target=once, args=(x, e)) for x, e in photos[HOST][:3]]
    for t in threads[2:]:
        t.start()
    deadline, pending = time.monotonic() + 30, 0
    while time.monotonic() < deadline and pending != 3:   # the three are accepted and queued
        time.sleep(0.02)
        pending = scrape(server.http, HOST, {"Authorization": auth["authorization"]}).get(
            "nv_inference_pending_request_count")
    assert pending == 3, f"{pending} requests queued, not the three: {outcomes}"
    server.terminate()
    for t in threads:
        t.join(60)
    assert server.proc.wait(30) == 0
    assert outcomes.count("queued ok") == len(queued), outcomes
    assert len(outcomes) == 5 and not [o for o in outcomes if "FAILED" in o], outcomes
    drained = server.wait_for(re.compile(r"stopped \((\d+) requests were in flight"), 10)
    assert int(drained[1]) >= 3   # the queued ones, held by the front


@needs_grpcpp
def test_connections_past_the_limit_are_closed_and_the_open_ones_are_served(serve_repo, photos):
    """libgrpc++ 1.51 has no connection limit: the front accepts connections itself and closes one past it."""
    limit = 2
    server = ServerProcess.start(serve_repo, "--native", "--max-connections", str(limit), "--instances", "1",
                                 "--threads", "1")
    own = [("grpc.use_local_subchannel_pool", 1)]   # each client its own connection
    x, expected = photos[HOST][0]
    try:
        clients = [grpcclient.InferenceServerClient(server.grpc, channel_args=own) for _ in range(limit)]
        for client in clients:
            _close(client.infer(HOST, [_input(x)]).as_numpy("output"), expected)
        extra = grpcclient.InferenceServerClient(server.grpc, channel_args=own)
        with pytest.raises(InferenceServerException) as err:
            extra.infer(HOST, [_input(x)])
        assert err.value.status() == "StatusCode.UNAVAILABLE"
        extra.close()
        host, port = server.grpc.split(":")
        with socket.create_connection((host, int(port)), timeout=10) as sock:   # closed at once, unanswered
            assert sock.recv(100) == b""
        for client in clients:
            _close(client.infer(HOST, [_input(x)]).as_numpy("output"), expected)
        clients.pop().close()
        for _ in range(50):   # the closed one is seen gone at the next accept
            try:
                again = grpcclient.InferenceServerClient(server.grpc, channel_args=own)
                _close(again.infer(HOST, [_input(x)]).as_numpy("output"), expected)
                clients.append(again)
                break
            except InferenceServerException:
                again.close()
        else:
            raise AssertionError("no new connection accepted after one was closed")
        for client in clients:
            client.close()
    finally:
        server.stop()


def test_without_libgrpcpp_native_keeps_the_python_grpc_server_and_says_why(serve_repo, photos, monkeypatch):
    monkeypatch.setenv("PKG_CONFIG_LIBDIR", "/nonexistent")   # pkg-config finds no grpc++
    monkeypatch.setenv("PKG_CONFIG_PATH", "")
    server = ServerProcess.start(serve_repo, "--native", "--instances", "1", "--threads", "1")
    try:
        x, expected = photos[HOST][0]
        client = grpcclient.InferenceServerClient(server.grpc)
        _close(client.infer(HOST, [_input(x)]).as_numpy("output"), expected)
        client.close()
        said = [line for line in server.lines if "gRPC stays on the Python server" in line]
        assert len(said) == 1 and "libgrpc++ not found by pkg-config" in said[0], server.lines
        assert NATIVE not in scrape(server.http, HOST)
    finally:
        assert server.stop() == 0, server.output()
