"""Tune a model's kernels with MetaSchedule, then compare the tuned build with the default
schedules and ONNX Runtime. Records depend on kernel shapes and precision only (weights are
constants outside the kernels), so a random-weight A0 tunes the real A0 as well.

    TVM_NUM_THREADS=2 .venv/bin/python benchmarks/tune_model.py a0 fp32 --trials 1000 --per-task 128 \
        --work-dir build_in/tuning/repvgg_a0/<target-key>
    (run it again to continue: it resumes from the records in --work-dir)
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

import tvm
from tvm import relax
from tvm.relax.frontend.onnx import from_onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_schedules import TARGET, cos, lite0, timeit  # noqa: E402
from benchmarks.conv_models import repvgg_a0_onnx  # noqa: E402
from tvmzoo.compile.pipeline import run_pipeline  # noqa: E402
from tvmzoo.compile.tuning import tune  # noqa: E402

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402


def main() -> None:
    os.environ.setdefault("TVM_NUM_THREADS", "2")
    ap = argparse.ArgumentParser()
    ap.add_argument("model", choices=["a0", "lite0"])
    ap.add_argument("precision", choices=["fp32", "fp16"])
    ap.add_argument("--trials", type=int, required=True, help="trials in this run (0: only measure)")
    ap.add_argument("--per-task", type=int, default=None)
    ap.add_argument("--work-dir", type=Path, required=True)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    model = repvgg_a0_onnx() if args.model == "a0" else lite0()
    mod = from_onnx(model, shape_dict={"input": [1, 3, 224, 224]}, keep_params_in_input=False)
    if args.trials > 0:
        t = time.perf_counter()
        n = tune(mod, TARGET, args.work_dir, args.trials, args.per_task, precision=args.precision)
        print(f"tuned {args.trials} trials in {time.perf_counter() - t:.0f} s; {n} records in {args.work_dir}")

    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    opts = ort.SessionOptions(); opts.intra_op_num_threads = 2
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    ref = sess.run(None, {"input": x})[0]
    xt = tvm.runtime.tensor(x)
    for label, work_dir in (("default", None), ("tuned", args.work_dir)):
        built, kernels = run_pipeline(mod, TARGET, args.precision, work_dir)
        n_tuned, n_fallback = kernels.tuned, kernels.default
        vm = relax.VirtualMachine(tvm.compile(built, TARGET), tvm.cpu())
        out = vm["main"](xt).numpy()
        print(f"{args.model} {args.precision} {label}: {timeit(lambda: vm['main'](xt)):.1f} ms "
              f"({n_tuned} tuned, {n_fallback} default kernels), cos {cos(out, ref):.7f}", flush=True)
    print(f"ONNX Runtime: {timeit(lambda: sess.run(None, {'input': x})):.1f} ms")


if __name__ == "__main__":
    main()
