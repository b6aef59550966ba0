"""Builds for another CPU, run on this one (issue 15): EfficientNet-Lite0 and RepVGG-A0 fp32, batch 1, built
for -mcpu=haswell (AVX2) and -mcpu=znver4 (Zen 4), against the same model built for this host, timed
interleaved in one process; and the haswell build as it was before its vector widths followed the
target (16-float schedules from the host's width: `--no-before` leaves it out). The host build
is timed twice: with its shipped tuning records (what a user gets) and on the default schedules only (as
the other builds, for which no records apply). Outputs checked against ONNX Runtime fp32 on real photos.

    .venv/bin/python benchmarks/avx2_on_avx512.py [--models lite0 a0] [--rounds 10] [--reuse]

Writes benchmarks/results/avx2_on_avx512.md.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from unittest import mock

os.environ["TVM_NUM_THREADS"] = "2"

import numpy as np  # noqa: E402
import onnx  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_name  # noqa: E402
from vs_onnxruntime import PHOTOS, TITLES, WORK, agreement, build_cfg, ort_session, round_robin  # noqa: E402

from tvmzoo.compile.compiler import compile_model, ensure_onnx, input_spec, preprocessing_of  # noqa: E402
from tvmzoo.compile.cpu import host_cpu  # noqa: E402
from tvmzoo.io.images import find_images  # noqa: E402
from tvmzoo.preprocess import apply, read_image  # noqa: E402
from tvmzoo.run.runtime import CompiledModel, stack_aligned  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "avx2_on_avx512.md"
NO_RECORDS = WORK / "no_records"   # an empty records folder: the default schedules only


def variants(model: str, before: bool) -> dict[str, tuple[dict, bool]]:
    """Build name -> (config overrides, built with 16-float schedules whatever the target)."""
    host = host_cpu().name

    def target(cpu: str, records: bool = False) -> dict:
        return {"backend.target": f"llvm -mcpu={cpu}", **({} if records else {"tuning.records": str(NO_RECORDS)})}

    found = {f"host ({host}), shipped records": ({"name": f"{model}_xcpu_host_rec"}, False),
             f"host ({host}), default schedules": ({"name": f"{model}_xcpu_host", **target(host)}, False),
             "haswell (AVX2)": ({"name": f"{model}_xcpu_haswell", **target("haswell")}, False),
             "znver4 (Zen 4)": ({"name": f"{model}_xcpu_znver4", **target("znver4")}, False)}
    if before:
        found["haswell, 16-float schedules (before)"] = ({"name": f"{model}_xcpu_haswell16", **target("haswell")}, True)
    return found


def build(model: str, overrides: dict, wide: bool, reuse: bool) -> CompiledModel:
    cfg = build_cfg(model, "fp32", 1, 16, overrides)
    if not (reuse and (cfg.output_dir / "mod.json").is_file()):
        print(f"compiling {cfg.name} ...", flush=True)
        with mock.patch("tvmzoo.compile.schedules.base.vector_bits", lambda _target: 512) if wide else nullcontext():
            compile_model(cfg)
    return CompiledModel.load(cfg.output_dir)


def bench(model: str, args) -> list[str]:
    cfg = build_cfg(model, "fp32", 1, 16)
    reference = ort_session(onnx.load(str(ensure_onnx(cfg, input_spec(cfg)))))
    pre = preprocessing_of(cfg)
    photos = [stack_aligned([apply(pre, read_image(p))]) for p in sorted(find_images(PHOTOS, ("JPEG",)))[:8]]
    ref = np.concatenate([reference.run(None, {"input": x})[0] for x in photos])
    models = {name: build(model, overrides, wide, args.reuse)
              for name, (overrides, wide) in variants(model, not args.no_before).items()}
    x = photos[0]
    times = round_robin({name: (lambda m=m: m.run(x)) for name, m in models.items()}, args.rounds)
    base = float(np.median(times["haswell (AVX2)"]))
    rows = []
    for name, m in models.items():
        out = np.concatenate([m.run(p) for p in photos])
        med = float(np.median(times[name]))
        kernels = m.meta["kernels"]
        rows.append(f"| {TITLES[model]} | {name} | {med * 1e3:.2f} | {med / base:.2f}x | "
                    f"{kernels['tuned']}/{kernels['default']} | {agreement(out, ref)} |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", choices=list(TITLES), default=list(TITLES))
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--no-before", action="store_true", help="leave out the build with the host's vector width")
    ap.add_argument("--reuse", action="store_true", help="keep builds already in workspace/bench_vs_ort")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    NO_RECORDS.mkdir(parents=True, exist_ok=True)
    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    rows = [row for model in args.models for row in bench(model, args)]
    from tvmzoo.io.atomic import write_text

    text = (f"# Builds for other CPUs run on this one (`benchmarks/avx2_on_avx512.py --rounds {args.rounds}`)\n\n"
            f"CPU: {cpu_name()}; LLVM target for this host: -mcpu={host_cpu().name}. The haswell and znver4 "
            "builds are cross-compiled here and run on this AVX-512 CPU: the AVX2 build uses ymm registers "
            "only, so its times are an AVX2 CPU's code on this core, not an AVX2 CPU's speed. "
            f"fp32, batch 1, 2 threads, {args.rounds} interleaved rounds; load average {load0:.1f} at the start, "
            f"{os.getloadavg()[0]:.1f} at the end ({time.perf_counter() - t0:.0f} s with the builds).\n\n"
            "| model | build | median ms | vs haswell | kernels tuned/default | agreement with ORT fp32 "
            "(min cosine, top-1 on 8 photos) |\n|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n")
    write_text(OUT, text)
    print(text)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
