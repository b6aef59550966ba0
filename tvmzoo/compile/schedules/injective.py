"""ScheduleInjective: elementwise / transpose / pad kernels inlined into one loop nest, parallel
outer loops, the channel axis vectorized (the width, where there are only 3 or 4 channels)."""
from __future__ import annotations

from tvm import s_tir
from tvm.target import Target

from .base import CPURule, NotApplicable, is_reduction, root_blocks, vector_lanes
from .loops import inline_into_last, schedule_injective


class ScheduleInjective(CPURule):
    """Kernels without reduction: one fused, parallel, vectorized loop nest per output."""

    def schedule(self, sch: s_tir.Schedule, target: Target) -> bool:
        blocks = root_blocks(sch)
        if any(is_reduction(sch, b) for b in blocks):
            raise NotApplicable("a reduction")
        blocks = inline_into_last(sch, blocks)
        dtype = sch.get(blocks[-1]).writes[0].source.dtype
        bits = 32 if str(dtype) == "bfloat16" else dtype.bits  # bf16 is computed in float32 (BF16ComputeLegalize)
        for block in blocks:
            schedule_injective(sch, block, vector_lanes(target, bits))
        return True
