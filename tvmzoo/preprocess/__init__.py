"""Preprocessing as data: one Preprocessing spec, built from a vdsp JSON, from YAML process_ops or
from a model's defaults, and one implementation used by calibration, the runner and evaluation.

The pipeline is the vendor's fused vdsp step: decode (BGR, uint8) -> resize -> colour order -> crop
-> normalize -> planar float32 tensor. `resize_and_crop_uint8` is everything before normalization
(what a fused, on-device normalization consumes); `apply` = `normalize(resize_and_crop_uint8(...))`.

Conventions (the training repos differ by a pixel here and there; these are ours):
- sizes are (height, width), as in NCHW shapes, and named `*_hw`; points are (x, y) (`crop_xy`). The
  files keep their own forms: vdsp JSON Width / Height keys, mod.json's `resize` / `crop` as
  [width, height] (`to_meta`, read by the runtime and the C++ runner).
- keep-aspect resize: the short side becomes `short_side`, the long side `int(size * long / short)`
  (torchvision's rule).
- centred crop: top-left corner `((W - w) // 2, (H - h) // 2)` (PaddleClas' rule, and the vdsp
  CropX/CropY the vendor writes for 256 -> 224).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, did_you_mean, in_context

NORM_TYPES = ("NORMAL_EQUAL", "MINUSMEAN_DIVSTD", "DIV255_MINUSMEAN_DIVSTD", "DIV127_5_MINUSONE", "DIV255")
RESIZE_TYPES = ("BILINEAR_CV", "BILINEAR", "BILINEAR_PILLOW", "NEAREST", "BICUBIC")
COLOR_CVT_CODES = ("NO_CHANGE", "BGR2RGB", "RGB2BGR")
# Norm types whose formula uses mean/std.
_USES_MEAN_STD = ("MINUSMEAN_DIVSTD", "DIV255_MINUSMEAN_DIVSTD")
# mod.json names of the (height, width) fields, written [width, height] as vdsp and OpenCV do
_META_NAMES = {"resize_hw": "resize", "crop_hw": "crop"}

def _suggest(name: str, choices: Sequence[str]) -> str:
    return f"{did_you_mean(str(name).upper(), choices)} Allowed: {', '.join(choices)}."


def _suggest_exact(name: Any, choices: Mapping[str, Any] | Sequence[str]) -> str:
    return f"{did_you_mean(name, choices)} Supported: {', '.join(choices)}."


def _choice(value: Any, choices: Sequence[str], what: str, *, prefix: str = "") -> str:
    """Canonical name of `value` among `choices` (case-insensitive; a vendor prefix like
    'NORMAL_' or 'COLOR_' is tolerated)."""
    if isinstance(value, str):
        name = value.strip().upper()
        if name in choices:
            return name
        if prefix and name.startswith(prefix) and name[len(prefix):] in choices:
            return name[len(prefix):]
    raise ConfigError(f"unknown {what} {value!r}.{_suggest(str(value), choices)}")


def _int_pair(name: str, value: Any, minimum: int, order: str = "height, width") -> tuple[int, int]:
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(
            isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in value):
        pair = (int(value[0]), int(value[1]))
        if min(pair) >= minimum:
            return pair
    kind = "positive" if minimum > 0 else "non-negative"
    raise ConfigError(f"preprocessing {name} must be two {kind} integers ({order}), got {value!r}.")


def _triple(name: str, value: Any) -> tuple[float, float, float]:
    if (isinstance(value, (list, tuple)) and len(value) == 3
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) for v in value)):
        return (float(value[0]), float(value[1]), float(value[2]))
    raise ConfigError(f"preprocessing {name} must be three finite numbers (one per channel), got {value!r}.")


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes the network's input tensor.

    resize_hw: (height, width) of a plain resize when keep_aspect is False; with keep_aspect the
        short side is resized to `short_side` and the aspect ratio kept (the training repos' way).
    crop_hw: (height, width) of the crop: the network's input size; crop_xy its top-left corner
        (x, y), None = centred.
    mean / std: in the scale of the normalization (0..1 for DIV255_MINUSMEAN_DIVSTD), in the
        network's channel order; NORMAL_EQUAL, DIV127_5_MINUSONE and DIV255 ignore them.
    rgb: True when the network expects RGB channel order (images are decoded as BGR by OpenCV).

    Every instance is validated on construction (ConfigError).
    """

    resize_hw: tuple[int, int] = (256, 256)
    keep_aspect: bool = False
    crop_hw: tuple[int, int] = (224, 224)
    crop_xy: tuple[int, int] | None = None
    interpolation: str = "BILINEAR_CV"
    norm: str = "DIV255_MINUSMEAN_DIVSTD"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    rgb: bool = True

    def __post_init__(self) -> None:
        fix = object.__setattr__  # frozen: normalise lists to tuples once, here
        fix(self, "resize_hw", _int_pair("resize_hw", self.resize_hw, 1))
        fix(self, "crop_hw", _int_pair("crop_hw", self.crop_hw, 1))
        if self.crop_xy is not None:
            fix(self, "crop_xy", _int_pair("crop_xy", self.crop_xy, 0, "x, y"))
        fix(self, "interpolation", _choice(self.interpolation, RESIZE_TYPES, "ResizeType"))
        fix(self, "norm", _choice(self.norm, NORM_TYPES, "NormaType", prefix="NORMAL_"))
        fix(self, "mean", _triple("mean", self.mean))
        fix(self, "std", _triple("std", self.std))
        for name in ("keep_aspect", "rgb"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"preprocessing {name} must be true or false, got {getattr(self, name)!r}.")
        if self.norm in _USES_MEAN_STD and any(s <= 0 for s in self.std):
            raise ConfigError(f"preprocessing std must be positive for {self.norm}, got {self.std}.")
        if self.resize_hw[0] * self.resize_hw[1] > MAX_PIXELS:
            raise ConfigError(f"preprocessing resize {self.resize_hw[1]}x{self.resize_hw[0]} is above the limit of "
                              f"{MAX_PIXELS} pixels: networks take a few hundred pixels a side.")
        self._check_crop_fits()

    @property
    def short_side(self) -> int:
        """With keep_aspect: what the short side is resized to (the width entry, vdsp's ResizeWidth)."""
        return self.resize_hw[1]

    @property
    def resized_hw(self) -> tuple[int, int]:
        """(height, width) the crop is taken from, at least: with keep_aspect the short side on both."""
        return (self.short_side, self.short_side) if self.keep_aspect else self.resize_hw

    def _check_crop_fits(self) -> None:
        (room_h, room_w), (crop_h, crop_w) = self.resized_hw, self.crop_hw
        x, y = self.crop_xy or (0, 0)
        if x + crop_w > room_w or y + crop_h > room_h:
            where = f" at ({x}, {y})" if self.crop_xy else ""
            side = f"short side {room_w}" if self.keep_aspect else f"resize {room_w}x{room_h}"
            raise ConfigError(
                f"preprocessing crop {crop_w}x{crop_h}{where} does not fit in the {side}: "
                f"make the crop smaller or the resize larger.")

    # ---- mod.json: sizes as [width, height] under 'resize' / 'crop' (the runtime and the C++ runner) ----
    def to_meta(self) -> dict[str, Any]:
        return {_META_NAMES.get(f.name, f.name): getattr(self, f.name)[::-1] if f.name in _META_NAMES
                else getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> Preprocessing:
        kw = {k: tuple(v) if isinstance(v, list) else v for k, v in meta.items()}
        for field_name, key in _META_NAMES.items():
            if key in kw:
                value = kw.pop(key)
                kw[field_name] = value[::-1] if isinstance(value, tuple) else value
        return cls(**kw)

    # ---- normalization as an affine map (used by host code and by fused preprocessing) ----
    def scale_offset(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel (scale, offset), float32, with normalized = uint8_value * scale + offset."""
        mean, std = np.array(self.mean, np.float64), np.array(self.std, np.float64)
        ones, zeros = np.ones(3), np.zeros(3)
        scale, offset = {
            "NORMAL_EQUAL": (ones, zeros),
            "MINUSMEAN_DIVSTD": (1 / std, -mean / std),
            "DIV255_MINUSMEAN_DIVSTD": (1 / (255 * std), -mean / std),
            "DIV127_5_MINUSONE": (ones / 127.5, -ones),
            "DIV255": (ones / 255, zeros),
        }[self.norm]
        return scale.astype(np.float32), offset.astype(np.float32)

    # ---- vdsp params JSON ----
    @classmethod
    def from_vdsp(cls, source: str | Path | Mapping[str, Any]) -> Preprocessing:
        """Read a vendor vdsp params JSON (a path or the parsed dict): the `OpType`/`OpConfig`
        form, or the older `vdsp_op_type` + `config` list form (also its flat sdk1.0 variant)."""
        from .vdsp import read_vdsp

        return read_vdsp(source)

    def to_vdsp(self) -> dict[str, Any]:
        """The `OpType`/`OpConfig` form; keep-aspect adds our optional `ResizeKeepAspect: true`."""
        (rh, rw), (ch, cw) = self.resized_hw, self.crop_hw
        cx, cy = self.crop_xy or ((rw - cw) // 2, (rh - ch) // 2)
        cfg: dict[str, Any] = {
            "IimageFormat": "RGB_PLANAR" if self.rgb else "BGR888",
            "IimageWidth": rw, "IimageHeight": rh,
            "OimageWidth": cw, "OimageHeight": ch,
            "CropX": cx, "CropY": cy,
            "ResizeWidth": rw, "ResizeHeight": rh,
            "IimageWidthPitch": rw, "IimageHeightPitch": rh,
            "Mean": list(self.mean), "Std": list(self.std),
            "NormaType": self.norm,
            "ColorCvtCode": "NO_CHANGE",
            "ResizeType": self.interpolation,
        }
        if self.keep_aspect:
            cfg["ResizeKeepAspect"] = True
        from .vdsp import VDSP_OP_TYPES

        return {"OpType": VDSP_OP_TYPES[0], "OpConfig": cfg}

    # ---- YAML dataset.process_ops ----
    @classmethod
    def from_process_ops(cls, ops: Sequence[Mapping[str, Any]], where: str = "process_ops") -> Preprocessing:
        """The build YAML's `dataset.process_ops` list as one Preprocessing."""
        from .process_ops import read_process_ops

        kw = read_process_ops(ops, where)
        try:
            return cls(**kw)
        except ConfigError as err:
            raise in_context(err, where) from None


# the parts, under the names the package has always had
from .decode import MAX_PIXELS, decode_image, read_image  # noqa: E402
from .transform import (apply, batch, normalize, resize_and_crop_uint8, resize_pillow, resize_uint8,  # noqa: E402
                        resized_size)
