"""`tvmzoo serve --native`: the dynamic batcher in C++ (tvmzoo/run/serve/native/engine.cc) through NativeBatcher,
on real compiled tiny builds (fp32 at batch 1 and 8, int8, fused uint8) and real photos: the same answers as
CompiledModel.run exactly, the same refusals, flush / close and statistics as DynamicBatcher; the real server
with the real Triton clients; and the one clear message when the engine cannot be built."""
from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
import pytest

grpcclient = pytest.importorskip("tritonclient.grpc")
httpclient = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

from serve_client import FUSED, HOST, ServerProcess, scrape  # noqa: E402
from tiny import build_tiny  # noqa: E402
from tvmzoo.errors import ConfigError  # noqa: E402
from tvmzoo.preprocess import apply, read_image  # noqa: E402
from tvmzoo.preprocess.fused import fused_input  # noqa: E402
from tvmzoo.run.runtime import CompiledModel  # noqa: E402
from tvmzoo.run.serve.batcher import Closed  # noqa: E402
from tvmzoo.run.serve.metrics import VERSION, Metrics  # noqa: E402
from tvmzoo.run.serve.native.batcher import NativeBatcher  # noqa: E402
from tvmzoo.run.serve.tensors import ServeError, check_finite  # noqa: E402
from tvmzoo.run.threads import usable_cores  # noqa: E402

pytestmark = pytest.mark.reliability
DELAY_S = 1.5


@pytest.fixture(scope="module")
def builds(tmp_path_factory, sample_images) -> dict[str, Path]:
    """fp32 at batch 1 and 8, int8 (calibrated on 8 photos) and fused uint8 input, all host-independent."""
    root = tmp_path_factory.mktemp("native")
    for path in sample_images[:8]:
        shutil.copy(path, root)
    options = {"b1": {}, "b8": {"batch": 8}, "int8": {"dtype": "int8"}, "fused": {"preprocess": "fused"}}
    return {name: build_tiny(root, name, resize_short=40, **kw).parent for name, kw in options.items()}


def _photos(model: CompiledModel, paths) -> np.ndarray:
    """The module's rows for `paths`; the second half mirrored, so every row differs whatever the samples."""
    convert = partial(fused_input if model.fused else apply, model.preprocessing)
    rows = np.stack([convert(read_image(p)) for p in paths])
    half = len(rows) // 2
    rows[half:] = rows[half:, ..., ::-1] if model.fused else rows[half:, :, :, ::-1]
    return rows


def _batcher(directory: Path, metrics: Metrics, instances: int = 1, delay_s: float = 0.002, **kwargs) -> NativeBatcher:
    models = [CompiledModel.load(directory) for _ in range(instances)]
    kwargs.setdefault("check_input", "input")
    return NativeBatcher(directory.name, models, models[0].fixed_batch, delay_s, metrics, **kwargs)


@pytest.mark.parametrize("name", ["b1", "b8", "int8", "fused"])
def test_outputs_equal_compiled_model_run_exactly(builds, sample_images, name):
    """One row per request, a batch-8 build given fewer rows (padded), a request of more rows than a batch
    (run in chunks), adaptive on two instances: every answer is CompiledModel.run's, bit for bit."""
    model = CompiledModel.load(builds[name])
    x = _photos(model, (sample_images * 12)[:12])
    expected = model.run(x)
    cores = usable_cores()[:2]
    batcher = _batcher(builds[name], Metrics.create(), instances=len(cores), cores=cores)
    try:
        for i in range(3):   # one at a time: a batch of one request (in place at batch 1, padded at 8)
            np.testing.assert_array_equal(batcher.submit(x[i:i + 1]).result(60), expected[i:i + 1])
        futures = [batcher.submit(x[i:i + 1]) for i in range(12)]
        np.testing.assert_array_equal(np.concatenate([f.result(60) for f in futures]), expected)
        np.testing.assert_array_equal(batcher.submit(x[:3]).result(60), expected[:3])
        np.testing.assert_array_equal(batcher.submit(x[:11]).result(60), expected[:11])
        raw = np.empty(x[:1].nbytes + 64, np.uint8)    # a row 4 bytes past a 64-byte boundary: copied to run
        start = -raw.ctypes.data % 64 + 4
        unaligned = raw[start:start + x[:1].nbytes].view(x.dtype).reshape(x[:1].shape)
        unaligned[:] = x[2:3]
        np.testing.assert_array_equal(batcher.submit(unaligned).result(60), expected[2:3])
    finally:
        batcher.close()


def test_concurrent_tagged_submissions_each_get_their_own_rows(builds, sample_images):
    """8 threads x 16 requests, each of one distinct photo row, on a batch-8 build with 2 instances: every
    answer is its own row's."""
    model = CompiledModel.load(builds["b8"])
    x = _photos(model, (sample_images * 16)[:16])
    expected = model.run(x)
    metrics = Metrics.create()
    batcher = _batcher(builds["b8"], metrics, instances=2, threads=1)

    def client(k: int) -> int:
        for j in range(16):
            i = (k * 5 + j) % len(x)
            np.testing.assert_array_equal(batcher.submit(x[i:i + 1]).result(60), expected[i:i + 1])
        return 16

    try:
        with ThreadPoolExecutor(8) as pool:
            assert sum(pool.map(client, range(8))) == 128
        assert metrics.inference_count.value("b8", VERSION) == 128
        assert metrics.exec_count.value("b8", VERSION) < 128   # batched
        names = [task.joinpath("comm").read_text().strip() for task in Path("/proc/self/task").iterdir()]
        assert {n for n in names if n.startswith("b8/")} == {"b8/i0", "b8/i1"}   # and their TVM pools' threads
    finally:
        batcher.close()


def test_a_refused_request_leaves_the_rest_of_its_batch_answered(builds, sample_images):
    """The NaN / Inf check on each request's staged rows, in C++: the refused request gets check_finite's
    message exactly, the others of the same batch their own outputs; a batch of refused requests runs nothing."""
    model = CompiledModel.load(builds["b8"])
    x = _photos(model, (sample_images * 4)[:4])
    expected = model.run(x)
    rows = [x[i:i + 1].copy() for i in range(4)]
    rows[1][0, 2, 5, 7] = np.nan
    rows[3][:] = np.inf
    metrics = Metrics.create()
    batcher = _batcher(builds["b8"], metrics, delay_s=DELAY_S)

    async def main(batch: list[np.ndarray]) -> list:
        return await asyncio.wait_for(asyncio.gather(*(batcher.infer(r) for r in batch), return_exceptions=True), 60)

    def message(r: np.ndarray) -> str:
        with pytest.raises(ServeError) as refused:
            check_finite("input", r)
        return str(refused.value)

    try:
        results = asyncio.run(main(rows[:1] * 4))   # the first batch waits for a full one: 4 rows, then 4
        results = asyncio.run(main(rows))
        for i in (0, 2):
            np.testing.assert_array_equal(results[i], expected[i:i + 1])
        for i in (1, 3):
            assert isinstance(results[i], ServeError) and results[i].status == "INVALID_ARGUMENT"
            assert str(results[i]) == message(rows[i])
        assert metrics.exec_count.value("b8", VERSION) == 2
        assert metrics.inference_count.value("b8", VERSION) == 4 + 2   # the refused rows ran, unanswered
        refused = asyncio.run(main([rows[1], rows[3], rows[1], rows[3]]))
        assert [str(r) for r in refused] == [message(rows[i]) for i in (1, 3, 1, 3)]
        assert metrics.exec_count.value("b8", VERSION) == 2   # nothing ran for them
    finally:
        batcher.close()


def test_asyncio_callers_are_settled_by_one_hand_back_per_batch(builds, sample_images):
    model = CompiledModel.load(builds["b8"])
    x = _photos(model, (sample_images * 4)[:4])
    expected = model.run(x)
    metrics = Metrics.create()
    batcher = _batcher(builds["b8"], metrics, delay_s=DELAY_S)

    async def main() -> tuple[list, int]:
        loop = asyncio.get_running_loop()
        calls = []
        original = loop.call_soon_threadsafe
        loop.call_soon_threadsafe = lambda *args, **kw: calls.append(args[0]) or original(*args, **kw)
        tasks = [asyncio.create_task(batcher.infer(x[i:i + 1])) for i in range(8)]
        await asyncio.sleep(0)                          # all eight queued: a full batch runs at once
        tasks[1].cancel()
        results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 60)
        await asyncio.sleep(0.05)
        return results, len(calls)

    try:
        x = np.concatenate([x, x])
        expected = np.concatenate([expected, expected])
        results, hand_backs = asyncio.run(main())
        assert isinstance(results[1], asyncio.CancelledError)
        for i in (0, *range(2, 8)):
            np.testing.assert_array_equal(results[i], expected[i:i + 1])
        assert metrics.exec_count.value("b8", VERSION) == 1 and hand_backs == 1
    finally:
        batcher.close()
    with pytest.raises(Closed):
        asyncio.run(batcher.infer(x[:1]))


def test_flush_runs_what_waits_and_close_finishes_the_queue(builds, sample_images):
    """A batch-8 build's first batch waits up to the delay for 8 rows: flush (SIGTERM) runs it at once; close
    answers everything queued, then refuses."""
    model = CompiledModel.load(builds["b8"])
    x = _photos(model, (sample_images * 4)[:4])
    expected = model.run(x)
    batcher = _batcher(builds["b8"], Metrics.create(), delay_s=30.0)
    start = time.perf_counter()
    waiting = [batcher.submit(x[i:i + 1]) for i in range(2)]
    time.sleep(0.2)
    assert not any(f.done() for f in waiting)          # waiting for a full batch
    batcher.flush()
    np.testing.assert_array_equal(np.concatenate([f.result(10) for f in waiting]), expected[:2])
    assert time.perf_counter() - start < 10
    batcher.close()
    with pytest.raises(Closed):
        batcher.submit(x[:1])

    batcher = _batcher(builds["b8"], Metrics.create(), delay_s=30.0)
    queued = [batcher.submit(x[i:i + 1]) for i in range(3)]
    batcher.close()                                     # does not wait the 30 s out: closing runs them at once
    assert time.perf_counter() - start < 20
    np.testing.assert_array_equal(np.concatenate([f.result(0) for f in queued]), expected[:3])


def _bucket(metrics: Metrics, name: str, model: str, bound: float) -> float:
    return metrics.registry.get_sample_value(f"{name}_bucket", {"model": model, "le": f"{float(bound)}"}) or 0.0


def test_batch_statistics_are_kept_in_cpp_and_read_at_scrape_time(builds, sample_images):
    """The quantities DynamicBatcher counts per batch, counted by the engine and exposed unchanged."""
    model = CompiledModel.load(builds["b8"])
    x = _photos(model, (sample_images * 8)[:8])
    metrics = Metrics.create()
    batcher = _batcher(builds["b8"], metrics, delay_s=DELAY_S, threads=1)
    try:
        batcher.submit(x).result(60)                     # 8 rows: one full batch
        for i in range(3):                               # one client: batches of one row
            batcher.submit(x[i:i + 1]).result(60)
        sample = partial(metrics.registry.get_sample_value, labels={"model": "b8", "version": VERSION})
        assert sample("nv_inference_exec_count") == 4
        assert sample("nv_inference_count") == 11
        for name in ("queue", "compute_input", "compute_infer", "compute_output"):
            assert sample(f"nv_inference_{name}_duration_us") > 0
        assert sample("nv_inference_compute_infer_duration_us") > sample("nv_inference_compute_output_duration_us")
        assert _bucket(metrics, "tvmzoo_inference_batch_size", "b8", 1) == 3
        assert _bucket(metrics, "tvmzoo_inference_batch_size", "b8", 8) == 4
        assert metrics.registry.get_sample_value("tvmzoo_inference_batch_size_sum", {"model": "b8"}) == 11
        assert _bucket(metrics, "tvmzoo_inference_threads", "b8", 1) == 4
        stats = metrics.statistics("b8")
        assert stats["inference_count"] == 11 and stats["execution_count"] == 4
        assert stats["inference_stats"]["compute_infer"]["ns"] > 0
        assert b'nv_inference_exec_count{model="b8",version="1"} 4.0' in metrics.exposition()[0]
    finally:
        batcher.close()


@pytest.mark.skipif(len(usable_cores()) < 2, reason="adaptive threads need 2 cores")
def test_adaptive_lanes_run_a_lone_batch_wide_and_a_crowd_narrow(builds, sample_images):
    model = CompiledModel.load(builds["b8"])
    x = _photos(model, (sample_images * 8)[:8])
    expected = model.run(x)
    metrics = Metrics.create()
    batcher = _batcher(builds["b8"], metrics, instances=2, delay_s=DELAY_S, cores=usable_cores()[:2])
    try:
        batcher.submit(x).result(60)                        # the first batch waits for a full one
        for i in range(4):                                  # one client at a time: every batch on both cores
            np.testing.assert_array_equal(batcher.submit(x[i:i + 1]).result(60), expected[i:i + 1])
        wide = _bucket(metrics, "tvmzoo_inference_threads", "b8", 2) - _bucket(metrics, "tvmzoo_inference_threads",
                                                                               "b8", 1)
        assert wide == 5
        futures = [batcher.submit(x) for _ in range(6)]     # a crowd: full batches side by side
        for future in futures:
            np.testing.assert_array_equal(future.result(60), expected)
        assert _bucket(metrics, "tvmzoo_inference_threads", "b8", 1) >= 1
        assert metrics.exec_count.value("b8", VERSION) == 11
    finally:
        batcher.close()


def test_float16_and_bfloat16_outputs_become_float32_as_astype_does(builds, sample_images):
    """Outputs in half precision (the engine calls any VM `main`; here one returning the real model's outputs
    cast to float16 / bfloat16, with subnormals, infinities and NaN added) reach the caller as numpy's
    .astype(np.float32) of them, as CompiledModel.run converts."""
    import ml_dtypes
    import tvm
    import tvm_ffi

    model = CompiledModel.load(builds["b1"])
    x = _photos(model, sample_images[:1])
    scores = np.log(model.run(x))                       # logits-like values of both signs
    scores[0, :6] = [6e-8, -3e-6, np.inf, -np.inf, np.nan, 65504.0]
    for dtype in (np.float16, ml_dtypes.bfloat16):
        half = scores.astype(dtype)
        main = tvm_ffi.convert(lambda batch, half=half: tvm.runtime.tensor(half))
        metrics = Metrics.create()
        batcher = NativeBatcher("half", [_Fake(model, main)], 1, 0.0, metrics, check_input="input")
        try:
            np.testing.assert_array_equal(batcher.submit(x).result(60), half.astype(np.float32))
        finally:
            batcher.close()


class _Fake:
    """A CompiledModel whose VM `main` is another function (mod.json, shapes and dtype: the real build's)."""

    def __init__(self, model: CompiledModel, main) -> None:
        self.meta, self.input_shape, self.fixed_batch = model.meta, model.input_shape, model.fixed_batch
        self.input_dtype, self.vm = model.input_dtype, {"main": main}


def test_serve_native_answers_http_and_grpc_as_compiled_model_run(serve_repo, sample_images):
    """The real server with --native: tritonclient HTTP (binary and JSON) and gRPC answers equal
    CompiledModel.run, a NaN input gets 400 with check_finite's message, /metrics counts the batches, and
    SIGTERM ends it cleanly."""
    server = ServerProcess.start(serve_repo, "--native", "--max-queue-delay-us", "2000", "--instances", "2")
    try:
        http = httpclient.InferenceServerClient(server.http)
        grpc = grpcclient.InferenceServerClient(server.grpc)
        for name in (HOST, FUSED):
            model = CompiledModel.load(serve_repo / name)
            x = _photos(model, (sample_images * 4)[:4])
            expected = model.run(x)
            datatype = "UINT8" if model.fused else "FP32"
            for module, client in ((httpclient, http), (grpcclient, grpc)):
                for i in range(4):
                    tensor = module.InferInput("input", [1, *x.shape[1:]], datatype)
                    tensor.set_data_from_numpy(x[i:i + 1])
                    np.testing.assert_array_equal(client.infer(name, [tensor]).as_numpy("output"), expected[i:i + 1])
            tensor = httpclient.InferInput("input", list(x.shape), datatype)
            tensor.set_data_from_numpy(x, binary_data=False)
            np.testing.assert_array_equal(http.infer(name, [tensor]).as_numpy("output"), expected)
        model = CompiledModel.load(serve_repo / HOST)
        bad = _photos(model, sample_images[:1])
        bad[0, 1, 3, 4] = np.nan
        tensor = httpclient.InferInput("input", list(bad.shape), "FP32")
        tensor.set_data_from_numpy(bad)
        with pytest.raises(InferenceServerException) as refused:
            http.infer(HOST, [tensor])
        with pytest.raises(ServeError) as expected_error:
            check_finite("input", bad)
        assert str(expected_error.value) in str(refused.value) and refused.value.status() == "400"
        metrics = scrape(server.http, HOST)
        assert metrics["nv_inference_count"] >= 4 * 2 + 4 and metrics["nv_inference_exec_count"] >= 1
        assert metrics["nv_inference_request_failure"] == 1
    finally:
        assert server.stop() == 0, server.output()
    assert not any("Traceback" in line for line in server.lines)


def test_an_engine_that_cannot_be_built_is_one_clear_error(serve_repo, tmp_path):
    """A C++ compiler that fails (CXX=/bin/false): `tvmzoo serve --native` exits with one message saying what
    failed, why and what to do; no traceback, no server."""
    env = {**os.environ, "CXX": shutil.which("false") or "/bin/false", "XDG_CACHE_HOME": str(tmp_path)}
    proc = subprocess.run([str(Path(sys.executable).parent / "tvmzoo"), "serve", str(serve_repo), "--native",
                           "--http-port", "0", "--grpc-port", "0"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr + proc.stdout
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "--native: building the native engine" in lines[0] and "failed" in lines[0]
    assert "Check the C++ compiler (CXX" in lines[0] and "serve without --native" in lines[0]
    env["CXX"] = str(tmp_path / "no-such-compiler")
    proc = subprocess.run([str(Path(sys.executable).parent / "tvmzoo"), "serve", str(serve_repo), "--native",
                           "--http-port", "0", "--grpc-port", "0"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "no-such-compiler not found. Install a C++ compiler" in proc.stderr


def test_the_default_path_is_native_where_it_builds_else_python_with_one_warning(serve_repo, sample_images, tmp_path,
                                                                                monkeypatch):
    """No flag: the native path when the module builds (the startup line says so, the pump answers); without a
    compiler the Python path serves the same answers after one warning saying why and how to get the native
    path; --no-native: the Python path, nothing built."""
    model = CompiledModel.load(serve_repo / HOST)
    x = _photos(model, sample_images[:4])
    expected = model.run(x)

    def serve_and_check(*flags: str) -> list[str]:
        server = ServerProcess.start(serve_repo, *flags)
        try:
            tensor = httpclient.InferInput("input", list(x.shape), "FP32")
            tensor.set_data_from_numpy(x)
            np.testing.assert_array_equal(httpclient.InferenceServerClient(server.http).infer(HOST, [tensor])
                                          .as_numpy("output"), expected)
        finally:
            assert server.stop() == 0, server.output()
        return [line for line in server.lines if "data path" in line or "WARNING" in line]

    (line,) = serve_and_check()
    assert "data path: native (C++) (the default; --no-native: the Python path)" in line
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))   # an empty cache: nothing built to find
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    warning, line = serve_and_check()
    assert "the native data path cannot be built here (cannot build the native engine" in warning
    assert "no-such-compiler not found): serving on the Python path" in warning and "install a C++ compiler" in warning
    assert line.endswith("data path: Python (the native module cannot be built here: cannot build the native engine "
                         f"(engine.cc, pump.cc): {tmp_path / 'no-such-compiler'} not found)")
    monkeypatch.setenv("CXX", shutil.which("false") or "/bin/false")
    (line,) = serve_and_check("--no-native")
    assert line.endswith("data path: Python (started with --no-native)") and not (tmp_path / "tvmzoo").exists()


def test_an_unwritable_cache_is_a_reason_not_a_traceback(tmp_path, monkeypatch, caplog):
    """XDG_CACHE_HOME a file: the default falls back to the Python path saying where and how to fix it;
    --native exits with that message."""
    from tvmzoo.run.serve import native

    (tmp_path / "file").write_bytes(b"")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "file"))
    monkeypatch.setattr(native, "_loaded", None)
    assert native.choose(None) == (False, "the native module cannot be built here: cannot create its build folder "
                                          f"{native.cache_dir()} (Not a directory)")
    assert "make XDG_CACHE_HOME (default ~/.cache) a writable folder" in caplog.text
    with pytest.raises(ConfigError, match="Make XDG_CACHE_HOME .* writable folder, or serve without --native"):
        native.choose(True)
    assert native.choose(False) == (False, "started with --no-native")


def test_cpp_submitters_get_their_rows_outputs_by_done(builds, sample_images, tmp_path, monkeypatch):
    """The pump's way in (engine.h: EngineFromHandle(handle)->Submit(Rows, Done)), from a C++ client built with
    the engine into one module: each row its own output, a NaN row refused by its Done, alongside Python's
    requests in the same batches; rows a submitter marks finite are not checked again (the fronts check what
    they copy, finite.h); after close, Submit refuses."""
    import tvm_ffi.cpp

    from tvmzoo.run.serve import native

    module = tvm_ffi.cpp.load("engine_client", sources=[*map(str, native.sources()), str(Path(__file__).parent /
                              "engine_client.cc")], extra_include_paths=[str(native.SOURCE_DIR)],
                              build_directory=str(tmp_path), extra_cflags=native.CFLAGS)
    monkeypatch.setattr(native, "_loaded", module)    # NativeBatcher's engine in the module that has the client
    model = CompiledModel.load(builds["b8"])
    x = _photos(model, (sample_images * 12)[:12])
    expected = model.run(x)
    x[5, 0, 0, 0] = np.nan
    batcher = _batcher(builds["b8"], Metrics.create(), instances=2, threads=1)
    try:
        out = np.full((12, expected.shape[1]), -1, np.float32)
        from_python = [batcher.submit(x[i:i + 1]) for i in (0, 1, 2)]
        errors = list(module.submit_rows(batcher.handle, x, out, False))
        assert errors[5].startswith("refused: input 'input' holds 1 NaN or infinite values (the first at flat index 0)")
        assert errors[:5] + errors[6:] == [""] * 11
        keep = [i for i in range(12) if i != 5]
        np.testing.assert_array_equal(out[keep], expected[keep])
        np.testing.assert_array_equal(np.concatenate([f.result(60) for f in from_python]), expected[:3])
        assert module.checks_finite32(batcher.handle)
        assert list(module.submit_rows(batcher.handle, x[5:6], out, True)) == [""]   # trusted: run, not refused
    finally:
        batcher.close()
    fused = _batcher(builds["fused"], Metrics.create())
    try:
        assert not module.checks_finite32(fused.handle)   # uint8 pixels: nothing to check
    finally:
        fused.close()
    assert list(module.submit_rows(batcher.handle, x[:2], out, False)) == ["closed", "closed"]


def test_sigterm_under_load_loses_no_accepted_request(serve_repo, sample_images, tmp_path):
    """test_serve's drain under load with --native: queued requests answered by the flush, loops refused after."""
    from test_serve import _drain_under_load

    token = tmp_path / "token"
    token.write_text("s3cret\n")
    server = ServerProcess.start(serve_repo, "--native", "--auth-token-file", str(token), "--max-queue-delay-us",
                                 "5000000")   # a long delay: the three queued stay queued until SIGTERM
    models = {name: CompiledModel.load(serve_repo / name) for name in (HOST, FUSED)}
    try:
        _drain_under_load(server, models, sample_images[200:207], {"Authorization": "Bearer s3cret"})
    finally:
        server.stop()


def test_a_failed_run_gives_each_request_the_error_and_is_logged(builds, sample_images, caplog):
    """A model run that raises (here a VM `main` that fails after its warm-up run): every request of the batch
    gets the error, it is logged through Python's logging, nothing is counted as executed, and the next
    batch runs again."""
    import tvm
    import tvm_ffi

    model = CompiledModel.load(builds["b1"])
    x = _photos(model, sample_images[:1])
    calls = []

    def main(batch):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("the model's kernel failed")
        return tvm.runtime.tensor(np.zeros((1, 1000), np.float32))

    metrics = Metrics.create()
    batcher = NativeBatcher("failing", [_Fake(model, tvm_ffi.convert(main))], 1, 0.0, metrics)
    try:
        with pytest.raises(RuntimeError, match="the model's kernel failed"):
            batcher.submit(x).result(60)
        assert "model failing: failed on a batch of 1 requests" in caplog.text and "kernel failed" in caplog.text
        assert metrics.exec_count.value("failing", VERSION) == 0
        assert metrics.queue_us.value("failing", VERSION) > 0
        np.testing.assert_array_equal(batcher.submit(x).result(60), np.zeros((1, 1000), np.float32))
        assert metrics.exec_count.value("failing", VERSION) == 1
    finally:
        batcher.close()


def test_processes_starting_at_once_build_the_engine_once(tmp_path):
    """Three processes load the engine at the same moment into an empty cache: each gets the module, one built
    it (ninja's log holds one compile), the others waited on tvm_ffi's lock and loaded it."""
    code = "from tvmzoo.run.serve import native; assert native.load().engine_create is not None"
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    assert [p.wait(300) for p in procs] == [0, 0, 0], [p.stderr.read() for p in procs]
    (folder,) = (tmp_path / "tvmzoo" / "native").iterdir()
    log = (folder / ".ninja_log").read_text().splitlines()
    assert sum("cpp_0.o" in line for line in log) == 1, log


def test_an_event_loops_burst_is_one_batch_without_a_delay(builds, sample_images):
    """--max-queue-delay-us 0 (the server's default): 8 requests submitted in one pass of the event loop run as
    one batch of a b8 build (the instances are woken once, after the pass), each answered with its own row."""
    model = CompiledModel.load(builds["b8"])
    x = _photos(model, (sample_images * 8)[:8])
    expected = model.run(x)
    metrics = Metrics.create()
    batcher = _batcher(builds["b8"], metrics, instances=2, delay_s=0.0, cores=usable_cores()[:2])

    async def burst() -> list[np.ndarray]:
        return await asyncio.wait_for(asyncio.gather(*(batcher.infer(x[i:i + 1]) for i in range(8))), 60)

    try:
        for round_ in range(3):
            np.testing.assert_array_equal(np.concatenate(asyncio.run(burst())), expected)
            assert metrics.exec_count.value("b8", VERSION) == round_ + 1
    finally:
        batcher.close()


@pytest.mark.skipif(len(usable_cores()) < 2 or shutil.which("taskset") is None,
                    reason="needs 2 cores (one to keep the server on, one to leave) and taskset")
@pytest.mark.parametrize("path", ["--native", "--no-native"])
def test_fixed_threads_keep_to_the_cores_the_server_was_given(serve_repo, sample_images, path):
    """`--threads 2` under `taskset -c <last core>`: TVM would bind each instance's 2-thread pool to cores 0 and 1;
    every thread of the server stays on the core it was given (instances pin their pools to their own of the
    usable cores, as vamp's), and the answer is CompiledModel.run's."""
    core = str(max(usable_cores()))
    server = ServerProcess.start(serve_repo / HOST, path, "--instances", "1", "--threads", "2",
                                 under=("taskset", "-c", core))
    try:
        model = CompiledModel.load(serve_repo / HOST)
        x = _photos(model, sample_images[:1])
        client = httpclient.InferenceServerClient(server.http)
        tensor = httpclient.InferInput("input", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        got = client.infer(HOST, [tensor]).as_numpy("output")
        np.testing.assert_allclose(got, model.run(x), rtol=1e-5, atol=1e-6)
        tasks = Path(f"/proc/{server.proc.pid}/task")
        allowed = {line.split()[1] for task in tasks.iterdir() for line in (task / "status").read_text().splitlines()
                   if line.startswith("Cpus_allowed_list")}
        assert allowed == {core}, allowed
    finally:
        assert server.stop() == 0, server.output()
