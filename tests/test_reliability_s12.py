"""Inputs that still broke tvmzoo in session 12, each through the real CLI or a real server: decompression
bombs sent to `tvmzoo serve`, clients that stall, odd request fields, named pipes handed over as input files."""
from __future__ import annotations

import http.client
import json
import os
import re
import socket
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from serve_client import HOST, ServerProcess

pytestmark = pytest.mark.reliability


def _png(width: int, height: int) -> bytes:
    """A black RGB PNG written row by row: a 5000 x 5000 one is 75 MB decoded and 76 KB here."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    deflate, row = zlib.compressobj(9), bytes(1 + 3 * width)
    pixels = b"".join(deflate.compress(row) for _ in range(height)) + deflate.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", pixels) + chunk(b"IEND", b""))


def _infer(address: str, body: bytes, headers: dict | None = None, model: str = HOST) -> tuple[int, dict]:
    host, port = address.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.request("POST", f"/v2/models/{model}/infer", body, headers or {})
    response = conn.getresponse()
    status, text = response.status, response.read()
    conn.close()
    return status, json.loads(text) if text else {}


def _send_image(address: str, image: bytes) -> tuple[int, dict]:
    header = json.dumps({"inputs": [{"name": "input", "datatype": "BYTES", "shape": [1],
                                     "parameters": {"binary_data_size": len(image) + 4}}]}).encode()
    return _infer(address, header + struct.pack("<I", len(image)) + image,
                  {"Inference-Header-Content-Length": str(len(header))})


def _peak_mb(pid: int) -> float:
    status = open(f"/proc/{pid}/status").read()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status)[1]) / 1024


@pytest.fixture(scope="module")
def server(serve_repo):
    proc = ServerProcess.start(serve_repo, "--instances", "1", "--threads", "1", "--idle-timeout-seconds", "1",
                               "--max-image-pixels", "30000000", "--max-json-bytes", "1000000")
    yield proc
    assert proc.stop() == 0, proc.output()


def test_serve_refuses_decompression_bombs_before_decoding_them(server, sample_images):
    """Was: a 97 KB PNG of 6000 x 6000 pixels decoded (108 MB, 480 MB peak for 9000 x 9000) and a 321-byte
    1 x 62500 PNG resized to 40 x 2.5 M (300 MB): every decoding core could take that much."""
    status, doc = _send_image(server.http, sample_images[0].read_bytes())
    assert status == 200, doc
    before = _peak_mb(server.proc.pid)
    status, doc = _send_image(server.http, _png(6000, 6000))
    assert status == 400
    assert "6000x6000 pixels is above the limit of 30000000 pixels (tvmzoo serve --max-image-pixels)" in doc["error"]
    _, strip = cv2.imencode(".png", np.zeros((62500, 1, 3), np.uint8))
    status, doc = _send_image(server.http, strip.tobytes())
    assert status == 400 and "would be 40x2500000, above the limit of 30000000" in doc["error"], doc
    assert _peak_mb(server.proc.pid) - before < 50
    _, strip = cv2.imencode(".png", np.zeros((1, 200000, 3), np.uint8))   # over the runner's 100 M (was: 500)
    status, doc = _send_image(server.http, strip.tobytes())
    assert status == 400 and "--max-image-pixels" in doc["error"], doc
    status, doc = _send_image(server.http, _png(5000, 5000))   # above the default 16.8 M, within the flag's 30 M
    assert status == 200, doc


def test_serve_default_pixel_limit_and_its_bound():
    from tvmzoo.errors import ConfigError
    from tvmzoo.run.serve.config import ServeConfig

    assert ServeConfig(".").max_image_pixels == 4096 * 4096
    with pytest.raises(ConfigError, match="--max-image-pixels must be at most 100000000"):
        ServeConfig(".", max_image_pixels=10 ** 9)
    with pytest.raises(ConfigError, match="--idle-timeout-seconds must be 0.1..86400"):
        ServeConfig(".", idle_timeout_seconds=float("nan"))


def test_a_stalled_client_is_timed_out_and_blocks_nobody(server):
    """Was: a request that sent half its body, or an idle keep-alive connection, was held open forever."""
    address = server.http.split(":")
    stalled = socket.create_connection((address[0], int(address[1])))
    stalled.sendall(b"POST /v2/models/tiny_b4/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{\"inputs\"")
    idle = socket.create_connection((address[0], int(address[1])))
    idle.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
    assert idle.recv(1000).startswith(b"HTTP/1.1 200")
    start = time.monotonic()
    ok = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3, 32, 32],
                                 "data": [0.5] * 3072}]}).encode()
    assert _infer(server.http, ok)[0] == 200    # served while the other two wait
    stalled.settimeout(10)
    answer = stalled.recv(1000)
    assert answer.startswith(b"HTTP/1.1 408 Request Timeout") and b"--idle-timeout-seconds" in answer
    assert b"Connection: close" in answer and stalled.recv(100) == b""
    idle.settimeout(10)
    assert idle.recv(100) == b""              # closed without an answer: nothing was asked
    assert time.monotonic() - start < 8


def test_json_over_its_limit_is_refused_before_parsing_and_binary_data_is_not_counted(server):
    """Was: a 64 MB body of JSON numbers held the event loop for 11 s (every client waited) and took 720 MB."""
    zeros = np.zeros((100, 3, 32, 32), np.float32)
    body = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": list(zeros.shape),
                                   "data": zeros.ravel().tolist()}]}).encode()
    status, doc = _infer(server.http, body)
    assert status == 413 and f"the request's JSON is {len(body)} bytes, over the limit of 1000000 (--max-json-bytes)" \
        in doc["error"], doc
    header = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": list(zeros.shape),
                                     "parameters": {"binary_data_size": zeros.nbytes}}]}).encode()
    status, doc = _infer(server.http, header + zeros.tobytes(), {"Inference-Header-Content-Length": str(len(header))})
    assert status == 200 and doc["outputs"][0]["shape"] == [100, 1000], doc


def test_grpc_typed_contents_are_read_without_a_python_number_per_element(server):
    """Was: list(fp32_contents): a 60 MB message took 930 MB; a shape of 2**64 elements wrapped to 0 in np.prod."""
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    stub = service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(server.grpc, options=[
        ("grpc.max_send_message_length", 1 << 30)]))

    def infer(shape, datatype="FP32", values=()):
        request = service_pb2.ModelInferRequest(model_name=HOST)
        tensor = request.inputs.add(name="input", datatype=datatype, shape=shape)
        getattr(tensor.contents, "bytes_contents" if datatype == "BYTES" else "fp32_contents").extend(values)
        return stub.ModelInfer(request, timeout=120)

    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    typed = np.frombuffer(infer([2, 3, 32, 32], values=x.ravel()).raw_output_contents[0], np.float32)
    request = service_pb2.ModelInferRequest(model_name=HOST)
    request.inputs.add(name="input", datatype="FP32", shape=[2, 3, 32, 32])
    request.raw_input_contents.append(x.tobytes())
    assert np.array_equal(typed, np.frombuffer(stub.ModelInfer(request).raw_output_contents[0], np.float32))
    before = _peak_mb(server.proc.pid)
    with pytest.raises(grpc.RpcError) as info:
        infer([5000, 3, 32, 32], values=np.zeros(5000 * 3072, np.float32))   # 61 MB, over 256 rows
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "1 <= n <= 256" in info.value.details()
    assert _peak_mb(server.proc.pid) - before < 500
    with pytest.raises(grpc.RpcError) as info:
        infer([2 ** 32, 2 ** 32], "BYTES")
    assert "0 elements do not fill shape [4294967296, 4294967296] (18446744073709551616 elements)" \
        in info.value.details()


@pytest.mark.parametrize("change, words", [
    ({"inputs": [{"name": "input", "datatype": ["FP32"], "shape": [1, 3, 32, 32], "data": [0.0] * 3072}]},
     "unknown datatype ['FP32']"),                                                          # was: 500
    ({"parameters": {"binary_data_output": "false"}}, "binary_data_output must be true or false, got 'false'"),
    ({"outputs": [{"name": "output", "parameters": {"binary_data": 0}}]}, "binary_data must be true or false"),
    ({"id": {"a": [1]}}, '"id" must be a string'),                                           # was: echoed as str()
])
def test_request_fields_of_the_wrong_type_are_400(server, change, words):
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3, 32, 32], "data": [0.0] * 3072}]}
    status, doc = _infer(server.http, json.dumps({**body, **change}).encode())
    assert status == 400 and words in doc["error"], doc


ROOT = Path(__file__).resolve().parents[1]
COMMON = ROOT / "common"


def _run(*args, timeout: float = 120) -> subprocess.CompletedProcess:
    """A console script or vendor script, killed after `timeout` (a reader blocked on a pipe never returns)."""
    first = str(args[0])
    program = [sys.executable, first] if first.endswith(".py") else [str(Path(sys.executable).parent / first)]
    return subprocess.run([*program, *map(str, args[1:])], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "TVM_NUM_THREADS": "2"})


@pytest.mark.parametrize("what, command", [
    ("build config", lambda p, m: ["vamc", "compile", p]),
    ("label file", lambda p, m: ["tvmzoo", "run", "--file_path", COMMON / "label", "--model_prefix_path", m,
                                 "--label_txt", p]),
    ("vdsp params file", lambda p, m: ["tvmzoo", "run", "--file_path", COMMON / "label", "--model_prefix_path", m,
                                       "--vdsp_params_info", p]),
    ("result file", lambda p, m: [COMMON / "eval" / "eval_topk.py", p]),
    ("datalist", lambda p, m: [COMMON / "eval" / "vamp_npz_decode.py", p, p.parent / "out", p.parent / "r.txt"]),
    ("checkpoint", lambda p, m: ["tvmzoo", "export", "--family", "repvgg", "--arch", "A0", "--source", "official",
                                 "--weights", p, "--output", p.parent / "a0.onnx"]),
    ("--auth-token-file", lambda p, m: ["tvmzoo", "serve", m.parent, "--auth-token-file", p]),
    ("image path", lambda p, m: ["tvmzoo", "run", "--file_path", p, "--model_prefix_path", m]),
    ("npz", lambda p, m: ["vamp", "-m", m, "--datalist", _datalist(p), "--path_output", p.parent / "out"]),
])
def test_a_named_pipe_given_as_an_input_is_refused_not_waited_on(what, command, serve_repo, tmp_path):
    """Was: vamc compile, --label_txt, --vdsp_params_info, serve --auth-token-file and vamp --datalist waited
    forever for a writer; the checkpoint, result file and datalist were "not found"."""
    pipe = tmp_path / "input"
    os.mkfifo(pipe)
    proc = _run(*command(pipe, serve_repo / HOST / "mod"), timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "is a named pipe, not a regular file" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert (what == "npz") or f"{what} {pipe}" in proc.stderr


def _datalist(pipe: Path) -> Path:
    datalist = pipe.parent / "datalist.txt"
    datalist.write_text(f"{pipe}\n")
    return datalist


def test_a_device_given_as_a_build_config_is_refused_not_read_without_end():
    """Was: /dev/zero read as YAML until memory ran out (its size is 0, so the 64 MB bound passed it)."""
    proc = _run("vamc", "compile", "/dev/zero", timeout=60)
    assert proc.returncode == 2 and "build config /dev/zero is a character device, not a regular file" in proc.stderr


def _vamp_outputs(tmp_path: Path, scores: np.ndarray) -> tuple[Path, Path]:
    """A datalist of one image and the output npz vamp --datalist would have written for it."""
    datalist, out = tmp_path / "datalist.txt", tmp_path / "out"
    datalist.write_text(f"{tmp_path / 'img.npz'}\n")
    out.mkdir()
    np.savez(out / "0000000_img.npz", output_0=scores.astype(np.float32).reshape(1, -1))
    return datalist, out


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_npz_decode_refuses_scores_that_are_not_numbers(bad, tmp_path):
    """Was: one NaN made every softmax score NaN: written as 'prob: nan' with class 0 on top, and scored."""
    scores = np.linspace(-3, 3, 1000)
    scores[7] = bad
    datalist, out = _vamp_outputs(tmp_path, scores)
    proc = _run(COMMON / "eval" / "vamp_npz_decode.py", datalist, out, tmp_path / "result.txt")
    assert proc.returncode == 2, proc.stderr
    assert "holds 1 NaN or infinite scores (the first at index 7)" in proc.stderr
    assert not (tmp_path / "result.txt").exists()


def test_an_output_that_is_also_an_input_is_refused_before_any_work(serve_repo, sample_images, tmp_path):
    """Was: npz decode's result written over its datalist, run's over its --label_txt, export's over the
    checkpoint it read (also when the output is a symbolic link to the input)."""
    datalist, out = _vamp_outputs(tmp_path, np.linspace(-3, 3, 1000))
    (tmp_path / "link.txt").symlink_to(datalist)
    labels = tmp_path / "labels.txt"
    labels.write_text("".join(f"class {i}\n" for i in range(1000)))
    weights = tmp_path / "a0.pth"
    weights.write_bytes(b"PK not read")
    cases = [
        ([COMMON / "eval" / "vamp_npz_decode.py", datalist, out, tmp_path / "link.txt"], datalist, "datalist"),
        ([COMMON / "eval" / "vamp_npz_decode.py", datalist, out, labels, labels], labels, "label file"),
        (["tvmzoo", "run", "--file_path", sample_images[0], "--model_prefix_path", serve_repo / HOST / "mod",
          "--label_txt", labels, "--save_result_txt", labels], labels, "label file"),
        (["tvmzoo", "export", "--family", "repvgg", "--arch", "A0", "--source", "official", "--weights", weights,
          "--output", weights], weights, "checkpoint"),
    ]
    for command, kept, what in cases:
        before = kept.read_bytes()
        proc = _run(*command)
        assert proc.returncode == 2 and f"is also the {what} this command reads" in proc.stderr, proc.stderr
        assert kept.read_bytes() == before


class _NanRow:
    """A real compiled build whose scores for the second image of each batch come out NaN (as a build of a
    checkpoint with NaN weights gives for every image)."""

    def __init__(self, model) -> None:
        self.model, self.fused = model, model.fused

    def run(self, inputs: np.ndarray) -> np.ndarray:
        scores = self.model.run(inputs).copy()
        scores[1:2] = np.nan
        return scores


def test_the_runner_lists_an_image_with_nan_scores_as_failed(serve_repo, sample_images):
    """Was: written as 'prob: nan' lines with class 0 on top, and scored by eval_topk."""
    from tvmzoo.run.runner import classify
    from tvmzoo.run.runtime import CompiledModel

    model = CompiledModel.load(serve_repo / HOST)
    paths = sample_images[:4]
    summary = classify(_NanRow(model), paths, model.preprocessing, batch=4, progress=False)
    assert [p.path for p in summary.predictions] == [str(paths[i]) for i in (0, 2, 3)]
    assert all(np.isfinite(p.probs).all() for p in summary.predictions)
    assert summary.failed == [(str(paths[1]), "the model's scores for it hold NaN or infinite values (broken "
                               "weights or build?): its top-k would mean nothing")]
    reference = classify(model, paths, model.preprocessing, batch=4, progress=False)
    assert [p.ids for p in summary.predictions] == [reference.predictions[i].ids for i in (0, 2, 3)]


@pytest.mark.parametrize("rounds", ["0", "-3"])
def test_report_refuses_zero_timing_rounds(rounds, tmp_path):
    """Was: no build timed and 'nan' ms / image written into the report."""
    proc = _run("tvmzoo", "report", tmp_path / "any.yaml", "--rounds", rounds, timeout=60)
    assert proc.returncode == 2 and f"--rounds must be at least 1 (timing rounds per build), got {rounds}." \
        in proc.stderr, proc.stderr


def test_an_output_place_that_refuses_files_is_found_before_the_work(tmp_path):
    """Was: a FileNotFoundError traceback for workspace.path=/proc as root (access() says yes to root)."""
    proc = _run("vamc", "compile", ROOT / "tvmzoo" / "build_in" / "build" / "efficientnet_lite0.yaml", "--set",
                "workspace.path=/proc", timeout=60)
    assert proc.returncode == 2 and "cannot" in proc.stderr and "in /proc" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
