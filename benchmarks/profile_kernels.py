"""Where the time goes: per-kernel times of a tvmzoo build (relax VM profiler, min over rounds),
optionally beside OpenVINO's per-layer counters on the same ONNX.

    TVM_NUM_THREADS=2 .venv/bin/python benchmarks/profile_kernels.py ONNX --batch 8 [--records DIR]
        [--rounds 5] [--top 25] [--openvino] [--precision int8|bf16]

int8: ONNX is a QDQ model (benchmarks/vs_peers.py saves ONNX Runtime's as workspace/bench_vs_ort/onnx/
MODEL_qdq.onnx); OpenVINO runs it at its default precision (its int8 layers). bf16: the fp32 ONNX, OpenVINO
at its bf16 hint.

Each kernel's time is the minimum over `rounds` profiled runs (robust while others use the CPU).
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import sys
import time
from pathlib import Path

os.environ.setdefault("TVM_NUM_THREADS", "2")

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import tvm  # noqa: E402
from tvm import relax  # noqa: E402
from tvm.relax.frontend.onnx import from_onnx  # noqa: E402

from tvmzoo.compile.pipeline import run_pipeline  # noqa: E402
from tvmzoo.compile.target import resolve_target  # noqa: E402
from tvmzoo.run.host import request_amx  # noqa: E402



def _signature(func) -> str:
    """The shapes of a PrimFunc's buffers, from its header."""
    header = func.script().split("):\n", 1)[0]
    header = re.sub(r"T\.int64\((\d+)\)", r"\1", header)
    return " ".join(m.replace(", ", "x") for m in re.findall(r"T\.Buffer\(\(([^)]*)\)", header))


def profiled(vm: relax.VirtualMachine, x) -> list[tuple[str, float]]:
    """One run of vm["main"](x): (called symbol, ms) of every Call instruction, in order."""
    calls: list[tuple[str, float]] = []
    started = [0.0]

    def instrument(_func, symbol, before, _ret, *_args):  # the VM calls it around every Call instruction
        if before:
            started[0] = time.perf_counter()
        else:
            calls.append((str(symbol), (time.perf_counter() - started[0]) * 1e3))
        return 0

    vm.set_instrument(tvm.runtime.convert(instrument))
    vm["main"](x)
    vm.set_instrument(None)
    return calls


def kernel_times(onnx_path: Path, batch: int, records: Path | None, rounds: int,
                 precision: str = "fp32") -> dict[str, tuple[float, int]]:
    """kernel name -> (min over rounds of its summed ms per run, calls per run)."""
    model = onnx.load(str(onnx_path))
    name = model.graph.input[0].name
    mod = from_onnx(model, shape_dict={name: [batch, 3, 224, 224]}, keep_params_in_input=False)
    target = tvm.target.Target(resolve_target(None))  # the host, as `vamc compile` builds for it
    mod, _ = run_pipeline(mod, target, precision, records)
    shapes = {gv.name_hint: _signature(f) for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}
    vm = relax.VirtualMachine(tvm.compile(mod, target), tvm.cpu())
    x = tvm.runtime.tensor(np.random.default_rng(0).standard_normal((batch, 3, 224, 224)).astype("float32"))
    vm["main"](x)
    calls: list[tuple[str, float]] = []
    fastest: list[float] = []
    for _ in range(rounds):  # the minimum of every call over the rounds: robust to other users' load
        calls = profiled(vm, x)
        fastest = [min(ms, fastest[i]) for i, (_, ms) in enumerate(calls)] if fastest else [ms for _, ms in calls]
    best: dict[str, tuple[float, int]] = {}
    for (k, _), ms in zip(calls, fastest):
        best[k] = (best.get(k, (0.0, 0))[0] + ms, best.get(k, (0.0, 0))[1] + 1)
    return {f"{k} [{shapes.get(k, '')}]": v for k, v in best.items() if not k.startswith("vm.builtin")}


def openvino_layers(onnx_path: Path, batch: int, rounds: int, precision: str = "fp32") -> list[tuple[str, str, float]]:
    """(layer, type + exec type, min ms) from OpenVINO's per-layer counters (benchmark_app -pc)."""
    import openvino as ov
    core = ov.Core()
    model = core.read_model(str(onnx_path))
    model.reshape({model.inputs[0].get_any_name(): [batch, 3, 224, 224]})
    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": 2, "PERF_COUNT": True}
    hint = {"fp32": "f32", "bf16": "bf16"}.get(precision)  # int8: OpenVINO's default (its int8 layers)
    if hint:
        config["INFERENCE_PRECISION_HINT"] = hint
    compiled = core.compile_model(model, "CPU", config)
    req = compiled.create_infer_request()
    x = np.random.default_rng(0).standard_normal((batch, 3, 224, 224)).astype("float32")
    best: dict[str, tuple[str, float]] = {}
    req.infer({0: x})
    for _ in range(rounds):
        req.infer({0: x})
        for p in req.profiling_info:
            ms = p.real_time.total_seconds() * 1e3
            if p.status.name == "EXECUTED":
                best[p.node_name] = (f"{p.node_type}/{p.exec_type}", min(ms, best.get(p.node_name, ("", 1e30))[1]))
    return sorted(((k, t, ms) for k, (t, ms) in best.items()), key=lambda r: -r[2])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("onnx", type=Path)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--records", type=Path, default=None)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--openvino", action="store_true")
    ap.add_argument("--precision", choices=["fp32", "int8", "bf16"], default="fp32")
    args = ap.parse_args()
    request_amx()
    times = kernel_times(args.onnx, args.batch, args.records, args.rounds, args.precision)
    total = sum(ms for ms, _ in times.values())
    print(f"tvmzoo: {total:.2f} ms per run (sum of per-kernel minima), {len(times)} kernels")
    for k, (ms, n) in sorted(times.items(), key=lambda kv: -kv[1][0])[:args.top]:
        print(f"  {ms:8.3f} ms {100 * ms / total:5.1f} %  x{n:<3d} {k}")
    if args.openvino:
        layers = openvino_layers(args.onnx, args.batch, args.rounds, args.precision)
        ov_total = sum(ms for _, _, ms in layers)
        print(f"OpenVINO {args.precision}: {ov_total:.2f} ms per run (sum of per-layer minima)")
        for name, kind, ms in layers[:args.top]:
            print(f"  {ms:8.3f} ms {100 * ms / ov_total:5.1f} %  {kind:40s} {name}")


if __name__ == "__main__":
    sys.exit(main())
