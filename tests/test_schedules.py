"""Default CPU schedules and MetaSchedule records on a small conv net, checked against ONNX Runtime."""
from __future__ import annotations

import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tvm
from tvm import relax, tirx
from tvm.relax.frontend.onnx import from_onnx

from tvmzoo.onnx_graph import GraphBuilder
from tvmzoo.schedules import canonicalize, fuse_passes, layout_passes, optimize, register_tile
from tvmzoo.target import resolve_target

os.environ.setdefault("TVM_NUM_THREADS", "2")
SHAPE = (1, 3, 32, 32)


def _w(rng, *shape):
    return (rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32)


def small_net() -> onnx.ModelProto:
    """conv3x3/2 + ReLU, depthwise 3x3 + ReLU6, grouped conv + ReLU, max pool, 1x1 conv with
    a residual add, GAP, Gemm: every kernel kind of the real nets, narrow and small."""
    rng = np.random.default_rng(0)
    g = GraphBuilder("small")
    x = g.relu(g.conv(g.input(list(SHAPE)), _w(rng, 16, 3, 3, 3), _w(rng, 16), "stem", stride=2))
    x = g.relu6(g.conv(x, _w(rng, 16, 1, 3, 3), _w(rng, 16), "dw", groups=16))
    x = g.relu(g.conv(x, _w(rng, 24, 4, 3, 3), _w(rng, 24), "grouped", groups=4))
    x = g.op("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2])
    x = g.add(x, g.conv(x, _w(rng, 24, 24, 1, 1), _w(rng, 24), "pw"))
    x = g.flatten(g.global_avg_pool(x))
    g.output(g.gemm(x, _w(rng, 10, 24), _w(rng, 10), "fc"), [1, 10])
    return g.build()


@pytest.fixture(scope="module")
def model() -> onnx.ModelProto:
    return small_net()


@pytest.fixture(scope="module")
def target() -> tvm.target.Target:
    return tvm.target.Target(resolve_target(None))


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return np.random.default_rng(1).standard_normal(SHAPE).astype(np.float32)


@pytest.fixture(scope="module")
def reference(model, image) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": image})[0]


def _import(model) -> tvm.IRModule:
    return from_onnx(model, shape_dict={"input": list(SHAPE)}, keep_params_in_input=False)


def _run(mod: tvm.IRModule, target, image) -> np.ndarray:
    vm = relax.VirtualMachine(tvm.compile(mod, target), tvm.cpu())
    return vm["main"](tvm.runtime.tensor(image)).numpy()


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _loop_kinds(func: tirx.PrimFunc) -> set[tirx.ForKind]:
    """The kinds of every For loop in the kernel (walks the statement tree)."""
    kinds: set[tirx.ForKind] = set()
    stack = [func.body]
    while stack:
        node = stack.pop()
        if isinstance(node, tirx.For):
            kinds.add(tirx.ForKind(int(node.kind)))
        if isinstance(node, tirx.SeqStmt):
            stack.extend(node.seq)
        for attr in ("body", "block", "then_case", "else_case", "init"):
            child = getattr(node, attr, None)
            if isinstance(child, tirx.Stmt):
                stack.append(child)
    return kinds


@pytest.fixture(scope="module")
def scheduled(model, target) -> tvm.IRModule:
    return optimize(_import(model), target)


def test_default_schedules_match_onnxruntime(scheduled, target, image, reference):
    out = _run(scheduled, target, image)
    assert out.shape == reference.shape
    assert _cos(out, reference) > 0.99999
    np.testing.assert_allclose(out, reference, rtol=1e-4, atol=1e-4)


def test_no_kernel_is_a_naive_loop_nest(scheduled):
    kernels = {gv.name_hint: f for gv, f in scheduled.functions_items() if isinstance(f, tirx.PrimFunc)}
    names = " ".join(kernels)
    for op in ("conv2d", "matmul", "pool", "mean"):  # every kind of the net became a kernel
        assert op in names, names
    for name, func in kernels.items():
        assert func.attrs.get("tirx.is_scheduled", False), f"{name} has no schedule"
        kinds = _loop_kinds(func)
        assert tirx.ForKind.PARALLEL in kinds, f"{name} has no parallel loop:\n{func.script()}"
        if any(op in name for op in ("conv2d", "matmul", "pool")):
            assert tirx.ForKind.VECTORIZED in kinds, f"{name} has no vectorized loop:\n{func.script()}"


def test_loop_check_sees_naive_kernels(model, target):
    """The check above can fail: kernels fused but not scheduled have only serial loops."""
    with target:
        naive = tvm.transform.Sequential([*layout_passes(), *fuse_passes()])(canonicalize(_import(model)))
    conv = next(f for gv, f in naive.functions_items() if "conv2d" in gv.name_hint)
    assert _loop_kinds(conv) == {tirx.ForKind.SERIAL}


def test_fp16_default_schedules_close_to_fp32(model, target, image, reference):
    mod = relax.transform.ToMixedPrecision(out_dtype="float16")(canonicalize(_import(model)))
    out = _run(optimize(mod, target), target, image)
    assert _cos(out.astype(np.float32), reference) > 0.999


@pytest.mark.parametrize("channels, rows, lanes, expected", [
    (192, 14, 16, (7, 3, 16)),    # 7 rows x 3 zmm of 16 floats = 21 accumulators
    (48, 112, 16, (8, 3, 16)),
    (24, 56, 16, (8, 3, 8)),      # 24 channels: 8-wide vectors, no lane wasted
    (1000, 1, 16, (1, 1, 8)),
    (7, 7, 16, (7, 1, 1)),        # odd channel count: no vector, still a row tile
])
def test_register_tile(channels, rows, lanes, expected):
    tile = register_tile(channels, rows, lanes)
    assert tile == expected
    r, vecs, width = tile
    assert rows % r == 0 and channels % (vecs * width) == 0


@pytest.mark.slow
def test_tuning_records_apply_and_match(model, target, image, reference, tmp_path):
    pytest.importorskip("xgboost")
    from tvmzoo.tuning import RECORD_FILE, apply_records, tune

    n_records = tune(_import(model), target, tmp_path, max_trials_global=2, max_trials_per_task=1, seed=0)
    assert (tmp_path / RECORD_FILE).is_file() and n_records >= 1
    mod, n_tuned, n_fallback = apply_records(_import(model), target, tmp_path)
    assert n_tuned >= 1 and n_fallback >= 1
    out = _run(mod, target, image)
    assert _cos(out, reference) > 0.99999
