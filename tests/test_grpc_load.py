"""benchmarks/grpc_load.cc, serve_perf's C++ gRPC load generator (benchmarks/serve_grpc_cpp.py builds it), against
a real `tvmzoo serve` of a tiny build and a real photo, unary and streaming: it counts only right answers the server
really served; a wrong model name or a wrong expected class are errors, never throughput."""
from __future__ import annotations

import os
import sys
import threading

import pytest

pytest.importorskip("tritonclient.grpc")   # serve_load builds the request with tritonclient's protobuf classes
from conftest import ROOT  # noqa: E402
from serve_client import ServerProcess, scrape  # noqa: E402
from tiny import build_tiny  # noqa: E402
from tvmzoo.preprocess import apply, read_image  # noqa: E402
from tvmzoo.run.runtime import CompiledModel  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
import serve_grpc_cpp  # noqa: E402

pytestmark = pytest.mark.reliability
NAME = "tiny_b1"


@pytest.fixture(scope="module")
def program():
    if reason := serve_grpc_cpp.missing():
        if os.environ.get("CI"):   # .ci/run installs libgrpc++-dev: a missing one is a CI bug, not a skip
            pytest.fail(f"CI cannot build grpc_load: {reason} (see .ci/run)")
        pytest.skip(f"grpc_load cannot be built here: {reason}")
    return serve_grpc_cpp.build()


@pytest.fixture(scope="module")
def served(tmp_path_factory, sample_images):
    root = tmp_path_factory.mktemp("grpc_load")
    model = CompiledModel.load(build_tiny(root, NAME, resize_short=40))
    x = apply(model.preprocessing, read_image(sample_images[0]))[None]
    server = ServerProcess.start(root / "ws", "--instances", "1", "--threads", "2")
    yield server, x, int(model.run(x)[0].argmax())
    assert server.stop() == 0, server.output()


@pytest.mark.parametrize("shared_memory", ["none", "system"])
@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
def test_counts_the_answers_the_server_served(program, served, stream, shared_memory):
    """Tensors over the socket or in registered shared memory regions (perf_analyzer --shared-memory system:
    the output region's top class is checked after the run)."""
    server, x, top = served
    load = serve_grpc_cpp.GrpcLoad(server.grpc, NAME, x, top, stream=stream, shared_memory=shared_memory)
    try:
        before = scrape(server.http, NAME)["nv_inference_request_success"]
        result = load.run(2, 1.0, warmup=0.3)
        served_now = scrape(server.http, NAME)["nv_inference_request_success"] - before
    finally:
        load.close()
    assert (result.errors, result.first_error) == (0, "")
    assert 0 < result.requests == len(result.latencies_s) <= served_now
    assert result.cpu_s > 0 and (result.latencies_s > 0).all()


def test_a_wrong_class_in_the_output_region_is_an_error(program, served):
    server, x, top = served
    load = serve_grpc_cpp.GrpcLoad(server.grpc, NAME, x, (top + 1) % 1000, shared_memory="system")
    try:
        with pytest.raises(AssertionError, match="output region"):
            load.run(1, 0.3)
    finally:
        load.close()


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
@pytest.mark.parametrize("wrong", ["model", "class"])
def test_wrong_answers_are_errors_not_throughput(program, served, stream, wrong):
    server, x, top = served
    model, expected = ("nope", top) if wrong == "model" else (NAME, (top + 1) % 1000)
    load = serve_grpc_cpp.GrpcLoad(server.grpc, model, x, expected, stream=stream)
    try:
        result = load.run(2, 0.5, warmup=0.2, checked=False)
    finally:
        load.close()
    assert result.requests == 0 and len(result.latencies_s) == 0 and result.errors > 0
    assert ("unknown model 'nope'" if wrong == "model" else f"expected {expected}") in result.first_error
    with pytest.raises(AssertionError, match="errors"):
        result.raise_errors()


def _established_to(port: int) -> int:
    """TCP connections accepted on `port` (this host's /proc/net/tcp: local port, state 01 = ESTABLISHED)."""
    rows = [line.split() for line in open("/proc/net/tcp").read().splitlines()[1:]]
    return sum(1 for row in rows if int(row[1].split(":")[1], 16) == port and row[3] == "01")


def test_clients_share_the_connections_asked_for(program, served):
    """--channels: 4 streaming clients over 2 connections (serve_perf --grpc-connections), every answer right."""
    server, x, top = served
    port = int(server.grpc.rsplit(":", 1)[1])
    load = serve_grpc_cpp.GrpcLoad(server.grpc, NAME, x, top, stream=True, connections=2)
    seen: list[int] = []
    sampler = threading.Timer(0.8, lambda: seen.append(_established_to(port)))
    try:
        sampler.start()
        result = load.run(4, 1.0, warmup=0.3)
    finally:
        sampler.cancel()
        load.close()
    assert (result.errors, result.requests > 0) == (0, True)
    assert seen == [2]
