"""ScheduleReduction: every fused kernel with one reduction block (conv, depthwise and grouped conv,
matmul, pooling, mean). A register tile of `rows x channel vectors` accumulators, outer spatial
loops fused and parallel (split between the cores the way the next kernel reads: `parallel_order`),
reduction loops outside the tile, channel lanes vectorized, epilogue (bias, activation, residual
add) computed right after each tile; the weight repacked so that each tile's channel block is
contiguous."""
from __future__ import annotations

import logging

from tvm import s_tir, tirx
from tvm.target import Target

from .base import NotApplicable, ReductionRule, vector_lanes
from .loops import (is_plain_copy, loop_map, register_tile, repack_weight, schedule_epilogue, schedule_injective,
                    vectorize_innermost)
from .operands import FLOAT_SPLIT_BYTES, as_var, converts_input, parallel_order, reads_by_channel

log = logging.getLogger(__name__)


def _output_axes(stmt, spatial: list):
    """(channel iter, row iter or None): the iters indexing the output's last two axes."""
    index_vars = [r.min for r in stmt.writes[0].region]

    def axis_at(i: int):
        if len(index_vars) >= -i and isinstance(index_vars[i], tirx.Var):
            for iv in spatial:
                if iv.var.same_as(index_vars[i]):
                    return iv
        return None

    chan = axis_at(-1)
    if chan is None:
        raise NotApplicable("output's last axis is not a spatial loop")
    return chan, axis_at(-2)


class ScheduleReduction(ReductionRule):
    """One reduction block (conv, matmul, pool, mean) with injective producers and consumers."""

    def schedule_reduction(self, sch: s_tir.Schedule, red, producers: list, consumers: list,
                           target: Target) -> None:
        """Tile: [parallel outer spatial] [reduction loops] [rows (unrolled) x vectors (unrolled)
        x lanes (vectorized)], the accumulators of the tile held in registers."""
        stmt = sch.get(red)
        lanes = vector_lanes(target, stmt.writes[0].source.dtype.bits)
        loop_of = loop_map(sch, red)
        for iv in stmt.iter_vars:
            extents = (sch.get(loop_of[iv.var]).extent, iv.dom.extent)
            if not all(isinstance(e, tirx.IntImm) for e in extents) or extents[0].value != extents[1].value:
                raise NotApplicable("symbolic extent or loop / iter mismatch")
        spatial = [iv for iv in stmt.iter_vars if iv.iter_type == tirx.IterVar.DataPar]
        reduce = [iv for iv in stmt.iter_vars if iv.iter_type == tirx.IterVar.CommReduce]
        chan, row = _output_axes(stmt, spatial)
        self.check(stmt, chan, row, reduce)
        c_ext = int(chan.dom.extent)
        r_ext = int(row.dom.extent) if row is not None else 1
        row_tile, vecs, width = self.tile_shape(stmt, c_ext, r_ext, lanes)

        self._prepack_weight(sch, red, chan, row, vecs * width)
        c_out, c_vec, c_lane = sch.split(loop_of[chan.var], [None, vecs, width])
        if row is not None:
            r_out, r_in = sch.split(loop_of[row.var], [None, row_tile])
            tile, outer_rows = [r_in, c_vec, c_lane], [r_out]
        else:
            tile, outer_rows = [c_vec, c_lane], []
        others = [iv for iv in spatial if iv is not chan and iv is not row]
        red_loops = [loop_of[iv.var] for iv in reduce]
        outer_order = parallel_order(stmt, chan.var, row, loop_of, others, c_out, outer_rows, FLOAT_SPLIT_BYTES)
        log.debug("%s: tile %d rows x %d x %d lanes", stmt.name_hint, row_tile, vecs, width)
        inner = self.inner_order(red_loops, tile)
        sch.reorder(*outer_order, *inner)
        outer = sch.fuse(*outer_order)
        sch.parallel(outer)
        if width > 1:
            sch.vectorize(c_lane)
        for loop in inner[inner.index(tile[0]):-1]:
            sch.unroll(loop)
        channelwise = reads_by_channel(stmt, chan.var)
        if channelwise and converts_input(stmt) and inner[:len(red_loops)] == red_loops:
            for loop in red_loops:
                sch.unroll(loop)
        if red_loops:
            init = sch.decompose_reduction(red, red_loops[0])
            vectorize_innermost(sch, sch.get_loops(init)[-1], lanes)
        for block in producers:
            self._schedule_producer(sch, block, lanes, inline_pads=channelwise)
        schedule_epilogue(sch, outer, consumers, lanes, self.epilogue_unroll)

    epilogue_unroll = 0  # schedule_epilogue's `unroll`: the epilogue's loops over the tile stay loops

    def check(self, stmt, chan, row, reduce: list) -> None:
        """Raise NotApplicable for kernels the rule leaves to the next one (here: none)."""

    def tile_shape(self, stmt, c_ext: int, r_ext: int, lanes: int) -> tuple[int, int, int]:
        """(rows, vectors per row, vector width) of the accumulator tile."""
        return register_tile(c_ext, r_ext, lanes)

    def inner_order(self, red_loops: list, tile: list) -> list:
        """The loops inside the parallel loop, outermost first: every reduction loop outside the tile."""
        return [*red_loops, *tile]

    @staticmethod
    def _prepack_weight(sch, red, chan, row, block: int) -> None:
        """Weight [.., chan, ..] -> [chan / block, <other axes>, block] (folded into the constant at
        build time): each tile then streams its weights contiguously instead of `block` channels out
        of every row of all of them. Weight = the read indexed by the output channel, not the row."""
        stmt = sch.get(red)
        c_ext = int(chan.dom.extent)
        operands = [r for r in stmt.reads if not r.source.same_as(stmt.writes[0].source)]
        if block >= c_ext or c_ext % block or len(operands) < 2:  # pooling / mean: no weight
            return
        for i, read in enumerate(stmt.reads):
            if read.source.same_as(stmt.writes[0].source):
                continue
            idx = [as_var(r.min) for r in read.region]
            if any(v is None for v in idx) or sum(v.same_as(chan.var) for v in idx) != 1 \
                    or (row is not None and any(v.same_as(row.var) for v in idx)):
                continue
            if any(int(r.extent) != 1 for r in read.region):
                continue
            pos = next(k for k, v in enumerate(idx) if v.same_as(chan.var))

            def pack(*ix):
                return (ix[pos] // block, *[ix[k] for k in range(len(ix)) if k != pos], ix[pos] % block)

            repack_weight(sch, red, i, pack)
            return

    @staticmethod
    def _schedule_producer(sch, block, lanes: int, inline_pads: bool) -> None:
        """Pads and layout copies: inline when it is a plain copy (or `inline_pads`), else a
        parallel vector loop (a pad's border test would sit in the conv's innermost loop)."""
        if is_plain_copy(sch, block) or inline_pads:
            try:
                sch.compute_inline(block)
                return
            except RuntimeError:
                pass
        schedule_injective(sch, block, lanes)
