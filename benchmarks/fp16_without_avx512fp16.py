"""Why fp16 computes in fp32 on a CPU without AVX512-FP16 (issue 15): EfficientNet-Lite0 batch 1 built for
such a CPU (default znver4; one this machine can run) as fp32, as fp16 the way tvmzoo builds it there (fp32
compute, tvmzoo.compile.precision), and as emulated fp16 (ToMixedPrecision forced: what LLVM makes of fp16
arithmetic without native fp16), timed interleaved in one process, with the fp16 conversions counted in
each module's machine code.

    .venv/bin/python benchmarks/fp16_without_avx512fp16.py [--target znver4] [--rounds 10]
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

os.environ["TVM_NUM_THREADS"] = "2"

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vs_onnxruntime import WORK, build_cfg, round_robin  # noqa: E402

from tvmzoo.compile.compiler import build_module, compile_model, ensure_onnx, input_spec  # noqa: E402
from tvmzoo.compile.target import resolve_target  # noqa: E402
from tvmzoo.run.runtime import CompiledModel, stack_aligned  # noqa: E402


def emulated_fp16(cfg, described: Path, directory: Path) -> Path:
    """The fp16 build tvmzoo no longer makes on this target: ToMixedPrecision's fp16, emulated by LLVM
    (described by the mod.json of `described`, the same model and target)."""
    import json

    import onnx

    from tvmzoo.run.runtime import file_sha256

    spec = input_spec(cfg)
    target = resolve_target(cfg.backend.target)
    executable, _ = build_module(onnx.load(str(ensure_onnx(cfg, spec))), spec, "fp16", target)
    directory.mkdir(parents=True, exist_ok=True)
    executable.export_library(str(directory / "mod.so"))
    meta = json.loads((described / "mod.json").read_text())
    meta["compute"] = {"precision": "fp16", "note": "emulated by LLVM (benchmark only)"}
    meta["module_sha256"] = file_sha256(directory / "mod.so")
    (directory / "mod.json").write_text(json.dumps(meta))
    return directory


def conversions(directory: Path) -> int:
    text = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(directory / "mod.so")],
                          capture_output=True, text=True).stdout
    return len(re.findall(r"\bvcvtph2ps\b|\bvcvtps2ph\b", text))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default="znver4")
    ap.add_argument("--rounds", type=int, default=10)
    args = ap.parse_args()
    extra = {"backend.target": {"kind": "llvm", "mcpu": args.target}}
    builds = {}
    for precision in ("fp32", "fp16"):
        cfg = build_cfg("lite0", precision, 1, 16, {**extra, "name": f"lite0_{precision}_b1_{args.target}"})
        builds[f"tvmzoo {precision}"] = cfg.output_dir if (cfg.output_dir / "mod.json").is_file() else compile_model(cfg)
    builds["fp16 emulated (ToMixedPrecision)"] = emulated_fp16(cfg, builds["tvmzoo fp16"],
                                                            WORK / f"lite0_fp16emu_b1_{args.target}")
    x = stack_aligned([np.random.default_rng(0).standard_normal((3, 224, 224), dtype=np.float32)])
    models = {name: CompiledModel.load(d) for name, d in builds.items()}
    ref = models["tvmzoo fp32"].run(x)
    times = round_robin({name: (lambda m=m: m.run(x)) for name, m in models.items()}, args.rounds)
    base = np.median(times["tvmzoo fp32"])
    print(f"EfficientNet-Lite0 batch 1 built for -mcpu={args.target}, 2 threads, {args.rounds} interleaved rounds "
          "(machine shared with other developers)\n")
    print("| build | median ms | vs fp32 | fp16 conversions in the module | max abs diff vs fp32 |\n|---|---|---|---|---|")
    for name, secs in times.items():
        diff = float(np.abs(models[name].run(x) - ref).max())
        print(f"| {name} | {np.median(secs) * 1e3:.2f} | {np.median(secs) / base:.2f}x | {conversions(builds[name])} | "
              f"{diff:.2e} |")


if __name__ == "__main__":
    main()
