"""ScheduleDepthwise: NHWC depthwise convs (one input channel per output channel) as ScheduleReduction
schedules them, with a register tile shaped for their taps.

A depthwise conv has no channel reduction: each output vector sums KH x KW products of an input
vector and a weight vector. ScheduleReduction's tile (rows x channel vectors, every tap a loop outside
it) loads an input vector and a weight vector for each multiply-add. Here the tile is one row of R
output pixels x V channel vectors, and inside each kernel row the R pixels and KW taps are unrolled:
output pixel r's tap kx reads input pixel r * stride + kx, so LLVM loads each input vector once for
all the taps that read it (R * stride + KW - 1 loads instead of R * KW) and each weight vector once
for all R pixels. Every output still sums its taps in the same order (kernel row, then column), so
the results are bit-identical to ScheduleReduction's.

Per kernel, one thread, Lite0 (minima of interleaved runs; the sum over its 12 depthwise kernels):
fp32 0.87x (the 5x5 convs at 14x14 and 28x28 0.59-0.71x, at 7x7 x 1152 channels 0.84x, the 3x3 convs
0.88-0.98x), bf16 0.70x (each bf16 input vector is also converted once, not once per tap), int8 0.88x
at batch 1 (was: every tap unrolled, for the same reason). The convs at 56x56 and 112x112 gain little:
their inputs come from L3 (1.8-4.8 MB per image, ~25 GB/s on one core here).
"""
from __future__ import annotations

from tvm import tirx
from tvm.target import Target

from .base import NotApplicable
from .loops import MAX_VECTORS_PER_ROW, _divisors, max_accumulators, vector_width
from .operands import reads_by_channel
from .reduction import ScheduleReduction

# Accumulators of the tile (output pixels x channel vectors): at least 8 independent FMA chains keep
# both FMA ports busy through their 4-cycle latency; 14 vectors stay under TVM's 1 KiB stack limit
# (loops.MAX_ACCUMULATORS) and leave registers for KW weights and the input vectors in flight.
DEPTHWISE_ACCUMULATORS = 14
# Output pixels per tile for 3-wide kernels: 14 was 4-5 % slower than 8 on Lite0's 112- and 56-wide
# rows and no faster on its 14-wide ones; 5-wide kernels take up to 14 (their loads per multiply-add
# fall from 0.46 at 7 pixels to 0.33 at 14: 0.58-0.67x ScheduleReduction's time, 7 pixels 0.70-0.9x).
NARROW_KERNEL_PIXELS = 8


def depthwise_tile(channels: int, width: int, kernel_width: int, lanes: int) -> tuple[int, int, int]:
    """(pixels, vectors, vector width): the most output pixels of a row dividing its `width` (each
    input vector is loaded once for up to KW of them), then channel vectors up to the accumulators."""
    vec = vector_width(channels, lanes)
    accumulators = min(DEPTHWISE_ACCUMULATORS, max_accumulators(Target.current(allow_none=True)))  # AVX2: 16 registers
    most = min(NARROW_KERNEL_PIXELS, accumulators) if kernel_width <= 3 else accumulators
    pixels = max(_divisors(width, most))
    vecs = max(_divisors(channels // vec, min(MAX_VECTORS_PER_ROW, accumulators // pixels)))
    return pixels, vecs, vec


class ScheduleDepthwise(ScheduleReduction):
    """NHWC depthwise convs: [N, H, W, C] outputs, reduction over (KH, KW, one input channel)."""

    # The epilogue over the tile's pixels unrolled: as a loop, LLVM vectorized a uint8 requantize across
    # its 8 pixels with gathers and byte stores (Lite0 int8's 112x112x32 depthwise conv 3.4x slower).
    epilogue_unroll = DEPTHWISE_ACCUMULATORS

    def check(self, stmt, chan, row, reduce: list) -> None:
        operands = [r for r in stmt.reads if not r.source.same_as(stmt.writes[0].source)]
        if row is None or len(reduce) != 3 or int(reduce[2].dom.extent) != 1 or len(operands) != 2 \
                or not reads_by_channel(stmt, chan.var) or len(stmt.writes[0].region) != 4:
            raise NotApplicable("not an NHWC depthwise conv")

    def tile_shape(self, stmt, c_ext: int, r_ext: int, lanes: int) -> tuple[int, int, int]:
        kernel_width = [iv for iv in stmt.iter_vars if iv.iter_type == tirx.IterVar.CommReduce][1].dom.extent
        return depthwise_tile(c_ext, r_ext, int(kernel_width), lanes)

    def inner_order(self, red_loops: list, tile: list) -> list:
        """Kernel row, input channel, then the unrolled pixels x kernel columns x channel vectors."""
        ky, kx, rc = red_loops
        return [ky, rc, tile[0], kx, *tile[1:]]

