"""bf16 x bf16 -> float32 conv2d (NHWC / HWIO, not grouped) and matmul on AVX512-BF16 (`vdpbf16ps`).

The rule is ScheduleInt8Dot (int8_dot.py) with another dot product: the weight is repacked to
[OC/L, ..., IC/2, L, 2] (folded into the constant at build time), so each `vdpbf16ps` multiplies a
pair of input channels (one broadcast 32-bit word) by a contiguous L x 2 weight block and adds the
pairs' sums into L float32 accumulators (L = 16 in a zmm, 8 in a ymm for 8 x k channel counts).

TVM 0.27 cannot call `llvm.x86.avx512bf16.dpbf16ps.*` from TIR: LLVM 22 declares its operands
`<32 x bfloat>`, TVM's LLVM codegen has no bfloat type (a bf16 vector operand crashes it), and
BF16ComputeLegalize turns any bf16 value in the call into float32. So the kernel calls a tiny
LLVM function with `<16 x i32>` operands that bitcasts them to bfloat and runs the instruction;
its IR text is linked into the module (`pragma_import_llvm`, as TVM's own tensorize tutorial does
for C code) and always inlined: what remains is one `vdpbf16ps` with a memory operand.
"""
from __future__ import annotations

from tvm import s_tir
from tvm.script import tirx as T

from ..target import BF16_FEATURES
from .int8_dot import ScheduleInt8Dot, dot_intrin

_IMPORT = "pragma_import_llvm"


def _llvm_wrapper(lanes: int) -> tuple[str, str]:
    """(function name, LLVM IR) of C += dpbf16ps(broadcast(pair at a), vector at b) for `lanes`
    float32 lanes. The operands are pointers: BF16ComputeLegalize rewrites bf16 values and
    intermediate bf16 buffers (a padded input) to float32, but leaves alone a buffer whose address
    is taken."""
    bits, pairs = 32 * lanes, 2 * lanes
    name = f"tvmzoo_dpbf16ps_{bits}"
    intrin = f"llvm.x86.avx512bf16.dpbf16ps.{bits}"
    acc, word, half = f"<{lanes} x float>", f"<{lanes} x i32>", f"<{pairs} x bfloat>"
    ir = f"""
declare {acc} @{intrin}({acc}, {half}, {half})
define linkonce_odr {acc} @{name}({acc} %c, ptr %a, ptr %b) alwaysinline {{
  %pair = load i32, ptr %a, align 2
  %one = insertelement {word} poison, i32 %pair, i64 0
  %all = shufflevector {word} %one, {word} poison, <{lanes} x i32> zeroinitializer
  %a2 = bitcast {word} %all to {half}
  %b2 = load {half}, ptr %b, align 2
  %r = call {acc} @{intrin}({acc} %c, {half} %a2, {half} %b2)
  ret {acc} %r
}}
"""
    return name, ir


def _address(buf, extent: int):
    """buf.access_ptr("r") typed as bf16's storage type: BF16ComputeLegalize would turn a bf16
    type annotation into float32, and the pointer must match the uint16 buffer after BF16StorageLegalize."""
    return T.tvm_access_ptr(T.type_annotation("uint16"), buf.data, buf.elem_offset, extent, 1)


def _bf16_dot(lanes: int):
    """C[i] += sum_k float(A[k]) * float(B[i, k]) for `lanes` float32 lanes and k < 2: one vdpbf16ps."""
    func, _ = _llvm_wrapper(lanes)

    def vdpbf16ps(A, B, C):
        return T.call_pure_extern(f"float32x{lanes}", func, C.vload([0], dtype=f"float32x{lanes}"),
                                  _address(A, 2), _address(B, 2 * lanes))

    return dot_intrin(lanes, 2, ("bfloat16", "bfloat16", "float32"), vdpbf16ps)


BF16_INTRINS = {lanes: f"tvmzoo_dot_{lanes}x2_bf16" for lanes in (16, 8)}
for _lanes, _name in BF16_INTRINS.items():
    s_tir.TensorIntrin.register(_name, *_bf16_dot(_lanes))


class ScheduleBf16Dot(ScheduleInt8Dot):
    """bfloat16 x bfloat16 -> float32 conv2d / matmul, tensorized with `vdpbf16ps` (see the module doc)."""

    features = BF16_FEATURES
    acc_dtype, input_dtype, weight_dtype = "float32", "bfloat16", "bfloat16"
    group = 2
    intrins = BF16_INTRINS

    def annotate(self, sch: s_tir.Schedule, outer) -> None:
        """Link the dpbf16ps wrappers into the kernel's LLVM module (linkonce: once per module)."""
        sch.annotate(outer, _IMPORT, "".join(_llvm_wrapper(lanes)[1] for lanes in BF16_INTRINS))
