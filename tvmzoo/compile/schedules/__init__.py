"""Default CPU schedules: no kernel of an untuned build is left a naive loop nest.

TVM's default CPU pipeline schedules nothing (no parallel, no vector loop), and DLight has no CPU
rule for convolutions. This module fills that gap for conv nets:

1. tvmzoo.compile.passes.graph_passes: `canonicalize` (right after import, before ToMixedPrecision) and
   `layout_passes`: convolutions go to NHWC with HWIO weights (the weight transposes fold at build
   time; pooling and elementwise ops follow), so every kernel's innermost output axis is the
   channel axis, contiguous in output, weight and (depthwise) input: the axis to vectorize. Float
   3x3 stride-1 convs with enough channels become Winograd F(2x2, 3x3) (tvmzoo.compile.passes.winograd); integer
   convs on RGB get a fourth, zero input channel; at batch N > 1 the high-resolution layers run
   image by image (tvmzoo.compile.passes.batch_split). `fuse_passes`: legalize and fuse.
2. `ScheduleReduction`: one rule for every fused kernel with a reduction block (conv, depthwise and
   grouped conv, matmul, pooling, mean): a register tile of `rows x channel vectors` accumulators,
   outer spatial loops fused and parallel (split between the cores the way the next kernel reads:
   `_parallel_order`), reduction loops outside the tile, channel lanes vectorized, epilogue (bias,
   activation, residual add) computed right after each tile; the weight repacked so that each
   tile's channel block is contiguous.
3. `ScheduleInjective`: elementwise / transpose / pad kernels: inlined into one loop nest, parallel
   outer loops, the channel axis vectorized (the width, where there are only 3 or 4 channels).
4. int8 (after tvmzoo.compile.quant.quantize.lower_int8): `canonicalize` turns per-tensor quantize / dequantize
   into elementwise ops (bit-identical) so they follow NHWC and fuse into the conv epilogues,
   divisions by constants into multiplications, each requantize into one multiply-add, and
   depthwise convs into exact float32 ones (no VNNI form; ScheduleReduction unrolls their taps, so
   each uint8 input vector is converted to float once for all the taps that read it);
   `ScheduleInt8Dot` (before ScheduleReduction, on AVX512-VNNI targets) repacks the int8 weight
   to [OC/L, KH, KW, IC/4, L, 4] and tensorizes the reduction with `vpdpbusd` (L = 16 or 8 lanes).
   `prepack_passes` fold the weight repacking into the constants at build time.

`optimize(mod, target)` runs all of it; the result goes straight to `tvm.compile(mod, target)`.
`tvmzoo.compile.tuning.apply_records` runs the same passes with tuned kernels taking precedence.
"""
from __future__ import annotations

import logging
import math

import tvm
from tvm import relax, s_tir, tirx
from tvm.ir import IRModule
from tvm.s_tir import dlight
from tvm.script import tirx as T
from tvm.target import Target
from tvm.target.codegen import llvm_get_vector_width, target_has_features

from ..passes.graph_passes import canonicalize, fuse_passes, layout_passes

log = logging.getLogger(__name__)

# Accumulator tile: 15 64-byte vectors stay under TVM's 1 KiB stack-allocation limit (a larger
# tile becomes a heap workspace allocated per tile: measured 7-14 % slower on Lite0) and leave
# AVX-512 registers for the operands.
MAX_ACCUMULATORS = 15
MAX_ROW_TILE = 8
MAX_VECTORS_PER_ROW = 4
PIXEL_SPLIT_BYTES = 1 << 20  # a weight each core may read whole (its L2 is 2 MB here)
LAYOUT_REWRITE_PREPROC = "meta_schedule.layout_rewrite_preproc"  # what SplitLayoutRewritePreproc splits out



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


def _extent(sch: s_tir.Schedule, loop) -> int:
    extent = sch.get(loop).extent
    return int(extent.value) if isinstance(extent, tirx.IntImm) else 0


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
        sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])
    elif n > 1 and not vectorized:
        sch.parallel(vec)


def _vectorize_across(sch: s_tir.Schedule, loops: list, short: int) -> bool:
    """[..., W, C] with C < `short`: [..., W / v] parallel, C unrolled, v lanes of W vectorized.
    The NCHW -> NHWC input transpose then reads whole vectors from each colour plane: 10x faster
    than vectors across (W, C), whose lanes each need a div / mod by 3."""
    if len(loops) < 2 or not 1 < _extent(sch, loops[-1]) < short:
        return False
    across = loops[-2]
    width = next((v for v in (16, 8, *range(15, 3, -1)) if _extent(sch, across) % v == 0), 0)
    if not width or _extent(sch, across) == width:
        return False
    rows, vec = sch.split(across, [None, width])
    sch.reorder(rows, loops[-1], vec)
    sch.unroll(loops[-1])
    sch.vectorize(vec)
    outer = [*loops[:-2], rows]
    if math.prod(_extent(sch, lp) for lp in loops[:-2]) >= 64:  # rows, not vectors, per parallel task
        outer = outer[:-1]
    sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])
    return True


def _as_var(expr):
    return expr if isinstance(expr, tirx.Var) else None


def _repack_weight(sch: s_tir.Schedule, red, read: int, index_map) -> None:
    """Read `read` of block `red` through a re-laid-out copy; prepack_passes fold the copy into the
    constant at build time."""
    preproc = sch.cache_read(red, read, "global")
    sch.annotate(preproc, LAYOUT_REWRITE_PREPROC, True)
    sch.transform_layout(red, ("read", read), index_map)


def _contains_var(expr, var) -> bool:
    return any(v.same_as(var) for v in tirx.analysis.undefined_vars(expr))


def _indexed_by(read, var) -> bool:
    return var is not None and any(_contains_var(r.min, var) for r in read.region)


def _is_weight(read, chan_var, row) -> bool:
    """The weight: a read indexed by the output channel, not by the row."""
    return _indexed_by(read, chan_var) and not _indexed_by(read, row.var if row is not None else None)


def _operand_bytes(stmt, chan_var, row, want_weight: bool) -> int:
    """Bytes of the read buffers indexed by the output channel (weights) or not (activations)."""
    total = 0
    for read in stmt.reads:
        is_weight = _is_weight(read, chan_var, row)
        by_row = _indexed_by(read, row.var if row is not None else None)
        if is_weight == want_weight and (is_weight or by_row):
            shape = [int(d) for d in read.source.shape]
            total += math.prod(shape) * read.source.dtype.bits // 8
    return total


def _selects_weight(stmt, chan_var, row, var) -> bool:
    """Does loop variable `var` index the weight?"""
    return any(_is_weight(read, chan_var, row) and _indexed_by(read, var) for read in stmt.reads)


def _parallel_order(stmt, chan_var, row, loop_of: dict, others: list, c_out, outer_rows: list) -> list:
    """The loops fused into the parallel loop, outermost first. The runtime splits that loop into
    one contiguous range per core, so the leading axes decide which part each core computes:
    - axes that pick the weight (a batched matmul's batch, the 16 Winograd positions): each core
      reads only its own weights, and writes what the next kernel reads on the same core;
    - then the pixels, so each core keeps the rows the next kernel reads on it (a line in the other
      core's cache costs more than one in L3: splitting RepVGG-A0's stage-3 matmuls by channel
      made them 1.4x slower than splitting them by position);
    - the channel blocks lead only for a weight larger than the inputs and than PIXEL_SPLIT_BYTES,
      which both cores would otherwise stream whole (A0's 8.8 MB last conv: 1.05 -> 1.50 ms).
    Within a core's range the channel block stays outside the row tiles when the weight is the
    larger operand, so each row tile reuses the weight block from cache."""
    picks = [_selects_weight(stmt, chan_var, row, iv.var) for iv in others]
    by_weight = [loop_of[iv.var] for iv, p in zip(others, picks) if p]
    pixels = [loop_of[iv.var] for iv, p in zip(others, picks) if not p]
    weight = _weight_bytes(stmt, chan_var, row)
    if weight <= _input_bytes(stmt, chan_var, row):
        return [*by_weight, *pixels, *outer_rows, c_out]
    if weight <= PIXEL_SPLIT_BYTES:
        return [*by_weight, *pixels, c_out, *outer_rows]
    return [*by_weight, c_out, *pixels, *outer_rows]


def _reads_by_channel(stmt, chan_var) -> bool:
    """Depthwise convs and pooling: an operand read at the output channel and at shifted pixels.
    They are memory-bound, so their pad is read in place (a padded copy would double the traffic)."""
    return any(_indexed_by(read, chan_var) and any(_as_var(r.min) is None for r in read.region)
               for read in stmt.reads)


def _converts_input(stmt) -> bool:
    """An integer input summed in float (tvmzoo.compile.passes.graph_passes.depthwise_int8_as_float): every tap
    converts what it loads (zero-extend, int -> float: two uops per FMA). With the taps unrolled
    each input vector is converted once for all the taps of the tile that read it: Lite0 int8
    1.97 -> 1.78 ms at batch 1, 14.0 -> 12.8 at batch 8. A float input goes straight into the FMA
    from memory; unrolled, its 4 x 3 tiles spill registers (Lite0 fp32 and fp16 5 % slower)."""
    out = stmt.writes[0].source
    return "float" in str(out.dtype) and any(
        "int" in str(r.source.dtype) for r in stmt.reads if not r.source.same_as(out))


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

        self._prepack_weight(sch, red, chan, row, vecs * width)
        c_out, c_vec, c_lane = sch.split(loop_of[chan.var], [None, vecs, width])
        if row is not None:
            r_out, r_in = sch.split(loop_of[row.var], [None, row_tile])
            tile, outer_rows = [r_in, c_vec, c_lane], [r_out]
        else:
            tile, outer_rows = [c_vec, c_lane], []
        others = [iv for iv in spatial if iv is not chan and iv is not row]
        red_loops = [loop_of[iv.var] for iv in reduce]
        outer_order = _parallel_order(stmt, chan.var, row, loop_of, others, c_out, outer_rows)
        log.debug("%s: tile %d rows x %d x %d lanes", stmt.name_hint, row_tile, vecs, width)
        sch.reorder(*outer_order, *red_loops, *tile)
        outer = sch.fuse(*outer_order)
        sch.parallel(outer)
        if width > 1:
            sch.vectorize(c_lane)
        for loop in tile[:-1]:
            sch.unroll(loop)
        channelwise = _reads_by_channel(stmt, chan.var)
        if channelwise and _converts_input(stmt):
            for loop in red_loops:
                sch.unroll(loop)
        if red_loops:
            init = sch.decompose_reduction(red, red_loops[0])
            _vectorize_innermost(sch, sch.get_loops(init)[-1], lanes)
        self._schedule_neighbours(sch, outer, producers, consumers, lanes, inline_pads=channelwise)

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
            idx = [_as_var(r.min) for r in read.region]
            if any(v is None for v in idx) or sum(v.same_as(chan.var) for v in idx) != 1 \
                    or (row is not None and any(v.same_as(row.var) for v in idx)):
                continue
            if any(int(r.extent) != 1 for r in read.region):
                continue
            pos = next(k for k, v in enumerate(idx) if v.same_as(chan.var))

            def pack(*ix):
                return (ix[pos] // block, *[ix[k] for k in range(len(ix)) if k != pos], ix[pos] % block)

            _repack_weight(sch, red, i, pack)
            return

    def _schedule_neighbours(self, sch, outer, producers, consumers, lanes: int, inline_pads: bool) -> None:
        """Pads before the reduction; the epilogue computed per tile, right after it."""
        for block in producers:
            self._schedule_producer(sch, block, lanes, inline_pads)
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
    def _schedule_producer(sch, block, lanes: int, inline_pads: bool) -> None:
        """Pads and layout copies: inline when it is a plain copy (or `inline_pads`), else a
        parallel vector loop (a pad's border test would sit in the conv's innermost loop)."""
        stmt = sch.get(block)
        plain = isinstance(stmt.body, tirx.BufferStore) and isinstance(stmt.body.value, tvm.ir.TensorLoad)
        if plain or inline_pads:
            try:
                sch.compute_inline(block)
                return
            except RuntimeError:
                pass
        schedule_injective(sch, block, lanes)


# ---------------------------------------------------------------- int8 dot products (VNNI)

def _vnni_dot(lanes: int) -> tuple[tirx.PrimFunc, tirx.PrimFunc]:
    """C[i] += sum_k u8 A[k] * s8 B[i, k] for `lanes` int32 lanes and k < 4: one `vpdpbusd`.

    TVM's own VNNI_DOT_16x4_INTRIN passes <16 x i32> operands; LLVM 22's vpdpbusd takes
    <64 x i8> ones (the module fails verification), hence these."""
    n_bytes, llvm = 4 * lanes, f"llvm.x86.avx512.vpdpbusd.{32 * lanes}"

    @T.prim_func(s_tir=True)
    def desc(A: T.Buffer((4,), "uint8", offset_factor=1), B: T.Buffer((lanes, 4), "int8", offset_factor=1),
             C: T.Buffer((lanes,), "int32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:4], B[0:lanes, 0:4])
            T.writes(C[0:lanes])
            for i, k in T.grid(lanes, 4):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")

    @T.prim_func(s_tir=True)
    def impl(A: T.Buffer((4,), "uint8", offset_factor=1), B: T.Buffer((lanes, 4), "int8", offset_factor=1),
             C: T.Buffer((lanes,), "int32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:4], B[0:lanes, 0:4])
            T.writes(C[0:lanes])
            C[T.ramp(T.int32(0), 1, lanes)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id(llvm), C.vload([0], dtype=f"int32x{lanes}"),
                T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], "uint8x4"), dtype="int32"), lanes),
                              dtype=f"int8x{n_bytes}"),
                B.vload([0, 0], dtype=f"int8x{n_bytes}"), dtype=f"int32x{lanes}")

    return desc, impl


VNNI_INTRINS = {lanes: f"tvmzoo_dot_{lanes}x4_vnni" for lanes in (16, 8)}
for _lanes, _name in VNNI_INTRINS.items():
    s_tir.TensorIntrin.register(_name, *_vnni_dot(_lanes))


class ScheduleInt8Dot(dlight.ScheduleRule):
    """uint8 x int8 -> int32 conv2d (NHWC / HWIO, not grouped) and matmul on AVX512-VNNI.

    The weight is repacked to [OC/L, ..., IC/4, L, 4] (a layout-rewrite block that folds into the
    constant at build time), so each `vpdpbusd` multiplies 4 input channels (one broadcast int32)
    by a contiguous L x 4 weight block into L int32 accumulators; the register tile is
    `rows x vectors` of those, the reduction loops outside it, as in ScheduleReduction."""

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool):
        if not isinstance(func, tirx.PrimFunc) or target.kind.name != "llvm" \
                or not target_has_features(["avx512vnni", "avx512vl"], target):
            return None
        sch = s_tir.Schedule(func)
        blocks = _root_blocks(sch)
        reductions = [b for b in blocks if _is_reduction(sch, b)]
        if len(reductions) != 1:
            return None
        red = reductions[0]
        pos = [sch.get(b).name_hint for b in blocks].index(sch.get(red).name_hint)
        try:
            self._schedule(sch, red, blocks[:pos], blocks[pos + 1:], target)
        except (RuntimeError, ValueError) as err:
            log.debug("ScheduleInt8Dot skipped %s: %s", sch.get(red).name_hint, err)
            return None
        return sch

    @staticmethod
    def _operands(sch, red):
        """(input read, weight read, output-channel iter, input-channel iter, row iter or None,
        the weight's index vars); raises _NotApplicable when the kernel does not fit VNNI."""
        stmt = sch.get(red)
        out = stmt.writes[0]
        if out.source.dtype != "int32" or len(stmt.reads) != 2:
            raise _NotApplicable("not an int32 accumulation of two operands")
        by_var = {iv.var: iv for iv in stmt.iter_vars}
        out_vars = [_as_var(r.min) for r in out.region]
        if any(v is None or by_var[v].iter_type != tirx.IterVar.DataPar for v in out_vars):
            raise _NotApplicable("output not indexed by plain spatial vars")
        chan = by_var[out_vars[-1]]
        row = by_var[out_vars[-2]] if len(out_vars) >= 2 else None
        inp = wgt = None
        for i, read in enumerate(stmt.reads):
            if read.source.same_as(out.source):
                continue
            dtype = str(read.source.dtype)
            if dtype == "int8" and any(_as_var(r.min) is not None and _as_var(r.min).same_as(chan.var)
                                       for r in read.region):
                wgt = i
            elif dtype == "uint8":
                inp = i
        if inp is None or wgt is None:
            raise _NotApplicable("not uint8 x int8")
        rc = _as_var(stmt.reads[inp].region[-1].min)
        if rc is None or rc not in by_var or by_var[rc].iter_type != tirx.IterVar.CommReduce:
            raise _NotApplicable("input's last axis is not the channel reduction")
        w_vars = [_as_var(r.min) for r in stmt.reads[wgt].region]
        if any(v is None for v in w_vars) or sum(v.same_as(rc) for v in w_vars) != 1:
            raise _NotApplicable("weight not indexed by plain vars (grouped conv?)")
        return inp, wgt, chan, by_var[rc], row, w_vars

    def _schedule(self, sch, red, producers, consumers, target) -> None:
        self._operands(sch, red)  # applicable at all?
        for block in self._inline_producers(sch, red, producers):
            schedule_injective(sch, block, vector_lanes(target, 8))
        inp, wgt, chan, rc, row, w_vars = self._operands(sch, red)
        stmt = sch.get(red)
        c_ext, k_ext = int(chan.dom.extent), int(rc.dom.extent)
        lanes = 16 if c_ext % 16 == 0 else 8
        if c_ext % lanes or k_ext % 4:
            raise _NotApplicable(f"{c_ext} output / {k_ext} input channels: not multiples of {lanes} / 4")
        r_ext = int(row.dom.extent) if row is not None else 1
        row_tile, vecs, _ = register_tile(c_ext, r_ext, lanes)
        # weight [.., rc, .., chan, ..] -> [chan/L, <other axes>, rc/4, L, 4], folded at build time
        pos_c = next(i for i, v in enumerate(w_vars) if v.same_as(chan.var))
        pos_k = next(i for i, v in enumerate(w_vars) if v.same_as(rc.var))
        others = [i for i in range(len(w_vars)) if i not in (pos_c, pos_k)]

        def pack(*idx):
            c, k = idx[pos_c], idx[pos_k]
            return (c // lanes, *[idx[i] for i in others], k // 4, c % lanes, k % 4)

        _repack_weight(sch, red, wgt, pack)
        loops = sch.get_loops(red)
        if len(loops) != len(stmt.iter_vars):
            raise _NotApplicable("non-trivial loop binding")
        loop_of = {iv.var: loop for loop, iv in zip(loops, stmt.iter_vars)}

        c_out, c_vec, c_lane = sch.split(loop_of[chan.var], [None, vecs, lanes])
        k_out, k_lane = sch.split(loop_of[rc.var], [None, 4])
        if row is not None:
            r_out, r_in = sch.split(loop_of[row.var], [None, row_tile])
            tile, outer_rows = [r_in, c_vec], [r_out]
        else:
            tile, outer_rows = [c_vec], []
        tiled = [chan.var, rc.var] + ([row.var] if row is not None else [])
        rest = [iv for iv in stmt.iter_vars if not any(iv.var.same_as(v) for v in tiled)]
        spatial = [iv for iv in rest if iv.iter_type == tirx.IterVar.DataPar]
        red_loops = [loop_of[iv.var] for iv in rest if iv.iter_type == tirx.IterVar.CommReduce]
        outer_order = _parallel_order(stmt, chan.var, row, loop_of, spatial, c_out, outer_rows)
        sch.reorder(*outer_order, *red_loops, k_out, *tile, c_lane, k_lane)
        outer = sch.fuse(*outer_order)
        sch.parallel(outer)
        init = sch.decompose_reduction(red, (red_loops or [k_out])[0])
        for loop in tile:
            sch.unroll(loop)
        _vectorize_innermost(sch, sch.get_loops(init)[-1], lanes)
        sch.tensorize(c_lane, VNNI_INTRINS[lanes])
        self._schedule_epilogue(sch, outer, consumers, vector_lanes(target, 32))

    @staticmethod
    def _inline_producers(sch, red, producers) -> list:
        """Inline every producer into its consumer (elementwise work on a residual input goes into
        the epilogue, a plain-copy pad into the dot product); returns the blocks left (pads)."""
        read_by_red = {r.source.name for r in sch.get(red).reads}
        left = []
        for block in reversed(producers):
            stmt = sch.get(block)
            feeds_red = stmt.writes[0].source.name in read_by_red
            plain = isinstance(stmt.body, tirx.BufferStore) and isinstance(stmt.body.value, tvm.ir.TensorLoad)
            try:
                if feeds_red and not plain:
                    raise _NotApplicable("pad with a border: keep it a buffer for the intrinsic")
                sch.compute_inline(block)
            except (RuntimeError, ValueError):
                left.append(block)
        return left

    @staticmethod
    def _schedule_epilogue(sch, outer, consumers, lanes: int) -> None:
        if not consumers:
            return
        for block in _inline_into_last(sch, consumers):
            try:
                sch.reverse_compute_at(block, outer, preserve_unit_loops=False)
                _vectorize_innermost(sch, sch.get_loops(block)[-1], lanes)
            except (RuntimeError, ValueError) as err:
                log.debug("int8 epilogue not fused into the tile: %s", str(err).splitlines()[-1])
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
    return dlight.ApplyDefaultSchedule(ScheduleInt8Dot(), ScheduleReduction(), ScheduleInjective(),
                                       dlight.cpu.Reduction(), ScheduleFallback())


def prepack_passes() -> list[tvm.transform.Pass]:
    """Weight layout rewrites (ScheduleInt8Dot's, MetaSchedule's) split out of the kernels and
    folded into the constants at build time."""
    return [relax.transform.SplitLayoutRewritePreproc(), relax.transform.LiftTransformParams(),
            relax.transform.FoldConstant(), relax.transform.DeadCodeElimination()]


def default_cpu_pipeline(target: Target) -> tvm.transform.Pass:
    """Relax module as imported from ONNX -> fused, scheduled module for tvm.compile(mod, target)."""

    @tvm.transform.module_pass(opt_level=0, name="TvmzooDefaultCPUPipeline")
    def _pipeline(mod: IRModule, _ctx: tvm.transform.PassContext) -> IRModule:
        with target:
            mod = canonicalize(mod)
            return tvm.transform.Sequential([*layout_passes(), *fuse_passes(), schedule_pass(),
                                             *prepack_passes()])(mod)

    return _pipeline


def optimize(mod: IRModule, target: Target) -> IRModule:
    """Default-scheduled module (weights bound as constants) for tvm.compile(mod, target)."""
    return default_cpu_pipeline(target)(mod)
