"""Winograd F(2x2, 3x3) for float 3x3 stride-1 convolutions, as a Relax rewrite.

A 3x3 conv computes each 2x2 output tile from a 4x4 input tile with 36 multiply-adds per channel
pair; Winograd's minimal filtering does it with 16 (Lavin & Gray, 2016): the input tile and the
weights are transformed (V = Bt d B, U = G g Gt, U folded at build time), multiplied
elementwise per tile position (16 GEMMs over the channels: the only real work) and transformed
back (Y = At M A). 2.25x fewer multiply-adds for RepVGG's 3x3 convs; the transforms only add
and subtract. F(2x2, 3x3) rather than F(4x4, 3x3): its transforms are exact in binary floating
point except G's halves, so fp32 results stay within ~1e-6 of the direct conv, and its
transformed weights are 16/9 (not 36/9) the size of the originals, which matters at batch 1.

The rewrite runs after the NHWC layout pass, on convs with constant HWIO weights, and makes three
kernels per conv: the input transform (a TE kernel of adds, [16, tiles, C]), a batched relax.matmul
with the transformed weight (scheduled and tuned like any matmul), and the output transform (a TE
reduction into which FuseOps fuses the conv's bias and activation).
"""
from __future__ import annotations

import logging

import numpy as np
import tvm
from tvm import relax, te, topi
from tvm.ir import IRModule

log = logging.getLogger(__name__)

BT = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], np.float64)
G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], np.float64)
AT = np.array([[1, 1, 1, 0], [0, 1, -1, -1]], np.float64)
# Below this the GEMMs are too thin for the transforms to pay off: measured on RepVGG-A0 here, the
# 48-channel stage-1 conv runs slower as Winograd (the transforms move 4x its input through memory).
MIN_CHANNELS = 64


def transform_weight(hwio: np.ndarray) -> np.ndarray:
    """[3, 3, C, K] -> U [16, C, K] (tile position a * 4 + b), computed in float64."""
    u = np.einsum("ai,ijck,bj->abck", G, hwio.astype(np.float64), G)
    return u.reshape(16, *hwio.shape[2:]).astype(hwio.dtype)


def _tile_sum(coeffs: np.ndarray, load) -> tvm.tirx.PrimExpr:
    """sum_ij coeffs[i, j] * load(i, j) for coefficients in {0, 1, -1}: adds and subtracts only."""
    out = None
    for (i, j), c in np.ndenumerate(coeffs):
        if c == 0:
            continue
        term = load(i, j)
        out = (term if c > 0 else -term) if out is None else (out + term if c > 0 else out - term)
    return out


def _input_transform(data: te.Tensor, padding: tuple[int, int], th: int, tw: int) -> te.Tensor:
    """V[4a + b, (n, ty, tx), c] = sum_ij Bt[a, i] Bt[b, j] X[n, 2ty + i - top, 2tx + j - left, c].

    Bt has two non-zeros (+-1) per row, so each of the 16 positions is 4 loads and 3 adds, picked
    by a branch on the outermost (parallel) axis rather than 16 multiply-adds with a table."""
    n, h, w, c = data.shape
    top, left = padding
    padded = topi.nn.pad(data, [0, top, left, 0], [0, 2 * th + 2 - h - top, 2 * tw + 2 - w - left, 0])

    def value(ab, tile, c_):
        n_, y, x = tile // (th * tw), tile // tw % th, tile % tw
        out = None
        for pos in reversed(range(16)):
            expr = _tile_sum(np.outer(BT[pos // 4], BT[pos % 4]),
                             lambda i, j: padded[n_, 2 * y + i, 2 * x + j, c_])
            out = expr if out is None else tvm.tirx.if_then_else(ab == pos, expr, out)
        return out

    return te.compute((16, n * th * tw, c), value, name="winograd_input")


def _output_transform(m: te.Tensor, at: te.Tensor, th: int, tw: int, h_out: int, w_out: int) -> te.Tensor:
    """Y[n, y, x, k] = sum_ab At[y % 2, a] At[x % 2, b] M[4a + b, (n, y // 2, x // 2), k]."""
    n = m.shape[1] // (th * tw)
    a, b = te.reduce_axis((0, 4), "a"), te.reduce_axis((0, 4), "b")
    return te.compute((n, h_out, w_out, m.shape[2]), lambda n_, y, x, k: te.sum(
        at[y % 2, a] * at[x % 2, b] * m[a * 4 + b, (n_ * th + y // 2) * tw + x // 2, k], axis=[a, b]),
        name="winograd_output")


def winograd_conv(bb: relax.BlockBuilder, data: relax.Expr, hwio: np.ndarray,
                  padding: tuple[int, int, int, int], dtype: str, out_dtype: str | None = None) -> relax.Expr:
    """NHWC conv2d(data, weight, stride 1) as Winograd F(2x2, 3x3); returns [N, H_out, W_out, K].
    bf16 (dtype bfloat16, out_dtype float32): V stored bf16, the GEMMs accumulate in float32."""
    out_dtype = out_dtype or dtype
    h, w = (int(d) for d in data.ty.shape.values[1:3])  # static (checked by _eligible); N may be symbolic
    top, left, bottom, right = padding
    h_out, w_out = h + top + bottom - 2, w + left + right - 2
    th, tw = -(-h_out // 2), -(-w_out // 2)
    if dtype != out_dtype:  # bf16: the transform in float32 (as bf16 TIR it did not vectorize), V stored bf16
        data = bb.emit(relax.op.astype(data, out_dtype))
    v = bb.emit_te(_input_transform, data, (top, left), th, tw, primfunc_name_hint="winograd_input")
    if dtype != out_dtype:
        v = bb.emit(relax.op.astype(v, dtype))
    m = bb.emit(relax.op.matmul(v, relax.const(transform_weight(hwio), dtype), out_dtype=out_dtype))
    return bb.call_te(_output_transform, m, relax.const(AT.astype(out_dtype)), th, tw, h_out, w_out,
                      primfunc_name_hint="winograd_output")


def _eligible(call: relax.Call) -> bool:
    if getattr(call.op, "name", "") != "relax.nn.conv2d" or not isinstance(call.args[1], tvm.ir.Constant):
        return False
    a = call.attrs
    data, weight = call.args
    shape = data.ty.shape
    if shape is None or not all(isinstance(d, tvm.tirx.IntImm) for d in shape.values[1:]):
        return False
    kh, kw, c, k = (int(d) for d in weight.ty.shape.values)
    dtypes = (str(data.ty.dtype), str(weight.ty.dtype), str(a.out_dtype or "") or str(data.ty.dtype))
    return (dtypes in (("float32",) * 3, ("bfloat16", "bfloat16", "float32"))
            and a.data_layout == "NHWC" and a.kernel_layout == "HWIO" and a.out_layout == "NHWC"
            and int(a.groups) == 1 and (kh, kw) == (3, 3) and [int(s) for s in a.strides] == [1, 1]
            and [int(d) for d in a.dilation] == [1, 1] and c >= MIN_CHANNELS and k >= MIN_CHANNELS)


@relax.expr_functor.mutator
class _Winograd(relax.PyExprMutator):
    def __init__(self, mod: IRModule) -> None:
        super().__init__(mod)
        self.count = 0

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if not _eligible(call):
            return call
        self.count += 1
        pad = [int(p) for p in call.attrs.padding]
        return winograd_conv(self.builder_, call.args[0], call.args[1].value.numpy(), tuple(pad),
                             str(call.args[0].ty.dtype), str(call.ty.dtype))


@tvm.transform.module_pass(opt_level=0, name="Winograd")
def winograd(mod: IRModule, _ctx: tvm.transform.PassContext) -> IRModule:
    """Every eligible 3x3 stride-1 conv (NHWC / HWIO, constant weight) -> Winograd F(2x2, 3x3)."""
    mutator = _Winograd(mod)
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            mutator.builder_.update_func(gv, mutator.visit_expr(func))
    if not mutator.count:
        return mod
    log.info("winograd: %d conv2d now F(2x2, 3x3)", mutator.count)
    return relax.transform.DeadCodeElimination()(mutator.builder_.get())
