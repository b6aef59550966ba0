"""LowerInt8: the QDQ model as imported (dequantize -> float conv2d / matmul) -> integer conv2d /
matmul with int32 accumulation (tvmzoo.compile.quant makes the QDQ model; this makes it run on int8)."""
from __future__ import annotations

import logging

import numpy as np
import tvm
from tvm import relax
from tvm.ir import IRModule
from tvm.ir.expr import Constant
from tvm.relax.dpl import is_const, is_op, rewrite_call, wildcard

log = logging.getLogger(__name__)


def _const_np(expr) -> np.ndarray | None:
    return expr.value.numpy() if isinstance(expr, Constant) else None


def _dtype(expr) -> str:
    return str(getattr(expr.ty, "dtype", ""))


def _lower_conv(call, m, pats):
    """conv2d(dequantize(x_q), dequantize(w_q)) -> float(conv2d(x_q, w_q, int32) - zp term) * s_x * s_w."""
    x_q, xs, xzp, w_q, ws, wzp = (m[pats[k]] for k in ("x", "xs", "xzp", "w", "ws", "wzp"))
    attrs = call.attrs
    consts = [_const_np(e) for e in (xs, xzp, w_q, ws, wzp)]
    if any(c is None for c in consts) or attrs.data_layout != "NCHW" \
            or attrs.kernel_layout != "OIHW" or consts[1].size != 1 or np.any(consts[4] != 0):
        return call  # other layouts, asymmetric weights: stay float
    s_x, zp, w, s_w, _ = consts
    if _dtype(x_q) not in ("uint8", "int8") or w.dtype != np.int8 \
            or (s_w.size > 1 and int(m[pats["dqw"]].attrs.axis) != 0):
        return call
    zp = int(zp.reshape(()))
    padding = [int(v) for v in attrs.padding]
    if zp != 0 and any(padding):
        # pad with the zero point (the quantized 0.0, what the float conv pads with): the zp term is then
        # one number per output channel, not a [H', W'] map of border effects read by every epilogue
        pt, pl, pb, pr = padding
        x_q = relax.op.nn.pad(x_q, [0, 0, 0, 0, pt, pb, pl, pr], pad_value=float(zp))
        padding = [0, 0, 0, 0]
    acc = relax.op.nn.conv2d(x_q, w_q, strides=attrs.strides, padding=padding, dilation=attrs.dilation,
                             groups=attrs.groups, data_layout="NCHW", kernel_layout="OIHW", out_dtype="int32")
    if zp != 0:  # conv(x_q) - conv(zp): every output channel sums zp over its own weights
        corr = zp * w.astype(np.int64).sum(axis=(1, 2, 3))
        acc = relax.op.subtract(acc, relax.const(corr.astype(np.int32).reshape(1, -1, 1, 1)))
    scale = (s_x.astype(np.float32).reshape(()) * np.broadcast_to(s_w.astype(np.float32), (w.shape[0],)))
    return relax.op.multiply(relax.op.astype(acc, "float32"), relax.const(scale.reshape(1, -1, 1, 1)))


def _lower_matmul(call, m, pats):
    """matmul(dequantize(x_q), permute_dims?(dequantize(w_q))) -> float(matmul(x_q, w_q, int32) - zp term) * s."""
    x_q, xs, xzp, w_q, ws, wzp = (m[pats[k]] for k in ("x", "xs", "xzp", "w", "ws", "wzp"))
    consts = [_const_np(e) for e in (xs, xzp, w_q, ws, wzp)]
    if any(c is None for c in consts) or consts[1].size != 1 or np.any(consts[4] != 0):
        return call
    s_x, zp, w, s_w, _ = consts
    if _dtype(x_q) not in ("uint8", "int8") or w.dtype != np.int8 or w.ndim != 2:
        return call
    transposed = pats["wt"] in m  # Gemm transB=1: the weight is [N, K]
    w_kn = w.T if transposed else w
    n = w_kn.shape[1]
    if s_w.size > 1 and int(m[pats["dqw"]].attrs.axis) % 2 != (0 if transposed else 1):
        return call  # scales along the reduction axis: not one integer matmul
    w_expr = relax.op.permute_dims(w_q, [1, 0]) if transposed else w_q
    acc = relax.op.matmul(x_q, w_expr, out_dtype="int32")
    zp = int(zp.reshape(()))
    if zp != 0:
        acc = relax.op.subtract(acc, relax.const((zp * w_kn.astype(np.int64).sum(0)).astype(np.int32)))
    scale = s_x.astype(np.float32).reshape(()) * np.broadcast_to(s_w.astype(np.float32).reshape(-1), (n,))
    return relax.op.multiply(relax.op.astype(acc, "float32"), relax.const(scale.astype(np.float32)))


def _patterns() -> dict:
    p = {"x": wildcard(), "xs": wildcard(), "xzp": wildcard(), "w": is_const(), "ws": is_const(),
         "wzp": is_const()}
    p["dqx"] = is_op("relax.dequantize")(p["x"], p["xs"], p["xzp"])
    p["dqw"] = is_op("relax.dequantize")(p["w"], p["ws"], p["wzp"])
    p["wt"] = is_op("relax.permute_dims")(p["dqw"])
    p["conv"] = is_op("relax.nn.conv2d")(p["dqx"], p["dqw"])
    p["matmul"] = is_op("relax.matmul")(p["dqx"], p["wt"] | p["dqw"])
    return p


@tvm.transform.module_pass(opt_level=0, name="LowerInt8")
def lower_int8(mod: IRModule, _ctx: tvm.transform.PassContext) -> IRModule:
    """Rewrite dequantize -> conv2d / matmul (weights dequantized from int8 constants) into integer
    conv2d / matmul with int32 accumulation, scaled back to float per output channel.

    The bias add and the consumer's quantize stay as imported: TVM fuses them into the epilogue,
    and they compute what QLinearConv does (int32 bias = float bias exactly, one float requantize).
    Run it right after the ONNX import, before FoldConstant (which folds weight dequantize away).
    """
    pats = _patterns()
    counts = {"conv": 0, "matmul": 0}

    def rewriter(kind, fn):
        def _rewrite(call, m):
            new = fn(call, m, pats)
            counts[kind] += new is not call
            return new
        return _rewrite

    out = IRModule(mod.functions, attrs=mod.attrs)
    for gv, func in mod.functions.items():
        if not isinstance(func, relax.Function):
            continue
        func = rewrite_call(pats["conv"], rewriter("conv", _lower_conv), func)
        func = rewrite_call(pats["matmul"], rewriter("matmul", _lower_matmul), func)
        out[gv] = func
    out = relax.transform.DeadCodeElimination()(out)
    if not any(counts.values()) and "R.quantize(" in out.script(show_meta=False):
        log.warning("lower_int8 found quantize ops but no dequantize(int8 constant) -> conv2d/matmul to lower: "
                    "run it right after the ONNX import with keep_params_in_input=False, before FoldConstant")
    log.info("lower_int8: %d conv2d and %d matmul now run on int8 x int8 -> int32",
             counts["conv"], counts["matmul"])
    return out


def int8_op_counts(mod: IRModule) -> dict[str, int]:
    """How many conv2d / matmul calls in `mod` are (u)int8 x int8 -> int32, and how many are not."""
    counts = {"conv2d": 0, "matmul": 0, "float_conv2d": 0, "float_matmul": 0}

    @relax.expr_functor.visitor
    class _Count(relax.PyExprVisitor):
        def visit_call_(self, call):
            name = getattr(call.op, "name", "")
            kind = {"relax.nn.conv2d": "conv2d", "relax.matmul": "matmul"}.get(name)
            if kind:
                integer = _dtype(call.args[0]) in ("uint8", "int8") and _dtype(call.args[1]) == "int8" \
                    and _dtype(call) == "int32"
                counts[kind if integer else f"float_{kind}"] += 1
            super().visit_call_(call)

    for func in mod.functions.values():
        if isinstance(func, relax.Function):
            _Count().visit_expr(func)
    return counts
