"""Triton's system shared memory extension in `tvmzoo serve`: a real server process, tritonclient's HTTP and gRPC
clients and tritonclient.utils.shared_memory regions in /dev/shm, a real compiled tiny build and real photos.
Every bad case gets its status and the server keeps answering."""
from __future__ import annotations

import itertools
import os
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

grpcclient = pytest.importorskip("tritonclient.grpc")
httpclient = pytest.importorskip("tritonclient.http")
shm = pytest.importorskip("tritonclient.utils.shared_memory")
from tritonclient.utils import InferenceServerException  # noqa: E402

from serve_client import ServerProcess  # noqa: E402
from tiny import build_tiny  # noqa: E402
from tvmzoo.preprocess import apply, read_image  # noqa: E402
from tvmzoo.run.runtime import CompiledModel  # noqa: E402
from tvmzoo.run.serve.shared_memory import SharedMemoryRegions, ShmRef  # noqa: E402
from tvmzoo.run.serve.tensors import ServeError  # noqa: E402

pytestmark = [pytest.mark.reliability,
              pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="no /dev/shm: no POSIX shared memory here")]
MODEL = "tiny_b4"
TOKEN = "s3cret"
H = {"Authorization": f"Bearer {TOKEN}"}
G = {"authorization": f"Bearer {TOKEN}"}   # gRPC metadata keys are lowercase
_keys = itertools.count()


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_shm")
    build_tiny(root, MODEL, resize_short=40, batch=4)
    return root / "ws"


@pytest.fixture(scope="module")
def model(repo):
    return CompiledModel.load(repo / MODEL)


@pytest.fixture(scope="module", params=["native", "python"])
def server(repo, tmp_path_factory, request):
    """Both data paths: shared memory requests are Python's front ends' on both, batched by the C++ engine
    (the default) or the Python batcher (--no-native)."""
    token = tmp_path_factory.mktemp("token") / "token"
    token.write_text(TOKEN + "\n")
    path = [] if request.param == "native" else ["--no-native"]
    proc = ServerProcess.start(repo, "--auth-token-file", str(token), "--max-queue-delay-us", "2000", *path)
    yield proc
    assert proc.stop() == 0, proc.output()


@pytest.fixture
def clients(server):
    h, g = httpclient.InferenceServerClient(server.http), grpcclient.InferenceServerClient(server.grpc)
    yield h, g
    h.unregister_system_shared_memory(headers=H)
    g.unregister_system_shared_memory(headers=G)


@pytest.fixture
def region():
    """create(name, byte_size) -> a new shm object (unique key), destroyed after the test."""
    made = []

    def create(name: str, byte_size: int):
        key = f"/tvmzoo_test_{os.getpid()}_{next(_keys)}"
        made.append(shm.create_shared_memory_region(name, key, byte_size, create_only=True))
        return made[-1], key

    yield create
    for handle in made:
        shm.destroy_shared_memory_region(handle)


def _photos(model: CompiledModel, paths) -> np.ndarray:
    return np.stack([apply(model.preprocessing, read_image(p)) for p in paths])


def _request(module, x: np.ndarray, in_region: str | None, out_region: str | None, out_bytes: int = 0,
             in_bytes: int | None = None, in_offset: int = 0):
    tensor = module.InferInput("input", list(x.shape), "FP32")
    if in_region:
        tensor.set_shared_memory(in_region, x.nbytes if in_bytes is None else in_bytes, in_offset)
    else:
        tensor.set_data_from_numpy(x)
    output = module.InferRequestedOutput("output")
    if out_region:
        output.set_shared_memory(out_region, out_bytes)
    return [tensor], [output]


def _infer(client, module, x: np.ndarray, headers: dict, *args, **kwargs):
    inputs, outputs = _request(module, x, *args, **kwargs)
    return client.infer(MODEL, inputs, outputs=outputs, headers=headers)


def _status_of(exc: InferenceServerException) -> str:
    return str(exc.status())


def _status(err: pytest.ExceptionInfo) -> str:
    return _status_of(err.value)


def test_inputs_and_outputs_in_shared_memory_equal_compiled_model_run(clients, region, model, sample_images):
    h, g = clients
    x = _photos(model, sample_images[20:23])
    expected = model.run(x)
    assert "system_shared_memory" in h.get_server_metadata(headers=H)["extensions"]
    assert "system_shared_memory" in g.get_server_metadata(headers=G).extensions
    keys = {}
    for client, module, headers, tag in ((h, httpclient, H, "h"), (g, grpcclient, G, "g")):
        pad = 64   # the input after a gap: offsets within the object and within the region both count
        in_handle, keys[f"in_{tag}"] = region(f"in_{tag}", pad + x.nbytes)
        shm.set_shared_memory_region(in_handle, [x], offset=pad)
        out_handle, keys[f"out_{tag}"] = region(f"out_{tag}", expected.nbytes)
        client.register_system_shared_memory(f"in_{tag}", keys[f"in_{tag}"], x.nbytes + 16, offset=pad - 16,
                                             headers=headers)
        client.register_system_shared_memory(f"out_{tag}", keys[f"out_{tag}"], expected.nbytes, headers=headers)

        inputs, outputs = _request(module, x, f"in_{tag}", f"out_{tag}", expected.nbytes, in_offset=16)
        response = client.infer(MODEL, inputs, outputs=outputs, headers=headers).get_response()
        if module is httpclient:   # as Triton: the output's name, datatype and shape, no data
            assert response["outputs"] == [{"name": "output", "datatype": "FP32", "shape": list(expected.shape)}]
        else:
            assert list(response.outputs[0].shape) == list(expected.shape) and response.raw_output_contents == [b""]
        np.testing.assert_array_equal(shm.get_contents_as_numpy(out_handle, np.float32, expected.shape), expected)

        inputs, outputs = _request(module, x, f"in_{tag}", None, in_offset=16)   # output in the body
        np.testing.assert_array_equal(client.infer(MODEL, inputs, outputs=outputs, headers=headers)
                                      .as_numpy("output"), expected)
    answers = []   # Triton's stream (perf_analyzer --streaming) reads and writes the same regions
    g.start_stream(callback=lambda result, error: answers.append(error or result), headers=G)
    shm.set_shared_memory_region(out_handle, [np.zeros_like(expected)])   # out_g's, the loop's last
    inputs, outputs = _request(grpcclient, x, "in_g", "out_g", expected.nbytes, in_offset=16)
    g.async_stream_infer(MODEL, inputs, outputs=outputs)
    g.stop_stream()   # waits for the answer
    assert len(answers) == 1 and not isinstance(answers[0], InferenceServerException), answers
    np.testing.assert_array_equal(shm.get_contents_as_numpy(out_handle, np.float32, expected.shape), expected)

    listed = h.get_system_shared_memory_status(headers=H)
    assert {r["name"]: (r["key"], int(r["offset"]), int(r["byte_size"])) for r in listed} == {
        name: (key, 48 if name.startswith("in") else 0, x.nbytes + 16 if name.startswith("in") else expected.nbytes)
        for name, key in keys.items()}
    one = g.get_system_shared_memory_status("out_h", headers=G)
    assert list(one.regions) == ["out_h"] and one.regions["out_h"].byte_size == expected.nbytes
    h.unregister_system_shared_memory("in_h", headers=H)
    g.unregister_system_shared_memory("out_g", headers=G)
    assert sorted(r["name"] for r in h.get_system_shared_memory_status(headers=H)) == ["in_g", "out_h"]
    h.unregister_system_shared_memory(headers=H)   # all
    assert h.get_system_shared_memory_status(headers=H) == [] and not g.get_system_shared_memory_status(
        headers=G).regions


def test_concurrent_clients_each_get_their_own_regions_answers(server, region, model, sample_images):
    """16 clients (8 HTTP, 8 gRPC), each with its own input and output region, rewrite their input and infer
    again, all at once with dynamic batching: every answer lands in its own client's region and is that photo's."""
    photos = _photos(model, sample_images[60:72])
    expected = model.run(photos)
    out_bytes = expected[:1].nbytes

    def client_loop(i: int) -> list[str]:
        module, headers = (httpclient, H) if i % 2 else (grpcclient, G)
        url = server.http if i % 2 else server.grpc
        client = module.InferenceServerClient(url)
        (in_handle, in_key), (out_handle, out_key) = region(f"c{i}_in", photos[0:1].nbytes), \
            region(f"c{i}_out", out_bytes)
        client.register_system_shared_memory(f"c{i}_in", in_key, photos[0:1].nbytes, headers=headers)
        client.register_system_shared_memory(f"c{i}_out", out_key, out_bytes, headers=headers)
        wrong = []
        try:
            for step in range(6):
                k = (i + step) % len(photos)
                shm.set_shared_memory_region(in_handle, [photos[k:k + 1]])
                inputs, outputs = _request(module, photos[k:k + 1], f"c{i}_in", f"c{i}_out", out_bytes)
                client.infer(MODEL, inputs, outputs=outputs, headers=headers)
                got = shm.get_contents_as_numpy(out_handle, np.float32, expected[:1].shape)
                if not np.array_equal(got, expected[k:k + 1]):
                    wrong.append(f"client {i} step {step}: photo {k}'s answer is not in its region")
        finally:
            client.unregister_system_shared_memory(f"c{i}_in", headers=headers)
            client.unregister_system_shared_memory(f"c{i}_out", headers=headers)
            client.close()
        return wrong

    with ThreadPoolExecutor(16) as pool:
        wrong = [w for found in pool.map(client_loop, range(16)) for w in found]
    assert wrong == []
    assert server.proc.poll() is None


def test_encoded_photos_in_shared_memory_give_the_top_k(clients, region, model, sample_images):
    h, g = clients
    photos = sample_images[30:32]
    from tritonclient.utils import serialize_byte_tensor
    blob = serialize_byte_tensor(np.array([p.read_bytes() for p in photos], dtype=object)).item()
    handle, key = region("jpegs", len(blob))
    shm.set_shared_memory_region(handle, [np.array(blob, dtype=object)])
    g.register_system_shared_memory("jpegs", key, len(blob), headers=G)
    expected = model.run(_photos(model, photos))
    for client, module, headers in ((h, httpclient, H), (g, grpcclient, G)):
        tensor = module.InferInput("input", [len(photos)], "BYTES")
        tensor.set_shared_memory("jpegs", len(blob))
        out = client.infer(MODEL, [tensor], outputs=[module.InferRequestedOutput("output", class_count=1)],
                           headers=headers).as_numpy("output")
        assert [int(row[0].decode().split(":")[1]) for row in out] == list(expected.argmax(axis=1))


def test_every_bad_case_gets_its_status_and_the_server_goes_on(clients, region, model, sample_images, server):
    h, g = clients
    x = _photos(model, sample_images[40:41])
    handle, key = region("good", x.nbytes)
    shm.set_shared_memory_region(handle, [x])
    h.register_system_shared_memory("good", key, x.nbytes, headers=H)
    huge = 65 << 20   # over the default --max-request-bytes (64 MiB); tmpfs leaves the unwritten object sparse
    g.register_system_shared_memory("huge", region("huge", huge)[1], huge, headers=G)
    cases = [   # (what, HTTP call, gRPC call, HTTP status, gRPC status, words in the message)
        ("unknown key", lambda c, hd: c.register_system_shared_memory("r1", "/tvmzoo_no_such_object", 16, headers=hd),
         "400", "StatusCode.INVALID_ARGUMENT", "cannot open"),
        ("key leaving /dev/shm", lambda c, hd: c.register_system_shared_memory("r2", "/../../etc/passwd", 16,
                                                                               headers=hd),
         "400", "StatusCode.INVALID_ARGUMENT", "not a POSIX shared memory name"),
        ("past the object", lambda c, hd: c.register_system_shared_memory("r3", key, x.nbytes, offset=4, headers=hd),
         "400", "StatusCode.INVALID_ARGUMENT", "past the end"),
        ("name twice", lambda c, hd: c.register_system_shared_memory("good", key, 16, headers=hd),
         "400", "StatusCode.ALREADY_EXISTS", "already registered"),
        ("status of an unknown region", lambda c, hd: c.get_system_shared_memory_status("nope", headers=hd),
         "404", "StatusCode.NOT_FOUND", "Unable to find"),
        ("no token", lambda c, hd: c.get_system_shared_memory_status(),
         "401", "StatusCode.UNAUTHENTICATED", "token"),
        ("CUDA", lambda c, hd: c.get_cuda_shared_memory_status(headers=hd),
         "400", "StatusCode.UNIMPLEMENTED", "CUDA shared memory is not supported"),
    ]
    infer_cases = [   # (what, input region, input bytes, offset, output region, output bytes, statuses, words)
        ("unknown region", "nope", x.nbytes, 0, None, 0, ("404", "StatusCode.NOT_FOUND"), "Unable to find"),
        ("byte size not the shape's", "good", x.nbytes - 4, 0, None, 0, ("400", "StatusCode.INVALID_ARGUMENT"),
         "bytes of data"),
        ("outside the region", "good", x.nbytes, 4, None, 0, ("400", "StatusCode.INVALID_ARGUMENT"), "outside region"),
        ("output region too small", "good", x.nbytes, 0, "good", 8, ("400", "StatusCode.INVALID_ARGUMENT"),
         "should be at least"),
        ("input over the request limit", "huge", huge, 0, None, 0, ("413", "StatusCode.RESOURCE_EXHAUSTED"),
         "over the limit"),
    ]
    for what, in_region, in_bytes, offset, out_region, out_bytes, statuses, words in infer_cases:
        cases.append((what, lambda c, hd, a=(in_region, in_bytes, offset, out_region, out_bytes): _infer(
            c, httpclient if c is h else grpcclient, x, hd, a[0], a[3], a[4], in_bytes=a[1], in_offset=a[2]),
            *statuses, words))
    for what, call, http_status, grpc_status, words in cases:
        for client, headers, status in ((h, H, http_status), (g, G, grpc_status)):
            with pytest.raises(InferenceServerException) as err:
                call(client, headers)
            assert _status(err) == status, (what, err.value)
            assert words in err.value.message(), (what, err.value)
    expected = model.run(x)
    np.testing.assert_array_equal(_infer(h, httpclient, x, H, "good", None).as_numpy("output"), expected)

    os.truncate(f"/dev/shm/{key.lstrip('/')}", 100)   # the client shrinks its object after registering
    for client, module, headers, status in ((h, httpclient, H, "400"),
                                            (g, grpcclient, G, "StatusCode.INVALID_ARGUMENT")):
        with pytest.raises(InferenceServerException) as err:
            _infer(client, module, x, headers, "good", None)
        assert _status(err) == status and "truncated" in err.value.message()
    assert server.proc.poll() is None   # no SIGBUS: the server is still there
    np.testing.assert_array_equal(_infer(g, grpcclient, x, G, None, None).as_numpy("output"), expected)

    # a register body over 4 KB reaches the handler as a memoryview (the HTTP receive path): still a 400, not a 500
    padded = b'{"key": "/tvmzoo_no_such_object", "byte_size": 16}' + b" " * 8192
    request = urllib.request.Request(f"http://{server.http}/v2/systemsharedmemory/region/r9/register", data=padded,
                                     headers=H, method="POST")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=30)
    assert err.value.code == 400 and b"cannot open" in err.value.read()


def test_a_region_in_use_stays_open_until_released(tmp_path):
    """Unregistering a region a request holds takes the name away at once and closes it after the request."""
    key = f"/tvmzoo_test_{os.getpid()}_{next(_keys)}"
    handle = shm.create_shared_memory_region("r", key, 64, create_only=True)
    try:
        regions = SharedMemoryRegions()
        regions.register("r", key, 0, 64)
        held = regions.acquire(ShmRef("r", 16, 8), "output 'o'")
        regions.unregister("r")
        with pytest.raises(ServeError, match="Unable to find") as err:
            regions.acquire(ShmRef("r", 16), "input 'i'")
        assert err.value.status == "NOT_FOUND" and regions.status() == []
        held.write(ShmRef("r", 16, 8), memoryview(np.arange(4, dtype=np.float32)).cast("B"), "output 'o'")
        np.testing.assert_array_equal(shm.get_contents_as_numpy(handle, np.float32, [4], offset=8), np.arange(4))
        regions.release(held)
        assert held.fd == -1   # closed with the last request
        regions.register("r", key, 0, 64)   # the name is free again
        regions.close()
        assert regions.status() == []
    finally:
        shm.destroy_shared_memory_region(handle)


def test_unregistering_regions_in_use_leaves_the_server_serving(clients, region, model, sample_images, server):
    """Clients infer through their regions while the regions are unregistered and registered again: each
    request is answered right (its output region held until written) or refused NOT_FOUND, nothing else."""
    h, g = clients
    x = _photos(model, sample_images[50:52])
    expected = model.run(x)
    regions = {}
    for i in range(3):
        (in_handle, in_key), (out_handle, out_key) = region(f"in{i}", x.nbytes), region(f"out{i}", expected.nbytes)
        shm.set_shared_memory_region(in_handle, [x])
        regions[i] = (in_key, out_key, out_handle)

    def register(i: int) -> None:
        h.register_system_shared_memory(f"in{i}", regions[i][0], x.nbytes, headers=H)
        h.register_system_shared_memory(f"out{i}", regions[i][1], expected.nbytes, headers=H)

    for i in regions:
        register(i)

    def client(i: int) -> tuple[int, int]:
        c = grpcclient.InferenceServerClient(server.grpc) if i % 2 else httpclient.InferenceServerClient(server.http)
        module, headers = (grpcclient, G) if i % 2 else (httpclient, H)
        answered = refused = 0
        for _ in range(30):
            try:
                _infer(c, module, x, headers, f"in{i}", f"out{i}", expected.nbytes)
            except InferenceServerException as exc:
                assert _status_of(exc) in ("404", "StatusCode.NOT_FOUND"), exc
                refused += 1
                continue
            np.testing.assert_array_equal(shm.get_contents_as_numpy(regions[i][2], np.float32, expected.shape),
                                          expected)
            answered += 1
        return answered, refused

    with ThreadPoolExecutor(3) as pool:
        running = [pool.submit(client, i) for i in regions]
        while not all(f.done() for f in running):
            h.unregister_system_shared_memory(headers=H)
            for i in regions:
                register(i)
        counts = [f.result() for f in running]
    assert sum(a for a, _ in counts) > 0, counts
    assert server.proc.poll() is None
    _infer(g, grpcclient, x, G, "in0", None)   # still serving


def test_no_shared_memory_refuses_registration_and_says_why(repo, region, model, sample_images):
    """`--no-shared-memory`: the extension is not advertised, registering is refused with the flag named, and the
    server still answers tensors sent in the request."""
    proc = ServerProcess.start(repo, "--no-shared-memory")
    try:
        h, g = httpclient.InferenceServerClient(proc.http), grpcclient.InferenceServerClient(proc.grpc)
        assert "system_shared_memory" not in h.get_server_metadata()["extensions"]
        assert "system_shared_memory" not in g.get_server_metadata().extensions
        _, key = region("r", 64)
        for client, status in ((h, "400"), (g, "StatusCode.INVALID_ARGUMENT")):
            with pytest.raises(InferenceServerException) as err:
                client.register_system_shared_memory("r", key, 64)
            assert _status(err) == status and "--no-shared-memory" in err.value.message()
        x = _photos(model, sample_images[41:42])
        np.testing.assert_array_equal(_infer(g, grpcclient, x, {}, None, None).as_numpy("output"), model.run(x))
    finally:
        assert proc.stop() == 0, proc.output()
