"""ScheduleFallback: the last rule. Anything the others left (several reductions, softmax) gets at
least a parallel outer loop."""
from __future__ import annotations

import logging

from tvm import s_tir, tirx
from tvm.target import Target

from .base import CPURule, root_blocks

log = logging.getLogger(__name__)


class ScheduleFallback(CPURule):
    """Parallel over the first loop of every block whose first iter is spatial."""

    def schedule(self, sch: s_tir.Schedule, target: Target) -> bool:
        scheduled = False
        for block in root_blocks(sch):
            loops = sch.get_loops(block)
            iters = sch.get(block).iter_vars
            if loops and iters and iters[0].iter_type == tirx.IterVar.DataPar:
                try:
                    sch.parallel(loops[0])
                    scheduled = True
                except RuntimeError:
                    pass
        if scheduled:
            log.info("only a fallback schedule (parallel outer loop) for a kernel")
        return scheduled
