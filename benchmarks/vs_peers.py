"""tvmzoo fp32 / fp16 / bf16 / int8 against ONNX Runtime fp32 / int8 and OpenVINO fp32 / bf16 / int8, batch 1
and 8 (latency: one request at a time) and throughput mode (images/s: `vamp -i N -t T` against OpenVINO's
THROUGHPUT hint on the same cores), all interleaved in one process (issue 15's bars).

    pip install -e '.[bench]'     # OpenVINO and matplotlib: benchmark-only extras
    .venv/bin/python benchmarks/vs_peers.py [--models lite0 a0] [--batches 1 8]
        [--precisions fp32 fp16 bf16 int8] [--rounds 10] [--quick] [--reuse] [--target znver4]

Builds go through the library as a user's would (benchmarks/vs_onnxruntime.py's YAMLs and overrides);
OpenVINO reads the same deploy ONNX, and for int8 ONNX Runtime's QDQ model (the same calibration).
`--target` builds tvmzoo for another CPU this one can run (e.g. znver4: no AVX512-FP16, no AMX) to see
that CPU's precision choices. Writes benchmarks/results/vs_peers.md and .png.
"""
from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

THREADS = 2
os.environ["TVM_NUM_THREADS"] = str(THREADS)

import numpy as np  # noqa: E402
import onnx  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vs_onnxruntime import (PHOTOS, ROOT, TITLES, WORK, agreement, build_cfg, ort_session,  # noqa: E402
                            round_robin, save_figure)

from tvmzoo.compile.cpu import KERNEL_ISA, host_cpu, host_flags  # noqa: E402
from tvmzoo.errors import TvmzooError  # noqa: E402
from tvmzoo.run.runtime import stack_aligned  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "vs_peers.md"
THROUGHPUT_SECONDS = 2.0


def cpu_description(target: str | None) -> tuple[str, str]:
    """(the table's paragraph, the chart's title): the CPU's model name, LLVM target and ISA features."""
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name")), "?")
    isa = ", ".join(sorted((host_flags() or frozenset()) & KERNEL_ISA))
    choice = host_cpu()
    mcpu = target or choice.name
    long = (f"CPU: {model} ({len(os.sched_getaffinity(0))} cores; LLVM target {choice.name}: {choice.reason}); "
            f"ISA features used: {isa}. tvmzoo built for -mcpu={mcpu}{' (backend.target)' if target else ''}.")
    short = (f"{model}, {len(os.sched_getaffinity(0))} cores; tvmzoo -mcpu={mcpu}\n"
             f"ISA: {isa}")
    return long, short


# ---------------------------------------------------------------- engines


def openvino_model(core, path: Path, batch: int):
    model = core.read_model(str(path))
    model.reshape({model.inputs[0].get_any_name(): [batch, 3, 224, 224]})
    return model


def openvino_compiled(core, path: Path, batch: int, precision: str | None, hint: str = "LATENCY"):
    """OpenVINO on THREADS threads; precision f32 / bf16, or None: its default (int8 runs its QDQ layers in
    int8 and the rest at the CPU's default float precision)."""
    config = {"PERFORMANCE_HINT": hint, "INFERENCE_NUM_THREADS": THREADS}
    if precision:
        config["INFERENCE_PRECISION_HINT"] = precision
    return core.compile_model(openvino_model(core, path, batch), "CPU", config)


def openvino_call(compiled, x: np.ndarray):
    request = compiled.create_infer_request()

    def run():
        request.infer({0: x})
        return request.get_output_tensor(0).data.copy()
    return run


def openvino_images_per_second(compiled, x: np.ndarray) -> float:
    from openvino import AsyncInferQueue

    queue = AsyncInferQueue(compiled, compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
    t0, done = time.perf_counter(), 0
    while time.perf_counter() - t0 < THROUGHPUT_SECONDS:
        for _ in range(len(queue)):
            queue.start_async({0: x})
        queue.wait_all()
        done += len(queue) * len(x)
    return done / (time.perf_counter() - t0)


def tvmzoo_images_per_second(directory: Path, instances: int, threads: int, seconds_per_image: float) -> float:
    from tvmzoo.run.bench import BenchConfig, benchmark

    iterations = max(5, round(THROUGHPUT_SECONDS / max(seconds_per_image, 1e-4) / instances * threads))
    report = benchmark(directory / "mod", BenchConfig(instances, 1, iterations, 2, (3, 224, 224), threads))
    os.environ["TVM_NUM_THREADS"] = str(THREADS)  # benchmark set it for its instances
    return report.images_per_second


def tvmzoo_builds(model: str, batch: int, args) -> dict[str, tuple[Path | None, str]]:
    """{"tvmzoo <precision>": (model directory or None, note)}: a precision this tvmzoo does not accept,
    or that fails to compile, is a row saying so."""
    from tvmzoo.compile.compiler import compile_model
    from tvmzoo.config import PRECISIONS

    builds = {}
    extra = {"backend.target": {"kind": "llvm", "mcpu": args.target}} if args.target else {}
    for precision in args.precisions:
        name = f"tvmzoo {precision}"
        if precision not in PRECISIONS:
            builds[name] = (None, f"not available: this tvmzoo does not accept backend.dtype {precision}")
            continue
        suffix = f"_{args.target}" if args.target else ""
        cfg = build_cfg(model, precision, batch, args.calib, {**extra, "name": f"{model}_{precision}_b{batch}{suffix}"})
        try:
            directory = cfg.output_dir
            if not (args.reuse and (directory / "mod.json").is_file()):
                print(f"compiling {cfg.name} ...", flush=True)
                directory = compile_model(cfg)
            builds[name] = (directory, "")
        except TvmzooError as exc:
            builds[name] = (None, f"not available: {exc}")
    return builds


# ---------------------------------------------------------------- measuring


def peer_models(model: str, args) -> tuple[Path, Path, np.ndarray, object]:
    """The deploy ONNX, ONNX Runtime's QDQ int8 model of it (saved for OpenVINO), real photos (not among the
    calibration images) and the preprocessing."""
    from tvmzoo.compile.compiler import ensure_onnx, input_spec, preprocessing_of
    from tvmzoo.compile.quant.calibration import calibration_batches
    from tvmzoo.io.images import find_images
    from tvmzoo.preprocess import apply, read_image
    from tvmzoo.compile.quant.quantize import quantize_model

    cfg = build_cfg(model, "int8", 1, args.calib)
    fp32_path = ensure_onnx(cfg, input_spec(cfg))
    pre = preprocessing_of(cfg)
    qdq = quantize_model(onnx.load(str(fp32_path)), calibration_batches(cfg.dataset, pre), cfg.backend.quantize,
                         WORK / f"{model}_ort_calib.json")
    qdq_path = WORK / "onnx" / f"{model}_qdq.onnx"
    onnx.save(qdq, str(qdq_path))
    photos = sorted(find_images(PHOTOS, ("JPEG",)))[-max(args.batches):]
    return fp32_path, qdq_path, np.stack([apply(pre, read_image(p)) for p in photos]), pre


def latency_runs(core, paths: tuple[Path, Path], builds: dict, batch: int, x: np.ndarray) -> dict:
    from tvmzoo.run.runtime import CompiledModel

    fp32, qdq = paths
    sessions = {"ORT fp32": ort_session(onnx.load(str(fp32))), "ORT int8 (QDQ)": ort_session(onnx.load(str(qdq)))}
    runs = {name: (lambda s=s: s.run(None, {s.get_inputs()[0].name: x})[0]) for name, s in sessions.items()}
    for name, (path, precision) in {"OpenVINO fp32": (fp32, "f32"), "OpenVINO bf16": (fp32, "bf16"),
                                    "OpenVINO int8 (QDQ)": (qdq, None)}.items():
        runs[name] = openvino_call(openvino_compiled(core, path, batch, precision), x)
    for name, (directory, _) in builds.items():
        if directory is not None:
            runs[name] = (lambda cm=CompiledModel.load(directory): cm.run(x))
    return runs


def latency_rows(model: str, batch: int, runs: dict, builds: dict, rounds: int) -> list[dict]:
    ref = runs["ORT fp32"]()
    agree = {name: agreement(fn(), ref) for name, fn in runs.items()}
    print(f"timing {model} batch {batch}: {', '.join(runs)} ({rounds} rounds)", flush=True)
    times = round_robin(runs, rounds)
    base = float(np.median(times["ORT fp32"]))
    rows = []
    for name, secs in times.items():
        med = float(np.median(secs))
        rows.append({"model": model, "batch": batch, "mode": "latency", "build": name, "value": med / batch * 1e3,
                     "p90": float(np.percentile(secs, 90)) / batch * 1e3, "ratio": med / base,
                     "agree": agree[name], "note": _note(builds.get(name))})
    rows += [{"model": model, "batch": batch, "mode": "latency", "build": name, "value": None, "note": note}
             for name, (directory, note) in builds.items() if directory is None]
    return rows


def _note(build: tuple | None) -> str:
    """What a tvmzoo build computes in when that differs from its name (fp16 on a CPU without AVX512-FP16)."""
    if build is None or build[0] is None:
        return ""
    import json

    compute = json.loads((build[0] / "mod.json").read_text()).get("compute", {})
    return compute.get("note", "")


def throughput_rows(model: str, core, paths: tuple[Path, Path], builds: dict, x: np.ndarray, args,
                    latency: dict[str, float]) -> list[dict]:
    """images/s: tvmzoo `vamp -i I -t T` (batch 1 per instance) and OpenVINO THROUGHPUT (its own streams,
    THREADS threads), interleaved rounds, median."""
    one = x[:1].copy()
    fp32, qdq = paths
    variants = {}
    for name, (path, precision) in {"OpenVINO fp32": (fp32, "f32"), "OpenVINO bf16": (fp32, "bf16"),
                                    "OpenVINO int8 (QDQ)": (qdq, None)}.items():
        compiled = openvino_compiled(core, path, 1, precision, "THROUGHPUT")
        variants[f"{name} THROUGHPUT"] = (lambda c=compiled: openvino_images_per_second(c, one))
    inst, threads = args.instances, max(1, THREADS // args.instances)
    for name, (directory, _) in builds.items():
        if directory is not None:
            seconds = latency.get(name, 10.0) / 1e3
            variants[f"{name} vamp -i {inst} -t {threads}"] = (
                lambda d=directory, s=seconds: tvmzoo_images_per_second(d, inst, threads, s))
    print(f"throughput {model}: {', '.join(variants)} ({args.rounds // 2 or 1} rounds)", flush=True)
    results: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(max(1, args.rounds // 2)):
        for name, fn in (list(variants.items()) if r % 2 == 0 else list(variants.items())[::-1]):
            results[name].append(fn())
    return [{"model": model, "batch": 1, "mode": "throughput", "build": name, "value": float(np.median(v)),
             "note": ""} for name, v in results.items()]


# ---------------------------------------------------------------- report


def _best(rows: list[dict], prefix: str, lower: bool = True) -> tuple[str, float] | None:
    found = [(r["build"], r["value"]) for r in rows if r["build"].startswith(prefix) and r["value"] is not None]
    return (min if lower else max)(found, key=lambda b: b[1]) if found else None


def bars(rows: list[dict]) -> list[str]:
    """Issue 15's bars, as far as one run can tell (accuracy is `tvmzoo eval`'s; here: agreement with ORT)."""
    lines = []
    for model in dict.fromkeys(r["model"] for r in rows):
        for batch in (1, 8):
            group = [r for r in rows if r["model"] == model and r["batch"] == batch and r["mode"] == "latency"]
            ms = {r["build"]: r["value"] for r in group if r["value"] is not None}
            checks = [("tvmzoo fp32", "ORT fp32"), ("tvmzoo fp32", "OpenVINO fp32"), ("tvmzoo fp16", "tvmzoo fp32"),
                      ("tvmzoo bf16", "tvmzoo fp32")]
            best_t, best_o = _best(group, "tvmzoo"), _best(group, "OpenVINO")
            if best_t and best_o:
                lines.append(f"- {TITLES[model]}, batch {batch}: fastest tvmzoo ({best_t[0]}, {best_t[1]:.2f} ms) / "
                             f"fastest OpenVINO ({best_o[0]}, {best_o[1]:.2f} ms) = {best_t[1] / best_o[1]:.2f} "
                             f"(bar <= 1: {'met' if best_t[1] <= best_o[1] else 'NOT met'})")
            lines += [f"- {TITLES[model]}, batch {batch}: {a} / {b} = {ms[a] / ms[b]:.2f} "
                      f"(bar <= 1: {'met' if ms[a] <= ms[b] else 'NOT met'})" for a, b in checks if a in ms and b in ms]
        tp = [r for r in rows if r["model"] == model and r["mode"] == "throughput"]
        best_t, best_o = _best(tp, "tvmzoo", lower=False), _best(tp, "OpenVINO", lower=False)
        if best_t and best_o:
            lines.append(f"- {TITLES[model]}, throughput: best tvmzoo ({best_t[0]}, {best_t[1]:.0f} images/s) / best "
                         f"OpenVINO ({best_o[0]}, {best_o[1]:.0f}) = {best_t[1] / best_o[1]:.2f} "
                         f"(bar >= 1: {'met' if best_t[1] >= best_o[1] else 'NOT met'})")
    return lines


def markdown(rows: list[dict], header: str, args, load: tuple, seconds: float) -> str:
    import onnxruntime as ort
    import openvino

    lines = [f"# tvmzoo vs ONNX Runtime {ort.__version__} and OpenVINO {openvino.__version__.split('-')[0]}", "",
             header, "",
             f"Measured {time.strftime('%Y-%m-%d %H:%M')} by `benchmarks/vs_peers.py {' '.join(sys.argv[1:])}` in "
             f"{seconds / 60:.1f} min; load average {load[0]:.2f} at start, {load[1]:.2f} at end: absolute numbers "
             f"move with the other users' load, ratios are side by side ({args.rounds} interleaved rounds). "
             f"{THREADS} threads per engine. Agreement: lowest cosine of the logits vs ONNX Runtime fp32 on real "
             "photos (top-1 matches). int8: ONNX Runtime's QDQ model (per-channel, percentile, "
             f"{args.calib} calibration photos); OpenVINO runs that same file.", "",
             "## Latency (one request at a time)", "",
             "| model | batch | build | median ms/image | p90 ms/image | vs ORT fp32 | agreement | note |",
             "|---|---|---|---|---|---|---|---|"]
    for r in (r for r in rows if r["mode"] == "latency"):
        if r["value"] is None:
            lines.append(f"| {TITLES[r['model']]} | {r['batch']} | {r['build']} | - | - | - | - | {r['note']} |")
            continue
        lines.append(f"| {TITLES[r['model']]} | {r['batch']} | {r['build']} | {r['value']:.2f} | {r['p90']:.2f} | "
                     f"{r['ratio']:.2f}x | {r['agree']} | {r['note']} |")
    lines += ["", "## Throughput mode (batch 1 per request, the same cores)", "",
              "| model | build | images/s |", "|---|---|---|"]
    lines += [f"| {TITLES[r['model']]} | {r['build']} | {r['value']:.1f} |" for r in rows if r["mode"] == "throughput"]
    return "\n".join([*lines, "", "## Issue 15 bars", "", *bars(rows), ""])


def chart(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lat = [r for r in rows if r["mode"] == "latency" and r["value"] is not None]
    tp = [r for r in rows if r["mode"] == "throughput"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 0.28 * max(len(lat), len(tp)) + 1.6),
                                   gridspec_kw={"width_ratios": [3, 2]})
    colors = {"tvmzoo": "tab:blue", "ORT": "tab:gray", "OpenVINO": "tab:orange"}
    for ax, data, label in ((ax1, lat, "median ms / image (lower is better)"), (ax2, tp, "images/s (higher is better)")):
        names = [f"{r['model']} b{r['batch']} {r['build']}" if r["mode"] == "latency" else f"{r['model']} {r['build']}"
                 for r in data]
        ax.barh(names[::-1], [r["value"] for r in data][::-1],
                color=[colors[r["build"].split()[0]] for r in data][::-1])
        ax.set_xlabel(label)
        ax.tick_params(axis="y", labelsize=7)
    from matplotlib.patches import Patch

    ax2.legend(handles=[Patch(color=c, label=n) for n, c in colors.items()], fontsize=7, loc="lower right")
    fig.suptitle(title, fontsize=8)
    save_figure(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", choices=list(TITLES), default=list(TITLES))
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--precisions", nargs="+", choices=["fp32", "fp16", "bf16", "int8"],
                    default=["fp32", "fp16", "bf16", "int8"])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--calib", type=int, default=16, help="calibration photos for int8")
    ap.add_argument("--instances", type=int, default=2, help="tvmzoo throughput mode: vamp -i (threads: 2 / i)")
    ap.add_argument("--target", default=None, help="build tvmzoo for this -mcpu (one this CPU can run)")
    ap.add_argument("--quick", action="store_true", help="3 rounds: proves the run, numbers are rough")
    ap.add_argument("--reuse", action="store_true", help="keep builds already in workspace/bench_vs_ort")
    ap.add_argument("--build-only", action="store_true", help="compile the tvmzoo builds, measure nothing "
                    "(then run with --reuse when the machine is quiet)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import openvino

    args.rounds = min(args.rounds, 3) if args.quick else args.rounds
    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    if args.build_only:
        for model in args.models:
            for batch in sorted({1, *args.batches}):
                print({k: v[1] or str(v[0]) for k, v in tvmzoo_builds(model, batch, args).items()}, flush=True)
        return
    header, title = cpu_description(args.target)
    print(header, flush=True)
    core, rows = openvino.Core(), []
    for model in args.models:
        fp32, qdq, images, _ = peer_models(model, args)
        builds = {batch: tvmzoo_builds(model, batch, args) for batch in sorted({1, *args.batches})}
        for batch in args.batches:
            x = stack_aligned(list(images[:batch]))  # every engine reads it in place
            rows += latency_rows(model, batch, latency_runs(core, (fp32, qdq), builds[batch], batch, x), builds[batch],
                                 args.rounds)
        per_image = {r["build"]: r["value"] for r in rows if r["model"] == model and r["batch"] == 1
                     and r["mode"] == "latency" and r["value"] is not None}
        rows += throughput_rows(model, core, (fp32, qdq), builds[1], images[:1], args, per_image)
    from tvmzoo.io.atomic import write_text

    out = OUT.with_name(f"vs_peers_{args.target}.md") if args.target else OUT
    text = markdown(rows, header, args, (load0, os.getloadavg()[0]), time.perf_counter() - t0)
    write_text(out, text)
    print(text)
    print(f"wrote {out}")
    chart(rows, out.with_suffix(".png"), title)


if __name__ == "__main__":
    main()
