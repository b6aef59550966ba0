"""tvmzoo fp32 / fp16 / bf16 / int8 against ONNX Runtime fp32 and int8 (QDQ), side by side in one process
(issue 8's speed bars, issue 4's int8-vs-fp32 ratio). Builds go through the library as a user's would:
the shipped build YAMLs + overrides -> compile_model (shipped tuning records applied) -> CompiledModel.

    .venv/bin/python benchmarks/vs_onnxruntime.py [--models lite0 a0] [--batches 1 8]
        [--precisions fp32 fp16 bf16 int8] [--no-amx-too] [--rounds 10] [--quick] [--reuse]

Variants are timed round robin (every round runs each one for ~0.25 s, in alternating order), so
background load hits them all alike. Both runtimes get 2 threads. Writes benchmarks/results/vs_onnxruntime.md
(and .png when matplotlib is importable).
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

THREADS = 2
os.environ["TVM_NUM_THREADS"] = str(THREADS)  # before TVM starts its thread pool; also the target's num-cores

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from machine import cpu_name  # noqa: E402
from tvmzoo.io.checkpoint import save_npz  # noqa: E402
from tvmzoo.compile.compiler import compile_model, ensure_onnx, input_spec, preprocessing_of  # noqa: E402
from tvmzoo.config import PRECISIONS, load_build_config  # noqa: E402
from tvmzoo.compile.quant.calibration import calibration_batches  # noqa: E402
from tvmzoo.io.images import find_images  # noqa: E402
from tvmzoo.models.info import model_info  # noqa: E402
from tvmzoo.preprocess import apply, read_image  # noqa: E402
from tvmzoo.compile.quant.quantize import quantize_model  # noqa: E402
from tvmzoo.run.runtime import CompiledModel, stack_aligned  # noqa: E402

PHOTOS = ROOT.parent / "shared" / "data" / "imagenet-sample"
WORK = ROOT / "workspace" / "bench_vs_ort"
OUT = ROOT / "benchmarks" / "results" / "vs_onnxruntime.md"
YAMLS = {"lite0": "efficientnet_lite0_int8.yaml", "a0": "official_repvgg.yaml"}  # int8 YAMLs: they carry dataset
TITLES = {"lite0": "EfficientNet-Lite0", "a0": "RepVGG-A0 (random weights)"}
ROUND_SECONDS = 0.25


def nominal_peak() -> tuple[float, str]:
    """fp32 FMA peak in GFLOP/s: cores x max GHz x FLOP/cycle (2 FMA units x lanes x 2)."""
    cores = len(os.sched_getaffinity(0))
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout if shutil.which("lscpu") else ""
    cpuinfo = Path("/proc/cpuinfo").read_text()
    mhz, source = [float(line.split(":")[1]) for line in lscpu.splitlines() if line.startswith("CPU max MHz")], \
        "lscpu 'CPU max MHz'"
    if not mhz:  # VMs often expose no max frequency
        mhz = [float(line.split(":")[1]) for line in cpuinfo.splitlines() if line.startswith("cpu MHz")]
        source = "highest 'cpu MHz' in /proc/cpuinfo; lscpu shows no max"
    lanes, isa = (16, "AVX-512") if " avx512f " in cpuinfo else (8, "AVX2")
    ghz = max(mhz) / 1e3
    peak = cores * ghz * 2 * lanes * 2
    return peak, (f"{cores} cores x {ghz:.2f} GHz ({source}) x {2 * lanes * 2} FLOP/cycle ({isa} fp32 FMA: "
                  f"2 FMA units x {lanes} lanes x 2) = {peak:.0f} GFLOP/s, nominal (turbo, AVX-512 clock "
                  f"offsets and shared cores move the real figure)")


def build_cfg(model: str, precision: str, batch: int, calib: int, extra: dict | None = None):
    """The shipped YAML of `model` for this build (`extra`: more overrides, e.g. backend.target)."""
    overrides = {"name": f"{model}_{precision}_b{batch}", "backend.dtype": precision,
                 "frontend.shape": {"input": [batch, 3, 224, 224]},
                 "frontend.checkpoint": str(WORK / "onnx" / f"{model}.onnx"), "workspace.path": str(WORK),
                 "dataset.path": str(PHOTOS), "dataset.sampler.get_data_num": calib,
                 "backend.quantize.calibrate_mode": "percentile", "backend.quantize.quantize_per_channel": True}
    if model == "a0":  # weights don't change speed: a random checkpoint in the official layout
        ckpt = WORK / "repvgg_a0_random.npz"
        if not ckpt.is_file():
            from tvmzoo.models.repvgg import random_state_dict
            save_npz(random_state_dict("A0", "official", np.random.default_rng(0)), ckpt)
        overrides["model.weights"] = str(ckpt)
    return load_build_config(ROOT / "build_in" / "build" / YAMLS[model], {**overrides, **(extra or {})})


def no_amx(model: str, precision: str, batch: int) -> dict:
    """Overrides building for this host's CPU with AMX off (the kernels the CPU would use without it)."""
    from tvmzoo.compile.target import resolve_target

    target = resolve_target(None)
    target["mattr"] = [*target.get("mattr", []), "-amx-int8", "-amx-bf16", "-amx-tile"]
    return {"name": f"{model}_{precision}_noamx_b{batch}", "backend.target": target}


def ort_session(model: onnx.ModelProto) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = THREADS, 1
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def round_robin(runs: dict, rounds: int) -> dict[str, list[float]]:
    """Seconds per call of every variant; each round runs each variant for about ROUND_SECONDS."""
    reps = {}
    for name, fn in runs.items():  # warm-up, and how many calls fill a round
        fn()
        t = time.perf_counter(); fn(); reps[name] = max(1, min(50, round(ROUND_SECONDS / (time.perf_counter() - t))))
    times: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(rounds):
        for name, fn in (list(runs.items()) if r % 2 == 0 else list(runs.items())[::-1]):
            for _ in range(reps[name]):
                t = time.perf_counter(); fn(); times[name].append(time.perf_counter() - t)
    return times


def agreement(out: np.ndarray, ref: np.ndarray) -> str:
    """Lowest per-image cosine of the logits against ORT fp32, and how many top-1 classes match."""
    a, b = out.reshape(len(out), -1).astype(np.float64), ref.reshape(len(ref), -1).astype(np.float64)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    return f"{cos.min():.5f} ({int((a.argmax(1) == b.argmax(1)).sum())}/{len(a)} top-1)"


def bench_model(model: str, args, peak: float) -> list[dict]:
    rows = []
    cfg = build_cfg(model, "fp32", 1, args.calib)
    onnx_path = ensure_onnx(cfg, input_spec(cfg))   # exported once (symbolic batch), shared by every build
    fp32 = onnx.load(str(onnx_path))
    macs = model_info(fp32, size_hw=(224, 224)).macs
    pre = preprocessing_of(cfg)
    photos = sorted(find_images(PHOTOS, ("JPEG",)))[-max(args.batches):]  # not among the calibration images
    images = np.stack([apply(pre, read_image(p)) for p in photos])
    qcfg = build_cfg(model, "int8", 1, args.calib)
    qdq = quantize_model(fp32, calibration_batches(qcfg.dataset, pre), qcfg.backend.quantize,
                         WORK / f"{model}_ort_calib.json")
    sessions = {"ORT fp32": ort_session(fp32), "ORT int8 (QDQ)": ort_session(qdq)}
    for batch in args.batches:
        x = stack_aligned(list(images[:batch]))  # both engines read it in place (tvmzoo: when aligned)
        runs = {name: (lambda s=s: s.run(None, {s.get_inputs()[0].name: x})[0]) for name, s in sessions.items()}
        kernels, build_s = {}, {}
        variants = [(f"tvmzoo {p}", build_cfg(model, p, batch, args.calib)) for p in args.precisions]
        if args.no_amx_too:  # the same builds with AMX off in the target: VNNI int8, bf16 = fp32 (precision.py)
            variants += [(f"tvmzoo {p} (no AMX)", build_cfg(model, p, batch, args.calib, no_amx(model, p, batch)))
                         for p in args.precisions if p in ("int8", "bf16")]
        for name, bcfg in variants:
            directory = bcfg.output_dir
            if not (args.reuse and (directory / "mod.json").is_file()):
                print(f"compiling {bcfg.name} ...", flush=True)
                directory = compile_model(bcfg)
            cm = CompiledModel.load(directory)
            runs[name] = lambda cm=cm: cm.run(x)
            kernels[name] = "{tuned}/{default}".format(**cm.meta["kernels"])
            build_s[name] = f"{cm.meta.get('build_seconds', float('nan')):.0f}"
        ref = runs["ORT fp32"]()
        outs = {name: fn() for name, fn in runs.items()}
        print(f"timing {model} batch {batch}: {', '.join(runs)} ({args.rounds} rounds)", flush=True)
        times = round_robin(runs, args.rounds)
        base = float(np.median(times["ORT fp32"])) / batch
        for name, secs in times.items():
            per_image = np.asarray(secs) / batch
            med = float(np.median(per_image))
            gflops = 2 * macs / med / 1e9
            rows.append({"model": model, "batch": batch, "build": name, "ms": med * 1e3,
                         "p90": float(np.percentile(per_image, 90)) * 1e3, "ratio": med / base, "gflops": gflops,
                         "peak": 100 * gflops / peak, "kernels": kernels.get(name, "-"),
                         "build_s": build_s.get(name, "-"), "calls": len(secs), "agree": agreement(outs[name], ref)})
    return rows


def bars(rows: list[dict]) -> list[str]:
    lines = []
    for model in dict.fromkeys(r["model"] for r in rows):
        for batch in dict.fromkeys(r["batch"] for r in rows if r["model"] == model):
            ms = {r["build"]: r["ms"] for r in rows if r["model"] == model and r["batch"] == batch}
            for num, den, bar, ok in (("tvmzoo fp32", "ORT fp32", "<= 1.0", lambda v: v <= 1.0),
                                      ("tvmzoo int8", "ORT fp32", "<= 0.5", lambda v: v <= 0.5),
                                      ("tvmzoo int8", "tvmzoo fp32", "< 1", lambda v: v < 1.0),
                                      ("tvmzoo int8", "tvmzoo int8 (no AMX)", "<= 1, AMX never slower",
                                       lambda v: v <= 1.0),
                                      ("tvmzoo bf16", "tvmzoo bf16 (no AMX)", "<= 1, AMX never slower",
                                       lambda v: v <= 1.0),
                                      ("tvmzoo bf16", "tvmzoo fp32", "<= 1.0, issue 15", lambda v: v <= 1.0),
                                      ("tvmzoo bf16", "tvmzoo fp32", "<= 0.6 with AVX512-BF16, issue 15",
                                       lambda v: v <= 0.6)):
                if num in ms and den in ms:
                    v = ms[num] / ms[den]
                    lines.append(f"- {TITLES[model]}, batch {batch}: {num} / {den} = {v:.2f} "
                                 f"(bar {bar}: {'met' if ok(v) else 'NOT met'})")
    return lines


def markdown(rows: list[dict], peak_how: str, args, load: tuple, seconds: float) -> str:
    head = ["model", "batch", "build", "median ms/image", "p90 ms/image", "vs ORT fp32", "GFLOP/s",
            "% of fp32 peak", "kernels tuned/default", "build s", "cos vs ORT fp32 (top-1 agree)"]
    lines = [f"# tvmzoo vs ONNX Runtime {ort.__version__} (CPU, {THREADS} threads each)", "",
             f"Measured {time.strftime('%Y-%m-%d %H:%M')} by `benchmarks/vs_onnxruntime.py "
             f"{' '.join(sys.argv[1:])}` in {seconds / 60:.1f} min; load average {load[0]:.2f} at start, "
             f"{load[1]:.2f} at end. {args.rounds} interleaved rounds of ~{ROUND_SECONDS} s per variant; "
             "ms/image = time per call / batch, on real photos.", "",
             f"CPU: {cpu_name()}. Peak: {peak_how}. GFLOP/s = 2 x multiply-adds / time (tvmzoo.models.info); fp16, "
             "bf16 and int8 rows are shown against the same fp32 peak.", "",
             "int8: per-channel weights, percentile (99.99) activation ranges on "
             f"{args.calib} photos of imagenet-sample; ORT runs the QDQ model (fused to QLinearConv), tvmzoo the "
             "same QDQ model lowered to integer kernels. RepVGG-A0 has random weights (speed does not depend on "
             "them): its logits are nearly tied, so its top-1 agreement means little; the cosine does.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append(f"| {TITLES[r['model']]} | {r['batch']} | {r['build']} | {r['ms']:.2f} | {r['p90']:.2f} | "
                     f"{r['ratio']:.2f}x | {r['gflops']:.0f} | {r['peak']:.1f} % | {r['kernels']} | "
                     f"{r['build_s']} | {r['agree']} |")
    return "\n".join([*lines, "", "## Issue 8 / 4 / 15 bars", "", *bars(rows), ""])


def chart(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no chart")
        return
    labels = [f"{r['model']} b{r['batch']} {r['build']}" for r in rows]
    fig, ax = plt.subplots(figsize=(8, 0.3 * len(rows) + 1))
    ax.barh(labels[::-1], [r["ms"] for r in rows][::-1])
    ax.set_xscale("log")
    ax.set_xlabel("median ms / image (log scale, lower is better)")
    save_figure(fig, path)


def save_figure(fig, path: Path) -> None:
    """A PNG written whole or not at all."""
    from tvmzoo.io.atomic import atomic_path

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", choices=list(YAMLS), default=list(YAMLS))
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS))
    ap.add_argument("--no-amx-too", action="store_true",
                    help="also time the int8 / bf16 builds with AMX off in the target (VNNI int8; bf16 as the probe chooses there, fp32 on this CPU: benchmarks/bf16_dot_vs_fp32.py times the vdpbf16ps kernels)")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--calib", type=int, default=16, help="calibration photos for int8")
    ap.add_argument("--quick", action="store_true", help="3 rounds: proves the run, numbers are rough")
    ap.add_argument("--reuse", action="store_true", help="keep builds already in workspace/bench_vs_ort")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.quick:
        args.rounds = min(args.rounds, 3)
    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    peak, peak_how = nominal_peak()
    print(f"peak: {peak_how}", flush=True)
    rows = [row for model in args.models for row in bench_model(model, args, peak)]
    from tvmzoo.io.atomic import write_text

    text = markdown(rows, peak_how, args, (load0, os.getloadavg()[0]), time.perf_counter() - t0)
    write_text(OUT, text)
    print(text)
    print(f"wrote {OUT}")
    chart(rows, OUT.with_suffix(".png"))


if __name__ == "__main__":
    main()
