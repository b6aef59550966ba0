"""Float convs whose output channels fill no whole register (EfficientNet's 24 and 40) computed on padded
registers (tvmzoo.compile.passes.graph_passes.pad_conv_lanes): exact, and 16 lanes wide on AVX-512."""
from __future__ import annotations

import os
import re

import numpy as np
import onnxruntime as ort
import pytest
import tvm
from tvm import relax, tirx
from tvm.relax.frontend.onnx import from_onnx

import tvmzoo.compile.pipeline as pipeline
from test_schedules import _for_loops, _w
from tvmzoo.compile.passes.graph_passes import padded_channels
from tvmzoo.compile.target import resolve_target
from tvmzoo.io.onnx_graph import GraphBuilder
from tvmzoo.run.host import host_cpu_flags

os.environ.setdefault("TVM_NUM_THREADS", "2")
SHAPE = (1, 3, 64, 64)


def inverted_residuals():
    """Two EfficientNet-style blocks: 24-channel projections with a residual add, then a 40-channel one."""
    rng = np.random.default_rng(0)
    g = GraphBuilder("narrow")
    x = g.relu6(g.conv(g.input(list(SHAPE)), _w(rng, 16, 3, 3, 3), _w(rng, 16), "stem", stride=2))
    y = g.conv(x, _w(rng, 24, 16, 1, 1), _w(rng, 24), "project1")
    x = g.relu6(g.conv(y, _w(rng, 96, 24, 1, 1), _w(rng, 96), "expand2"))
    x = g.relu6(g.conv(x, _w(rng, 96, 1, 3, 3), _w(rng, 96), "dw2", groups=96))
    y = g.add(y, g.conv(x, _w(rng, 24, 96, 1, 1), _w(rng, 24), "project2"))
    x = g.conv(y, _w(rng, 40, 24, 1, 1), _w(rng, 40), "project3")
    x = g.flatten(g.global_avg_pool(x))
    g.output(g.gemm(x, _w(rng, 10, 40), _w(rng, 10), "fc"), [1, 10])
    return g.build()


@pytest.fixture(scope="module")
def model():
    return inverted_residuals()


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return np.random.default_rng(1).standard_normal(SHAPE).astype(np.float32)


def _build(model, target) -> tvm.IRModule:
    mod = from_onnx(model, shape_dict={"input": list(SHAPE)}, keep_params_in_input=False)
    return pipeline.get_pipeline(target)(mod)


def _run(mod, target, image) -> np.ndarray:
    return relax.VirtualMachine(tvm.compile(mod, target), tvm.cpu())["main"](tvm.runtime.tensor(image)).numpy()


@pytest.mark.parametrize("channels, lanes, padded", [(24, 16, 32), (40, 16, 48), (48, 16, 48), (24, 8, 24),
                                                     (8, 16, 8), (3, 16, 16), (1280, 16, 1280)])
def test_padded_channels(channels, lanes, padded):
    """Padded only where fewer vector instructions result (AVX2's 8 lanes: 24 is three whole registers)."""
    assert padded_channels(channels, lanes) == padded


def _conv_channels(model, cpu: str) -> list[int]:
    """The output channels of every conv2d after the layout phase for `cpu`."""
    mod = from_onnx(model, shape_dict={"input": list(SHAPE)}, keep_params_in_input=False)
    with tvm.target.Target(resolve_target({"kind": "llvm", "mcpu": cpu})):
        for p in pipeline.import_passes("fp32") + pipeline.layout_passes():
            mod = p(mod)
    found: list[int] = []
    relax.analysis.post_order_visit(mod["main"], lambda e: found.append(int(e.ty.shape[3]))
                                    if isinstance(e, relax.Call) and getattr(e.op, "name", "") == "relax.nn.conv2d"
                                    else None)
    return found


@pytest.mark.parametrize("cpu, avx512", [("sapphirerapids", True), ("znver4", True), ("haswell", False),
                                         ("znver3", False)])
def test_only_avx512_targets_pad(model, cpu, avx512):
    """(Graph only, no CPU feature needed.) The depthwise conv and the 16 / 96-channel convs keep their width;
    with an AVX2 target's 8 float lanes (whatever the host has) none pads."""
    expected = [16, 32, 32, 48, 96, 96] if avx512 else [16, 24, 24, 40, 96, 96]
    assert sorted(_conv_channels(model, cpu)) == expected


@pytest.fixture(scope="module")
def builds(model):
    """(padded, as before the pass) modules for the host."""
    if "avx512f" not in host_cpu_flags():
        pytest.skip("host has no AVX-512: 24 and 40 channels are whole AVX2 registers, nothing is padded")
    target = tvm.target.Target(resolve_target(None))
    padded = _build(model, target)
    mp = pytest.MonkeyPatch()
    mp.setattr(pipeline, "pad_conv_lanes", tvm.transform.Sequential([], name="NoPad"))
    try:
        plain = _build(model, target)
    finally:
        mp.undo()
    return target, padded, plain


def test_padding_is_exact_and_matches_onnxruntime(builds, model, image):
    target, padded, plain = builds
    out = _run(padded, target, image)
    np.testing.assert_array_equal(out, _run(plain, target, image))
    reference = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(out, reference.run(None, {"input": image})[0], rtol=1e-4, atol=1e-4)


def _narrow_conv_vectors(mod: tvm.IRModule) -> set[int]:
    """Widths of the vector loops in the kernels of the convs with 24 and 40 output channels."""
    widths = set()
    for gv, func in mod.functions_items():
        if not isinstance(func, tirx.PrimFunc) or "conv2d" not in gv.name_hint:
            continue
        header = re.sub(r"T\.int64\((\d+)\)", r"\1", func.script().split("):\n", 1)[0])
        if re.findall(r"T\.Buffer\(\(([^)]*)\)", header)[-1].split(", ")[-1] in ("24", "40"):  # the output's
            widths |= {int(lp.extent) for lp in _for_loops(func) if lp.kind == tirx.ForKind.VECTORIZED}
    return widths


def test_narrow_convs_run_on_whole_registers(builds):
    """The sums of the 24- and 40-channel convs in 16-lane vectors; before the pass they were 8 lanes."""
    _, padded, plain = builds
    assert 8 in _narrow_conv_vectors(plain)
    widths = _narrow_conv_vectors(padded)
    assert 16 in widths and 8 not in widths, widths
