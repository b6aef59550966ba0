"""Depthwise convs on ScheduleDepthwise's row tiles (tvmzoo.compile.schedules.depthwise): the same sums in the
same order as ScheduleReduction's schedule (bit-identical), close to ONNX Runtime on real photos, and the
loop structure that lets each loaded input vector serve every tap that reads it."""
from __future__ import annotations

import functools
import os

import numpy as np
import pytest
import tvm
from tvm import relax, tirx
from tvm.relax.frontend.onnx import from_onnx

import tvmzoo.compile.schedules as schedules
from conftest import cosine, run_onnx
from test_schedules import _for_loops, _w
from tvmzoo.compile.pipeline import run_pipeline
from tvmzoo.compile.schedules.depthwise import ScheduleDepthwise, depthwise_tile
from tvmzoo.compile.target import resolve_target
from tvmzoo.io.onnx_graph import GraphBuilder
from tvmzoo.run.host import host_cpu_flags

os.environ.setdefault("TVM_NUM_THREADS", "2")
SIZE = 56
N_PHOTOS = 2


@pytest.mark.parametrize("channels, width, kernel, lanes, tile", [
    (144, 56, 3, 16, (8, 1, 16)),   # 3-wide kernels: 8 pixels of a long row
    (32, 112, 3, 16, (8, 1, 16)),
    (480, 14, 3, 16, (7, 2, 16)),   # 7 pixels and two channel vectors: 14 accumulators
    (672, 14, 5, 16, (14, 1, 16)),  # 5-wide kernels: up to 14 pixels (each input vector serves 5 of them)
    (240, 28, 5, 16, (14, 1, 16)),
    (1152, 7, 5, 16, (7, 2, 16)),
    (24, 28, 5, 16, (14, 1, 8)),    # 24 channels: 8-lane vectors
    (144, 56, 3, 8, (8, 1, 8)),     # AVX2
])
def test_depthwise_tile(channels, width, kernel, lanes, tile):
    assert depthwise_tile(channels, width, kernel, lanes) == tile


@functools.cache
def depthwise_net():
    """MBConv-like depthwise convs of every tile shape above: 3x3 and 5x5, stride 1 and 2, rows 56 to 7 wide,
    32 to 144 channels, each with its bias and ReLU6."""
    rng = np.random.default_rng(0)
    g = GraphBuilder("depthwise")
    x = g.relu6(g.conv(g.input([1, 3, SIZE, SIZE]), _w(rng, 32, 3, 3, 3), _w(rng, 32), "stem"))
    x = g.relu6(g.conv(x, 3 * _w(rng, 32, 1, 3, 3), _w(rng, 32), "dw56", groups=32))
    x = g.relu6(g.conv(x, _w(rng, 96, 32, 1, 1), _w(rng, 96), "expand"))
    x = g.relu6(g.conv(x, 3 * _w(rng, 96, 1, 3, 3), _w(rng, 96), "dw3s2", stride=2, pads=(0, 0, 1, 1), groups=96))
    x = g.relu6(g.conv(x, 5 * _w(rng, 96, 1, 5, 5), _w(rng, 96), "dw5", groups=96))
    x = g.relu6(g.conv(x, 5 * _w(rng, 96, 1, 5, 5), _w(rng, 96), "dw5s2", stride=2, pads=(1, 1, 2, 2), groups=96))
    x = g.relu6(g.conv(x, _w(rng, 144, 96, 1, 1), _w(rng, 144), "expand2"))
    x = g.relu6(g.conv(x, 5 * _w(rng, 144, 1, 5, 5), _w(rng, 144), "dw5s2b", stride=2, pads=(1, 1, 2, 2),
                       groups=144))
    x = g.flatten(g.global_avg_pool(x))
    g.output(g.gemm(x, _w(rng, 10, 144), _w(rng, 10), "fc"), [1, 10])
    return g.build()


@pytest.fixture(scope="module")
def target():
    return tvm.target.Target(resolve_target(None))


def _build(target, precision: str, depthwise_rule: bool) -> tvm.IRModule:
    mod = from_onnx(depthwise_net(), shape_dict={"input": [1, 3, SIZE, SIZE]}, keep_params_in_input=False)
    rules = schedules.RULES if depthwise_rule else tuple(r for r in schedules.RULES
                                                          if not isinstance(r, ScheduleDepthwise))
    mp = pytest.MonkeyPatch()
    mp.setattr(schedules, "RULES", rules)
    try:
        return run_pipeline(mod, target, precision)[0]
    finally:
        mp.undo()


def _run(mod, target, photos) -> np.ndarray:
    vm = relax.VirtualMachine(tvm.compile(mod, target), tvm.cpu())
    return np.concatenate([vm["main"](tvm.runtime.tensor(p[None])).numpy() for p in photos])


def _depthwise_kernels(mod: tvm.IRModule) -> dict[str, tirx.PrimFunc]:
    return {gv.name_hint: f for gv, f in mod.functions_items()
            if isinstance(f, tirx.PrimFunc) and f.attrs.get(schedules.RULE_ATTR) == "ScheduleDepthwise"}


@pytest.fixture(scope="module")
def fp32_builds(target):
    return _build(target, "fp32", True), _build(target, "fp32", False)


def test_every_depthwise_conv_gets_the_rule(fp32_builds):
    new, old = fp32_builds
    assert len(_depthwise_kernels(new)) == 5, list(_depthwise_kernels(new))
    assert not _depthwise_kernels(old)


def test_bit_identical_and_matches_onnxruntime_on_photos(fp32_builds, target, photos):
    new, old = fp32_builds
    out = _run(new, target, photos)
    np.testing.assert_array_equal(out, _run(old, target, photos))
    reference = np.concatenate([run_onnx(depthwise_net(), p[None]) for p in photos])
    assert cosine(out, reference) > 0.99999
    np.testing.assert_allclose(out, reference, rtol=1e-4, atol=1e-4)


def test_each_input_vector_serves_its_taps(fp32_builds):
    """Inside each kernel row (a loop) the tile's pixels and the kernel columns are unrolled, pixels outside
    columns, so that output pixel r's column kx and pixel r + 1's column kx - 1 load the same input vector."""
    for name, func in _depthwise_kernels(fp32_builds[0]).items():
        loops = {lp.loop_var.name: lp for lp in _for_loops(func)}
        assert loops["ry"].kind == tirx.ForKind.SERIAL, name
        assert loops["rx"].kind == tirx.ForKind.UNROLLED, name
        pixels = [lp for lp in _for_loops(loops["ry"]) if lp.loop_var.name.startswith("xx")]
        assert len(pixels) == 1 and pixels[0].kind == tirx.ForKind.UNROLLED, name
        assert any(lp.loop_var.name == "rx" for lp in _for_loops(pixels[0])), name


def test_bf16_depthwise_bit_identical(target, photos):
    """bf16 builds' depthwise convs (bf16 input, float32 weights and sums) gain most: each input vector is
    converted once for all its taps."""
    if "avx512_bf16" not in host_cpu_flags():
        pytest.skip("host has no AVX512-BF16")
    new = _build(target, "bf16", True)
    assert _depthwise_kernels(new)
    np.testing.assert_array_equal(_run(new, target, photos), _run(_build(target, "bf16", False), target,
                                                                  photos))


def test_depthwise_tile_fits_avx2_registers():
    """AVX2 has 16 vector registers, not 32: the tile's accumulators stay within loops.max_accumulators."""
    from tvm.target import Target
    with Target({"kind": "llvm", "mcpu": "haswell"}):
        pixels, vecs, _ = depthwise_tile(96, 14, 5, 8)
    assert pixels * vecs <= 12
