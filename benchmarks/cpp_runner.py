"""The C++ runner (deploy/cpp) against the Python tools, side by side in one driver process:

- model latency: `vamp` (Python, CompiledModel.run) vs `tvmzoo_classify --repeat` (C++, the same mod.so),
  each a fresh child process, in alternating order every round; the ratio of their median p50s;
- the whole runner: `classification.py` vs `tvmzoo_classify` on the same photos, images/second and the
  child's peak resident memory (ru_maxrss from wait4).

    .venv/bin/python benchmarks/cpp_runner.py [--models a0 lite0 a0_int8] [--rounds 5] [--iterations 200]

Builds go through the shipped YAMLs (A0 with random weights, Lite0 with its real package weights).
Writes benchmarks/results/cpp_runner.md.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

THREADS = 2
os.environ["TVM_NUM_THREADS"] = str(THREADS)

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from machine import cpu_name  # noqa: E402
from tvmzoo.io.checkpoint import save_npz  # noqa: E402
from tvmzoo.compile.compiler import compile_model  # noqa: E402
from tvmzoo.config import load_build_config  # noqa: E402
from tvmzoo.models import repvgg  # noqa: E402
from tvmzoo.run import cpp_runner  # noqa: E402

PHOTOS = ROOT.parent / "shared" / "data" / "imagenet-sample"
WORK = ROOT / "workspace" / "bench_cpp_runner"
OUT = ROOT / "benchmarks" / "results" / "cpp_runner.md"
LABELS = ROOT / "tvmzoo" / "data" / "imagenet.txt"
BIN = Path(sys.executable).parent
TIME = "/usr/bin/time"
BUILDS = {  # name -> (shipped YAML, overrides)
    "a0": ("official_repvgg.yaml", {"backend.dtype": "fp32"}),
    "a0_int8": ("official_repvgg.yaml", {"backend.dtype": "int8", "dataset.sampler.get_data_num": 32}),
    "lite0": ("efficientnet_lite0.yaml", {}),
}


def build(name: str) -> Path:
    yaml_name, overrides = BUILDS[name]
    weights = WORK / "a0_random.npz"
    if not weights.is_file():
        save_npz(repvgg.random_state_dict("A0", "official", np.random.default_rng(0)), weights)
    overrides = {**overrides, "name": f"cpp_bench_{name}", "workspace.path": str(WORK / "ws"),
                 "dataset.path": str(PHOTOS)}
    if name.startswith("a0"):
        overrides |= {"model.weights": str(weights), "frontend.checkpoint": str(WORK / "a0.onnx")}
    cfg = load_build_config(ROOT / "build_in" / "build" / yaml_name, overrides)
    prefix = cfg.output_dir / "mod"
    if not (cfg.output_dir / "mod.json").is_file():
        compile_model(cfg)
    return prefix


def run_measured(cmd: list) -> tuple[str, int]:
    """The child's stdout and its peak resident memory in KiB, from GNU time: a child forked from this
    Python process would carry the driver's own peak in its ru_maxrss (Linux keeps it across exec)."""
    if not Path(TIME).is_file():
        raise SystemExit(f"{TIME} (GNU time) is needed to measure peak memory: apt-get install time")
    report = WORK / "time.txt"
    proc = subprocess.run([str(c) for c in (TIME, "-f", "%M", "-o", report, *cmd)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed: {proc.stderr.strip().splitlines()[-1:]}")
    return proc.stdout, int(report.read_text().split()[-1])


def latency_round(prefix: Path, program: Path, iterations: int, cpp_first: bool) -> dict[str, float]:
    vamp = [BIN / "vamp", "-m", prefix, "--iterations", iterations, "--warmup", 10, "--json"]
    cpp = [program, "--file_path", PHOTOS / "n01440764_tench.JPEG", "--model_prefix_path", prefix,
           "--label_txt", LABELS, "--repeat", iterations]
    out: dict[str, float] = {}
    for kind in (("cpp", "vamp") if cpp_first else ("vamp", "cpp")):
        text, _ = run_measured(cpp if kind == "cpp" else vamp)
        if kind == "vamp":
            out["vamp"] = json.loads(text)["latency_ms"]["p50"]
        else:
            out["cpp"] = float(re.search(r"p50 ([\d.]+)", text).group(1)) / 1e3
    return out


def runner_round(prefix: Path, program: Path, photos: Path) -> dict[str, tuple[float, float]]:
    """images/second and peak MiB of each whole runner over the same photos."""
    common = ["--file_path", photos, "--model_prefix_path", prefix, "--save_result_txt", "r.txt"]
    py = [sys.executable, ROOT / "common" / "vsx" / "classification.py", *common, "--save_dir", WORK / "py"]
    cpp = [program, *common, "--save_dir", WORK / "cpp", "--label_txt", LABELS]
    out = {}
    for kind, cmd in (("python", py), ("cpp", cpp)):
        text, rss = run_measured(cmd)
        speed = float(re.search(r"\(([\d.]+) images/second\)", text).group(1))
        out[kind] = (speed, rss / 1024)
    if (WORK / "py" / "r.txt").read_text() != (WORK / "cpp" / "r.txt").read_text():
        raise SystemExit("the C++ and Python result files differ")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["a0", "lite0", "a0_int8"], choices=list(BUILDS))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--photos", type=int, default=100, help="photos for the whole-runner rows")
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    program = cpp_runner.build(WORK / "cpp_build")
    photos = WORK / "photos"
    photos.mkdir(exist_ok=True)
    for p in sorted(PHOTOS.glob("*.JPEG"))[: args.photos]:
        if not (photos / p.name).exists():
            os.symlink(p, photos / p.name)
    rows = []
    for name in args.models:
        prefix = build(name)
        lat = [latency_round(prefix, program, args.iterations, cpp_first=i % 2 == 1) for i in range(args.rounds)]
        vamp, cpp = (statistics.median(r[k] for r in lat) for k in ("vamp", "cpp"))
        whole = runner_round(prefix, program, photos)
        rows.append(f"| {name} | {vamp:.3f} | {cpp:.3f} | {cpp / vamp:.3f} | {whole['python'][0]:.1f} | "
                    f"{whole['cpp'][0]:.1f} | {whole['python'][1]:.0f} | {whole['cpp'][1]:.0f} |")
        print(rows[-1], flush=True)
    table = "\n".join([
        f"CPU: {cpu_name()}, {THREADS} threads; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
        f"{args.rounds} rounds x {args.iterations} forward passes, median of the per-round p50s; "
        f"whole runners over {args.photos} photos (decode + preprocess + infer, batch 1).",
        "",
        "| build | vamp p50 ms | C++ p50 ms | C++ / vamp | classification.py img/s | C++ img/s "
        "| classification.py peak MiB | C++ peak MiB |",
        "|---|---|---|---|---|---|---|---|", *rows])
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
