"""bf16 precision: the Relax pass, the AMX-BF16 (where the CPU has it) and vdpbf16ps kernels (where it has
AVX512-BF16) against ONNX Runtime fp32 on real photos, and which path each CPU gets (on paper, from LLVM's
own CPU tables)."""
from __future__ import annotations

import json
import logging
import os
import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tvm
import yaml
from tvm import relax, tirx
from tvm.relax.frontend.onnx import from_onnx
from tvm.target.codegen import target_has_features

from conftest import ROOT, cosine
from tvmzoo.compile.compiler import compile_model, input_spec, plan_for, records_dir
from tvmzoo.compile.cpu import features_of
from tvmzoo.compile.pipeline import get_pipeline, import_passes
from tvmzoo.compile.precision import bf16_plan
from tvmzoo.compile.target import resolve_target
from tvmzoo.config import load_build_config
from tvmzoo.io.onnx_graph import GraphBuilder
from tvmzoo.run.host import host_cpu_flags

os.environ.setdefault("TVM_NUM_THREADS", "2")
SIZE = 24
HAS_BF16 = "avx512_bf16" in host_cpu_flags()
needs_bf16 = pytest.mark.skipif(not HAS_BF16, reason="host CPU has no AVX512-BF16 (vdpbf16ps)")
needs_amx_bf16 = pytest.mark.skipif("amx_bf16" not in host_cpu_flags(), reason="host CPU has no AMX-BF16 (tdpbf16ps)")
NO_AMX = ["-amx-bf16", "-amx-int8", "-amx-tile"]


def _w(rng, *shape):
    return (rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32)


def bf16_net() -> onnx.ModelProto:
    """RGB stem (odd channels: stays fp32), a 64-channel 3x3 conv (Winograd, bf16 GEMMs), a 1x1 conv
    (48: zmm lanes), a depthwise conv (bf16 input, fp32 weight), a 3x3/2 conv to 24 channels (ymm lanes), GAP, Gemm."""
    rng = np.random.default_rng(0)
    g = GraphBuilder("bf16")
    x = g.relu(g.conv(g.input([None, 3, SIZE, SIZE]), _w(rng, 64, 3, 3, 3), _w(rng, 64), "stem"))
    x = g.relu(g.conv(x, _w(rng, 64, 64, 3, 3), _w(rng, 64), "wino"))
    x = g.relu(g.conv(x, _w(rng, 48, 64, 1, 1), _w(rng, 48), "pw"))
    x = g.relu6(g.conv(x, _w(rng, 48, 1, 3, 3), _w(rng, 48), "dw", groups=48))
    x = g.relu(g.conv(x, _w(rng, 24, 48, 3, 3), _w(rng, 24), "c24", stride=2))
    x = g.flatten(g.global_avg_pool(x))
    g.output(g.gemm(x, _w(rng, 16, 24), _w(rng, 16), "fc"), [None, 16])
    return g.build()


def _imported(model: onnx.ModelProto, batch: int) -> tvm.IRModule:
    return from_onnx(model, shape_dict={"input": [batch, 3, SIZE, SIZE]}, keep_params_in_input=False)


def _lowered(model: onnx.ModelProto, target: tvm.target.Target, batch: int) -> tvm.IRModule:
    """The bf16 build's Relax module after the pipeline's import phase (where the precision is set)."""
    with target:
        return tvm.transform.Sequential(import_passes("bf16"))(_imported(model, batch))


@pytest.mark.parametrize("cpu, plan", [
    ("sapphirerapids", "amx-bf16"),     # AMX-BF16 tiles (it has AVX512-BF16 too: the kernels AMX cannot hold)
    ("znver4", "fp32"),                 # AMD Zen 4: AVX512-BF16, no AMX: vdpbf16ps loses to fp32
    ("cooperlake", "fp32"),
    ("icelake-server", "fp32"),         # AVX-512 without BF16
    ("haswell", "fp32"),                # AVX2 only
])
def test_bf16_plan_per_cpu(cpu, plan):
    assert bf16_plan(features_of(cpu)) == plan


@pytest.mark.parametrize("cpu, why", [
    ("haswell", "has no AVX512-BF16 or AMX-BF16"),       # operands converted on every use
    ("icelake-server", "has no AVX512-BF16 or AMX-BF16"),
    ("znver4", "has AVX512-BF16 but no AMX-BF16"),        # vdpbf16ps measured slower than fp32
    ("cooperlake", "has AVX512-BF16 but no AMX-BF16"),
])
def test_where_bf16_does_not_pay_the_build_stays_fp32(cpu, why, caplog):
    """Without AMX-BF16 the plan computes in fp32 and logs why (and, with AVX512-BF16, what is faster)."""
    cfg = load_build_config(ROOT / "build_in" / "build" / "official_repvgg.yaml", {"backend.dtype": "bf16"})
    with caplog.at_level(logging.WARNING, logger="tvmzoo.compile.compiler"):
        plan = plan_for(cfg, {"kind": "llvm", "mcpu": cpu})
    assert (plan.requested, plan.compute) == ("bf16", "fp32")
    assert f"bf16: {cpu} {why}" in caplog.text
    assert ("faster on " in caplog.text) == ("but no AMX" in why)
    if "but no AMX" in why:
        assert "int8 (AVX512-VNNI)" in caplog.text


def test_the_bf16_pass_rewrites_whenever_it_runs():
    """The plan alone decides: the pass does not second-guess the target (here one without BF16)."""
    assert "bfloat16" in _lowered(bf16_net(), tvm.target.Target({"kind": "llvm", "mcpu": "haswell"}), 1).script()


@pytest.mark.parametrize("cpu, records", [("haswell", "fp32-b1-224x224"), ("znver4", "fp32-b1-224x224"),
                                          ("sapphirerapids", "bf16-b1-224x224")])
def test_bf16_builds_use_the_records_of_what_they_compute(cpu, records):
    """A bf16 build that computes in fp32 is the fp32 build, tuned kernels included (never slower)."""
    cfg = load_build_config(ROOT / "build_in" / "build" / "official_repvgg.yaml", {"backend.dtype": "bf16"})
    target = {"kind": "llvm", "mcpu": cpu}
    assert records_dir(cfg, input_spec(cfg), target, plan_for(cfg, target).compute).name == records


def _compiled(tmp_path, cpu: str | dict, dtype: str, batch: int = 1):
    """`vamc compile` of bf16_net for `cpu` (a name, or a whole target) at `dtype`: the model directory."""
    onnx.save(bf16_net(), str(tmp_path / "bf16.onnx"))
    target = cpu if isinstance(cpu, dict) else {"kind": "llvm", "mcpu": cpu}
    cfg = {"name": f"net_{dtype}", "frontend": {"shape": {"input": [batch, 3, SIZE, SIZE]}, "type": "onnx",
                                                "checkpoint": str(tmp_path / "bf16.onnx")},
           "backend": {"type": "tvm", "dtype": dtype, "target": target},
           "workspace": {"path": str(tmp_path / "ws")}}
    (tmp_path / f"{dtype}.yaml").write_text(yaml.safe_dump(cfg))
    return compile_model(load_build_config(tmp_path / f"{dtype}.yaml"))


@pytest.mark.parametrize("cpu, computes", [("haswell", "fp32"), ("znver4", "fp32"), ("sapphirerapids", "bf16")])
def test_mod_json_says_what_the_build_computes_as(cpu, computes, tmp_path):
    """`vamc compile` of a bf16 YAML records the precision asked for and the one it computes in."""
    meta = json.loads((_compiled(tmp_path, cpu, "bf16") / "mod.json").read_text())
    assert (meta["precision"], meta["compute"]["precision"]) == ("bf16", computes)
    # a bf16 build computing in fp32 is the fp32 build: its pipeline has no bf16 pass
    assert ("ToBf16" in meta["kernels"]["pipeline"]["import"]) == (computes == "bf16")


@pytest.mark.parametrize("cpu", ["znver4", "cooperlake"])
def test_without_amx_a_bf16_build_is_the_fp32_build(cpu, tmp_path):
    """AVX512-BF16 without AMX: the bf16 build's module is byte for byte the fp32 build's (so never slower)."""
    bf16, fp32 = (_compiled(tmp_path, cpu, dtype) for dtype in ("bf16", "fp32"))
    assert (bf16 / "mod.so").read_bytes() == (fp32 / "mod.so").read_bytes()


def test_bf16_pass_converts_dense_layers_and_depthwise_inputs():
    """Dense convs and the Gemm: bf16 x bf16 -> float32; the depthwise conv: bf16 input, float32 weight
    (no channel pairs to dot: only its traffic halves); the RGB stem (3 channels) stays float32."""
    target = tvm.target.Target(resolve_target({"kind": "llvm", "mcpu": "znver4"}))
    mod = _lowered(bf16_net(), target, 1)
    convs = []
    for binding in mod["main"].body.blocks[0].bindings:
        if isinstance(binding.value, relax.Call) and getattr(binding.value.op, "name", "") == "relax.nn.conv2d":
            data, weight = binding.value.args
            convs.append((int(binding.value.attrs.groups), str(data.ty.dtype), str(weight.ty.dtype),
                          str(binding.value.ty.dtype)))
    assert convs == [(1, "float32", "float32", "float32"),       # stem: odd channels
                     *[(1, "bfloat16", "bfloat16", "float32")] * 2,  # wino, pw
                     (48, "bfloat16", "float32", "float32"),     # depthwise: bf16 storage only
                     (1, "bfloat16", "bfloat16", "float32")], convs  # c24
    text = mod.script()
    assert len(re.findall(r"R\.matmul\([^\n]*out_dtype=\"float32\"", text)) == 1
    assert text.count('R.astype(') >= 5


def host_bf16_target(amx: bool) -> tvm.target.Target:
    """This host's target, with AVX512-BF16 enabled when the target name does not imply it (the host has
    the instructions: the tests are skipped otherwise); without AMX: the vdpbf16ps kernels."""
    spec = resolve_target(None)
    if not target_has_features(["avx512bf16"], tvm.target.Target(spec)):
        spec["mattr"] = [*spec.get("mattr", []), "+avx512bf16", "+avx512vl"]
    if not amx:
        spec["mattr"] = [*spec.get("mattr", []), *NO_AMX]
    return tvm.target.Target(spec)


def _bf16_build(amx: bool):
    target = host_bf16_target(amx)
    model = bf16_net()
    return model, target, tvm.compile(get_pipeline(target, "bf16")(_imported(model, 4)), target)


@pytest.fixture(scope="module")
def bf16_build():
    return _bf16_build(amx=False)


@pytest.fixture(scope="module")
def amx_bf16_build():
    from tvmzoo.run.host import request_amx

    assert request_amx()
    return _bf16_build(amx=True)


@needs_bf16
def test_bf16_kernels_use_vdpbf16ps(bf16_build):
    _, _, ex = bf16_build
    asm = ex.mod.imports[0].inspect_source("asm")
    dots = re.findall(r"\tvdpbf16ps\t[^\n]*%([yz]mm)", asm)
    assert {"zmm", "ymm"} <= set(dots), "16-lane (64 / 48 channels) and 8-lane (24 / 16 channels) kernels"
    assert not re.search(r"call[^\n]*tvmzoo_dpbf16ps", asm), "the wrapper is inlined"


def _matches_onnxruntime_fp32(build, photos) -> None:
    model, _, ex = build
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"input": photos})[0]
    out = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(photos)).numpy()
    assert out.dtype == np.float32 and out.shape == ref.shape
    for o, r in zip(out, ref):
        assert cosine(o, r) > 0.999
    assert np.abs(out - ref).max() < 0.05 * np.abs(ref).max()
    assert not np.allclose(out, ref, rtol=1e-6, atol=1e-6), "bf16 rounding should show: is it really bf16?"


@needs_bf16
def test_bf16_matches_onnxruntime_fp32_on_photos(bf16_build, photos):
    _matches_onnxruntime_fp32(bf16_build, photos)


@needs_amx_bf16
def test_amx_bf16_kernels_use_tdpbf16ps_and_match_onnxruntime_fp32(amx_bf16_build, photos):
    asm = amx_bf16_build[2].mod.imports[0].inspect_source("asm")
    assert len(re.findall(r"\ttdpbf16ps\t", asm)) >= 3 and "ldtilecfg" in asm and "tilerelease" in asm
    _matches_onnxruntime_fp32(amx_bf16_build, photos)


@needs_amx_bf16
def test_amx_bf16_tiles_configured_once_per_task_change_no_output(amx_bf16_build, photos):
    """HoistAmxTileSetup moves where the tiles are configured, not the arithmetic: outputs bit-identical to
    the build that configures them per macro tile."""
    from test_amx import _without_hoist, tile_setup

    model, target, ex = amx_bf16_build
    scheduled = get_pipeline(target, "bf16")(_imported(model, 4))
    kernels = [f for _, f in scheduled.functions_items() if isinstance(f, tirx.PrimFunc) and "tdpbf16ps" in f.script()]
    assert kernels and all(tile_setup(f) == {"calls": 2, "in loops": 0, "launch points": 1} for f in kernels)
    before = tvm.compile(_without_hoist("bf16", target)(_imported(model, 4)), target)
    out, ref = (relax.VirtualMachine(e, tvm.cpu())["main"](tvm.runtime.tensor(photos)).numpy() for e in (ex, before))
    assert np.array_equal(out, ref)
