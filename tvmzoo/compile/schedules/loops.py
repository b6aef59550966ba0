"""Loop-nest helpers the rules share: the register tile, inlining, vectorizing, the injective
schedule, the epilogue computed per tile, and weight repacking folded at build time."""
from __future__ import annotations

import logging
import math

import tvm
from tvm import s_tir, tirx
from tvm.target import Target

from .base import NotApplicable, vector_bits

log = logging.getLogger(__name__)

# Accumulator tile: 15 64-byte vectors stay under TVM's 1 KiB stack-allocation limit (a larger
# tile becomes a heap workspace allocated per tile: measured 7-14 % slower on Lite0) and leave
# AVX-512 registers for the operands.
MAX_ACCUMULATORS = 15
# AVX2 and SSE have 16 vector registers, not 32: 12 accumulators leave the weight vectors and the broadcast
# input theirs (with 15 they spilled: RepVGG-A0 built for haswell 1.46x the time, Lite0 1.11x).
MAX_ACCUMULATORS_16_REGISTERS = 12
MAX_ROW_TILE = 8
MAX_VECTORS_PER_ROW = 4
LAYOUT_REWRITE_PREPROC = "meta_schedule.layout_rewrite_preproc"  # what SplitLayoutRewritePreproc splits out


def _divisors(n: int, limit: int) -> list[int]:
    return [d for d in range(1, min(n, limit) + 1) if n % d == 0]


def vector_width(channels: int, lanes: int) -> int:
    """Lanes of one vector over the channel axis: a full register, else the largest power of two
    dividing `channels` (24 channels -> 8-wide vectors), so every vector is a native register."""
    if channels % lanes == 0:
        return lanes
    return math.gcd(channels, lanes) if lanes & (lanes - 1) == 0 else 1


def max_accumulators(target: Target | None) -> int:
    """Accumulator registers of a tile for `target` (None: an AVX-512 one): fewer without AVX-512's 32."""
    return MAX_ACCUMULATORS if target is None or vector_bits(target) >= 512 else MAX_ACCUMULATORS_16_REGISTERS


def register_tile(channels: int, rows: int, lanes: int) -> tuple[int, int, int]:
    """(rows, vectors per row, vector width) of the accumulator tile: the extents divide the
    loops, and the tile keeps the most lanes busy within the registers of the current target
    (`max_accumulators`: the rules schedule inside `with target`)."""
    width = vector_width(channels, lanes)
    most = max_accumulators(Target.current(allow_none=True))
    best = (0, 1, 1)
    for vecs in _divisors(channels // width, MAX_VECTORS_PER_ROW):
        for r in _divisors(rows, MAX_ROW_TILE):
            if r * vecs <= most:
                best = max(best, (r * vecs, vecs, r))
    return best[2], best[1], width


def inline_into_last(sch: s_tir.Schedule, blocks: list) -> list:
    """compute_inline every block that allows it except the last; returns the blocks left."""
    left = []
    for block in blocks[:-1]:
        try:
            sch.compute_inline(block)
        except RuntimeError:
            left.append(block)
    return left + blocks[-1:]


def vectorize_innermost(sch: s_tir.Schedule, loop, lanes: int) -> None:
    extent = sch.get(loop).extent
    if not isinstance(extent, tirx.IntImm) or extent.value < 2:
        return
    n = int(extent.value)
    if n <= 4 * lanes:
        sch.vectorize(loop)
    elif n % lanes == 0:
        sch.vectorize(sch.split(loop, [None, lanes])[1])


def _extent(sch: s_tir.Schedule, loop) -> int:
    extent = sch.get(loop).extent
    return int(extent.value) if isinstance(extent, tirx.IntImm) else 0


def parallel_fused(sch: s_tir.Schedule, loops: list) -> None:
    """`loops` (outermost first) fused into one parallel loop; a single loop made parallel as it is."""
    sch.parallel(sch.fuse(*loops) if len(loops) > 1 else loops[0])


def schedule_injective(sch: s_tir.Schedule, block, lanes: int) -> None:
    """Outer loops fused and parallel; the innermost axis (the channels, in NHWC) vectorized.

    The vector loop stays within one row of channels: fused across rows, a vector whose width
    does not divide the channel count (48 uint8 channels in 64 lanes) needs a div / mod per lane
    and runs scalar. Axes too short for a vector (3 RGB channels) are unrolled inside a vector
    loop over the next axis out (the image width), else fused with it."""
    loops = sch.get_loops(block)
    short = min(lanes, 8)
    if not loops or _vectorize_across(sch, loops, short):
        return
    inner = len(loops) - 1
    while inner > 0 and math.prod(_extent(sch, lp) for lp in loops[inner:]) < short:
        inner -= 1
    vec = sch.fuse(*loops[inner:]) if len(loops) - inner > 1 else loops[-1]
    n = _extent(sch, vec)
    outer = list(loops[:inner])
    step = math.gcd(n, lanes)  # a whole register where the channels allow it
    if n > 4 * lanes and step > 1:
        rest, vec = sch.split(vec, [None, step])
        outer.append(rest)
    vectorized = n > 1 and (n <= 4 * lanes or step > 1)
    if vectorized:
        sch.vectorize(vec)
    if outer:
        parallel_fused(sch, outer)
    elif n > 1 and not vectorized:
        sch.parallel(vec)


def schedule_pad(sch: s_tir.Schedule, block, lanes: int) -> None:
    """A pad (`if_then_else(border, 0, input)`) over [..., W, C] wider than one register: the loops
    above W (N x H) fused and parallel (whole rows per task: no div / mod per vector for the border test;
    0.92-0.95x A0's convs on 30 x 30 x 96 pads), C in vectors of the largest power of two lanes
    dividing it. As one vector over all of C (192 uint8 channels) it is lowered lane by lane
    (`vpextrb` / `vpinsrb`): 0.36 -> 0.26 ms on A0's 14 x 14 x 192 int8 AMX conv at batch 8.
    Narrower pads: schedule_injective."""
    loops = sch.get_loops(block)
    n = _extent(sch, loops[-1])
    width = math.gcd(n, lanes)
    if len(loops) < 2 or n <= lanes or width < 4 or lanes & (lanes - 1):
        schedule_injective(sch, block, lanes)
        return
    _, vec = sch.split(loops[-1], [None, width])
    sch.vectorize(vec)
    parallel_fused(sch, loops[:-2] or loops[:1])


def _vectorize_across(sch: s_tir.Schedule, loops: list, short: int) -> bool:
    """[..., W, C] with C < `short`: [..., W / v] parallel, C unrolled, v lanes of W vectorized.
    The NCHW -> NHWC input transpose then reads whole vectors from each colour plane: 10x faster
    than vectors across (W, C), whose lanes each need a div / mod by 3."""
    if len(loops) < 2 or not 1 < _extent(sch, loops[-1]) < short:
        return False
    across = loops[-2]
    width = next((v for v in (16, 8, *range(15, 3, -1)) if _extent(sch, across) % v == 0), 0)
    if not width and len(loops) > 2:
        # No vector width divides W (A0's 226-wide padded input): rows in parallel, C unrolled, W a plain
        # loop that LLVM vectorizes; vectors across (W, C) with a div / mod per lane took 6.7x the time.
        sch.unroll(loops[-1])
        parallel_fused(sch, loops[:-2])
        return True
    if not width or _extent(sch, across) == width:
        return False
    rows, vec = sch.split(across, [None, width])
    sch.reorder(rows, loops[-1], vec)
    sch.unroll(loops[-1])
    sch.vectorize(vec)
    outer = [*loops[:-2], rows]
    if math.prod(_extent(sch, lp) for lp in loops[:-2]) >= 64:  # rows, not vectors, per parallel task
        outer = outer[:-1]
    parallel_fused(sch, outer)
    return True


def repack_weight(sch: s_tir.Schedule, red, read: int, index_map) -> None:
    """Read `read` of block `red` through a re-laid-out copy; prepack_passes fold the copy into the
    constant at build time."""
    preproc = sch.cache_read(red, read, "global")
    sch.annotate(preproc, LAYOUT_REWRITE_PREPROC, True)
    sch.transform_layout(red, ("read", read), index_map)



def schedule_epilogue(sch: s_tir.Schedule, outer, consumers: list, lanes: int, unroll: int = 0) -> None:
    """The consumers (bias, activation, residual add, requantize) inlined into one block computed
    right after each tile of `outer`, its innermost loop vectorized, the loops between unrolled where
    they make at most `unroll` iterations; else a loop nest of its own."""
    if not consumers:
        return
    for block in inline_into_last(sch, consumers):
        try:
            sch.reverse_compute_at(block, outer, preserve_unit_loops=False)
            vectorize_innermost(sch, sch.get_loops(block)[-1], lanes)
        except (RuntimeError, ValueError, TypeError) as err:  # TypeError: TVM 0.27 failing to word an error
            log.debug("epilogue not fused into the tile: %s", str(err).splitlines()[-1])
            schedule_injective(sch, block, lanes)
            continue
        loops = sch.get_loops(block)
        tile = next(i for i, lp in enumerate(loops) if sch.get(lp).same_as(sch.get(outer)))
        inner = loops[tile + 1:-1]
        if inner and math.prod(_extent(sch, lp) for lp in inner) <= unroll:
            for loop in inner:
                sch.unroll(loop)


def is_plain_copy(sch: s_tir.Schedule, block) -> bool:
    """A block that stores what it loads (a layout copy, a pad without border)."""
    stmt = sch.get(block)
    return isinstance(stmt.body, tirx.BufferStore) and isinstance(stmt.body.value, tvm.ir.TensorLoad)


def loop_map(sch: s_tir.Schedule, block) -> dict:
    """Block iter var -> its loop (legalization creates one loop per iter, in order)."""
    loops = sch.get_loops(block)
    iters = list(sch.get(block).iter_vars)
    if len(loops) != len(iters):
        raise NotApplicable("non-trivial loop binding")
    return {iv.var: loop for loop, iv in zip(loops, iters)}
