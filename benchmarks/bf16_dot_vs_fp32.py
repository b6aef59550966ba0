"""bf16 on vdpbf16ps (AVX512-BF16 without AMX) against fp32, on this host, whole models: the ground truth for
the compile-time probe (tvmzoo.compile.bf16_probe) that decides a bf16 build on Zen 4 / Cooper Lake. Both
builds of RepVGG-A0 / EfficientNet-Lite0 (random weights) are lowered for this host's target with AMX off,
through the pipeline directly (bypassing the plan), without tuning records; whole model and kernel by
kernel (conv / matmul kernels paired by call order), interleaved in one process, min (and median) over
rounds; the probe's own ratio is taken before each model, in the same process.

    TVM_NUM_THREADS=2 .venv/bin/python benchmarks/bf16_dot_vs_fp32.py [--models a0 lite0] [--batch 1]
        [--rounds 15]

A bf16 build computes in bf16 where the probe's ratio is at most precision.BF16_MAX_RATIO; this shows
whether that threshold keeps the whole models at or under fp32.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TVM_NUM_THREADS", "2")

import numpy as np  # noqa: E402
import tvm  # noqa: E402
from tvm import relax  # noqa: E402
from tvm.relax.frontend.onnx import from_onnx  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_amx import MODELS, NO_AMX  # noqa: E402
from benchmarks.profile_kernels import _signature, profiled  # noqa: E402
from benchmarks.machine import cpu_name  # noqa: E402
from tvmzoo.compile import bf16_probe  # noqa: E402
from tvmzoo.compile.pipeline import run_pipeline  # noqa: E402
from tvmzoo.compile.target import resolve_target  # noqa: E402

PRECISIONS = ("fp32", "bf16")


def build(model: str, batch: int, precision: str, target: tvm.target.Target):
    """(VM, kernel name -> buffer shapes) of `precision`'s build, untuned."""
    mod = from_onnx(MODELS[model](batch=batch), shape_dict={"input": [batch, 3, 224, 224]}, keep_params_in_input=False)
    mod, _ = run_pipeline(mod, target, precision, None)
    shapes = {gv.name_hint: _signature(f) for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}
    return relax.VirtualMachine(tvm.compile(mod, target), tvm.cpu()), shapes


def interleaved(vms: dict, x, rounds: int) -> tuple[dict[str, list[float]], dict[str, list]]:
    """Whole-model ms per round, and per-call minima (symbol, ms), both builds alternating order."""
    whole: dict[str, list[float]] = {p: [] for p in vms}
    calls: dict[str, list] = {p: [] for p in vms}
    for r in range(2 * rounds):
        for p in (PRECISIONS if r % 2 == 0 else PRECISIONS[::-1]):
            if r < rounds:
                t = time.perf_counter()
                vms[p]["main"](x)
                whole[p].append((time.perf_counter() - t) * 1e3)
                continue
            cur = profiled(vms[p], x)
            calls[p] = cur if not calls[p] else [(k, min(a, b)) for (k, a), (_, b) in zip(calls[p], cur)]
    return whole, calls


def report(model: str, batch: int, whole: dict, calls: dict, shapes: dict) -> None:
    for p in PRECISIONS:
        print(f"{model} b{batch} whole {p}: min {min(whole[p]):.2f} ms, median {statistics.median(whole[p]):.2f} ms")
    med = {p: statistics.median(whole[p]) for p in PRECISIONS}
    print(f"bf16 / fp32: min {min(whole['bf16']) / min(whole['fp32']):.2f}, median {med['bf16'] / med['fp32']:.2f}")
    total = {p: sum(ms for k, ms in calls[p] if not k.startswith("vm.builtin")) for p in PRECISIONS}
    print(f"sum of per-kernel minima: fp32 {total['fp32']:.2f} ms, bf16 {total['bf16']:.2f} ms, "
          f"ratio {total['bf16'] / total['fp32']:.2f}")
    convs = {p: [(k, ms) for k, ms in calls[p] if "conv" in k or "matmul" in k] for p in PRECISIONS}
    if len(convs["fp32"]) != len(convs["bf16"]):
        return print("conv / matmul kernels differ in number: not paired")
    print("| fp32 ms | bf16 ms | bf16 / fp32 | bf16 kernel [buffers] |\n|---|---|---|---|")
    for (_, a), (k, b) in zip(convs["fp32"], convs["bf16"]):
        print(f"| {a:.3f} | {b:.3f} | {b / a:.2f} | {k} [{shapes.get(k, '')}] |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()
    spec = resolve_target(None)
    no_amx = {**spec, "mattr": [*spec.get("mattr", []), *NO_AMX]}
    target = tvm.target.Target(no_amx)
    print(f"CPU {cpu_name()}; target {spec.get('mcpu')} without AMX; load average {os.getloadavg()[0]:.2f}")
    x = tvm.runtime.tensor(np.random.default_rng(0).standard_normal((args.batch, 3, 224, 224)).astype("float32"))
    probe = bf16_probe.builds(no_amx)
    for model in args.models:
        built = {p: build(model, args.batch, p, target) for p in PRECISIONS}
        vms = {p: vm for p, (vm, _) in built.items()}
        for vm in vms.values():
            vm["main"](x)
        print(f"probe before {model}: bf16 / fp32 {bf16_probe.time_builds(probe).ratio:.2f}")
        whole, calls = interleaved(vms, x, args.rounds)
        report(model, args.batch, whole, calls, built["bf16"][1])
    print(f"load average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
