"""The vendor's vdsp params JSON (the `OpType` / `OpConfig` form and the older sdk1.0 form) ->
a Preprocessing."""
from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, did_you_mean, in_context
from ..limits import json_nesting_problem, read_text_file
from . import _USES_MEAN_STD, COLOR_CVT_CODES, NORM_TYPES, RESIZE_TYPES, Preprocessing, _choice, _suggest_exact

log = logging.getLogger(__name__)

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



def _load_json(source: str | Path | Mapping[str, Any]) -> tuple[str, Any]:
    if isinstance(source, Mapping):
        return "vdsp params", dict(source)
    path = Path(source)
    text = read_text_file(path, "vdsp params file", "check the --vdsp_params path", "give the .json file")
    too_deep = json_nesting_problem(text)
    if too_deep:
        raise ConfigError(f"{path}: {too_deep}; a vdsp params file nests 3 levels.")
    try:
        return str(path), json.loads(text, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}.") from None
    except _Twice as err:
        raise ConfigError(f"{path}: '{err}' is given twice in one object: JSON readers keep only the last "
                          "(a hand edit pasted beside the old value?). Remove one.") from None


class _Twice(ValueError):
    """A key given twice in one JSON object (json.loads keeps the last silently)."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _Twice(key)
        out[key] = value
    return out


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
        hint = did_you_mean(key, _OPCONFIG_KEYS, cutoff=0.75)
        if hint:
            raise ConfigError(f"unknown key '{key}'.{hint} Rename it.")
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
            resize_hw=(rh, rw), keep_aspect=keep, crop_hw=(oh, ow),
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
        resize_hw, keep = (short, short), True
    else:
        resize_hw, keep = (_get(props, "oimage_height", int), _get(props, "oimage_width", int)), False
    crop = _get(props, "crop_size", int, None)
    stats = [[_fp16_value(props, dtypes, f"{s}{c}") for c in "rgb"] for s in ("mean", "std")] \
        if norm in _USES_MEAN_STD else [[0, 0, 0], [1, 1, 1]]
    return Preprocessing(resize_hw=resize_hw, keep_aspect=keep, crop_hw=(crop, crop) if crop else resize_hw,
                         interpolation=resize_type, norm=norm, mean=stats[0], std=stats[1],
                         rgb=_rgb_from(fmt, cvt))


# ---------------------------------------------------------------------------------------------
# image decoding
# ---------------------------------------------------------------------------------------------


def read_vdsp(source: str | Path | Mapping[str, Any]) -> Preprocessing:
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
        raise in_context(err, where) from None
