"""Default CPU schedules and MetaSchedule records on a small conv net, checked against ONNX Runtime."""
from __future__ import annotations

import os
import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tvm
from tvm import relax, s_tir, tirx
from tvm.script import tirx as T
from tvm.relax.frontend.onnx import from_onnx

from tvmzoo.io.onnx_graph import GraphBuilder
from tvmzoo.compile.passes.graph_passes import (canonicalize, depthwise_int8_as_float, divide_as_multiply,
                                                fold_requantize, qdq_to_elementwise)
from tvmzoo.compile.pipeline import get_pipeline, run_pipeline, tuning_pipeline
from tvmzoo.compile.schedules.loops import register_tile, schedule_injective
from tvmzoo.compile.schedules.operands import FLOAT_SPLIT_BYTES
from tvmzoo.compile.target import WIDE_VECTORS, resolve_target
from tvmzoo.run.host import host_cpu_flags

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
    """The kinds of every For loop in the kernel."""
    return {tirx.ForKind(int(loop.kind)) for loop in _for_loops(func)}


def _for_loops(func: tirx.PrimFunc) -> list[tirx.For]:
    """Every For loop in the kernel (walks the statement tree)."""
    loops = []
    stack = [func.body]
    while stack:
        node = stack.pop()
        if isinstance(node, tirx.For):
            loops.append(node)
        if isinstance(node, tirx.SeqStmt):
            stack.extend(node.seq)
        for attr in ("body", "block", "then_case", "else_case", "init"):
            child = getattr(node, attr, None)
            if isinstance(child, tirx.Stmt):
                stack.append(child)
    return loops


@pytest.fixture(scope="module")
def scheduled(model, target) -> tvm.IRModule:
    return get_pipeline(target)(_import(model))


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
    naive = tuning_pipeline(target)(_import(model))
    conv = next(f for gv, f in naive.functions_items() if "conv2d" in gv.name_hint)
    assert _loop_kinds(conv) == {tirx.ForKind.SERIAL}


def test_fp16_default_schedules_close_to_fp32(model, target, image, reference):
    out = _run(get_pipeline(target, "fp16")(_import(model)), target, image)
    assert _cos(out.astype(np.float32), reference) > 0.999


@pytest.mark.parametrize("channels, rows, lanes, expected", [
    (192, 14, 16, (7, 2, 16)),    # 7 rows x 2 zmm of 16 floats = 14 accumulators (at most 15)
    (48, 112, 16, (4, 3, 16)),
    (24, 56, 16, (4, 3, 8)),      # 24 channels: 8-wide vectors, no lane wasted
    (1000, 1, 16, (1, 1, 8)),
    (7, 7, 16, (7, 1, 1)),        # odd channel count: no vector, still a row tile
])
def test_register_tile(channels, rows, lanes, expected):
    tile = register_tile(channels, rows, lanes)
    assert tile == expected
    r, vecs, width = tile
    assert rows % r == 0 and channels % (vecs * width) == 0


@pytest.mark.parametrize("width, inner", [(24, [(tirx.ForKind.UNROLLED, 3), (tirx.ForKind.VECTORIZED, 8)]),
                                          (226, [(tirx.ForKind.SERIAL, 226), (tirx.ForKind.UNROLLED, 3)])])
def test_rgb_transpose_vectorizes_across_the_width(target, width, inner):
    """NCHW -> NHWC with 3 channels: vectors along W read each colour plane contiguously, the
    channel loop is unrolled (vectors across (W, C) would need a div / mod by 3 per lane). A width no
    vector divides (226: A0's padded input) stays a loop over W around the unrolled channels, for LLVM
    to vectorize (as vectors across (W, C) it took 6.7x the time)."""
    from tvm import te

    image = te.placeholder((2, 3, 20, width), "float32", name="image")
    out = te.compute((2, 20, width, 3), lambda n, h, w, c: image[n, c, h, w] * 2.0, name="nhwc")
    sch = s_tir.Schedule(te.create_prim_func([image, out]))
    schedule_injective(sch, sch.get_sblock("nhwc"), 16)
    loops = [sch.get(lp) for lp in sch.get_loops(sch.get_sblock("nhwc"))]
    assert [(lp.kind, int(lp.extent)) for lp in loops[-2:]] == inner
    assert loops[0].kind == tirx.ForKind.PARALLEL
    x = np.random.default_rng(3).standard_normal((2, 3, 20, width)).astype(np.float32)
    y = tvm.runtime.tensor(np.zeros((2, 20, width, 3), np.float32))
    tvm.tirx.build(sch.mod, target)["main"](tvm.runtime.tensor(x), y)
    np.testing.assert_array_equal(y.numpy(), x.transpose(0, 2, 3, 1) * 2)


def _axis_values(script: str, block: str, axis: str) -> list[int]:
    """Block iter `axis` of `block` at each iteration of the kernel's parallel loop (inner loops at
    0), evaluated from the TVMScript's binding."""
    par = re.search(r"for (\w+) in T.parallel\(T.int64\((\d+)\)\)", script)
    body = script[script.index(f'T.sblock("{block}")'):]
    expr = re.sub(r"T.int64\((\d+)\)", r"\1", re.search(rf"{axis} = T.axis.spatial\(T.int64\(\d+\), (.+)\)\n",
                                                          body).group(1))
    names = set(re.findall(r"[A-Za-z_]\w*", expr))
    return [eval(expr, {}, {n: i if n == par.group(1) else 0 for n in names}) for i in range(int(par.group(2)))]


def _single_kernel(call: relax.Expr, x: relax.Var, target) -> str:
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(call)
        bb.emit_func_output(out)
    scheduled = get_pipeline(target)(bb.get())
    kernels = [f.script() for _, f in scheduled.functions_items() if isinstance(f, tirx.PrimFunc)]
    return next(k for k in kernels if "T.parallel" in k)


def test_each_core_computes_what_the_next_kernel_reads_on_it(target):
    """The parallel loop runs as one contiguous range per core, so its leading axis decides the
    split: a batched matmul (Winograd's 16 positions) by batch, a conv by output rows while each
    core can read the whole weight, by channel blocks beyond FLOAT_SPLIT_BYTES (float kernels)."""
    rng = np.random.default_rng(12)
    x = relax.Var("x", relax.TensorType((16, 49, 192), "float32"))
    mm = _single_kernel(relax.op.matmul(x, relax.const(rng.random((16, 192, 192), "float32"))), x, target)
    batch = _axis_values(mm, "matmul_update", "v_i0")
    assert set(batch[:len(batch) // 2]) == set(range(8)), batch

    def conv(cin: int, cout: int) -> str:
        data = relax.Var("x", relax.TensorType((1, cin, 7, 7), "float32"))
        weight = relax.const(rng.random((cout, cin, 1, 1), "float32"))
        return _single_kernel(relax.op.nn.conv2d(data, weight), data, target)

    assert 480 * 80 * 4 <= FLOAT_SPLIT_BYTES < 1152 * 192 * 4
    small, big = conv(80, 480), conv(192, 1152)  # weights 150 KB and 0.9 MB, both > the 7x7 input
    rows = _axis_values(small, "conv2d_nhwc_update", "v_yy")
    assert rows == sorted(rows) and rows[0] == 0 and rows[-1] == 6, rows
    channels = _axis_values(big, "conv2d_nhwc_update", "v_ff")
    assert channels == sorted(channels) and channels[-1] >= 1120, channels
    assert _axis_values(big, "conv2d_nhwc_update", "v_yy") != rows


def _records_per_workload(work_dir) -> dict[int, list[bool]]:
    """workload line -> is-default flag of each of its records."""
    import json

    from tvmzoo.compile.records import RECORD_FILE

    per: dict[int, list[bool]] = {}
    for line in (work_dir / RECORD_FILE).read_text().splitlines():
        index, (trace, *_rest) = json.loads(line)
        per.setdefault(index, []).append(not any(inst[0] == "EnterPostproc" for inst in trace[0]))
    return per


@pytest.mark.slow
def test_tuning_records_apply_and_match(model, target, image, reference, tmp_path, caplog):
    """tune() also measures the default schedule of every tuned workload and commits it as a
    record; the records apply and match ONNX Runtime; compacted records still build, and a
    0-trial tune() re-measures the defaults in place."""
    pytest.importorskip("xgboost")
    import logging

    from tvmzoo.compile.records import RECORD_FILE, WORKLOAD_FILE, compact_records
    from tvmzoo.compile.tuning import tune

    n_records = tune(_import(model), target, tmp_path, max_trials_global=2, max_trials_per_task=1, seed=0)
    assert (tmp_path / RECORD_FILE).is_file() and n_records >= 1
    n_workloads = len((tmp_path / WORKLOAD_FILE).read_text().splitlines())
    per = _records_per_workload(tmp_path)
    # every tuned kind of kernel (conv, matmul, pooling, mean) has one default-schedule record
    assert len(per) == n_workloads >= 5
    assert all(flags.count(True) == 1 for flags in per.values()), per
    # the 2 MetaSchedule trials survive compaction (at most one tuned record per workload)
    assert 1 <= sum(flags.count(False) for flags in per.values()) <= 2
    assert all(len(flags) <= 2 for flags in per.values())

    with caplog.at_level(logging.DEBUG, logger="tvmzoo.compile.records"):
        mod, kernels = run_pipeline(_import(model), target, records=tmp_path)
    n_tuned, n_fallback = kernels.tuned, kernels.default
    won = [r.getMessage() for r in caplog.records if " schedule won (" in r.getMessage()]
    assert len(won) == n_workloads
    # only tuned winners come from the records; where the default won, today's default applies
    assert n_tuned == len([m for m in won if "tuned schedule won" in m])
    assert n_tuned + n_fallback == len(_kernels(mod)) and n_fallback >= 1
    out = _run(mod, target, image)
    assert _cos(out, reference) > 0.99999
    np.testing.assert_allclose(out, reference, rtol=1e-4, atol=1e-4)

    # a later measurement of the same schedule replaces the earlier one
    lines = (tmp_path / RECORD_FILE).read_text().splitlines()
    (tmp_path / RECORD_FILE).write_text("\n".join(lines + lines) + "\n")
    assert compact_records(tmp_path) == (2 * len(lines), len(lines))

    # a later tune() into the folder (here with 0 trials: only the default schedules re-measured,
    # as after an upgrade) keeps one default and at most one tuned record per workload, and the
    # records still build. Resuming with trials is MetaSchedule's own (tune_relax loads this
    # database); not repeated here (it would add ~20 s).
    tune(_import(model), target, tmp_path, max_trials_global=0)
    assert _records_per_workload(tmp_path).keys() == per.keys()
    assert all(len(flags) <= 2 and flags.count(True) == 1 for flags in _records_per_workload(tmp_path).values())
    mod = get_pipeline(target, records=tmp_path)(_import(model))
    assert _cos(_run(mod, target, image), reference) > 0.99999


def test_compact_records_keeps_best_tuned_and_newest_default(tmp_path):
    """JSON-level: per workload the fastest MetaSchedule record, the newest default record;
    failed runs dropped; the workload file untouched."""
    import json

    from tvmzoo.compile.records import RECORD_FILE, WORKLOAD_FILE, compact_records

    tuned = [[["EnterPostproc", [], [], []]], []]
    default = [[["GetSBlock", [], ["root", "main"], ["b0"]]], []]
    other_default = [[["GetSBlock", [], ["conv", "main"], ["b0"]]], []]

    def rec(index, trace, secs):
        return [index, [trace, secs, {"kind": "llvm"}, []]]

    tuned_b = [[["Split", [], [], []], ["EnterPostproc", [], [], []]], []]
    records = [rec(0, tuned, [2e-3]), rec(0, tuned_b, [1e-3]), rec(0, default, [5e-4]),
               rec(0, other_default, [1e-4]),   # an older default (rules changed since): superseded
               rec(0, default, [7e-4]),          # re-measured: the newest wins
               rec(1, tuned, [1e10]),            # failed run
               rec(1, tuned, [3e-3])]
    (tmp_path / WORKLOAD_FILE).write_text('["1","x"]\n["2","y"]\n')
    (tmp_path / RECORD_FILE).write_text("".join(json.dumps(r) + "\n" for r in records))
    assert compact_records(tmp_path) == (7, 3)
    kept = [json.loads(line) for line in (tmp_path / RECORD_FILE).read_text().splitlines()]
    assert kept == [rec(0, tuned_b, [1e-3]), rec(0, default, [7e-4]), rec(1, tuned, [3e-3])]
    assert (tmp_path / WORKLOAD_FILE).read_text() == '["1","x"]\n["2","y"]\n'


# ---------------------------------------------------------------- int8: VNNI kernels

INT8_SHAPE = (1, 3, 24, 24)


def int8_net() -> onnx.ModelProto:
    """stem (3 input channels, padded to 4 for VNNI), depthwise, 1x1 and 3x3 convs whose channels
    fit the 16- and 8-lane VNNI kernels, a residual add, GAP, Gemm."""
    rng = np.random.default_rng(3)
    g = GraphBuilder("int8_small")
    x = g.relu(g.conv(g.input(list(INT8_SHAPE)), _w(rng, 16, 3, 3, 3), _w(rng, 16), "stem"))
    x = g.relu6(g.conv(x, _w(rng, 16, 1, 3, 3), _w(rng, 16), "dw", groups=16))
    x = g.relu(g.conv(x, _w(rng, 32, 16, 3, 3), _w(rng, 32), "c3x3", stride=2))
    x = g.conv(x, _w(rng, 24, 32, 1, 1), _w(rng, 24), "pw24")          # 8-lane kernel, no ReLU
    x = g.add(x, g.conv(x, _w(rng, 24, 24, 1, 1), _w(rng, 24), "pw_res"))  # input zero point != 0
    x = g.flatten(g.global_avg_pool(x))
    g.output(g.gemm(x, _w(rng, 16, 24), _w(rng, 16), "fc"), [1, 16])
    return g.build()


def _int8_lowered(target, n_calib: int) -> tuple[onnx.ModelProto, tvm.IRModule]:
    """int8_net calibrated on random inputs -> QDQ ONNX and its Relax module as imported."""
    from tvmzoo.config import Quantize
    from tvmzoo.compile.quant.quantize import quantize_model

    rng = np.random.default_rng(4)
    calib = [rng.standard_normal(INT8_SHAPE).astype(np.float32) for _ in range(n_calib)]
    qdq = quantize_model(int8_net(), calib, Quantize(keep_first_last_float=False))
    return qdq, from_onnx(qdq, shape_dict={"input": list(INT8_SHAPE)}, keep_params_in_input=False)


@pytest.fixture(scope="module")
def vnni_target() -> tvm.target.Target:
    """The host's target without AMX: the VNNI kernels (tests/test_amx.py covers the AMX ones)."""
    spec = resolve_target(None)
    return tvm.target.Target({**spec, "mattr": [*spec.get("mattr", []), "-amx-int8", "-amx-bf16", "-amx-tile"]})


@pytest.fixture(scope="module")
def int8_build(vnni_target):
    qdq, mod = _int8_lowered(vnni_target, 8)
    return qdq, get_pipeline(vnni_target, "int8")(mod)


def _vnni_host() -> bool:
    from tvmzoo.run.host import host_cpu_flags

    return "avx512_vnni" in host_cpu_flags()


def _kernels(mod: tvm.IRModule) -> dict[str, str]:
    return {gv.name_hint: f.script() for gv, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)}


@pytest.mark.skipif(not _vnni_host(), reason="host has no AVX512-VNNI")
def test_int8_convs_and_matmul_run_on_vnni_and_match_onnxruntime(int8_build, vnni_target):
    qdq, mod, target = *int8_build, vnni_target
    vnni = [name for name, text in _kernels(mod).items() if "vpdpbusd" in text]
    # stem (RGB + a zero channel) and c3x3 (16 lanes), pw24 and pw_res (8 lanes), fc: every dense layer
    assert len([n for n in vnni if "conv2d" in n]) == 4 and len([n for n in vnni if "matmul" in n]) == 1, vnni
    ex = tvm.compile(mod, target)
    assert "vpdpbusd" in ex.mod.imports[0].inspect_source("asm")
    # the weight repacking ran at build time: no kernel still carries the layout-rewrite block
    assert not any("layout_rewrite_preproc" in text for text in _kernels(mod).values())
    from tvmzoo.compile.quant.quantize import run_ort

    vm = relax.VirtualMachine(ex, tvm.cpu())
    images = [np.random.default_rng(10 + i).standard_normal(INT8_SHAPE).astype(np.float32) for i in range(4)]
    out = np.concatenate([vm["main"](tvm.runtime.tensor(x)).numpy() for x in images])
    ref = run_ort(qdq, images)
    for o, r in zip(out, ref):
        assert _cos(o, r) > 0.9999
    assert (out.argmax(1) == ref.argmax(1)).all()


def test_int8_depthwise_gets_a_vector_schedule(int8_build):
    """No VNNI for it (no channel reduction): still parallel and vectorized."""
    _, mod = int8_build
    kernels = {gv.name_hint: f for gv, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)}
    convs = {n: f for n, f in kernels.items() if "conv2d" in n and "vpdpbusd" not in f.script()}
    assert len(convs) == 1, list(kernels)  # depthwise
    for name, func in convs.items():
        kinds = _loop_kinds(func)
        assert {tirx.ForKind.PARALLEL, tirx.ForKind.VECTORIZED} <= kinds, f"{name}:\n{func.script()}"


def _qdq_module():
    from tvm.script import relax as R

    @tvm.script.ir_module
    class QDQ:
        @R.function
        def main(x: R.Tensor((4, 256), "float32")):
            q = R.quantize(x, R.const(0.05, "float32"), R.const(7, "uint8"), axis=1, out_dtype="uint8")
            d = R.dequantize(q, R.const(0.05, "float32"), R.const(7, "uint8"), axis=1, out_dtype="float32")
            s = R.quantize(x, R.const(0.1, "float32"), R.const(-3, "int8"), axis=1, out_dtype="int8")
            return (q, d, s)

    return QDQ


def _run_vm(mod, target, x: np.ndarray) -> list[np.ndarray]:
    vm = relax.VirtualMachine(tvm.compile(mod, target), tvm.cpu())
    return [t.numpy() for t in vm["main"](tvm.runtime.tensor(x))]


def test_quantize_as_elementwise_ops_is_bit_identical(target):
    """qdq_to_elementwise rewrites per-tensor quantize / dequantize into elementwise ops (so they fuse
    into conv epilogues): same results as TVM's own legalization, ties and saturation included."""
    rng = np.random.default_rng(5)
    x = np.concatenate([rng.uniform(-20, 20, (2, 256)), (np.arange(-256, 256).reshape(2, 256) + 0.5) * 0.05])
    x = x.astype(np.float32)
    rewritten = qdq_to_elementwise(_qdq_module())
    assert "R.quantize" not in rewritten.script() and "R.dequantize" not in rewritten.script()
    for a, b in zip(_run_vm(_qdq_module(), target, x), _run_vm(rewritten, target, x)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)


def test_divisions_by_constants_become_multiplications(target):
    """canonicalize quantizes with x * (1 / scale): no divide left, and a quantized value moves by at
    most one step, only where x / scale lies within rounding error of a .5 tie (rare on real data)."""
    x = np.random.default_rng(6).uniform(-20, 20, (4, 256)).astype(np.float32)
    canonical = canonicalize(_qdq_module())
    assert "R.divide" not in canonical.script() and "R.multiply" in canonical.script()
    assert divide_as_multiply(canonical).script() == canonical.script()  # idempotent
    for a, b in zip(_run_vm(_qdq_module(), target, x), _run_vm(canonical, target, x)):
        assert a.dtype == b.dtype
        if a.dtype != np.float32:
            diff = np.abs(a.astype(np.int32) - b.astype(np.int32))
            assert diff.max() <= 1 and np.count_nonzero(diff) <= 2, diff.max()


def test_requantize_folds_into_one_multiply_add(target):
    """An int8 conv's epilogue (float(acc - zp term) * s + bias) / s_y becomes float(acc) * q + b':
    the same values to float rounding, one subtract and one multiply fewer per element."""
    rng = np.random.default_rng(8)
    corr, scale, bias = (rng.integers(-5000, 5000, 8).astype(np.int32), rng.uniform(1e-4, 1e-3, 8).astype(np.float32),
                         rng.uniform(-1, 1, 8).astype(np.float32))
    bb = relax.BlockBuilder()
    acc = relax.Var("acc", relax.TensorType((64, 8), "int32"))
    with bb.function("main", [acc]):
        x = relax.op.astype(relax.op.subtract(acc, relax.const(corr)), "float32")
        y = relax.op.add(relax.op.multiply(x, relax.const(scale)), relax.const(bias))
        bb.emit_func_output(bb.emit(relax.op.multiply(y, relax.const(np.float32(1 / 0.02)))))
    mod = bb.get()
    folded = fold_requantize(mod)
    assert folded.script().count("R.multiply") == 1 and "R.subtract" not in folded.script()
    a = rng.integers(-2_000_000, 2_000_000, (64, 8)).astype(np.int32)
    want = ((a - corr).astype(np.float64) * scale + bias) / 0.02
    for m in (mod, folded):
        out = relax.VirtualMachine(tvm.compile(m, target), tvm.cpu())["main"](tvm.runtime.tensor(a)).numpy()
        np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-3)


def _int8_depthwise(kernel: int, w: np.ndarray) -> tvm.IRModule:
    """float(conv2d(x_u8, w_i8 -> int32)), depthwise, as lower_int8 emits it."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, w.shape[0], 12, 12), "uint8"))
    with bb.function("main", [x]):
        with bb.dataflow():
            acc = relax.op.nn.conv2d(x, relax.const(w), padding=[kernel // 2] * 4, groups=w.shape[0],
                                     out_dtype="int32")
            out = bb.emit_output(relax.op.astype(acc, "float32"))
        bb.emit_func_output(out)
    return bb.get()


def test_int8_depthwise_runs_exactly_in_float(target):
    """Depthwise int8 convs compute on float32 FMAs: bit-identical sums (every partial sum of uint8 x
    int8 products stays below 2^24), checked against numpy's int64 sums at the extremes (255 x -128,
    255 x 127 on every tap). Kernels whose sums could pass 2^24 stay int32."""
    rng = np.random.default_rng(13)
    w = rng.integers(-128, 128, (16, 1, 5, 5)).astype(np.int8)
    w[0], w[1] = -128, 127
    mod = _int8_depthwise(5, w)
    assert "int32" not in depthwise_int8_as_float(mod).script()
    x = rng.integers(0, 256, (1, 16, 12, 12)).astype(np.uint8)
    x[:, :2] = 255
    padded = np.pad(x.astype(np.int64), [(0, 0), (0, 0), (2, 2), (2, 2)])
    want = sum(padded[:, :, i:i + 12, j:j + 12] * w[:, 0, i, j].astype(np.int64)[None, :, None, None]
               for i in range(5) for j in range(5))
    scheduled = get_pipeline(target)(mod)
    assert _tap_loop_kinds(scheduled) == {"ry": tirx.ForKind.SERIAL, "rx": tirx.ForKind.UNROLLED}
    vm = relax.VirtualMachine(tvm.compile(scheduled, target), tvm.cpu())
    out = vm["main"](tvm.runtime.tensor(x)).numpy()
    np.testing.assert_array_equal(out, want.astype(np.float32))
    huge = np.full((4, 1, 23, 23), 127, np.int8)  # 255 * 127 * 529 > 2^24
    assert "int32" in depthwise_int8_as_float(_int8_depthwise(23, huge)).script()


def _tap_loop_kinds(mod: tvm.IRModule) -> dict[str, tirx.ForKind]:
    """How the depthwise conv kernel of `mod` runs its loops over the kernel rows (ry) and columns (rx)."""
    kinds = {loop.loop_var.name: tirx.ForKind(int(loop.kind)) for _, func in mod.functions_items()
             if isinstance(func, tirx.PrimFunc) for loop in _for_loops(func) if loop.loop_var.name in ("ry", "rx")}
    assert len(kinds) == 2, kinds
    return kinds


def test_float_depthwise_unrolls_its_kernel_columns(target):
    """ScheduleDepthwise (tvmzoo.compile.schedules.depthwise): kernel rows a loop, columns unrolled inside the
    tile's pixels (each input vector loaded once for the taps that read it); tests/test_depthwise.py."""
    w = np.random.default_rng(3).standard_normal((16, 1, 5, 5)).astype(np.float32)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 16, 12, 12), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.nn.conv2d(x, relax.const(w), padding=[2] * 4, groups=16))
        bb.emit_func_output(out)
    assert _tap_loop_kinds(get_pipeline(target)(bb.get())) == {"ry": tirx.ForKind.SERIAL, "rx": tirx.ForKind.UNROLLED}


def test_avx512_targets_build_full_width_vectors():
    """LLVM's tuning for AVX-512 CPUs prefers 256-bit vectors and would split our 512-bit ones."""
    assert resolve_target("llvm -mcpu=sapphirerapids")["mattr"] == [WIDE_VECTORS]
    assert resolve_target({"kind": "llvm", "mcpu": "skylake-avx512"})["mattr"] == [WIDE_VECTORS]
    assert "mattr" not in resolve_target("llvm -mcpu=haswell")
    assert resolve_target("llvm -mcpu=cascadelake -mattr=+avx512f")["mattr"] == ["+avx512f"]  # the user's choice
    if "avx512f" not in host_cpu_flags():
        pytest.skip("host has no AVX-512")

    @T.prim_func(s_tir=True)
    def requantize(a: T.Buffer((4096,), "int32"), b: T.Buffer((4096,), "uint8")):
        for i in range(128):
            for j in T.vectorized(32):
                with T.sblock("b"):
                    v = T.axis.spatial(4096, i * 32 + j)
                    b[v] = T.Cast("uint8", T.max(T.min(T.nearbyint(T.Cast("float32", a[v]) * T.float32(0.1)),
                                                       T.float32(255)), T.float32(0)))

    asm = tvm.tirx.build(tvm.IRModule({"requantize": requantize}), tvm.target.Target(resolve_target(None)))
    registers = set(re.findall(r"\tv(?:cvtdq2ps|mulps)\t.*?%([xyz]mm)", asm.inspect_source("asm")))
    assert registers == {"zmm"}, registers  # LLVM's default here: ymm halves


def _without_preproc_flag(script: str) -> str:
    return re.sub(r'"meta_schedule.layout_rewrite_preproc": [^,}]+', "", script)


def test_default_schedule_traces_replay_from_the_database(target, tmp_path):
    """Default schedules committed as MetaSchedule records (as tvmzoo.compile.seeding.seed_default_schedules
    does, to measure them against tuned ones) replay from the JSON database into the same kernels,
    VNNI tensorization and int8 weight repacking included. ApplyTuningRecords does not pin them: where
    a default record wins, the kernel gets the current default schedule (same build, bit for bit)."""
    from tvm.s_tir import meta_schedule as ms

    from tvmzoo.compile.records import is_default_trace
    from tvmzoo.compile.schedules import default_schedule

    _, mod = _int8_lowered(target, 4)
    normalize = tvm.get_global_func("tvm.s_tir.meta_schedule.normalize_mod")
    db = ms.database.JSONDatabase(work_dir=str(tmp_path))
    seeded, expected = [], []
    for gv, func in tuning_pipeline(target, "int8")(mod).functions_items():
        if isinstance(func, tirx.PrimFunc) and ("conv2d" in gv.name_hint or "matmul" in gv.name_hint):
            workload = db.commit_workload(normalize(func))
            sch = default_schedule(workload.mod["main"], target)
            assert sch is not None and is_default_trace(sch.trace)
            db.commit_tuning_record(ms.database.TuningRecord(sch.trace, workload, [1e-3], target, []))
            seeded.append(any(dot in sch.mod.script() for dot in ("vpdpbusd", "tdpbusd")))  # VNNI, AMX tiles
            expected.append((workload.mod, sch.mod))
    assert sum(seeded) >= 4, seeded  # stem, c3x3 (AMX where the host has it), pw24, pw_res (VNNI)
    del db
    db = ms.database.JSONDatabase(work_dir=str(tmp_path))  # read back from the files
    for workload_mod, scheduled in expected:
        stored = db.get_top_k(db.commit_workload(workload_mod), 1)[0].trace
        replayed = s_tir.Schedule(workload_mod)
        stored.apply_to_schedule(replayed, remove_postproc=False)
        # the JSON round trip turns the layout-rewrite annotation's True into 1: compare modulo that
        assert _without_preproc_flag(replayed.mod.script()) == _without_preproc_flag(scheduled.script())
    del db
    from_records, kernels = run_pipeline(mod, target, "int8", tmp_path)
    assert kernels.tuned == 0
    assert not any("layout_rewrite_preproc" in text for text in _kernels(from_records).values())
    x = tvm.runtime.tensor(np.random.default_rng(6).standard_normal(INT8_SHAPE).astype(np.float32))
    outs = [relax.VirtualMachine(tvm.compile(m, target), tvm.cpu())["main"](x).numpy()
            for m in (from_records, get_pipeline(target, "int8")(mod))]
    np.testing.assert_array_equal(*outs)
