"""Preprocessing as data: one Preprocessing spec, built from a vdsp JSON, from YAML process_ops or
from a model's defaults, and one implementation used by calibration, the runner and evaluation.

The pipeline is the vendor's fused vdsp step: decode (BGR, uint8) -> resize -> colour order -> crop
-> normalize -> planar float32 tensor. `resize_and_crop_uint8` is everything before normalization
(what a fused, on-device normalization consumes); `apply` = `normalize(resize_and_crop_uint8(...))`.

Conventions (the training repos differ by a pixel here and there; these are ours):
- keep-aspect resize: the short side becomes `resize[0]`, the long side `int(size * long / short)`
  (torchvision's rule).
- centred crop: top-left corner `((W - w) // 2, (H - h) // 2)` (PaddleClas' rule, and the vdsp
  CropX/CropY the vendor writes for 256 -> 224).
"""
from __future__ import annotations

import difflib
import json
import os
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from ..errors import ConfigError, ImageError
from ..limits import (IMAGE_BYTES_PER_PIXEL, IMAGE_EXTRA_BYTES, IMAGE_HEADER_BYTES, check_text_size,
                      json_nesting_problem)

log = logging.getLogger(__name__)

NORM_TYPES = ("NORMAL_EQUAL", "MINUSMEAN_DIVSTD", "DIV255_MINUSMEAN_DIVSTD", "DIV127_5_MINUSONE", "DIV255")
RESIZE_TYPES = ("BILINEAR_CV", "BILINEAR", "BILINEAR_PILLOW", "NEAREST", "BICUBIC")
COLOR_CVT_CODES = ("NO_CHANGE", "BGR2RGB", "RGB2BGR")
# Norm types whose formula uses mean/std.
_USES_MEAN_STD = ("MINUSMEAN_DIVSTD", "DIV255_MINUSMEAN_DIVSTD")

# Images above this many pixels are refused before decoding (a 100 MP photo already needs
# 300 MB as BGR; ImageNet photos are ~0.2 MP).
MAX_PIXELS = 100_000_000

_CV_INTERPOLATION = {
    "BILINEAR_CV": cv2.INTER_LINEAR,
    "BILINEAR": cv2.INTER_LINEAR,  # the vendor's plain bilinear: same half-pixel sampling as OpenCV
    "NEAREST": cv2.INTER_NEAREST,
    "BICUBIC": cv2.INTER_CUBIC,
}

# vdsp fused ops we implement faithfully; the others (letterbox, YUV input, ...) are refused.
VDSP_OP_TYPES = (
    "FUSION_OP_RGB_RESIZE_CVTCOLOR_CROP_NORM_TENSOR",
    "FUSION_OP_RGB_RESIZE_CVTCOLOR_NORM_TENSOR",
)
LEGACY_VDSP_OP_TYPES = (
    "RGB_RESIZE_CVTCOLOR_CROP_NORMALIZATION_TENSORIZATION_U8",
    300,  # the numeric form of the same op in the vendor's sdk1.0 files
)
# Numeric codes of the legacy (sdk1.0) files, as seen in the vendor zoo: norma_type 3 comes with
# 0..255 means, 4 with 0..1 means, 6 is documented as DIV255; 2 and 5 follow the enum order.
_LEGACY_NORM_CODES = {2: "NORMAL_EQUAL", 3: "MINUSMEAN_DIVSTD", 4: "DIV255_MINUSMEAN_DIVSTD",
                      5: "DIV127_5_MINUSONE", 6: "DIV255"}
_LEGACY_RESIZE_CODES = {1: "BILINEAR"}
_LEGACY_COLOR_CODES = {2: "NO_CHANGE"}  # the only code seen, always with RGB planar input
_LEGACY_FORMAT_CODES = {5000: "RGB_PLANAR"}


def _suggest(name: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(str(name).upper(), list(choices), n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return f"{hint} Allowed: {', '.join(choices)}."


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


def _int_pair(name: str, value: Any, minimum: int) -> tuple[int, int]:
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(
            isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in value):
        pair = (int(value[0]), int(value[1]))
        if min(pair) >= minimum:
            return pair
    kind = "positive" if minimum > 0 else "non-negative"
    raise ConfigError(f"preprocessing {name} must be two {kind} integers (width, height), got {value!r}.")


def _triple(name: str, value: Any) -> tuple[float, float, float]:
    if (isinstance(value, (list, tuple)) and len(value) == 3
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) for v in value)):
        return (float(value[0]), float(value[1]), float(value[2]))
    raise ConfigError(f"preprocessing {name} must be three finite numbers (one per channel), got {value!r}.")


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes the network's input tensor.

    resize: (width, height) of a plain resize when keep_aspect is False; with keep_aspect the
        short side is resized to resize[0] and the aspect ratio kept (the training repos' way).
    crop: (width, height) of the crop; crop_xy its top-left corner, None = centred.
    mean / std: in the scale of the normalization (0..1 for DIV255_MINUSMEAN_DIVSTD), in the
        network's channel order; NORMAL_EQUAL, DIV127_5_MINUSONE and DIV255 ignore them.
    rgb: True when the network expects RGB channel order (images are decoded as BGR by OpenCV).

    Every instance is validated on construction (ConfigError).
    """

    resize: tuple[int, int] = (256, 256)
    keep_aspect: bool = False
    crop: tuple[int, int] = (224, 224)
    crop_xy: tuple[int, int] | None = None
    interpolation: str = "BILINEAR_CV"
    norm: str = "DIV255_MINUSMEAN_DIVSTD"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    rgb: bool = True

    def __post_init__(self) -> None:
        fix = object.__setattr__  # frozen: normalise lists to tuples once, here
        fix(self, "resize", _int_pair("resize", self.resize, 1))
        fix(self, "crop", _int_pair("crop", self.crop, 1))
        if self.crop_xy is not None:
            fix(self, "crop_xy", _int_pair("crop_xy", self.crop_xy, 0))
        fix(self, "interpolation", _choice(self.interpolation, RESIZE_TYPES, "ResizeType"))
        fix(self, "norm", _choice(self.norm, NORM_TYPES, "NormaType", prefix="NORMAL_"))
        fix(self, "mean", _triple("mean", self.mean))
        fix(self, "std", _triple("std", self.std))
        for name in ("keep_aspect", "rgb"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"preprocessing {name} must be true or false, got {getattr(self, name)!r}.")
        if self.norm in _USES_MEAN_STD and any(s <= 0 for s in self.std):
            raise ConfigError(f"preprocessing std must be positive for {self.norm}, got {self.std}.")
        if self.resize[0] * self.resize[1] > MAX_PIXELS:
            raise ConfigError(f"preprocessing resize {self.resize[0]}x{self.resize[1]} is above the limit of "
                              f"{MAX_PIXELS} pixels: networks take a few hundred pixels a side.")
        self._check_crop_fits()

    def _check_crop_fits(self) -> None:
        # With keep_aspect the resized image is at least resize[0] on both sides.
        room = (self.resize[0], self.resize[0]) if self.keep_aspect else self.resize
        x, y = self.crop_xy or (0, 0)
        if x + self.crop[0] > room[0] or y + self.crop[1] > room[1]:
            where = f" at ({x}, {y})" if self.crop_xy else ""
            side = f"short side {room[0]}" if self.keep_aspect else f"resize {room[0]}x{room[1]}"
            raise ConfigError(
                f"preprocessing crop {self.crop[0]}x{self.crop[1]}{where} does not fit in the {side}: "
                f"make the crop smaller or the resize larger.")

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
        where, data = _load_json(source)
        try:
            if not isinstance(data, dict):
                raise ConfigError(f"expected a JSON object, got {type(data).__name__}.")
            if "OpConfig" in data:
                return _from_opconfig(data)
            if "vdsp_op_type" in data:
                return _from_legacy(data)
            raise ConfigError(
                "not a vdsp params file: expected the keys 'OpType' and 'OpConfig' (or the older "
                f"'vdsp_op_type' and 'config'), found {sorted(map(str, data))}.")
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from None

    def to_vdsp(self) -> dict[str, Any]:
        """The `OpType`/`OpConfig` form; keep-aspect adds our optional `ResizeKeepAspect: true`."""
        rw, rh = (self.resize[0], self.resize[0]) if self.keep_aspect else self.resize
        cx, cy = self.crop_xy or ((rw - self.crop[0]) // 2, (rh - self.crop[1]) // 2)
        cfg: dict[str, Any] = {
            "IimageFormat": "RGB_PLANAR" if self.rgb else "BGR888",
            "IimageWidth": rw, "IimageHeight": rh,
            "OimageWidth": self.crop[0], "OimageHeight": self.crop[1],
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
        return {"OpType": VDSP_OP_TYPES[0], "OpConfig": cfg}

    # ---- YAML dataset.process_ops ----
    @classmethod
    def from_process_ops(cls, ops: Sequence[Mapping[str, Any]], where: str = "process_ops") -> Preprocessing:
        """The build YAML's `dataset.process_ops` list as one Preprocessing."""
        if not isinstance(ops, (list, tuple)) or not ops:
            raise ConfigError(f"{where} must be a non-empty list of {{type: ...}} steps, got {ops!r}.")
        kw: dict[str, Any] = {"crop": None}
        for i, op in enumerate(ops):
            here = f"{where}[{i}]"
            if not isinstance(op, Mapping) or "type" not in op:
                raise ConfigError(f"{here} must be a mapping with a 'type' key, got {op!r}.")
            kind = op["type"]
            handler = _PROCESS_OPS.get(kind) if isinstance(kind, str) else None
            if handler is None:
                raise ConfigError(f"{here}.type: unknown step {kind!r}.{_suggest_exact(kind, _PROCESS_OPS)}")
            args = {k: v for k, v in op.items() if k != "type"}
            try:
                handler(args, kw)
            except ConfigError as err:
                raise ConfigError(f"{here} ({kind}): {err}") from None
        if "resize" not in kw:
            raise ConfigError(f"{where}: no Resize step: add `- type: Resize` with `size: [256, 256]` "
                              "or `resize_short: 256`.")
        if kw["crop"] is None:
            if kw.get("keep_aspect"):
                raise ConfigError(f"{where}: a resize_short Resize keeps the aspect ratio, so the input "
                                  "size varies: add a CenterCrop step (crop_size: [224, 224]).")
            kw["crop"] = kw["resize"]
        try:
            return cls(**kw)
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from None


def _suggest_exact(name: Any, choices: Mapping[str, Any] | Sequence[str]) -> str:
    close = difflib.get_close_matches(str(name), list(choices), n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return f"{hint} Supported: {', '.join(choices)}."


def _no_args(args: dict, kw: dict) -> None:
    if args:
        raise ConfigError(f"unexpected keys {sorted(map(str, args))}.")


def _op_decode(args: dict, kw: dict) -> None:
    extra = set(args) - {"to_rgb", "channel_first"}
    if extra:
        raise ConfigError(f"unexpected keys {sorted(map(str, extra))}; allowed: to_rgb.")
    if args.get("channel_first"):
        raise ConfigError("channel_first: true is not supported: tvmzoo decodes to HWC and lays out "
                          "the tensor itself (ToTensor); remove the key.")
    if "to_rgb" in args:
        if not isinstance(args["to_rgb"], bool):
            raise ConfigError(f"to_rgb must be true or false, got {args['to_rgb']!r}.")
        kw["rgb"] = args["to_rgb"]


_INTERP_ALIASES = {"bilinear": "BILINEAR_CV", "linear": "BILINEAR_CV", "nearest": "NEAREST",
                   "bicubic": "BICUBIC", "cubic": "BICUBIC", "pillow": "BILINEAR_PILLOW"}


def _op_resize(args: dict, kw: dict) -> None:
    extra = set(args) - {"size", "resize_short", "interpolation"}
    if extra:
        raise ConfigError(f"unexpected keys {sorted(map(str, extra))}; allowed: size, resize_short, interpolation.")
    if ("size" in args) == ("resize_short" in args):
        raise ConfigError("give exactly one of size: [width, height] or resize_short: <short side>.")
    if "size" in args:
        size = args["size"]
        kw["resize"] = (size, size) if isinstance(size, int) and not isinstance(size, bool) else size
        kw["keep_aspect"] = False
    else:
        short = args["resize_short"]
        kw["resize"] = (short, short)
        kw["keep_aspect"] = True
    if "interpolation" in args:
        name = args["interpolation"]
        kw["interpolation"] = _INTERP_ALIASES.get(str(name).lower(), name)


def _op_center_crop(args: dict, kw: dict) -> None:
    extra = set(args) - {"crop_size"}
    if extra or "crop_size" not in args:
        raise ConfigError("expected exactly one key, crop_size: [width, height].")
    size = args["crop_size"]
    kw["crop"] = (size, size) if isinstance(size, int) and not isinstance(size, bool) else size
    kw["crop_xy"] = None


def _op_normalize(args: dict, kw: dict) -> None:
    extra = set(args) - {"mean", "std", "div255"}
    if extra:
        raise ConfigError(f"unexpected keys {sorted(map(str, extra))}; allowed: mean, std, div255.")
    mean = _triple("mean", args.get("mean", (0, 0, 0)))
    std = _triple("std", args.get("std", (1, 1, 1)))
    div255 = args.get("div255")
    if div255 is None:
        # Not said: infer from the scale of the statistics (the vendor example gives 0..1 means).
        div255 = max(mean) <= 1 and max(std) <= 1
        log.debug("Normalize without div255: inferred div255=%s from mean %s", div255, mean)
    elif not isinstance(div255, bool):
        raise ConfigError(f"div255 must be true or false, got {div255!r}.")
    plain = mean == (0.0, 0.0, 0.0) and std == (1.0, 1.0, 1.0)
    if div255:
        kw["norm"] = "DIV255" if plain else "DIV255_MINUSMEAN_DIVSTD"
    else:
        kw["norm"] = "NORMAL_EQUAL" if plain else "MINUSMEAN_DIVSTD"
    kw["mean"], kw["std"] = mean, std


def _op_custom(args: dict, kw: dict) -> None:
    raise ConfigError(
        "not supported, because a build config must never make tvmzoo import and run code "
        "(module_path/func_name), and preprocessing must be a declarative spec the runner, "
        "calibration and evaluation share: describe it with DecodeImage / Resize / CenterCrop / "
        "Normalize / ToTensor, or pass a vdsp params JSON.")


_PROCESS_OPS = {
    "DecodeImage": _op_decode,
    "Resize": _op_resize,
    "CenterCrop": _op_center_crop,
    "Normalize": _op_normalize,
    "ToTensor": _no_args,  # layout only (HWC -> CHW); scaling is Normalize's job
    "CustomFunc": _op_custom,
}


# ---------------------------------------------------------------------------------------------
# vdsp parsing
# ---------------------------------------------------------------------------------------------
def _load_json(source: str | Path | Mapping[str, Any]) -> tuple[str, Any]:
    if isinstance(source, Mapping):
        return "vdsp params", dict(source)
    path = Path(source)
    check_text_size(path, "vdsp params file")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"vdsp params file {path} does not exist: check the --vdsp_params path.") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read vdsp params file {path}: {err}.") from None
    too_deep = json_nesting_problem(text)
    if too_deep:
        raise ConfigError(f"{path}: {too_deep}; a vdsp params file nests 3 levels.")
    try:
        return str(path), json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}.") from None


_MISSING = object()


def _get(cfg: Mapping[str, Any], key: str, kind: type | tuple[type, ...], default: Any = _MISSING) -> Any:
    if key not in cfg:
        if default is _MISSING:
            raise ConfigError(f"missing key '{key}'.")
        return default
    value = cfg[key]
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise ConfigError(f"'{key}' must be {_kind_name(kind)}, got {value!r}.")
    if not isinstance(value, kind):
        raise ConfigError(f"'{key}' must be {_kind_name(kind)}, got {value!r}.")
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join({int: "an integer", str: "a string", list: "a list", bool: "true or false",
                        float: "a number"}.get(k, k.__name__) for k in kinds)


def _rgb_from(image_format: str, cvt_code: str) -> bool:
    """The network's channel order: BGR2RGB / RGB2BGR say it; NO_CHANGE keeps the buffer's order."""
    if cvt_code == "BGR2RGB":
        return True
    if cvt_code == "RGB2BGR":
        return False
    return not image_format.upper().startswith("BGR")


def _from_opconfig(data: Mapping[str, Any]) -> Preprocessing:
    op = data.get("OpType")
    if op not in VDSP_OP_TYPES:
        raise ConfigError(f"OpType {op!r} is not supported.{_suggest_exact(op, VDSP_OP_TYPES)}")
    cfg = data["OpConfig"]
    if not isinstance(cfg, dict):
        raise ConfigError(f"'OpConfig' must be an object, got {cfg!r}.")
    try:
        return _opconfig(op, cfg)
    except ConfigError as err:
        raise ConfigError(f"OpConfig: {err}") from None


# The OpConfig keys tvmzoo reads or knowingly ignores (input-buffer placeholders, tensor types).
_OPCONFIG_KEYS = ("IimageFormat", "IimageWidth", "IimageHeight", "IimageWidthPitch", "IimageHeightPitch",
                  "OimageWidth", "OimageHeight", "CropX", "CropY", "ResizeWidth", "ResizeHeight",
                  "Mean", "Std", "NormaType", "ColorCvtCode", "ResizeType", "ResizeKeepAspect")


def _check_opconfig_keys(cfg: Mapping[str, Any]) -> None:
    """A misspelt key would silently fall back to its default: refuse the ones that look like typos."""
    for key in cfg:
        if key in _OPCONFIG_KEYS or str(key).startswith("TensorType"):
            continue
        close = difflib.get_close_matches(str(key), _OPCONFIG_KEYS, n=1, cutoff=0.75)
        if close:
            raise ConfigError(f"unknown key '{key}'. Did you mean '{close[0]}'? Rename it.")
        log.warning("vdsp OpConfig: unknown key '%s' ignored", key)


def _size_key(cfg: Mapping[str, Any], key: str, default: Any = _MISSING, minimum: int = 1) -> int:
    value = _get(cfg, key, int, default)
    if value < minimum:
        what = "a positive integer" if minimum > 0 else "an integer >= 0"
        raise ConfigError(f"'{key}' must be {what}, got {value}.")
    return value


def _opconfig(op: str, cfg: Mapping[str, Any]) -> Preprocessing:
    _check_opconfig_keys(cfg)
    ow, oh = _size_key(cfg, "OimageWidth"), _size_key(cfg, "OimageHeight")
    rw, rh = _size_key(cfg, "ResizeWidth", ow), _size_key(cfg, "ResizeHeight", oh)
    cx, cy = _size_key(cfg, "CropX", 0, minimum=0), _size_key(cfg, "CropY", 0, minimum=0)
    keep = _get(cfg, "ResizeKeepAspect", bool, False)
    if keep and rw != rh:
        raise ConfigError(f"ResizeKeepAspect resizes the short side to one size, but ResizeWidth {rw} != "
                          f"ResizeHeight {rh}: set both to the short-side size.")
    if "CROP" not in op:
        cx, cy = 0, 0
    centred = ((rw - ow) // 2, (rh - oh) // 2)
    norm = _choice(_get(cfg, "NormaType", str), NORM_TYPES, "NormaType", prefix="NORMAL_")
    uses_stats = norm in _USES_MEAN_STD
    mean = _get(cfg, "Mean", list, _MISSING if uses_stats else [0, 0, 0])
    std = _get(cfg, "Std", list, _MISSING if uses_stats else [1, 1, 1])
    cvt = _choice(_get(cfg, "ColorCvtCode", str, "NO_CHANGE"), COLOR_CVT_CODES, "ColorCvtCode", prefix="COLOR_")
    fmt = _get(cfg, "IimageFormat", str, "RGB_PLANAR")
    log.debug("vdsp OpConfig: ignoring input-buffer keys %s",
              sorted(k for k in cfg if k.startswith("Iimage") or k.startswith("TensorType")))
    try:
        return Preprocessing(
            resize=(rw, rh), keep_aspect=keep, crop=(ow, oh),
            crop_xy=None if (cx, cy) == centred else (cx, cy),
            interpolation=_choice(_get(cfg, "ResizeType", str, "BILINEAR_CV"), RESIZE_TYPES, "ResizeType"),
            norm=norm, mean=mean, std=std, rgb=_rgb_from(fmt, cvt))
    except ConfigError as err:
        if "does not fit" not in str(err):
            raise
        raise ConfigError(f"{err} Here the crop is OimageWidth x OimageHeight = {ow}x{oh} at CropX, CropY = "
                          f"({cx}, {cy}) and the resize ResizeWidth x ResizeHeight = {rw}x{rh}.") from None


def _legacy_enum(props: Mapping[str, Any], key: str, choices: Sequence[str], codes: Mapping[int, str],
                 default: str | None = None, prefix: str = "") -> str:
    value = props.get(key, default)
    if value is None:
        raise ConfigError(f"missing property '{key}'.")
    if isinstance(value, int) and not isinstance(value, bool):
        if value not in codes:
            raise ConfigError(f"numeric code {value} for '{key}' is not known to tvmzoo: write the name "
                              f"instead ({', '.join(choices)}).")
        return codes[value]
    try:
        return _choice(value, choices, key, prefix=prefix)
    except ConfigError as err:
        raise ConfigError(f"property {err}") from None


def _fp16_value(props: Mapping[str, Any], dtypes: Mapping[str, str], key: str) -> float:
    """meanr/stdr/...: an integer is an fp16 bit pattern (UINT_16, 14275 = 0.485), a float is the value."""
    if key not in props:
        raise ConfigError(f"missing property '{key}'.")
    value, dtype = props[key], dtypes.get(key, "").upper()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"property '{key}' must be a number, got {value!r}.")
    if isinstance(value, int) and "FLOAT" not in dtype and "FP" not in dtype:
        if not 0 <= value <= 0xFFFF:
            raise ConfigError(f"property '{key}' = {value} is not a 16-bit fp16 bit pattern (0..65535).")
        return float(np.array(value, np.uint16).view(np.float16))
    return float(value)


def _from_legacy(data: Mapping[str, Any]) -> Preprocessing:
    op = data["vdsp_op_type"]
    if op not in LEGACY_VDSP_OP_TYPES:
        raise ConfigError(f"vdsp_op_type {op!r} is not supported; supported: "
                          f"{', '.join(map(str, LEGACY_VDSP_OP_TYPES))}.")
    props: dict[str, Any] = {}
    dtypes: dict[str, str] = {}
    if "config" in data:
        if not isinstance(data["config"], list):
            raise ConfigError(f"'config' must be a list of {{Property, DType, ParamType, Value}}, got {data['config']!r}.")
        for i, item in enumerate(data["config"]):
            if not isinstance(item, dict) or not isinstance(item.get("Property"), str) or "Value" not in item:
                raise ConfigError(f"config[{i}] must have 'Property' (a string) and 'Value', got {item!r}.")
            props[item["Property"].lower()] = item["Value"]
            dtypes[item["Property"].lower()] = str(item.get("DType", ""))
    else:  # flat sdk1.0 form: the properties are top-level keys
        props = {str(k).lower(): v for k, v in data.items() if k != "vdsp_op_type"}
    norm = _legacy_enum(props, "norma_type", NORM_TYPES, _LEGACY_NORM_CODES, prefix="NORMAL_")
    fmt = _legacy_enum(props, "iimage_format", ("RGB_PLANAR", "BGR_PLANAR", "RGB888", "BGR888"),
                       _LEGACY_FORMAT_CODES, default="RGB_PLANAR")
    cvt = _legacy_enum(props, "color_cvt_code", COLOR_CVT_CODES, _LEGACY_COLOR_CODES, "NO_CHANGE", "COLOR_")
    resize_type = _legacy_enum(props, "resize_type", RESIZE_TYPES, _LEGACY_RESIZE_CODES, "BILINEAR_CV")
    if "short_edge_threshold" in props:
        short = _get(props, "short_edge_threshold", int)
        resize, keep = (short, short), True
    else:
        resize, keep = (_get(props, "oimage_width", int), _get(props, "oimage_height", int)), False
    crop = _get(props, "crop_size", int, None)
    stats = [[_fp16_value(props, dtypes, f"{s}{c}") for c in "rgb"] for s in ("mean", "std")] \
        if norm in _USES_MEAN_STD else [[0, 0, 0], [1, 1, 1]]
    return Preprocessing(resize=resize, keep_aspect=keep, crop=(crop, crop) if crop else resize,
                         interpolation=resize_type, norm=norm, mean=stats[0], std=stats[1],
                         rgb=_rgb_from(fmt, cvt))


# ---------------------------------------------------------------------------------------------
# image decoding
# ---------------------------------------------------------------------------------------------
def _header_size(buf: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG / JPEG / BMP / WebP header without decoding, or None."""
    if buf[:8] == b"\x89PNG\r\n\x1a\n" and len(buf) >= 24:
        return int.from_bytes(buf[16:20], "big"), int.from_bytes(buf[20:24], "big")
    if buf[:2] == b"BM" and len(buf) >= 26:
        return abs(int.from_bytes(buf[18:22], "little", signed=True)), \
            abs(int.from_bytes(buf[22:26], "little", signed=True))
    if buf[:4] == b"RIFF" and buf[8:12] == b"WEBP" and len(buf) >= 30:
        chunk = buf[12:16]
        if chunk == b"VP8X":
            return int.from_bytes(buf[24:27], "little") + 1, int.from_bytes(buf[27:30], "little") + 1
        if chunk == b"VP8 ":
            return int.from_bytes(buf[26:28], "little") & 0x3FFF, int.from_bytes(buf[28:30], "little") & 0x3FFF
        if chunk == b"VP8L":
            bits = int.from_bytes(buf[21:25], "little")
            return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
        return None
    if buf[:2] == b"\xff\xd8":
        i = 2
        while i + 9 < len(buf):
            if buf[i] != 0xFF:
                return None
            marker = buf[i + 1]
            if marker == 0xFF:  # fill byte
                i += 1
                continue
            if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:
                i += 2
                continue
            if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # start of frame
                return int.from_bytes(buf[i + 7:i + 9], "big"), int.from_bytes(buf[i + 5:i + 7], "big")
            i += 2 + int.from_bytes(buf[i + 2:i + 4], "big")
    return None


_FORMATS = {b"\xff\xd8": "JPEG", b"\x89PNG": "PNG", b"BM": "BMP", b"RIFF": "WebP"}


def _format_of(buf: bytes) -> str:
    for magic, name in _FORMATS.items():
        if buf.startswith(magic):
            return f"a {name} header without a readable image size"
    return f"content starts with {buf[:8]!r}"


def _jpeg_is_complete(buf: bytes) -> bool:
    # An end-of-image marker must follow the last start-of-scan (0xFFDA cannot occur inside
    # entropy-coded data); older OpenCV decodes a truncated JPEG into a grey-padded image.
    sos = buf.rfind(b"\xff\xda")
    return sos >= 0 and buf.find(b"\xff\xd9", sos) >= 0


def _checked_size(head: bytes | bytearray, path: str | Path, max_pixels: int) -> tuple[int, int]:
    """(width, height) from the header, refused when unknown or above `max_pixels`."""
    size = _header_size(head)
    if size is None:  # never hand OpenCV a file whose size is unknown: it would allocate first, then refuse
        raise ImageError(f"cannot decode {path}: not a supported image or corrupt/truncated data "
                         f"({_format_of(head)}; tvmzoo reads {', '.join(_FORMATS.values())}).")
    if size[0] * size[1] > max_pixels:
        raise ImageError(f"cannot decode {path}: {size[0]}x{size[1]} pixels is above the limit of "
                         f"{max_pixels} pixels; downscale the image first.")
    return size


def _read_bounded(path: Path, max_pixels: int) -> bytearray:
    """The file's bytes, read whole only once its header gives a size within `max_pixels` and the file
    is no larger than that many pixels can take (IMAGE_BYTES_PER_PIXEL, + IMAGE_EXTRA_BYTES of metadata)."""
    with open(path, "rb") as f:
        total = os.fstat(f.fileno()).st_size
        if total == 0:
            raise ImageError(f"cannot decode {path}: the file is empty (0 bytes); re-copy or remove it.")
        head = f.read(min(total, 64 << 10))
        size = _header_size(head)
        while size is None and head[:2] == b"\xff\xd8" and len(head) < min(total, IMAGE_HEADER_BYTES):
            head += f.read(min(len(head), IMAGE_HEADER_BYTES - len(head)))  # EXIF / ICC segments first
            size = _header_size(head)
        size = _checked_size(head, path, max_pixels)
        most = size[0] * size[1] * IMAGE_BYTES_PER_PIXEL + IMAGE_EXTRA_BYTES
        if total > most:
            raise ImageError(f"cannot decode {path}: the file holds {total} bytes, more than a {size[0]}x{size[1]} "
                             f"image can take ({most}); it is corrupt or holds something else.")
        raw = bytearray(total)
        raw[:len(head)] = head
        got = len(head) + f.readinto(memoryview(raw)[len(head):])
    return raw[:got] if got < total else raw  # a file that shrank while read: decoding says what is missing


def read_image(path: str | Path, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode an image file to HxWx3 uint8 BGR, as cv2.imread(path, IMREAD_COLOR) does: EXIF
    orientation applied, grayscale expanded to 3 channels, alpha dropped, 16-bit scaled to 8-bit.
    Works with non-ASCII paths. Reads JPEG, PNG, BMP and WebP content (whatever the file is named):
    the size comes from the header, and images above `max_pixels` are refused before decoding, so
    memory stays bounded. Raises ImageError("cannot decode <path>: <reason>")."""
    path = Path(path)
    try:
        raw = _read_bounded(path, max_pixels)
    except FileNotFoundError:
        raise ImageError(f"cannot decode {path}: the file does not exist.") from None
    except OSError as err:
        raise ImageError(f"cannot decode {path}: cannot read it ({err.strerror or err}).") from None
    return decode_image(raw, str(path), max_pixels)


def decode_image(buf: np.ndarray | bytes | bytearray, path: str, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """`read_image` on encoded bytes already in memory (uint8 array, bytes or bytearray: the last two
    are decoded in place, without a copy); `path` names them in errors."""
    raw = buf if isinstance(buf, (bytes, bytearray)) else buf.tobytes()
    buf = np.frombuffer(raw, np.uint8)
    if buf.size == 0:
        raise ImageError(f"cannot decode {path}: the file is empty (0 bytes); re-copy or remove it.")
    _checked_size(raw, path, max_pixels)
    try:
        image = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    except cv2.error as err:
        raise ImageError(f"cannot decode {path}: OpenCV refused it ({str(err).strip().splitlines()[-1]}).") from None
    if image is None:
        raise ImageError(f"cannot decode {path}: not a supported image or corrupt/truncated data.")
    if raw[:2] == b"\xff\xd8" and not _jpeg_is_complete(raw):
        raise ImageError(f"cannot decode {path}: truncated JPEG (no end-of-image marker); re-copy the file.")
    if image.shape[0] * image.shape[1] > max_pixels:
        raise ImageError(f"cannot decode {path}: {image.shape[1]}x{image.shape[0]} pixels is above the "
                         f"limit of {max_pixels} pixels; downscale the image first.")
    return image


# ---------------------------------------------------------------------------------------------
# resize / crop / normalize
# ---------------------------------------------------------------------------------------------
_PILLOW_BITS = 22  # Pillow's PRECISION_BITS for 8-bit images (32 - 8 - 2)


def _pillow_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pillow's bilinear (triangle filter, support widened by the scale when downscaling)
    coefficients as (index, fixed-point weight) arrays of shape (out_size, taps)."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 1.0 * filterscale
    taps = int(np.ceil(support)) * 2 + 1
    index = np.zeros((out_size, taps), np.int64)
    weight = np.zeros((out_size, taps), np.int64)
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size) - xmin
        x = np.arange(xmax)
        w = np.maximum(0.0, 1.0 - np.abs((x + xmin - center + 0.5) / filterscale))
        total = w.sum()
        if total != 0.0:
            w = w / total
        # C's (int)(0.5 + w * 2^22) for w >= 0 (the triangle filter has no negative lobes)
        weight[xx, :xmax] = np.trunc(0.5 + w * (1 << _PILLOW_BITS)).astype(np.int64)
        index[xx, :xmax] = x + xmin
    return index, weight


def _pillow_pass(image: np.ndarray, out_size: int, axis: int) -> np.ndarray:
    index, weight = _pillow_taps(image.shape[axis], out_size)
    acc = np.full(image.shape[:axis] + (out_size,) + image.shape[axis + 1:], 1 << (_PILLOW_BITS - 1), np.int64)
    for k in range(index.shape[1]):
        taken = np.take(image, index[:, k], axis=axis).astype(np.int64)
        w = weight[:, k].reshape((-1,) + (1,) * (image.ndim - axis - 1))
        acc += taken * w
    return np.clip(acc >> _PILLOW_BITS, 0, 255).astype(np.uint8)


def resize_pillow(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Pillow's Image.resize(size, BILINEAR) on an HxWxC uint8 array, bit-exact: antialiased
    (the filter widens with the downscale factor), 22-bit fixed point, horizontal pass first."""
    out = image
    if size[0] != image.shape[1]:
        out = _pillow_pass(out, size[0], axis=1)
    if size[1] != image.shape[0]:
        out = _pillow_pass(out, size[1], axis=0)
    return out


def resize_uint8(image: np.ndarray, size: tuple[int, int], interpolation: str) -> np.ndarray:
    """Resize an HxWx3 uint8 image to size = (width, height)."""
    if (image.shape[1], image.shape[0]) == tuple(size):
        return image
    if interpolation == "BILINEAR_PILLOW":
        return resize_pillow(image, size)
    return cv2.resize(image, tuple(size), interpolation=_CV_INTERPOLATION[interpolation])


def resized_size(pre: Preprocessing, width: int, height: int) -> tuple[int, int]:
    """(width, height) an image of the given size has after pre's resize."""
    if not pre.keep_aspect:
        return pre.resize
    short = pre.resize[0]
    if width <= height:
        return short, int(short * height / width)
    return int(short * width / height), short


def _check_image(image: np.ndarray) -> None:
    if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3
            and image.shape[2] == 3 and image.shape[0] > 0 and image.shape[1] > 0):
        got = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ImageError(f"expected an HxWx3 uint8 BGR image (as read_image returns), got {got}.")


def resize_and_crop_uint8(pre: Preprocessing, image_bgr: np.ndarray) -> np.ndarray:
    """Resize, crop and order the channels: HxWx3 uint8 in the network's channel order
    (RGB when pre.rgb), i.e. everything before normalization."""
    _check_image(image_bgr)
    rw, rh = resized_size(pre, image_bgr.shape[1], image_bgr.shape[0])
    if rw * rh > MAX_PIXELS:  # keep-aspect resize of a thin strip (e.g. 1x20000) would need gigabytes
        raise ImageError(f"a {image_bgr.shape[1]}x{image_bgr.shape[0]} image resized to keep its aspect ratio "
                         f"would be {rw}x{rh}, above the limit of {MAX_PIXELS} pixels; crop it first.")
    resized = resize_uint8(image_bgr, (rw, rh), pre.interpolation)
    cw, ch = pre.crop
    x, y = pre.crop_xy or ((rw - cw) // 2, (rh - ch) // 2)
    cropped = resized[y:y + ch, x:x + cw]
    if pre.rgb:
        cropped = cropped[:, :, ::-1]
    return np.ascontiguousarray(cropped)


def normalize(pre: Preprocessing, image: np.ndarray) -> np.ndarray:
    """HxWx3 uint8 (network channel order) -> 3xHxW float32 normalized by pre.norm."""
    scale, offset = pre.scale_offset()
    out = image.astype(np.float32) * scale + offset
    return np.ascontiguousarray(out.transpose(2, 0, 1))


def apply(pre: Preprocessing, image_bgr: np.ndarray) -> np.ndarray:
    """A decoded BGR image -> the network's 3xHxW float32 input."""
    return normalize(pre, resize_and_crop_uint8(pre, image_bgr))


def batch(pre: Preprocessing, images: Sequence[np.ndarray]) -> np.ndarray:
    """Several decoded BGR images -> one NCHW float32 batch."""
    if len(images) == 0:
        raise ImageError("cannot build a batch from zero images.")
    return np.stack([apply(pre, image) for image in images])
