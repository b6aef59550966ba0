"""Trust gaps of `tvmzoo serve` closed in session 13, each through a real server process and real clients:
a limit on open connections, gRPC requests over --max-request-bytes told which flag raises the limit, and
system shared memory off by default beyond a loopback --host."""
from __future__ import annotations

import re
import socket
import time
from pathlib import Path

import numpy as np
import pytest

grpcclient = pytest.importorskip("tritonclient.grpc")
httpclient = pytest.importorskip("tritonclient.http")
shm = pytest.importorskip("tritonclient.utils.shared_memory")
from tritonclient.utils import InferenceServerException  # noqa: E402

from conftest import photo_batch, run_cli  # noqa: E402
from serve_client import HOST, ServerProcess  # noqa: E402
from tvmzoo.run.runtime import CompiledModel  # noqa: E402

pytestmark = pytest.mark.reliability
LIMIT = 3               # --max-connections of the module's server
MAX_BYTES = 100_000     # its --max-request-bytes: a batch of 4 tiny images (49 KB) fits
# each client its own connection (grpc shares one between channels to the same address by default)
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1), ("grpc.max_send_message_length", -1),
                  ("grpc.max_receive_message_length", -1)]


@pytest.fixture(scope="module")
def server(serve_repo):
    proc = ServerProcess.start(serve_repo, "--max-connections", str(LIMIT), "--max-request-bytes", str(MAX_BYTES),
                               "--instances", "1", "--threads", "1")
    yield proc
    assert proc.stop() == 0, proc.output()


@pytest.fixture(scope="module")
def model(serve_repo):
    return CompiledModel.load(serve_repo / HOST)


@pytest.fixture(scope="module")
def photos(sample_images):
    return photo_batch(sample_images[60:64], 32)


def _infer(client, module, x: np.ndarray):
    tensor = module.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return client.infer(HOST, [tensor]).as_numpy("output")


def _accepted_again(connect, attempts: int = 50):
    """A new client once the server saw a closed connection go (it may take a moment): its first answer."""
    for _ in range(attempts):
        try:
            return connect()
        except InferenceServerException:
            time.sleep(0.1)
    raise AssertionError("no new connection accepted after one was closed")


def _refused(host: str, port: int) -> bytes:
    """What a raw client gets for a request on a connection past the limit (read until the server closes)."""
    for _ in range(50):   # a refusal closed just before may not be gone yet: this one is closed unanswered
        with socket.create_connection((host, port), timeout=10) as sock:
            sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        if answer:
            return answer
        time.sleep(0.1)
    raise AssertionError("every connection past the limit was closed unanswered")


def test_http_connections_past_the_limit_get_503_and_the_open_ones_are_served(server, model, photos):
    """Was: no limit: every connection held a socket and up to --max-request-bytes of body, until the process
    ran out of file descriptors and accept() failed for everyone."""
    expected = model.run(photos[:1])
    host, port = server.http.split(":")
    clients = [httpclient.InferenceServerClient(server.http) for _ in range(LIMIT)]   # one connection each
    try:
        for client in clients:
            np.testing.assert_array_equal(_infer(client, httpclient, photos[:1]), expected)
        lingering = [socket.create_connection((host, int(port)), timeout=10) for _ in range(LIMIT)]
        for sock in lingering:   # refused, left open by their clients: each holds a descriptor (up to 2 s)
            assert sock.recv(65536).startswith(b"HTTP/1.1 503 ")
        with socket.create_connection((host, int(port)), timeout=10) as sock:   # past as many: closed at once
            try:
                assert sock.recv(65536) == b""
            except ConnectionResetError:
                pass
        for sock in lingering:
            sock.close()
        head, _, body = _refused(host, int(port)).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503 ") and b"Connection: close" in head and b"Retry-After: 1" in head
        assert re.search(rb'"error":"the server has 3 open connections, its limit \(--max-connections\)', body), body
        extra = httpclient.InferenceServerClient(server.http)   # tritonclient shows the message too
        with pytest.raises(InferenceServerException) as err:
            _infer(extra, httpclient, photos[:1])
        assert err.value.status() == "503" and "--max-connections" in err.value.message()
        extra.close()
        for client in clients:   # the open connections were never disturbed
            np.testing.assert_array_equal(_infer(client, httpclient, photos[1:2]), model.run(photos[1:2]))
        clients.pop().close()

        def connect():
            client = httpclient.InferenceServerClient(server.http)
            clients.append(client)
            return _infer(client, httpclient, photos[2:4])
        np.testing.assert_array_equal(_accepted_again(connect), model.run(photos[2:4]))
    finally:
        for client in clients:
            client.close()


def test_grpc_connections_past_the_limit_are_closed_and_the_open_ones_are_served(server, model, photos):
    """gRPC has no way to answer a connection it will not take: grpc closes it (UNAVAILABLE at the client)."""
    expected = model.run(photos[:1])
    clients = [grpcclient.InferenceServerClient(server.grpc, channel_args=OWN_CONNECTION) for _ in range(LIMIT)]
    for client in clients:
        np.testing.assert_array_equal(_infer(client, grpcclient, photos[:1]), expected)
    extra = grpcclient.InferenceServerClient(server.grpc, channel_args=OWN_CONNECTION)
    with pytest.raises(InferenceServerException) as err:
        _infer(extra, grpcclient, photos[:1])
    assert err.value.status() == "StatusCode.UNAVAILABLE", err.value
    extra.close()
    for client in clients:
        np.testing.assert_array_equal(_infer(client, grpcclient, photos[1:2]), model.run(photos[1:2]))
    clients.pop().close()

    def connect():
        client = grpcclient.InferenceServerClient(server.grpc, channel_args=OWN_CONNECTION)
        clients.append(client)
        return _infer(client, grpcclient, photos[2:4])
    np.testing.assert_array_equal(_accepted_again(connect), model.run(photos[2:4]))
    for client in clients:
        client.close()


def test_grpc_request_over_the_limit_names_the_flag(server, model, photos):
    """Was: grpc's own "Received message larger than max (N vs. M)", which says nothing of --max-request-bytes.
    A request up to a quarter over the limit is refused by its size, unparsed; past that grpc refuses it itself."""
    client = grpcclient.InferenceServerClient(server.grpc)
    over = np.zeros((1, 27_000), np.float32)   # 108 KB: over the limit, within grpc's (125 000)
    with pytest.raises(InferenceServerException) as err:
        _infer(client, grpcclient, over)
    assert err.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
    assert re.fullmatch(r"request of 108\d{3} bytes is over the limit of 100000 \(tvmzoo serve --max-request-bytes\)",
                        err.value.message()), err.value.message()
    answers = []   # the stream (perf_analyzer --streaming) answers it in the stream and goes on
    client.start_stream(callback=lambda result, error: answers.append((result, error)))
    for x in (over, photos[:1]):
        tensor = grpcclient.InferInput("input", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        client.async_stream_infer(HOST, [tensor])
    client.stop_stream()   # waits for the answers
    errors = [error for _, error in answers if error is not None]
    assert len(errors) == 1 and "--max-request-bytes" in errors[0].message(), errors
    np.testing.assert_array_equal(next(r for r, e in answers if e is None).as_numpy("output"), model.run(photos[:1]))
    with pytest.raises(InferenceServerException) as err:   # past grpc's own limit: its message, the same status
        _infer(client, grpcclient, np.zeros((1, 40_000), np.float32))
    assert err.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
    np.testing.assert_array_equal(_infer(client, grpcclient, photos), model.run(photos))
    client.close()


def _register(client, headers: dict | None = None):
    """Register a fresh 64-byte region named 'r'; returns its handle (the caller destroys it)."""
    handle = shm.create_shared_memory_region("r", f"/tvmzoo_s13_{id(client)}", 64)
    try:
        client.register_system_shared_memory("r", f"/tvmzoo_s13_{id(client)}", 64)
    except InferenceServerException:
        shm.destroy_shared_memory_region(handle)
        raise
    return handle


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="no /dev/shm: no POSIX shared memory here")
def test_shared_memory_is_on_by_default_only_on_a_loopback_host(server, serve_repo, model, photos):
    """Was: on by default whatever --host: a token holder anywhere could have the server open /dev/shm objects."""
    assert "system shared memory: on (the default for the loopback --host 127.0.0.1; --no-shared-memory turns it " \
           "off)" in server.lines
    h = httpclient.InferenceServerClient(server.http)
    shm.destroy_shared_memory_region(_register(h))
    h.unregister_system_shared_memory()
    h.close()

    wide = ServerProcess.start(serve_repo, "--host", "0.0.0.0")   # reached through 127.0.0.1 all the same
    try:
        assert any(line.startswith("system shared memory: off (the default for --host 0.0.0.0, not a loopback "
                                   "address") and line.endswith("--shared-memory turns it on)") for line in wide.lines)
        h, g = httpclient.InferenceServerClient(wide.http), grpcclient.InferenceServerClient(wide.grpc)
        assert "system_shared_memory" not in h.get_server_metadata()["extensions"]
        for client, status in ((h, "400"), (g, "StatusCode.INVALID_ARGUMENT")):
            with pytest.raises(InferenceServerException) as err:
                _register(client)
            assert err.value.status() == status
            assert "off on this server (the default for --host 0.0.0.0" in err.value.message()
            assert "--shared-memory turns it on" in err.value.message()
        np.testing.assert_array_equal(_infer(g, grpcclient, photos[:1]), model.run(photos[:1]))
        h.close()   # here: a tritonclient.http client collected on another thread complains (no gevent hub)
    finally:
        assert wide.stop() == 0, wide.output()

    wide = ServerProcess.start(serve_repo, "--host", "0.0.0.0", "--shared-memory")
    try:
        assert "system shared memory: on (started with --shared-memory)" in wide.lines
        g = grpcclient.InferenceServerClient(wide.grpc)
        x = photos[:2]
        handle = shm.create_shared_memory_region("in", f"/tvmzoo_s13_in_{id(g)}", x.nbytes)
        try:
            shm.set_shared_memory_region(handle, [x])
            g.register_system_shared_memory("in", f"/tvmzoo_s13_in_{id(g)}", x.nbytes)
            tensor = grpcclient.InferInput("input", list(x.shape), "FP32")
            tensor.set_shared_memory("in", x.nbytes)
            np.testing.assert_array_equal(g.infer(HOST, [tensor]).as_numpy("output"), model.run(x))
            g.unregister_system_shared_memory()
        finally:
            shm.destroy_shared_memory_region(handle)
    finally:
        assert wide.stop() == 0, wide.output()


def test_shared_memory_flags_exclude_each_other(serve_repo):
    result = run_cli("tvmzoo", "serve", serve_repo, "--shared-memory", "--no-shared-memory", check=False)
    assert result.returncode == 2 and "not allowed with argument" in result.stderr


def test_max_connections_must_be_positive(serve_repo):
    result = run_cli("tvmzoo", "serve", serve_repo, "--max-connections", "0", check=False)
    assert result.returncode != 0 and "--max-connections must be at least 1, got 0" in result.stderr + result.stdout
    assert "Traceback" not in result.stderr


def _limited_tvmzoo(tmp_path: Path, soft: int, hard: int) -> str:
    """`tvmzoo` started with open-file limits soft / hard (as a shell's `ulimit -n` leaves them)."""
    import sys
    script = tmp_path / "tvmzoo_limited"
    script.write_text(f"#!{sys.executable}\nimport os, resource, sys\n"
                      f"resource.setrlimit(resource.RLIMIT_NOFILE, ({soft}, {hard}))\n"
                      f"tvmzoo = os.path.join(os.path.dirname(sys.executable), 'tvmzoo')\n"
                      "os.execv(tvmzoo, [tvmzoo, *sys.argv[1:]])\n")
    script.chmod(0o755)
    return str(script)


def _soft_nofile(pid: int) -> int:
    line = next(l for l in Path(f"/proc/{pid}/limits").read_text().splitlines() if l.startswith("Max open files"))
    return int(line.split()[3])


@pytest.mark.parametrize("hard", [4096, 300])
def test_the_open_file_limit_is_raised_to_what_max_connections_can_use(serve_repo, tmp_path, model, photos, hard):
    """--max-connections 256 can hold 3 x 256 + 64 descriptors: a soft limit of 256 is raised up to the hard one;
    a hard limit under that is said at start, with the fix, and the server still serves."""
    proc = ServerProcess.start(serve_repo, "--max-connections", "256", "--instances", "1", "--threads", "1",
                               executable=_limited_tvmzoo(tmp_path, 256, hard))
    try:
        assert _soft_nofile(proc.proc.pid) == min(3 * 256 + 64, hard)
        warned = [l for l in proc.lines if "open-file limit" in l]
        if hard < 3 * 256 + 64:
            assert warned and "raise `ulimit -n` or lower --max-connections" in warned[0] and "300" in warned[0]
        else:
            assert not warned
        got = _infer(httpclient.InferenceServerClient(proc.http), httpclient, photos[:1])
        np.testing.assert_array_equal(got, model.run(photos[:1]))
    finally:
        assert proc.stop() == 0, proc.output()
