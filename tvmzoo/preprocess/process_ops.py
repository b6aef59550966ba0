"""The YAML form: a list of process_ops steps (DecodeImage, Resize, CenterCrop, Normalize, ToTensor,
as PaddleClas writes them) -> the keyword arguments of a Preprocessing."""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import ConfigError
from . import _suggest_exact, _triple

log = logging.getLogger(__name__)


def _size_hw(size: Any) -> Any:
    """A YAML size (one number, or [width, height] as the vendor writes it) as (height, width); anything
    else as given, for Preprocessing to reject with its message."""
    if isinstance(size, int) and not isinstance(size, bool):
        return size, size
    return (size[1], size[0]) if isinstance(size, (list, tuple)) and len(size) == 2 else size


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
        kw["resize_hw"] = _size_hw(args["size"])
        kw["keep_aspect"] = False
    else:
        short = args["resize_short"]
        kw["resize_hw"] = (short, short)
        kw["keep_aspect"] = True
    if "interpolation" in args:
        name = args["interpolation"]
        kw["interpolation"] = _INTERP_ALIASES.get(str(name).lower(), name)


def _op_center_crop(args: dict, kw: dict) -> None:
    extra = set(args) - {"crop_size"}
    if extra or "crop_size" not in args:
        raise ConfigError("expected exactly one key, crop_size: [width, height].")
    kw["crop_hw"] = _size_hw(args["crop_size"])
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


def read_process_ops(ops: Sequence[Mapping[str, Any]], where: str = "process_ops") -> dict[str, Any]:
    """The build YAML's `dataset.process_ops` list -> Preprocessing keyword arguments."""
    if not isinstance(ops, (list, tuple)) or not ops:
        raise ConfigError(f"{where} must be a non-empty list of {{type: ...}} steps, got {ops!r}.")
    kw: dict[str, Any] = {"crop_hw": None}
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
    if "resize_hw" not in kw:
        raise ConfigError(f"{where}: no Resize step: add `- type: Resize` with `size: [256, 256]` "
                          "or `resize_short: 256`.")
    if kw["crop_hw"] is None:
        if kw.get("keep_aspect"):
            raise ConfigError(f"{where}: a resize_short Resize keeps the aspect ratio, so the input "
                              "size varies: add a CenterCrop step (crop_size: [224, 224]).")
        kw["crop_hw"] = kw["resize_hw"]
    return kw
