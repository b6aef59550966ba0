"""Relax graph passes of the import and layout phases (tvmzoo.compile.pipeline): `canonicalize`
(inference forms, Clip and per-tensor quantize / dequantize as elementwise ops, divisions by
constants as multiplications, int8 requantize folded to one multiply-add), the int8 RGB stem's
fourth channel (`pad_int8_channels`) and float convs widened to whole vector registers (`pad_conv_lanes`)."""
from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.ir import IRModule
from tvm.relax.dpl import is_const, is_op, rewrite_call, wildcard
from tvm.target import Target

from ..schedules.base import vector_lanes
from ..schedules.loops import vector_width


@relax.expr_functor.mutator
class _ClampToRelaxOps(relax.PyExprMutator):
    """ONNX Clip imports as call_tir(maximum/minimum TE kernels) with a 1-element constant bound.
    Those are opaque to ConvertLayout (it wraps them in transposes, which also stops conv+clip
    fusion), so turn them back into R.maximum / R.minimum with a scalar constant."""

    _OPS = {"maximum": relax.op.maximum, "minimum": relax.op.minimum}

    def __init__(self, mod: IRModule) -> None:
        super().__init__(mod)
        self.mod_ = mod

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if call.op != tvm.ir.Op.get("relax.call_tir"):
            return call
        name = call.args[0].name_hint.rstrip("0123456789_")
        args = call.args[1].fields
        if name not in self._OPS or len(args) != 2 or not isinstance(args[1], tvm.ir.Constant):
            return call
        bound = args[1].value.numpy()
        if bound.size != 1:
            return call
        scalar = relax.const(bound.reshape(()), str(bound.dtype))
        return self._OPS[name](args[0], scalar)


def _mutator_pass(name: str, mutator_cls, dce: bool = False) -> tvm.transform.Pass:
    """A Relax function pass running `mutator_cls(mod)` over each function (then dead code out)."""
    def rewrite(func: relax.Function, mod: IRModule, _ctx) -> relax.Function:
        return mutator_cls(mod).visit_expr(func)

    fpass = relax.transform.function_pass(rewrite, opt_level=0, name=name)
    return tvm.transform.Sequential([fpass, relax.transform.DeadCodeElimination()], name=name) if dce else fpass


clamp_to_relax_ops = _mutator_pass("ClampToRelaxOps", _ClampToRelaxOps, dce=True)


def _scalar_const(expr) -> np.ndarray | None:
    if isinstance(expr, tvm.ir.Constant) and expr.value.numpy().size == 1:
        return expr.value.numpy().reshape(())
    return None


@relax.expr_functor.mutator
class _QdqToElementwise(relax.PyExprMutator):
    """Per-tensor quantize / dequantize -> the elementwise ops their legalization computes
    (same ops, same order: bit-identical). ConvertLayout has no layout rule for relax.quantize,
    so it fences each one with NHWC -> NCHW -> NHWC transposes in its own kernel; as elementwise
    ops they follow the layout and fuse into the int8 conv's epilogue (one uint8 store)."""

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        name = getattr(call.op, "name", "")
        if name not in ("relax.quantize", "relax.dequantize"):
            return call
        data, scale, zp = call.args
        s, z = _scalar_const(scale), _scalar_const(zp)
        if s is None or z is None or str(s.dtype) != "float32":
            return call
        out_dtype = str(call.attrs.out_dtype)
        if name == "relax.quantize":
            if out_dtype not in ("uint8", "int8") or str(data.ty.dtype) != "float32":
                return call
            info = np.iinfo(out_dtype)
            x = relax.op.add(relax.op.round(relax.op.divide(data, relax.const(s, "float32"))),
                             relax.const(np.float32(z), "float32"))
            # clip as minimum / maximum: ConvertLayout has no layout rule for relax.clip either
            x = relax.op.minimum(x, relax.const(np.float32(info.max), "float32"))
            x = relax.op.maximum(x, relax.const(np.float32(info.min), "float32"))
            return relax.op.astype(x, out_dtype)
        if out_dtype != "float32" or str(data.ty.dtype) not in ("uint8", "int8"):
            return call
        x = relax.op.subtract(relax.op.astype(data, "int32"), relax.const(np.int32(z), "int32"))
        return relax.op.multiply(relax.op.astype(x, "float32"), relax.const(s, "float32"))


qdq_to_elementwise = _mutator_pass("QdqToElementwise", _QdqToElementwise)


@relax.expr_functor.mutator
class _DivideAsMultiply(relax.PyExprMutator):
    """x / c -> x * (1 / c) for a float32 constant c. A vector divide costs ~20x a multiply: as the
    requantize of every int8 conv epilogue it took more cycles than the conv's VNNI dot products.
    Results move by at most an ulp before rounding: ORT's QLinearConv requantizes by multiplying too."""

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if getattr(call.op, "name", "") != "relax.divide" or not isinstance(call.args[1], tvm.ir.Constant):
            return call
        divisor = call.args[1].value.numpy()
        if divisor.dtype != np.float32 or not np.all(np.isfinite(divisor)) or np.any(divisor == 0):
            return call
        return relax.op.multiply(call.args[0], relax.const(np.float32(1) / divisor, "float32"))


divide_as_multiply = _mutator_pass("DivideAsMultiply", _DivideAsMultiply)


def _pattern_pass(name: str, make) -> tvm.transform.Pass:
    """A Relax function pass: `make()` gives (pattern, rewrite(call, match)), applied to every
    function with relax.dpl.rewrite_call; then dead code out."""
    def run(func: relax.Function, _mod: IRModule, _ctx) -> relax.Function:
        pattern, rewrite = make()
        return rewrite_call(pattern, rewrite, func)

    fpass = relax.transform.function_pass(run, opt_level=0, name=name)
    return tvm.transform.Sequential([fpass, relax.transform.DeadCodeElimination()], name=name)


def _requantize_pattern() -> dict:
    p = {"acc": wildcard(), "corr": is_const(), "scale": is_const(), "bias": is_const(), "inv": is_const()}
    p["sub"] = is_op("relax.subtract")(p["acc"], p["corr"])
    p["float"] = is_op("relax.astype")(p["sub"] | p["acc"])
    p["out"] = is_op("relax.multiply")(
        is_op("relax.add")(is_op("relax.multiply")(p["float"], p["scale"]), p["bias"]), p["inv"])
    return p


def _fold_requantize():
    """(float(acc - zp_term) * s_x s_w + bias) * (1 / s_y) -> float(acc) * q + b', q and b' folded at
    build time: an int8 conv's epilogue loses a subtract and a multiply per element (its biggest cost
    on narrow convs). Moving the int32 zero-point term past the cast rounds differently only for
    |acc| >= 2^24."""
    p = _requantize_pattern()

    def rewrite(call: relax.Call, m) -> relax.Expr:
        acc = m[p["acc"]]
        if str(acc.ty.dtype) != "int32" or str(m[p["float"]].attrs.dtype) != "float32":
            return call
        scale, bias, inv = (m[p[k]].value.numpy() for k in ("scale", "bias", "inv"))
        corr = m[p["corr"]].value.numpy() if p["sub"] in m else np.zeros((), np.int32)
        if any(a.dtype != np.float32 for a in (scale, bias, inv)) or corr.dtype != np.int32:
            return call
        q = (scale * inv).astype(np.float32)
        b = ((bias - corr.astype(np.float32) * scale) * inv).astype(np.float32)
        return relax.op.add(relax.op.multiply(relax.op.astype(acc, "float32"), relax.const(q)), relax.const(b))

    return p["out"], rewrite


fold_requantize = _pattern_pass("FoldRequantize", _fold_requantize)


FLOAT_EXACT = 1 << 24  # float32 holds every integer up to 2^24 exactly


def _depthwise_int8_as_float():
    """float(conv2d(x_u8, w_i8 -> int32)) -> conv2d(x_u8, float(w_i8) -> float32) for depthwise convs.

    Bit-identical, not an approximation: every product and partial sum of a depthwise conv is an
    integer below 2^24 in magnitude (checked per channel from the weights), which float32 holds
    exactly. A depthwise conv has no channel reduction for VNNI to use: in int32 each tap is a
    widening load and a 32-bit multiply (2 uops) plus an add; in float32 a convert and an FMA. The
    input stays uint8 in memory (the convert is inside the conv): Lite0 int8 2.20 -> 2.04 ms at
    batch 1, 15.6 -> 14.4 ms at batch 8. (Casting the input as a separate op is worse: FuseOps puts the cast into the producing
    conv, which then writes float32 maps 4x the size.)"""
    conv = is_op("relax.nn.conv2d")(wildcard(), is_const())
    pattern = is_op("relax.astype")(conv)

    def rewrite(call: relax.Call, m) -> relax.Expr:
        c = m[conv]
        data, weight = c.args
        a = c.attrs
        if str(call.attrs.dtype) != "float32" or str(c.ty.dtype) != "int32" \
                or str(data.ty.dtype) not in ("uint8", "int8") or str(weight.ty.dtype) != "int8":
            return call
        w = weight.value.numpy()
        out_axis = a.kernel_layout.index("O")
        if int(a.groups) == 1 or int(a.groups) != w.shape[out_axis]:
            return call  # not depthwise
        per_channel = np.abs(np.moveaxis(w, out_axis, 0).astype(np.int64)).reshape(w.shape[out_axis], -1)
        if 255 * int(per_channel.sum(1).max()) >= FLOAT_EXACT:
            return call
        return relax.op.nn.conv2d(data, relax.const(w.astype(np.float32)),
                                  strides=a.strides, padding=a.padding, dilation=a.dilation, groups=a.groups,
                                  data_layout=a.data_layout, kernel_layout=a.kernel_layout,
                                  out_layout=a.out_layout, out_dtype="float32")

    return pattern, rewrite


depthwise_int8_as_float = _pattern_pass("DepthwiseInt8AsFloat", _depthwise_int8_as_float)


# Right after from_onnx and before ToMixedPrecision (which rejects the opaque clamp kernels):
# inference forms of BN etc., Clip as Relax ops, quantize / dequantize as elementwise ops, divisions
# by constants as multiplications, int8 requantize as one multiply-add. Idempotent.
canonicalize = tvm.transform.Sequential([relax.transform.DecomposeOpsForInference(),
                                         relax.transform.FoldConstant(), clamp_to_relax_ops,
                                         qdq_to_elementwise, divide_as_multiply, fold_requantize,
                                         depthwise_int8_as_float,
                                         relax.transform.CanonicalizeBindings()], name="Canonicalize")


@relax.expr_functor.mutator
class _PadInt8Channels(relax.PyExprMutator):
    """An integer NHWC conv whose input channels are not a multiple of 4 (the RGB stem) gets zero
    channels appended to its input and zero weights to match: the same sums (exact), and the conv
    fits VNNI's 4-channel dot product instead of running on 32-bit multiplies."""

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if getattr(call.op, "name", "") != "relax.nn.conv2d" or not isinstance(call.args[1], tvm.ir.Constant):
            return call
        data, weight = call.args
        attrs = call.attrs
        if (str(data.ty.dtype) not in ("uint8", "int8") or str(weight.ty.dtype) != "int8"
                or attrs.data_layout != "NHWC" or attrs.kernel_layout != "HWIO" or int(attrs.groups) != 1):
            return call
        w = weight.value.numpy()
        extra = -w.shape[2] % 4
        if extra == 0:
            return call
        w = np.concatenate([w, np.zeros((*w.shape[:2], extra, w.shape[3]), w.dtype)], axis=2)
        data = relax.op.nn.pad(data, [0, 0, 0, 0, 0, 0, 0, extra], pad_value=0.0)
        return relax.op.nn.conv2d(data, relax.const(w, "int8"), attrs.strides, attrs.padding, attrs.dilation,
                                  1, "NHWC", "HWIO", attrs.out_layout, attrs.out_dtype)


pad_int8_channels = _mutator_pass("PadInt8Channels", _PadInt8Channels)


def padded_channels(channels: int, lanes: int) -> int:
    """The output channels a float conv computes: the next multiple of `lanes` where that costs fewer
    vector instructions than the narrower vectors that divide `channels` (24 of 16 lanes: 2 x 16 lanes
    instead of 3 x 8), else `channels`."""
    padded = -(-channels // lanes) * lanes
    return padded if padded * vector_width(channels, lanes) < channels * lanes else channels


def _pad_conv_lanes():
    """conv2d(x, W) + b with C output channels -> slice(conv2d(x, W') + b', channels 0..C), W' and b' zero
    past C. Exact: each kept channel is the same sum in the same order. FuseOps keeps the slice in the
    conv's kernel (with its residual add), which computes whole registers of channels and stores the C
    real ones, so the consumers read the tensor they read before. Float32 NHWC convs only (int8 / bf16
    have their own tiles); run after SplitBatchPrefix, whose cut an extra op before it would move."""
    conv = is_op("relax.nn.conv2d")(wildcard(), is_const())
    bias = is_const()
    pattern = is_op("relax.add")(conv, bias)

    def rewrite(call: relax.Call, m) -> relax.Expr:
        c, target = m[conv], Target.current(allow_none=True)
        data, weight = c.args
        a = c.attrs
        if (target is None or int(a.groups) != 1 or (a.data_layout, a.kernel_layout) != ("NHWC", "HWIO")
                or any(str(t.dtype) != "float32" for t in (data.ty, weight.ty, c.ty))):
            return call
        w, b = weight.value.numpy(), m[bias].value.numpy()
        channels = w.shape[3]
        padded = padded_channels(channels, vector_lanes(target, 32))
        if padded == channels or b.shape != (1, 1, 1, channels):
            return call
        w = np.concatenate([w, np.zeros((*w.shape[:3], padded - channels), w.dtype)], axis=3)
        b = np.concatenate([b, np.zeros((1, 1, 1, padded - channels), b.dtype)], axis=3)
        y = relax.op.nn.conv2d(data, relax.const(w), a.strides, a.padding, a.dilation, 1, "NHWC", "HWIO",
                               a.out_layout, a.out_dtype)
        return relax.op.strided_slice(relax.op.add(y, relax.const(b)), [3], [0], [channels])

    return pattern, rewrite


pad_conv_lanes = _pattern_pass("PadConvLanes", _pad_conv_lanes)
