"""Default CPU schedules: no kernel of an untuned build is left a naive loop nest.

TVM's default CPU pipeline schedules nothing (no parallel, no vector loop), and DLight has no CPU
rule for convolutions. This module fills that gap for conv nets:

1. `canonicalize` (right after import, before ToMixedPrecision), `layout_passes`: convolutions go
   to NHWC with HWIO weights (the weight transposes fold at build time; pooling and elementwise
   ops follow), so every kernel's innermost output axis is the channel axis, contiguous in
   output, weight and (depthwise) input: the axis to vectorize. `fuse_passes`: legalize and fuse.
2. `ScheduleReduction`: one rule for every fused kernel with a reduction block (conv, depthwise and
   grouped conv, matmul, pooling, mean): a register tile of `rows x channel vectors` accumulators,
   outer spatial loops fused and parallel, reduction loops outside the tile, channel lanes
   vectorized, epilogue (bias, activation, residual add) computed right after each tile.
3. `ScheduleInjective`: elementwise / transpose / pad kernels: inlined into one loop nest, parallel
   outer loop, vectorized inner loop.

`optimize(mod, target)` runs all of it; the result goes straight to `tvm.compile(mod, target)`.
`tvmzoo.tuning.apply_records` runs the same passes with tuned kernels taking precedence.
"""
from __future__ import annotations

import logging
import math

import tvm
from tvm import relax, s_tir, tirx
from tvm.ir import IRModule
from tvm.s_tir import dlight
from tvm.target import Target
from tvm.target.codegen import llvm_get_vector_width

log = logging.getLogger(__name__)

# Pooling, means and elementwise ops follow their input's layout (ConvertLayout rejects a
# desired layout for them).
NHWC_LAYOUTS = {"relax.nn.conv2d": ["NHWC", "HWIO"]}
MAX_ACCUMULATORS = 24  # vector registers for the accumulator tile (x86 AVX-512 has 32)
MAX_ROW_TILE = 8
MAX_VECTORS_PER_ROW = 4


# ---------------------------------------------------------------- Relax-level preparation

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


@tvm.transform.module_pass(opt_level=0, name="ClampToRelaxOps")
def clamp_to_relax_ops(mod: IRModule, _ctx: tvm.transform.PassContext) -> IRModule:
    mutator = _ClampToRelaxOps(mod)
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            mod[gv] = mutator.visit_expr(func)
    return relax.transform.DeadCodeElimination()(mod)


def canonicalize(mod: IRModule) -> IRModule:
    """Run right after from_onnx and before ToMixedPrecision (which rejects the opaque clamp
    kernels): inference forms of BN etc., Clip as Relax ops. Idempotent."""
    return tvm.transform.Sequential([relax.transform.DecomposeOpsForInference(),
                                     relax.transform.FoldConstant(), clamp_to_relax_ops,
                                     relax.transform.CanonicalizeBindings()])(mod)


def layout_passes() -> list[tvm.transform.Pass]:
    """Convolutions and pooling to NHWC / HWIO; the weight transposes fold into the constants."""
    return [
        relax.transform.ConvertLayout(NHWC_LAYOUTS),
        relax.transform.CanonicalizeBindings(),
        relax.transform.FoldConstant(),
    ]


def fuse_passes() -> list[tvm.transform.Pass]:
    """Relax ops -> fused TIR kernels (the same passes as relax.pipeline.zero_pipeline)."""
    return [
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
        relax.transform.DeadCodeElimination(),
    ]


# ---------------------------------------------------------------- TIR schedule rules

class _NotApplicable(RuntimeError):
    """A rule does not fit this kernel (ScheduleError is a RuntimeError too)."""


def vector_lanes(target: Target, dtype_bits: int) -> int:
    bits = llvm_get_vector_width(target)
    return max((bits if bits > 0 else 128) // dtype_bits, 2)


def _divisors(n: int, limit: int) -> list[int]:
    return [d for d in range(1, min(n, limit) + 1) if n % d == 0]


def vector_width(channels: int, lanes: int) -> int:
    """Lanes of one vector over the channel axis: a full register, else the largest power of two
    dividing `channels` (24 channels -> 8-wide vectors), so every vector is a native register."""
    if channels % lanes == 0:
        return lanes
    return math.gcd(channels, lanes) if lanes & (lanes - 1) == 0 else 1


def register_tile(channels: int, rows: int, lanes: int) -> tuple[int, int, int]:
    """(rows, vectors per row, vector width) of the accumulator tile: the extents divide the
    loops, and the tile keeps the most lanes busy within MAX_ACCUMULATORS registers."""
    width = vector_width(channels, lanes)
    best = (0, 1, 1)
    for vecs in _divisors(channels // width, MAX_VECTORS_PER_ROW):
        for r in _divisors(rows, MAX_ROW_TILE):
            if r * vecs <= MAX_ACCUMULATORS:
                best = max(best, (r * vecs, vecs, r))
    return best[2], best[1], width


def _root_blocks(sch: s_tir.Schedule) -> list[s_tir.schedule.SBlockRV]:
    return sch.get_child_blocks(sch.get_sblock("root"))


def _is_reduction(sch: s_tir.Schedule, block) -> bool:
    return any(iv.iter_type == tirx.IterVar.CommReduce for iv in sch.get(block).iter_vars)


def _inline_into_last(sch: s_tir.Schedule, blocks: list) -> list:
    """compute_inline every block that allows it except the last; returns the blocks left."""
    left = []
    for block in blocks[:-1]:
        try:
            sch.compute_inline(block)
        except RuntimeError:
            left.append(block)
    return left + blocks[-1:]


def _vectorize_innermost(sch: s_tir.Schedule, loop, lanes: int) -> None:
    extent = sch.get(loop).extent
    if not isinstance(extent, tirx.IntImm) or extent.value < 2:
        return
    n = int(extent.value)
    if n <= 4 * lanes:
        sch.vectorize(loop)
    elif n % lanes == 0:
        sch.vectorize(sch.split(loop, [None, lanes])[1])


def schedule_injective(sch: s_tir.Schedule, block, lanes: int) -> None:
    """Fuse all loops; outer part parallel, `lanes`-wide inner part vectorized."""
    loops = sch.get_loops(block)
    if not loops:
        return
    fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
    extent = sch.get(fused).extent
    n = int(extent.value) if isinstance(extent, tirx.IntImm) else 0
    if n >= 2 * lanes and n % lanes == 0:
        outer, inner = sch.split(fused, [None, lanes])
        sch.parallel(outer)
        sch.vectorize(inner)
    elif n > 1:
        sch.parallel(fused)


def _contains_var(expr, var) -> bool:
    return any(v.same_as(var) for v in tirx.analysis.undefined_vars(expr))


def _operand_bytes(stmt, chan_var, row, want_weight: bool) -> int:
    """Bytes of the read buffers indexed by the output channel (weights) or not (activations)."""
    total = 0
    for read in stmt.reads:
        by_chan = any(_contains_var(r.min, chan_var) for r in read.region)
        by_row = row is not None and any(_contains_var(r.min, row.var) for r in read.region)
        is_weight = by_chan and not by_row
        if is_weight == want_weight and (is_weight or by_row):
            shape = [int(d) for d in read.source.shape]
            total += math.prod(shape) * read.source.dtype.bits // 8
    return total


def _weight_bytes(stmt, chan_var, row) -> int:
    return _operand_bytes(stmt, chan_var, row, want_weight=True)


def _input_bytes(stmt, chan_var, row) -> int:
    return _operand_bytes(stmt, chan_var, row, want_weight=False)


class ScheduleReduction(dlight.ScheduleRule):
    """One reduction block (conv, matmul, pool, mean) with injective producers and consumers."""

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool):
        if not isinstance(func, tirx.PrimFunc) or target.kind.name != "llvm":
            return None
        sch = s_tir.Schedule(func)
        blocks = _root_blocks(sch)
        reductions = [b for b in blocks if _is_reduction(sch, b)]
        if len(reductions) != 1:
            return None
        red = reductions[0]
        pos = [sch.get(b).name_hint for b in blocks].index(sch.get(red).name_hint)
        producers, consumers = blocks[:pos], blocks[pos + 1:]
        try:
            self._schedule(sch, red, producers, consumers, target)
        except RuntimeError as err:
            log.debug("ScheduleReduction skipped %s: %s", func.attrs, err)
            return None
        return sch

    def _schedule(self, sch, red, producers, consumers, target) -> None:
        """Tile: [parallel outer spatial] [reduction loops] [rows (unrolled) x vectors (unrolled)
        x lanes (vectorized)], the accumulators of the tile held in registers."""
        stmt = sch.get(red)
        out = stmt.writes[0]
        lanes = vector_lanes(target, out.source.dtype.bits)
        loops = sch.get_loops(red)
        iters = list(stmt.iter_vars)
        if len(loops) != len(iters):
            raise _NotApplicable("non-trivial loop binding")
        # block iter var -> loop (loops are created in iter order by legalization; check)
        loop_of = {}
        for loop, iv in zip(loops, iters):
            extents = (sch.get(loop).extent, iv.dom.extent)
            if not all(isinstance(e, tirx.IntImm) for e in extents) or extents[0].value != extents[1].value:
                raise _NotApplicable("symbolic extent or loop / iter mismatch")
            loop_of[iv.var] = loop
        spatial = [iv for iv in iters if iv.iter_type == tirx.IterVar.DataPar]
        reduce = [iv for iv in iters if iv.iter_type == tirx.IterVar.CommReduce]
        index_vars = [r.min for r in out.region]

        def axis_at(i: int):
            if len(index_vars) >= -i and isinstance(index_vars[i], tirx.Var):
                for iv in spatial:
                    if iv.var.same_as(index_vars[i]):
                        return iv
            return None

        chan = axis_at(-1)
        if chan is None:
            raise _NotApplicable("output's last axis is not a spatial loop")
        row = axis_at(-2)
        c_ext = int(chan.dom.extent)
        r_ext = int(row.dom.extent) if row is not None else 1
        row_tile, vecs, width = register_tile(c_ext, r_ext, lanes)

        c_out, c_vec, c_lane = sch.split(loop_of[chan.var], [None, vecs, width])
        if row is not None:
            r_out, r_in = sch.split(loop_of[row.var], [None, row_tile])
            tile, outer_rows = [r_in, c_vec, c_lane], [r_out]
        else:
            tile, outer_rows = [c_vec, c_lane], []
        others = [loop_of[iv.var] for iv in spatial if iv is not chan and iv is not row]
        red_loops = [loop_of[iv.var] for iv in reduce]
        # Keep the larger operand cache-resident: a big weight (deep layers) is swept once with
        # the channel block outermost; big activations (early layers) with the pixels outermost.
        weight_outer = _weight_bytes(stmt, chan.var, row) > _input_bytes(stmt, chan.var, row)
        log.debug("%s: tile %d rows x %d x %d lanes, weight-outer %s", stmt.name_hint, row_tile,
                  vecs, width, weight_outer)
        if weight_outer:
            outer_order = [c_out, *others, *outer_rows]
        else:
            outer_order = [*others, *outer_rows, c_out]
        sch.reorder(*outer_order, *red_loops, *tile)
        outer = sch.fuse(*outer_order)
        sch.parallel(outer)
        if width > 1:
            sch.vectorize(c_lane)
        for loop in tile[:-1]:
            sch.unroll(loop)
        if red_loops:
            init = sch.decompose_reduction(red, red_loops[0])
            _vectorize_innermost(sch, sch.get_loops(init)[-1], lanes)
        self._schedule_neighbours(sch, outer, producers, consumers, lanes)

    def _schedule_neighbours(self, sch, outer, producers, consumers, lanes: int) -> None:
        """Pads before the reduction; the epilogue computed per tile, right after it."""
        for block in producers:
            self._schedule_producer(sch, block, lanes)
        if consumers:
            consumers = _inline_into_last(sch, consumers)
            for block in consumers:
                try:
                    sch.reverse_compute_at(block, outer, preserve_unit_loops=False)
                    inner = sch.get_loops(block)[-1]
                    _vectorize_innermost(sch, inner, lanes)
                except RuntimeError:
                    schedule_injective(sch, block, lanes)

    @staticmethod
    def _schedule_producer(sch, block, lanes: int) -> None:
        """Pads and layout copies: inline when it is a plain copy, else a parallel vector loop."""
        stmt = sch.get(block)
        if isinstance(stmt.body, tirx.BufferStore) and isinstance(stmt.body.value, tvm.ir.TensorLoad):
            try:
                sch.compute_inline(block)
                return
            except RuntimeError:
                pass
        schedule_injective(sch, block, lanes)


class ScheduleInjective(dlight.ScheduleRule):
    """Kernels without reduction: one fused, parallel, vectorized loop nest per output."""

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool):
        if not isinstance(func, tirx.PrimFunc) or target.kind.name != "llvm":
            return None
        sch = s_tir.Schedule(func)
        blocks = _root_blocks(sch)
        if any(_is_reduction(sch, b) for b in blocks):
            return None
        try:
            blocks = _inline_into_last(sch, blocks)
            bits = sch.get(blocks[-1]).writes[0].source.dtype.bits
            for block in blocks:
                schedule_injective(sch, block, vector_lanes(target, bits))
        except RuntimeError as err:
            log.debug("ScheduleInjective skipped: %s", err)
            return None
        return sch


class ScheduleFallback(dlight.ScheduleRule):
    """Anything else (e.g. several reductions, softmax): at least parallel over the first loop."""

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool):
        if not isinstance(func, tirx.PrimFunc) or target.kind.name != "llvm":
            return None
        sch = s_tir.Schedule(func)
        scheduled = False
        for block in _root_blocks(sch):
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
        return sch if scheduled else None


def schedule_pass() -> tvm.transform.Pass:
    """Default schedules for every PrimFunc not scheduled yet (e.g. by a tuning database)."""
    return dlight.ApplyDefaultSchedule(ScheduleReduction(), ScheduleInjective(),
                                       dlight.cpu.Reduction(), ScheduleFallback())


def default_cpu_pipeline(target: Target) -> tvm.transform.Pass:
    """Relax module as imported from ONNX -> fused, scheduled module for tvm.compile(mod, target)."""

    @tvm.transform.module_pass(opt_level=0, name="TvmzooDefaultCPUPipeline")
    def _pipeline(mod: IRModule, _ctx: tvm.transform.PassContext) -> IRModule:
        with target:
            mod = canonicalize(mod)
            return tvm.transform.Sequential([*layout_passes(), *fuse_passes(), schedule_pass()])(mod)

    return _pipeline


def optimize(mod: IRModule, target: Target) -> IRModule:
    """Default-scheduled module (weights bound as constants) for tvm.compile(mod, target)."""
    return default_cpu_pipeline(target)(mod)
