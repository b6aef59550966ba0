"""Every choice a build makes for its CPU follows the TARGET, never the host that compiles it: vector widths
(schedules and PadConvLanes), the dot-product kernels (AMX / VNNI / BF16 / FP16), the precision plan and the
tuning records; on paper for the CPUs users run, and for real for two CPUs this one can run (AVX2 and
Zen 4 builds on real photos against ONNX Runtime, the AVX2 machine code free of AVX-512 registers)."""
from __future__ import annotations

import logging
import os
import re

import numpy as np
import pytest
import tvm
from tvm.relax.frontend.onnx import from_onnx
from tvm.target.codegen import llvm_get_vector_width, target_has_features

from test_schedules import small_net
from tvmzoo.compile.cpu import features_of, host_cpu
from tvmzoo.compile.pipeline import get_pipeline
from tvmzoo.compile.precision import bf16_plan, plan_precision
from tvmzoo.compile.schedules.base import vector_bits, vector_lanes
from tvmzoo.compile.schedules.int8_amx import ScheduleInt8Amx
from tvmzoo.compile.schedules.int8_dot import ScheduleInt8Dot
from tvmzoo.compile.target import resolve_target

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
