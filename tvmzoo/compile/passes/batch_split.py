"""Batch-N modules run their high-resolution layers one image at a time.

A kernel over the whole batch writes all N images' activations before the next kernel reads any:
EfficientNet-Lite0's 112x112x96 expansion is 4.8 MB per image in fp32, 38 MB at batch 8, so at
batch 8 every early kernel streams its input and output through L3 instead of the cores' 2 MB
L2s, and runs at half its batch-1 speed per image. The deep layers are the other way round: small
activations, large weights that a batch reuses. `split_batch_prefix` therefore rewrites

    y = f(x)  with x: [N, ...]         (f: the layers up to the last large activation)
into
    y = concat([f(x[0:1]), ..., f(x[N-1:N])])

and leaves the rest batched: the prefix ends at the first cut after the last conv whose input, for
the whole batch, is larger than an L2 (BATCHED_BYTES), so the deep layers read their weights once
per batch and the run has fewer kernel calls (each a fork-join of the cores). It only cuts where a single tensor carries all that the rest needs
(the end of a block, after its residual add), and only through ops that treat the images
independently; the result is the same arithmetic, image by image.
"""
from __future__ import annotations

import itertools
import logging
import math

import tvm
from tvm import relax
from tvm.ir import IRModule

log = logging.getLogger(__name__)

SPLIT_BYTES = 2 << 20  # per image: an activation larger than a core's L2
# The layers after the last conv with a batched input larger than this run batched. Measured here:
# Lite0 at batch 8: its 7x7 stage batched, 17.5 -> 15.4 ms / image (min), median under load 61 -> 37.
BATCHED_BYTES = 2 << 20

# Ops that compute each image from that image alone (batch axis 0 in, batch axis 0 out).
PER_IMAGE_OPS = {f"relax.{name}" for name in (
    "nn.conv2d", "nn.max_pool2d", "nn.avg_pool2d", "nn.pad", "nn.relu", "nn.silu", "sigmoid", "clip",
    "add", "subtract", "multiply", "divide", "maximum", "minimum", "astype", "round", "floor", "ceil",
    "tanh", "exp")}


def _tensor_bytes(ty) -> int:
    if not isinstance(ty, relax.TensorType) or ty.shape is None \
            or not all(isinstance(d, tvm.tirx.IntImm) for d in ty.shape.values):
        return 0
    return math.prod(int(d) for d in ty.shape.values) * tvm.DataType(ty.dtype).bits // 8


def _conv_input_bytes(binding: relax.VarBinding) -> int:
    """The size of a conv's input: a tensor that is written to memory (an int8 conv's int32 sums and
    requantize arithmetic stay in registers, inside its fused kernel)."""
    value = binding.value
    if isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op) and value.op.name == "relax.nn.conv2d":
        return _tensor_bytes(value.args[0].ty)
    return 0


def _batch_of(ty) -> int:
    if not isinstance(ty, relax.TensorType) or ty.shape is None or ty.ndim < 1:
        return 0
    first = ty.shape.values[0]
    return int(first) if isinstance(first, tvm.tirx.IntImm) else 0


def _per_image(binding: relax.VarBinding, batch: int) -> bool:
    value = binding.value
    if not (isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op)):
        return False
    batch_first = value.op.name == "relax.permute_dims" and value.attrs.axes is not None \
        and int(value.attrs.axes[0]) == 0  # NCHW -> NHWC
    if value.op.name not in PER_IMAGE_OPS and not batch_first:
        return False
    if _batch_of(binding.var.ty) != batch:
        return False
    return all(_batch_of(a.ty) == batch for a in value.args if isinstance(a, relax.Var))  # else constants


def _used_vars(expr: relax.Expr) -> set[relax.Var]:
    used: set[relax.Var] = set()
    relax.analysis.post_order_visit(expr, lambda e: used.add(e) if isinstance(e, relax.Var) else None)
    return used


def prefix_cut(func: relax.Function) -> int:
    """Index of the last binding of the per-image prefix of `func`'s dataflow block, or -1."""
    params = list(func.params)
    if len(params) != 1 or not isinstance(func.body, relax.SeqExpr) or len(func.body.blocks) != 1:
        return -1
    batch = _batch_of(params[0].ty)
    if batch < 2:
        return -1
    bindings = list(func.body.blocks[0].bindings)
    prefix = list(itertools.takewhile(lambda b: _per_image(b, batch), bindings))
    sizes = [_conv_input_bytes(b) for b in prefix]  # 0 for a binding that is not a conv
    cuts = _cut_points(func, bindings, sizes, batch)
    if not cuts:
        return -1
    # the last cut before the conv after the last large one: that conv's epilogue stays with it
    last_large = max((i for i, size in enumerate(sizes) if size > BATCHED_BYTES), default=-1)
    next_conv = next((i for i, size in enumerate(sizes) if size and i > last_large), len(bindings))
    return max((c for c in cuts if last_large <= c < next_conv), default=cuts[-1])


def _cut_points(func: relax.Function, bindings: list, sizes: list[int], batch: int) -> list[int]:
    """The prefix's bindings (`sizes`: their conv input bytes) after which only their own result is live
    (the one tensor the per-image part would hand to the batched rest), from the first conv reading more
    than SPLIT_BYTES per image on."""
    last_use = {func.params[0]: -1}
    for i, b in enumerate(bindings):
        for v in _used_vars(b.value):
            last_use[v] = i
    for v in _used_vars(func.body.body):
        last_use[v] = len(bindings)
    cuts, live, big_seen = [], {func.params[0]}, False
    for i, (b, size) in enumerate(zip(bindings, sizes)):
        big_seen |= size // batch > SPLIT_BYTES
        live = {v for v in live | {b.var} if last_use.get(v, -1) > i}
        if live == {b.var} and big_seen:
            cuts.append(i)
    return cuts


def _split(mod: IRModule, func: relax.Function, cut: int) -> IRModule:
    """`main` calling a batch-1 function on each image for the bindings up to `cut` (one function,
    so its kernels are built once)."""
    x = func.params[0]
    bindings = list(func.body.blocks[0].bindings)
    batch = _batch_of(x.ty)
    lead = bindings[:1] if cut > 0 and _input_transpose(bindings, x) else []
    first = lead[0].var if lead else x
    image = relax.Var(first.name, relax.TensorType([1, *first.ty.shape.values[1:]], first.ty.dtype))
    bb = relax.BlockBuilder(IRModule({gv: f for gv, f in mod.functions_items() if gv.name_hint != "main"},
                                     attrs=mod.attrs))
    with bb.function("image_prefix", [image], private=True):
        with bb.dataflow():
            remap = {first: image}
            for b in bindings[len(lead):cut + 1]:
                emit = bb.emit_output if b is bindings[cut] else bb.emit
                remap[b.var] = emit(_rebuild(b.value, remap))
        bb.emit_func_output(remap[bindings[cut].var])
    prefix = bb.get().get_global_var("image_prefix")
    new_x = relax.Var(x.name, x.ty)
    outputs = _used_vars(func.body.body)
    attrs = {k: v for k, v in (func.attrs or {}).items() if k != "global_symbol"}
    with bb.function("main", [new_x], attrs=attrs):
        with bb.dataflow():
            images = []
            for n in range(batch):  # the input transpose reads the image in place (fused with its slice)
                one = bb.emit(relax.op.strided_slice(new_x, [0], [n], [n + 1]))
                one = bb.emit(_rebuild(lead[0].value, {x: one})) if lead else one
                images.append(bb.emit(relax.Call(prefix, [one])))
            remap = {}
            rest = [(bindings[cut], relax.op.concat(images, axis=0)), *((b, b.value) for b in bindings[cut + 1:])]
            for b, value in rest:  # the cut tensor may be the output itself (a fully convolutional net)
                remap[b.var] = (bb.emit_output if b.var in outputs else bb.emit)(_rebuild(value, remap))
        bb.emit_func_output(_rebuild(func.body.body, remap))
    return bb.get()


def _input_transpose(bindings: list, x: relax.Var) -> bool:
    """Is the first binding the input's NCHW -> NHWC transpose, and the only use of the input? Then `main`
    runs it on each image's slice, and FuseOps makes the two one kernel: 8 copies of the batch-8 input
    fewer (Lite0 fp32: 0.034 ms each)."""
    value = bindings[0].value
    return (isinstance(value, relax.Call) and getattr(value.op, "name", "") == "relax.permute_dims"
            and list(value.args) == [x] and all(x not in _used_vars(b.value) for b in bindings[1:]))


def _rebuild(expr: relax.Expr, remap: dict) -> relax.Expr:
    """`expr` with its variables replaced (shapes inferred again when emitted)."""
    if isinstance(expr, relax.Var):
        return remap.get(expr, expr)
    if isinstance(expr, relax.Call):
        return relax.Call(expr.op, [_rebuild(a, remap) for a in expr.args], expr.attrs, expr.ty_args)
    if isinstance(expr, relax.Tuple):
        return relax.Tuple([_rebuild(f, remap) for f in expr.fields])
    if isinstance(expr, relax.TupleGetItem):
        return relax.TupleGetItem(_rebuild(expr.tuple_value, remap), expr.index)
    return expr


@tvm.transform.module_pass(opt_level=0, name="SplitBatchPrefix")
def split_batch_prefix(mod: IRModule, _ctx: tvm.transform.PassContext) -> IRModule:
    """The per-image prefix of `main` (see the module docstring); modules at batch 1, with a symbolic
    batch or without a large early activation are returned unchanged."""
    func = mod["main"] if "main" in [gv.name_hint for gv in mod.get_global_vars()] else None
    if not isinstance(func, relax.Function):
        return mod
    cut = prefix_cut(func)
    if cut < 0:
        return mod
    out = _split(mod, func, cut)
    log.info("the first %d of %d ops run image by image", cut + 1, len(func.body.blocks[0].bindings))
    return out
