"""The base of every default schedule rule: a dlight `ScheduleRule` for LLVM targets.

A rule is a file: subclass `CPURule` (or `ReductionRule` for kernels with one reduction block),
implement `schedule`, list the ISA features it needs in `features`, and add it to `RULES` in
tvmzoo.compile.schedules. A rule that does not fit a kernel raises `NotApplicable` (or lets TVM's
ScheduleError through); the next rule then gets the kernel.
"""
from __future__ import annotations

import logging

from tvm import s_tir, tirx
from tvm.s_tir import dlight
from tvm.target import Target
from tvm.target.codegen import target_has_features

from ...run.host import uses_amx

log = logging.getLogger(__name__)


class NotApplicable(RuntimeError):
    """A rule does not fit this kernel (ScheduleError is a RuntimeError too)."""


# (LLVM feature, the vector register width it brings), widest first
_VECTOR_ISA = (("avx512f", 512), ("avx2", 256))


def vector_bits(target: Target) -> int:
    """The vector width of the target's own ISA (its -mcpu / -mattr as LLVM reads them): 512 with AVX-512,
    256 with AVX2, else 128. Not TVM's `llvm_get_vector_width`: that answers for the host CPU, so an AVX2
    target cross-compiled on an AVX-512 host got 16-float vectors (and the reverse on an AVX2 host)."""
    return next((bits for feature, bits in _VECTOR_ISA if target_has_features(feature, target)), 128)


def vector_lanes(target: Target, dtype_bits: int) -> int:
    return max(vector_bits(target) // dtype_bits, 2)


def root_blocks(sch: s_tir.Schedule) -> list[s_tir.schedule.SBlockRV]:
    return sch.get_child_blocks(sch.get_sblock("root"))


def is_reduction(sch: s_tir.Schedule, block) -> bool:
    return any(iv.iter_type == tirx.IterVar.CommReduce for iv in sch.get(block).iter_vars)


class CPURule(dlight.ScheduleRule):
    """Applies to PrimFuncs on LLVM targets that have `features` (LLVM feature names)."""

    features: tuple[str, ...] = ()

    @property
    def uses_amx(self) -> bool:
        """Its kernels run AMX tile instructions (a process must ask Linux for tile state first)."""
        return uses_amx(self.features)

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool) -> s_tir.Schedule | None:
        if not isinstance(func, tirx.PrimFunc) or target.kind.name != "llvm" \
                or (self.features and not target_has_features(list(self.features), target)):
            return None
        sch = s_tir.Schedule(func)
        try:
            return sch if self.schedule(sch, target) is not False else None
        except (RuntimeError, ValueError) as err:
            log.debug("%s skipped %s: %s", type(self).__name__, func.attrs, err)
            return None

    def schedule(self, sch: s_tir.Schedule, target: Target) -> bool | None:
        """Schedule `sch` in place; False or NotApplicable: the rule does not apply."""
        raise NotImplementedError


class ReductionRule(CPURule):
    """Kernels with exactly one reduction block (conv, matmul, pool, mean): `schedule_reduction`
    gets the block and its producers (pads, layout copies) and consumers (the epilogue)."""

    def schedule(self, sch: s_tir.Schedule, target: Target) -> bool | None:
        blocks = root_blocks(sch)
        reductions = [b for b in blocks if is_reduction(sch, b)]
        if len(reductions) != 1:
            return False
        red = reductions[0]
        pos = [sch.get(b).name_hint for b in blocks].index(sch.get(red).name_hint)
        self.schedule_reduction(sch, red, blocks[:pos], blocks[pos + 1:], target)
        return True

    def schedule_reduction(self, sch: s_tir.Schedule, red, producers: list, consumers: list,
                           target: Target) -> None:
        raise NotImplementedError
