"""The high-resolution prefix of a batch-N module runs image by image: cut only at the end of a
block, only through per-image ops, and with the same results as the batched module."""
from __future__ import annotations

import os

import numpy as np
import pytest
import tvm
from tvm import relax

from tvmzoo.compile.passes import batch_split
from tvmzoo.compile.passes.batch_split import prefix_cut, split_batch_prefix
from tvmzoo.compile.pipeline import get_pipeline
from tvmzoo.compile.target import resolve_target

os.environ.setdefault("TVM_NUM_THREADS", "2")
BATCH, CHANNELS, SIZE = 3, 8, 24


def _mbconv_net(batch: int, blocks: int = 1, stem: bool = False) -> tvm.IRModule:
    """[3x3 stem conv ->] (expand 1x1 + relu -> depthwise 3x3 -> project 1x1 -> residual add) x blocks, a
    stride-2 conv between blocks -> flatten -> classifier: EfficientNet's shape, in NCHW as from ONNX."""
    rng = np.random.default_rng(0)

    def const(*shape):
        return relax.const(rng.standard_normal(shape).astype(np.float32) * 0.3)

    bb = relax.BlockBuilder()
    x = relax.Var("input", relax.TensorType((batch, CHANNELS, SIZE, SIZE), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            h = bb.emit(relax.op.nn.conv2d(x, const(CHANNELS, CHANNELS, 3, 3), padding=[1] * 4)) if stem else x
            for i in range(blocks):
                if i:
                    h = bb.emit(relax.op.nn.conv2d(h, const(CHANNELS, CHANNELS, 1, 1), strides=[2, 2]))
                e = bb.emit(relax.op.nn.relu(relax.op.nn.conv2d(h, const(4 * CHANNELS, CHANNELS, 1, 1))))
                e = bb.emit(relax.op.nn.conv2d(e, const(4 * CHANNELS, 1, 3, 3), padding=[1] * 4, groups=4 * CHANNELS))
                e = bb.emit(relax.op.nn.conv2d(e, const(CHANNELS, 4 * CHANNELS, 1, 1)))
                h = bb.emit(relax.op.add(e, h))
            size = SIZE >> (blocks - 1)
            flat = bb.emit(relax.op.reshape(h, (batch, CHANNELS * size * size)))
            out = bb.emit_output(relax.op.matmul(flat, const(CHANNELS * size * size, 10)))
        bb.emit_func_output(out)
    return bb.get()


@pytest.fixture
def small_split(monkeypatch):
    """Split at this test net's size: its expanded activation is 74 KB per image."""
    monkeypatch.setattr(batch_split, "SPLIT_BYTES", 16 << 10)
    monkeypatch.setattr(batch_split, "BATCHED_BYTES", 16 << 10)


def test_cut_at_the_end_of_the_block(small_split):
    mod = _mbconv_net(BATCH)
    bindings = list(mod["main"].body.blocks[0].bindings)
    ops = [b.value.op.name for b in bindings]
    cut = prefix_cut(mod["main"])
    assert ops[cut] == "relax.add" and ops[cut + 1] == "relax.reshape", ops  # not inside the residual block
    split = split_batch_prefix(mod)
    calls = [b.value for b in split["main"].body.blocks[0].bindings
             if isinstance(b.value, relax.Call) and isinstance(b.value.op, tvm.ir.GlobalVar)]
    assert len(calls) == BATCH and all(c.op.name_hint == "image_prefix" for c in calls)
    assert split["image_prefix"].params[0].ty.shape.values[0] == 1


def test_layers_whose_batch_fits_run_batched(small_split, monkeypatch):
    """The cut is the end of the last block with a batched conv input over BATCHED_BYTES (the first
    block's depthwise input: 74 KB per image here), not the end of the per-image ops (the second block)."""
    monkeypatch.setattr(batch_split, "BATCHED_BYTES", 100 << 10)
    mod = _mbconv_net(BATCH, blocks=2)
    ops = [b.value.op.name for b in mod["main"].body.blocks[0].bindings]
    cut = prefix_cut(mod["main"])
    assert ops.count("relax.add") == 2 and cut == ops.index("relax.add"), (cut, ops)
    monkeypatch.setattr(batch_split, "BATCHED_BYTES", 1 << 10)
    assert cut < prefix_cut(mod["main"]) == len(ops) - 3  # every block image by image: up to the second add


def test_modules_without_a_large_early_activation_stay_batched(small_split, monkeypatch):
    assert prefix_cut(_mbconv_net(1)["main"]) == -1                      # batch 1
    monkeypatch.setattr(batch_split, "SPLIT_BYTES", 1 << 30)
    assert prefix_cut(_mbconv_net(BATCH)["main"]) == -1                  # nothing large


@pytest.mark.parametrize("stem", [False, True])  # with a stem the input transpose moves to `main`
def test_split_module_computes_the_same(small_split, monkeypatch, stem):
    """Bit-identical to the batched build: the same kernels' arithmetic, image by image."""
    target = tvm.target.Target(resolve_target(None))
    x = np.random.default_rng(1).standard_normal((BATCH, CHANNELS, SIZE, SIZE)).astype(np.float32)
    split = get_pipeline(target)(_mbconv_net(BATCH, stem=stem))
    assert "image_prefix" in [gv.name_hint for gv in split.get_global_vars()]
    monkeypatch.setattr(batch_split, "SPLIT_BYTES", 1 << 30)
    batched = get_pipeline(target)(_mbconv_net(BATCH, stem=stem))
    assert "image_prefix" not in [gv.name_hint for gv in batched.get_global_vars()]
    outs = [relax.VirtualMachine(tvm.compile(m, target), tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
            for m in (split, batched)]
    np.testing.assert_array_equal(outs[0], outs[1])
    assert np.abs(outs[0]).max() > 0


def test_a_fully_convolutional_net_splits_whole(small_split):
    """Nothing after the cut: the concatenated images are the output."""
    target = tvm.target.Target(resolve_target(None))
    w = relax.const(np.random.default_rng(2).standard_normal((16, CHANNELS, 3, 3)).astype(np.float32))
    bb = relax.BlockBuilder()
    x = relax.Var("input", relax.TensorType((BATCH, CHANNELS, SIZE, SIZE), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.nn.relu(relax.op.nn.conv2d(x, w, padding=[1] * 4)))
        bb.emit_func_output(out)
    mod = bb.get()
    assert prefix_cut(mod["main"]) == 1
    image = np.random.default_rng(3).standard_normal((BATCH, CHANNELS, SIZE, SIZE)).astype(np.float32)
    split = get_pipeline(target)(mod)
    assert "image_prefix" in [gv.name_hint for gv in split.get_global_vars()]
    vm = relax.VirtualMachine(tvm.compile(split, target), tvm.cpu())
    out = vm["main"](tvm.runtime.tensor(image)).numpy()
    ref = relax.VirtualMachine(tvm.compile(mod, target), tvm.cpu())["main"](tvm.runtime.tensor(image)).numpy()
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_the_input_transpose_reads_each_image_in_place(small_split):
    """Each image's slice of the NCHW batch and its transpose to NHWC are one kernel (not a copy, then a
    transpose of the copy); the per-image function starts at the stem conv."""
    mod = get_pipeline(tvm.target.Target(resolve_target(None)))(_mbconv_net(BATCH, stem=True))
    kernels = [gv.name_hint for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    slices = [k for k in kernels if "strided_slice" in k]
    assert len(slices) == BATCH and all("transpose" in k for k in slices), kernels
    assert mod["image_prefix"].params[0].ty.shape.values[-1] == CHANNELS  # NHWC
