"""ScheduleBf16Amx: bf16 x bf16 -> float32 conv2d (NHWC / HWIO, not grouped) and matmul on AMX tiles
(`tdpbf16ps`), where the target has AMX-BF16: ScheduleInt8Amx (int8_amx.py) with the bf16 tiles of
amx.py (32 input channels per tile row, the weight packed [KH, KW, OC/16, IC/2, 16, 2]). Shapes the
tiles cannot hold go to the next rule (ScheduleBf16Dot, vdpbf16ps)."""
from __future__ import annotations

from ..target import AMX_BF16_FEATURES
from . import amx
from .int8_amx import ScheduleInt8Amx


class ScheduleBf16Amx(ScheduleInt8Amx):
    """bfloat16 x bfloat16 -> float32 conv2d / matmul on AMX tiles (see the module doc)."""

    features = AMX_BF16_FEATURES
    acc_dtype, input_dtype, weight_dtype = "float32", "bfloat16", "bfloat16"
    kind = amx.BF16
