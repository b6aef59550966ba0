"""ScheduleBf16Amx: bf16 x bf16 -> float32 conv2d (NHWC / HWIO, not grouped) and matmul on AMX tiles
(`tdpbf16ps`), where the target has AMX-BF16: ScheduleInt8Amx (int8_amx.py) with the bf16 tiles of
amx.py (32 input channels per tile row, the weight packed [KH, KW, OC/16, IC/2, 16, 2]). Shapes the
tiles cannot hold go to the next rule (ScheduleBf16Dot, vdpbf16ps)."""
from __future__ import annotations

from ..target import AMX_BF16_FEATURES
from . import amx
from .int8_amx import ScheduleInt8Amx

# bf16 macro tiles: one row tile x six channel tiles first (the most output per tile configuration: 8 tiles,
# one B tile). Each macro tile pays a tile configuration (~60 ns: measured by loading it three times) and a
# workspace for its accumulators (~60 ns), so fewer, larger tiles win. Lite0 bf16 kernel by kernel
# (Sapphire Rapids, interleaved, load 3.3-4.4) against int8's TILINGS: 0.54-1.02x (16 -> 96 channels at
# 112 x 112: 0.77x; the 1x1 convs at 28 x 28 and 14 x 14: 0.54-0.74x; none more than 2 % slower).
BF16_TILINGS = ((1, 6), (2, 2), (1, 4), (1, 5), (3, 1), (1, 3), (2, 1), (1, 2), (1, 1))


class ScheduleBf16Amx(ScheduleInt8Amx):
    """bfloat16 x bfloat16 -> float32 conv2d / matmul on AMX tiles (see the module doc)."""

    features = AMX_BF16_FEATURES
    acc_dtype, input_dtype, weight_dtype = "float32", "bfloat16", "bfloat16"
    kind = amx.BF16
    tilings = BF16_TILINGS
