"""bf16 precision: convolutions and matmuls multiply bfloat16 operands and accumulate in float32.

TVM 0.27's ToMixedPrecision knows only float16. This pass is narrower on purpose: a conv2d (not
grouped, an even number of input channels) or matmul with a constant float32 weight becomes
`op(astype(x, bf16), bf16 weight, out_dtype=float32)`. A depthwise / grouped conv has no channel pairs
for a dot instruction: it becomes `conv2d(astype(x, bf16), float32 weight, out_dtype=float32)`, so only
its input is stored as bf16 (it is memory-bound: the wide activations between an expansion 1x1 conv and
the depthwise conv are half the bytes; the weight and the arithmetic stay float32). Everything else
(bias, activations, pooling, residual adds, softmax) stays float32: those are memory-bound or have no
bf16 instruction, and keeping them in float32 costs no accuracy. FuseOps puts each `astype` into the
kernel that produces the activation, so activations feeding a conv are stored as bf16 (half the
bytes); weights are bf16 constants. Winograd (tvmzoo.compile.passes.winograd) keeps working on such
convs: its input transform is computed in float32 and stored as bf16, its GEMMs run bf16 x bf16 -> float32.

Where bf16 pays is decided by the precision plan (tvmzoo.compile.precision.bf16_plan), before the
pipeline is chosen: a bf16 build that computes in fp32 never runs this pass, and the pass rewrites
whenever it runs. The kernels then follow the target: AMX tiles, else vdpbf16ps (tvmzoo.compile.schedules).
"""
from __future__ import annotations

import logging

import ml_dtypes
import numpy as np
import tvm
from tvm import relax
from tvm.ir import IRModule

log = logging.getLogger(__name__)

BF16 = "bfloat16"


def _const_f32(expr) -> np.ndarray | None:
    if isinstance(expr, tvm.ir.Constant) and str(expr.value.dtype) == "float32":
        return expr.value.numpy()
    return None


def _bf16(x: relax.Expr) -> relax.Expr:
    return x if str(x.ty.dtype) == BF16 else relax.op.astype(x, BF16)


def _conv2d_like(call: relax.Call, data: relax.Expr, weight: relax.Expr) -> relax.Expr:
    """`call`'s conv2d on new operands, accumulating in float32."""
    a = call.attrs
    return relax.op.nn.conv2d(data, weight, strides=a.strides, padding=a.padding, dilation=a.dilation,
                              groups=a.groups, data_layout=a.data_layout, kernel_layout=a.kernel_layout,
                              out_layout=a.out_layout, out_dtype="float32")


@relax.expr_functor.mutator
class _ToBf16(relax.PyExprMutator):
    def __init__(self, mod: IRModule) -> None:
        super().__init__(mod)
        self.count = 0

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        name = getattr(call.op, "name", "")
        if name == "relax.nn.conv2d":
            out = self._conv2d(call)
        elif name == "relax.matmul":
            out = self._matmul(call)
        else:
            return call
        self.count += out is not call
        return out

    @staticmethod
    def _conv2d(call: relax.Call) -> relax.Expr:
        data, weight = call.args
        w, a = _const_f32(weight), call.attrs
        if w is None or str(data.ty.dtype) != "float32" or str(a.out_dtype or "float32") != "float32":
            return call
        if int(a.groups) != 1:  # depthwise / grouped: no channel pairs to dot; bf16 input, fp32 weight and math
            return _conv2d_like(call, _bf16(data), weight)
        if w.shape[a.kernel_layout.index("I")] % 2:
            return call  # odd channels (the RGB stem)
        return _conv2d_like(call, _bf16(data), relax.const(w.astype(ml_dtypes.bfloat16), BF16))

    @staticmethod
    def _matmul(call: relax.Call) -> relax.Expr:
        data, weight = call.args
        w = _const_f32(weight)
        if w is None or w.ndim < 2 or w.shape[-2] % 2 or str(data.ty.dtype) != "float32":
            return call
        return relax.op.matmul(_bf16(data), relax.const(w.astype(ml_dtypes.bfloat16), BF16), out_dtype="float32")


@tvm.transform.module_pass(opt_level=0, name="ToBf16")
def to_bf16(mod: IRModule, _ctx: tvm.transform.PassContext) -> IRModule:
    """The bf16 rewrite (see the module doc)."""
    mutator = _ToBf16(mod)
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            mutator.builder_.update_func(gv, mutator.visit_expr(func))
    log.info("bf16: %d conv2d / matmul now read bf16 and accumulate in float32", mutator.count)
    return mutator.builder_.get()
