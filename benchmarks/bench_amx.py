"""AMX vs no-AMX kernels, kernel by kernel: the int8 (or bf16) build of RepVGG-A0 / EfficientNet-Lite0
(random weights: speed does not depend on them) lowered for this host's target with and without AMX,
each conv / matmul kernel compiled alone and timed with TVM's time_evaluator, the two variants
interleaved, min over rounds (robust to a shared machine). Whole-model speed: benchmarks/vs_onnxruntime.py
--no-amx-too.

    TVM_NUM_THREADS=2 .venv/bin/python benchmarks/bench_amx.py [--models a0 lite0] [--batch 1]
        [--precision int8|bf16] [--rounds 5]
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("TVM_NUM_THREADS", "2")

import numpy as np  # noqa: E402
import tvm  # noqa: E402
from tvm import tirx  # noqa: E402
from tvm.relax.frontend.onnx import from_onnx  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.conv_models import efficientnet_lite0_onnx, repvgg_a0_onnx  # noqa: E402
from tvmzoo.compile.pipeline import get_pipeline  # noqa: E402
from tvmzoo.compile.quant.quantize import quantize_model  # noqa: E402
from tvmzoo.compile.target import resolve_target  # noqa: E402
from tvmzoo.config import Quantize  # noqa: E402
from tvmzoo.run.host import request_amx  # noqa: E402

MODELS = {"a0": repvgg_a0_onnx, "lite0": efficientnet_lite0_onnx}
NO_AMX = ["-amx-int8", "-amx-bf16", "-amx-tile"]
DOTS = ("tdpbusd", "tdpbf16ps", "vpdpbusd", "dpbf16ps")


def targets() -> dict[str, tvm.target.Target]:
    amx = resolve_target(None)
    off = {**amx, "mattr": [*amx.get("mattr", []), *NO_AMX]}
    return {"AMX": tvm.target.Target(amx), "no AMX": tvm.target.Target(off)}


def lowered(model: str, batch: int, precision: str, target: tvm.target.Target) -> tvm.IRModule:
    onnx_model = MODELS[model](batch=batch)
    if precision == "int8":
        rng = np.random.default_rng(0)
        calib = [rng.standard_normal((batch, 3, 224, 224)).astype(np.float32) for _ in range(2)]
        onnx_model = quantize_model(onnx_model, calib, Quantize(keep_first_last_float=False))
    mod = from_onnx(onnx_model, shape_dict={"input": [batch, 3, 224, 224]}, keep_params_in_input=False)
    return get_pipeline(target, precision)(mod)


def dot_kernels(mod: tvm.IRModule) -> dict[str, tirx.PrimFunc]:
    return {gv.name_hint: f for gv, f in mod.functions_items()
            if isinstance(f, tirx.PrimFunc) and any(d in f.script() for d in DOTS)}


def random_args(func: tirx.PrimFunc) -> list:
    rng = np.random.default_rng(1)
    args = []
    for param in func.params:  # TVM 0.27: a buffer parameter is a Var of BufferType
        shape, dtype = [int(d) for d in param.shape], str(param.dtype)
        if "int" in dtype:
            value = rng.integers(0, 8, shape).astype(dtype)
        elif dtype == "bfloat16":
            value = rng.standard_normal(shape).astype(np.float32).astype("bfloat16")
        else:
            value = rng.standard_normal(shape).astype(dtype)
        args.append(tvm.runtime.tensor(value))
    return args


def timer(func: tirx.PrimFunc, target: tvm.target.Target):
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target)
    args = random_args(func)
    evaluator = lib.mod.time_evaluator("main", tvm.cpu(), number=5, repeat=1)
    return lambda: evaluator(*args).mean


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--precision", choices=("int8", "bf16"), default="int8")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    assert request_amx(), "the kernel refused AMX state (or this CPU has no AMX)"
    print(f"load average {os.getloadavg()[0]:.2f}; {args.precision}, batch {args.batch}, min of {args.rounds} "
          "interleaved rounds of 5 calls")
    for model in args.models:
        mods = {name: lowered(model, args.batch, args.precision, t) for name, t in targets().items()}
        kernels = {name: dot_kernels(mod) for name, mod in mods.items()}
        total = {name: 0.0 for name in mods}
        print(f"\n| {model} kernel | dot (AMX build) | AMX ms | no-AMX ms | AMX / no-AMX |\n|---|---|---|---|---|")
        for kernel, func in kernels["AMX"].items():
            if kernel not in kernels["no AMX"]:
                continue
            fns = {name: timer(kernels[name][kernel], t) for name, t in targets().items()}
            secs: dict[str, list[float]] = {name: [] for name in fns}
            for r in range(args.rounds):  # interleaved, alternating order: both see the same load
                for name, fn in (list(fns.items()) if r % 2 == 0 else list(fns.items())[::-1]):
                    secs[name].append(fn())
            best = {name: min(s) for name, s in secs.items()}
            for name in total:
                total[name] += best[name]
            dot = next(d for d in DOTS if d in func.script())
            print(f"| {kernel} | {dot} | {best['AMX'] * 1e3:.3f} | {best['no AMX'] * 1e3:.3f} | "
                  f"{best['AMX'] / best['no AMX']:.2f} |", flush=True)
        print(f"| sum | | {total['AMX'] * 1e3:.2f} | {total['no AMX'] * 1e3:.2f} | "
              f"{total['AMX'] / total['no AMX']:.2f} |")
    print(f"load average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
