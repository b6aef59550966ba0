"""Preprocessing as data: one Preprocessing spec, built from a vdsp JSON, from YAML process_ops or
from a model's defaults, and one implementation used by calibration, the runner and evaluation."""
from __future__ import annotations

from dataclasses import dataclass

NORM_TYPES = ("NORMAL_EQUAL", "MINUSMEAN_DIVSTD", "DIV255_MINUSMEAN_DIVSTD", "DIV127_5_MINUSONE", "DIV255")
RESIZE_TYPES = ("BILINEAR_CV", "BILINEAR", "BILINEAR_PILLOW", "NEAREST", "BICUBIC")


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes the network's input tensor.

    resize: (width, height) of a plain resize when keep_aspect is False; with keep_aspect the
        short side is resized to resize[0] and the aspect ratio kept (the training repos' way).
    crop: (width, height) of the crop; crop_xy its top-left corner, None = centred.
    mean / std: in the scale of the normalization (0..1 for DIV255_MINUSMEAN_DIVSTD).
    rgb: True when the network expects RGB channel order (images are decoded as BGR by OpenCV).
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
