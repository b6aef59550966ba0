"""int8 vs fp32 builds (default schedules) of RepVGG-A0 and EfficientNet-Lite0, side by side in one
process, with ONNX Runtime fp32 as the yardstick; int8 outputs checked against ONNX Runtime running
the same QDQ model on real photos.

    TVM_NUM_THREADS=2 .venv/bin/python benchmarks/bench_int8.py [a0|lite0|all] [batch ...]
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import tvm
from tvm import relax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_schedules import lite0  # noqa: E402
from benchmarks.conv_models import repvgg_a0_onnx  # noqa: E402
from tvmzoo.config import Quantize  # noqa: E402
from tvmzoo.compile.quant.quantize import quantize_model, run_ort  # noqa: E402
from tvmzoo.compile.pipeline import get_pipeline  # noqa: E402

TARGET = tvm.target.Target({"kind": "llvm", "mcpu": "sapphirerapids", "num-cores": 2})
PHOTOS = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet-sample"
MEAN, STD = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)


def photos(first: int, count: int, size: int = 224) -> list[np.ndarray]:
    out = []
    for path in sorted(PHOTOS.glob("*.JPEG"))[first:first + count]:
        rgb = cv2.resize(cv2.imread(str(path)), (size, size))[:, :, ::-1].astype(np.float32) / 255
        out.append(((rgb - MEAN) / STD).transpose(2, 0, 1)[None].astype(np.float32))
    return out


def with_batch(model: onnx.ModelProto, batch: int) -> onnx.ModelProto:
    model = onnx.ModelProto.FromString(model.SerializeToString())
    for value in (*model.graph.input, *model.graph.output):
        value.type.tensor_type.shape.dim[0].dim_value = batch
    return model


def build(model: onnx.ModelProto, shape, precision: str):
    from tvm.relax.frontend.onnx import from_onnx

    t0 = time.perf_counter()
    mod = from_onnx(model, shape_dict={"input": list(shape)}, keep_params_in_input=False)
    mod = get_pipeline(TARGET, precision)(mod)
    vm = relax.VirtualMachine(tvm.compile(mod, TARGET), tvm.cpu())
    return vm, time.perf_counter() - t0


def time_all(fns: dict, reps: int) -> dict[str, tuple[float, float]]:
    """(median, min) ms per call, all functions interleaved so they see the same machine load."""
    for fn in fns.values():
        fn(); fn()
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            t = time.perf_counter(); fn(); times[k].append(time.perf_counter() - t)
    return {k: (float(np.median(v) * 1e3), float(np.min(v) * 1e3)) for k, v in times.items()}


def cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def run(name: str, model: onnx.ModelProto, batch: int, n_check: int) -> None:
    calib = photos(0, 16)
    qdq = quantize_model(model, calib, Quantize())
    shape = (batch, 3, 224, 224)
    vms = {}
    for prec, m in (("fp32", model), ("int8", qdq)):
        vms[prec], secs = build(with_batch(m, batch), shape, prec)
        print(f"{name} b{batch} {prec}: built in {secs:.1f} s", flush=True)
    if batch == 1 and n_check:  # int8 build vs ONNX Runtime on the same QDQ model, real photos
        held = photos(250, n_check)
        out = np.concatenate([vms["int8"]["main"](tvm.runtime.tensor(x)).numpy() for x in held])
        ref = run_ort(qdq, held)
        c = cos(out, ref)
        print(f"{name} int8 vs ORT QDQ on {n_check} photos: cos min {c.min():.6f}, "
              f"top-1 agreement {np.mean(out.argmax(1) == ref.argmax(1)):.3f}", flush=True)
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    xt = tvm.runtime.tensor(x)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = int(os.environ["TVM_NUM_THREADS"]), 1
    sess = ort.InferenceSession(with_batch(model, batch).SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])
    res = time_all({"ort fp32": lambda: sess.run(None, {"input": x}),
                    "tvm fp32": lambda: vms["fp32"]["main"](xt),
                    "tvm int8": lambda: vms["int8"]["main"](xt)}, reps=20 if batch == 1 else 6)
    ort_min = res["ort fp32"][1]
    for k, (med, mn) in res.items():
        print(f"{name} b{batch} {k:9s}: median {med / batch:7.2f} / min {mn / batch:7.2f} ms per image   "
              f"min vs ORT fp32 {mn / ort_min:.2f}x", flush=True)


if __name__ == "__main__":
    os.environ.setdefault("TVM_NUM_THREADS", "2")
    which = sys.argv[1] if len(sys.argv) > 1 else "all"
    batches = [int(b) for b in sys.argv[2:]] or [1]
    for name, make in {"a0": repvgg_a0_onnx, "lite0": lite0}.items():
        if which in (name, "all"):
            m = make()
            for b in batches:
                run(name, m, b, n_check=int(os.environ.get("N_CHECK", "50")))
