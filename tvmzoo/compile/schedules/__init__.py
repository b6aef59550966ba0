"""Default CPU schedules: no kernel of an untuned build is left a naive loop nest.

TVM's default CPU pipeline schedules nothing (no parallel, no vector loop), and DLight has no CPU
rule for convolutions. The rules here fill that gap for conv nets, one rule per file on the base
classes of `base.py` (dlight's ScheduleRule shape); `DefaultSchedules` gives every kernel not
scheduled yet (by tuning records) the first rule in `RULES` that applies:

- `ScheduleInt8Amx` (int8_amx.py, AMX-INT8 targets): uint8 x int8 conv / matmul on AMX tiles
  (`tdpbusd`; amx.py holds the tile pieces), where the shapes fit the tiles.
- `ScheduleInt8Dot` (int8_dot.py, AVX512-VNNI targets): uint8 x int8 conv / matmul, the weight
  repacked to [OC/L, KH, KW, IC/4, L, 4] and the reduction tensorized with `vpdpbusd`.
- `ScheduleBf16Amx` (bf16_amx.py, AMX-BF16 targets): the AMX rule on bf16 x bf16 -> float32 (`tdpbf16ps`).
- `ScheduleBf16Dot` (bf16_dot.py, AVX512-BF16 targets): the same on bf16 x bf16 -> float32, with
  `vdpbf16ps` on input-channel pairs (where the target has no AMX-BF16, or the shapes do not fit its tiles).
- `ScheduleDepthwise` (depthwise.py): NHWC depthwise convs as ScheduleReduction schedules them, with a
  tile of one row of output pixels x channel vectors whose taps reuse each loaded input vector.
- `ScheduleReduction` (reduction.py): every kernel with one reduction block (conv, depthwise,
  grouped conv, matmul, pooling, mean): a register tile of `rows x channel vectors` accumulators,
  parallel outer loops, the epilogue computed right after each tile.
- `ScheduleInjective` (injective.py): elementwise / transpose / pad kernels.
- dlight's CPU `Reduction`, then `ScheduleFallback` (fallback.py): at least a parallel outer loop.

The graph passes before them (NHWC, Winograd, int8 canonical forms: tvmzoo.compile.passes) put
the channel axis innermost, the axis these rules vectorize; tvmzoo.compile.pipeline runs it all.
"""
from __future__ import annotations

import tvm
from tvm import s_tir, tirx
from tvm.ir import IRModule
from tvm.s_tir import dlight
from tvm.target import Target

from .bf16_amx import ScheduleBf16Amx
from .bf16_dot import ScheduleBf16Dot
from .depthwise import ScheduleDepthwise
from .fallback import ScheduleFallback
from .injective import ScheduleInjective
from .int8_amx import ScheduleInt8Amx
from .int8_dot import ScheduleInt8Dot
from .reduction import ScheduleReduction

RULES: tuple[dlight.ScheduleRule, ...] = (ScheduleInt8Amx(), ScheduleInt8Dot(), ScheduleBf16Amx(), ScheduleBf16Dot(),
                                          ScheduleDepthwise(), ScheduleReduction(), ScheduleInjective(),
                                          dlight.cpu.Reduction(), ScheduleFallback())


RULE_ATTR = "tvmzoo.schedule_rule"
# The rules whose kernels run AMX tile instructions (a process must ask Linux for tile state first).
AMX_RULES = frozenset(type(r).__name__ for r in RULES if getattr(r, "uses_amx", False))


def first_rule(func: tirx.PrimFunc, target: Target) -> tuple[dlight.ScheduleRule, s_tir.Schedule] | None:
    """The first rule in RULES that applies to `func`, and its schedule (None: none does)."""
    with target:
        for rule in RULES:
            sch = rule.apply(func, target, False)
            if isinstance(sch, list):
                sch = sch[0] if sch else None
            if sch is not None:
                return rule, sch
    return None


def default_schedule(func: tirx.PrimFunc, target: Target) -> s_tir.Schedule | None:
    """The schedule of the first rule in RULES that applies to `func` (None: none does)."""
    found = first_rule(func, target)
    return found[1] if found else None


@tvm.transform.module_pass(opt_level=0, name="DefaultSchedules")
def default_schedules(mod: IRModule, _ctx: tvm.transform.PassContext) -> IRModule:
    """Every PrimFunc not scheduled yet (e.g. by tuning records) gets its default schedule, tagged with
    the rule's name (`RULE_ATTR`: what compile records in mod.json)."""
    target = Target.current(allow_none=False)
    updated = {}
    for gv, func in mod.functions_items():
        if isinstance(func, tirx.PrimFunc) and not func.attrs.get("tirx.is_scheduled", False):
            found = first_rule(func, func.attrs.get("target") or target)
            if found is not None:
                rule, sch = found
                updated[gv] = sch.mod["main"].with_attrs({"tirx.is_scheduled": True,
                                                          RULE_ATTR: type(rule).__name__})
    for gv, func in updated.items():
        mod[gv] = func
    return mod
