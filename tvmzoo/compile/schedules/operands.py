"""What a reduction block reads: which operand is the weight, how large each is, and from
that the order of the parallel loop (which part of the work each core gets)."""
from __future__ import annotations

import math

from tvm import tirx

PIXEL_SPLIT_BYTES = 1 << 20  # a weight each core may read whole (its L2 is 2 MB here)
# Float kernels (ScheduleReduction): a net's weights do not stay in L2 between runs, so a weight many
# times its input is split by channel from 256 KB on (Lite0 fp32 b1, per-call minima: its 1x1 convs at
# 7x7 and 14x14 12-17 % faster). int8 kernels keep PIXEL_SPLIT_BYTES until measured.
FLOAT_SPLIT_BYTES = 256 << 10


def as_var(expr):
    return expr if isinstance(expr, tirx.Var) else None


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


def parallel_order(stmt, chan_var, row, loop_of: dict, others: list, c_out, outer_rows: list,
                   split_bytes: int = PIXEL_SPLIT_BYTES) -> list:
    """The loops fused into the parallel loop, outermost first. The runtime splits that loop into
    one contiguous range per core, so the leading axes decide which part each core computes:
    - axes that pick the weight (a batched matmul's batch, the 16 Winograd positions): each core
      reads only its own weights, and writes what the next kernel reads on the same core;
    - then the pixels, so each core keeps the rows the next kernel reads on it (a line in the other
      core's cache costs more than one in L3: splitting RepVGG-A0's stage-3 matmuls by channel
      made them 1.4x slower than splitting them by position);
    - the channel blocks lead only for a weight larger than the inputs and than `split_bytes`,
      which both cores would otherwise stream whole (A0's 8.8 MB last conv: 1.05 -> 1.50 ms).
    Within a core's range the channel block stays outside the row tiles when the weight is the
    larger operand, so each row tile reuses the weight block from cache."""
    picks = [_selects_weight(stmt, chan_var, row, iv.var) for iv in others]
    by_weight = [loop_of[iv.var] for iv, p in zip(others, picks) if p]
    pixels = [loop_of[iv.var] for iv, p in zip(others, picks) if not p]
    weight = _weight_bytes(stmt, chan_var, row)
    if weight <= _input_bytes(stmt, chan_var, row):
        return [*by_weight, *pixels, *outer_rows, c_out]
    if weight <= split_bytes:
        return [*by_weight, *pixels, c_out, *outer_rows]
    return [*by_weight, c_out, *pixels, *outer_rows]


def reads_by_channel(stmt, chan_var) -> bool:
    """Depthwise convs and pooling: an operand read at the output channel and at shifted pixels.
    They are memory-bound, so their pad is read in place (a padded copy would double the traffic)."""
    return any(_indexed_by(read, chan_var) and any(as_var(r.min) is None for r in read.region)
               for read in stmt.reads)


def converts_input(stmt) -> bool:
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
