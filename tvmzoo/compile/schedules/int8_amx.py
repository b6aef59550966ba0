"""ScheduleInt8Amx: uint8 x int8 -> int32 conv2d (NHWC / HWIO, not grouped) and matmul on AMX tiles
(`tdpbusd`), where the target has AMX-INT8; the same integer arithmetic as the VNNI kernels
(int8_dot.py), so the outputs are bit-identical to theirs.

The output is cut into macro tiles of m row tiles (pixels of one image row) x n channel tiles (16
output channels, 8 for 8 x odd channels); each parallel iteration computes one: configure + zero the
accumulator tiles, then for every conv tap and K chunk load A (pixels x input channels, read in place
from the padded input with the conv stride as the tile's row pitch) and B (the weight, repacked at
build time to [KH, KW, OC/L, IC/4, L, 4], L = 16 or 8) and multiply-add, then store the tiles and release them
(amx.py).
Kernels whose shapes do not fit the tiles (channels not a multiple of 8, fewer than MIN_ROWS pixels
per row tile) or whose reductions are too shallow to pay for them (INT8_MIN_DEPTH) are left to the
next rule (VNNI).
"""
from __future__ import annotations

import math

from tvm import s_tir, tirx
from tvm.sym.pattern import detect_linear_equation
from tvm.target import Target

from ..target import AMX_INT8_FEATURES
from . import amx
from .base import NotApplicable, vector_lanes
from .int8_dot import ScheduleInt8Dot
from .loops import loop_map, repack_weight, schedule_epilogue
from .operands import as_var, parallel_order

# Fewer pixels per tile than this (a batch-1 matmul: 1 row) leave most of each tile idle: VNNI is faster.
MIN_ROWS = 4
# int8: a reduction shallower than this (multiply-adds per output: taps x input channels) does too little
# work per macro tile to pay for configuring, zeroing, storing and releasing the tiles. Measured kernel by
# kernel on EfficientNet-Lite0 (benchmarks/bench_amx.py, Sapphire Rapids): AMX / VNNI time 2.3x for the
# stem (9 x 4), 1.9x at 16, 1.6x at 24, 1.4x at 40, 1.1x at 32 input channels of a 1x1 conv; 1.0x at 80;
# 0.5-0.9x from 112 up; RepVGG-A0 (every conv 9 x 48 deep and more) runs 0.46-0.52x of its VNNI build.
INT8_MIN_DEPTH = 64
# Macro tiles (row tiles, channel tiles), best first among those with the most output per tile:
# 4 accumulators with 2 A + 2 B loads per K chunk, then the thinner shapes.
TILINGS = ((2, 2), (1, 4), (3, 1), (1, 3), (2, 1), (1, 2), (1, 1))
# A macro tile narrower than a register (one 8-channel tile: Lite0's 40-channel projections): its epilogue's
# rows unrolled. As a loop LLVM vectorized it across the rows (gathers, `vpextrb` byte stores): 0.28 -> 0.18-0.20
# ms at batch 8 (28 x 28, 144 / 240 -> 40). Wider tiles measured no faster unrolled: left as loops.
NARROW_EPILOGUE_UNROLL = 2 * amx.MAX_ROWS


def choose_tiles(kind: amx.AmxKind, rows: int, channels: int, k: int, stride: int,
                 depth: int | None = None, tilings: tuple[tuple[int, int], ...] = TILINGS,
                 height: int = 1, across: int = 0) -> amx.TileShape:
    """The macro tile for an output of `rows` pixels (per image row) x `channels`, reducing `k` input
    channels per tap (`depth` multiply-adds per output in all), the largest of `tilings`; NotApplicable
    when none fits or pays. With `across` (the input rows between output rows of a conv, its
    vertical stride) the m row tiles may also be m of the `height` output rows: taken where that
    makes the macro tile larger, or as large with fewer tile loads per dot (A0's 14 x 14 x 192 conv:
    2 x 2 tiles of whole 14-pixel rows, 2 A + 2 B loads per 4 dots, instead of 1 x 4: 1 A + 4 B)."""
    if kind is amx.INT8 and (depth or k) < INT8_MIN_DEPTH:
        raise NotApplicable(f"{depth or k} multiply-adds per output: too few for AMX tiles (VNNI is faster)")
    per_row = 64 // (4 // kind.group)
    chunk = max((d for d in range(kind.group, per_row + 1, kind.group) if k % d == 0), default=0)
    lanes = 16 if channels % 16 == 0 else 8  # 8 x odd channels (24, 40): half-width tiles
    if channels % lanes or not chunk:
        raise NotApplicable(f"{channels} output / {k} input channels do not fit AMX tiles")
    best = None
    candidates = [(m, n, 0) for m, n in tilings]  # the row tiles split one image row
    candidates += [(m, n, across) for m, n in tilings if across and m > 1 and height % m == 0]
    for m, n, step in candidates:
        pixels = max((r for r in range(1, amx.MAX_ROWS + 1) if rows % ((1 if step else m) * r) == 0), default=0)
        if (channels // lanes) % n or pixels < MIN_ROWS:
            continue
        shape = amx.TileShape(kind, pixels, m, n, chunk, stride, lanes, step)
        if best is None or _better(shape, best):
            best = shape
    if best is None:
        raise NotApplicable(f"{rows} pixels per row: no AMX row tile of {MIN_ROWS}..{amx.MAX_ROWS}")
    return best


def _better(shape: amx.TileShape, best: amx.TileShape) -> bool:
    """More output per macro tile; across image rows also as much with fewer tile loads per dot."""
    size, best_size = shape.m * shape.n * shape.rows, best.m * best.n * best.rows
    loads = (shape.m + shape.n) / (shape.m * shape.n)
    return size > best_size or (shape.across > 0 and size == best_size
                                and loads < (best.m + best.n) / (best.m * best.n))


def input_stride(stmt, inp: int, row, axis: int = -2) -> int:
    """Input pixels (rows, for axis -3) between consecutive outputs along `row` (the conv stride)."""
    coeffs = detect_linear_equation(stmt.reads[inp].region[axis].min, [row.var])
    stride = coeffs[0] if len(coeffs) == 2 else None
    if not isinstance(stride, tirx.IntImm) or stride.value < 1:
        raise NotApplicable("the input's pixel axis is not a strided row")
    return int(stride.value)


def image_rows(stmt, inp: int):
    """(iter, input stride) of the output's row axis above the pixels (a conv's H), or (None, 0)."""
    out, read = stmt.writes[0].region, stmt.reads[inp].region
    var = as_var(out[-3].min) if len(out) >= 3 and len(read) >= 3 else None
    iv = next((iv for iv in stmt.iter_vars if var is not None and iv.var.same_as(var)), None)
    if iv is None or iv.iter_type != tirx.IterVar.DataPar:
        return None, 0
    try:
        return iv, input_stride(stmt, inp, iv, -3)
    except NotApplicable:
        return None, 0


def _split(sch: s_tir.Schedule, loop, tiles: int, width: int) -> list:
    """loop -> [rest, tiles, width], without the unit loop when tiles == 1 (the tensor intrinsics'
    descriptions have none: TVMScript folds a unit loop away)."""
    return sch.split(loop, [None, tiles, width] if tiles > 1 else [None, width])


class ScheduleInt8Amx(ScheduleInt8Dot):
    """uint8 x int8 -> int32 conv2d / matmul on AMX tiles (see the module doc)."""

    features = AMX_INT8_FEATURES
    kind = amx.INT8
    tilings = TILINGS

    def schedule_reduction(self, sch: s_tir.Schedule, red, producers: list, consumers: list,
                           target: Target) -> None:
        inp, _, chan, rc, row, _ = self._operands(sch, red)
        if row is None or len(sch.get(red).reads[inp].region) < 2:
            raise NotApplicable("no pixel axis to tile")
        depth = math.prod(int(iv.dom.extent) for iv in sch.get(red).iter_vars
                          if iv.iter_type == tirx.IterVar.CommReduce)
        height, across = image_rows(sch.get(red), inp)
        shape = choose_tiles(self.kind, int(row.dom.extent), int(chan.dom.extent), int(rc.dom.extent),
                             input_stride(sch.get(red), inp, row), depth, self.tilings,
                             int(height.dom.extent) if height is not None else 1, across)
        self._schedule_producers(sch, red, producers, target)
        inp, wgt, chan, rc, row, w_vars = self._operands(sch, red)
        stmt, g = sch.get(red), self.kind.group
        pos_c = next(i for i, v in enumerate(w_vars) if v.same_as(chan.var))
        pos_k = next(i for i, v in enumerate(w_vars) if v.same_as(rc.var))
        others = [i for i in range(len(w_vars)) if i not in (pos_c, pos_k)]
        lanes = shape.lanes  # [.., rc, .., chan, ..] -> [<other axes>, chan/L, rc/G, L, G]: B tiles contiguous
        repack_weight(sch, red, wgt, lambda *idx: (*[idx[i] for i in others], idx[pos_c] // lanes,
                                                   idx[pos_k] // g, idx[pos_c] % lanes, idx[pos_k] % g))
        acc = sch.cache_write(red, 0, "global")
        loop_of = loop_map(sch, red)
        c_out, *c_in = _split(sch, loop_of[chan.var], shape.n, lanes)
        k_out, *k_in = _split(sch, loop_of[rc.var], shape.k // g, g)
        r_out, *r_in = self._split_rows(sch, loop_of, row, height, shape)
        tiled = [chan.var, rc.var, row.var]
        rest = [iv for iv in stmt.iter_vars if not any(iv.var.same_as(v) for v in tiled)]
        spatial = [iv for iv in rest if iv.iter_type == tirx.IterVar.DataPar]
        red_loops = [loop_of[iv.var] for iv in rest if iv.iter_type == tirx.IterVar.CommReduce]
        outer_order = parallel_order(stmt, chan.var, row, loop_of, spatial, c_out, [r_out])
        sch.reorder(*outer_order, *red_loops, k_out, *r_in, *c_in, *k_in)
        outer = sch.fuse(*outer_order)
        sch.parallel(outer)
        sch.reverse_compute_at(acc, outer, preserve_unit_loops=False)
        acc_loops = sch.get_loops(acc)[-1 - len(r_in):]  # [image rows], pixels, channels
        if shape.n > 1:
            sch.split(acc_loops[-1], [shape.n, lanes])
        init = sch.decompose_reduction(red, (red_loops or [k_out])[0])
        sch.tensorize(r_in[0], amx.dot_intrin(shape))
        sch.tensorize(sch.get_loops(init)[-len(r_in) - len(c_in)], amx.begin_intrin(shape))
        sch.tensorize(acc_loops[0], amx.end_intrin(shape))
        amx.link_config(sch, outer, shape)
        lanes32 = vector_lanes(target, 32)
        narrow = shape.n * lanes < lanes32  # one 8-channel tile: unrolled, not vectorized across the rows
        schedule_epilogue(sch, outer, consumers, lanes32, NARROW_EPILOGUE_UNROLL if narrow else 0)

    @staticmethod
    def _split_rows(sch: s_tir.Schedule, loop_of: dict, row, height, shape: amx.TileShape) -> list:
        """[the row loop left outside, the macro tile's row loops]: m image rows (loop_of then maps
        the image-row axis to the loop left of it) x `rows` pixels, or m * `rows` pixels of one row."""
        if not shape.across:
            return sch.split(loop_of[row.var], [None, shape.m * shape.rows])
        loop_of[height.var], h_in = sch.split(loop_of[height.var], [None, shape.m])
        r_out, r_in = sch.split(loop_of[row.var], [None, shape.rows])
        return [r_out, h_in, r_in]
