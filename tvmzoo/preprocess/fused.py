"""Preprocessing compiled into the module (`graph.preprocess: fused`), as the vendor's vdsp fusion op.

The host decodes and resizes (resampling stays on the host: it is data-dependent and not worth a
kernel); the module takes the resized image as uint8 NHWC in OpenCV's BGR order and does the rest:
crop -> float -> channel order -> per-channel scale and offset -> NCHW. This is an ONNX prefix put
in front of the network before import, so the TVM build sees one graph.

With a keep-aspect resize the resized size varies per image; the module's input is then a fixed
S x S window (S = the short side) that the host cuts so that the module's fixed crop lands on
exactly the pixels of the host pipeline's crop.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from . import Preprocessing
from .transform import _check_image, resize_uint8, resized_size

INPUT_DTYPE = "uint8"
INPUT_LAYOUT = "NHWC"


def fused_input_size(pre: Preprocessing) -> tuple[int, int]:
    """(width, height) of the uint8 image a fused module takes."""
    height, width = pre.resized_hw
    return width, height


def _module_crop_xy(pre: Preprocessing) -> tuple[int, int]:
    width, height = fused_input_size(pre)
    return pre.crop_xy or ((width - pre.crop_hw[1]) // 2, (height - pre.crop_hw[0]) // 2)


def fused_input(pre: Preprocessing, image_bgr: np.ndarray) -> np.ndarray:
    """The host's part: a decoded BGR image -> the HxWx3 uint8 BGR image a fused module takes."""
    _check_image(image_bgr)
    rw, rh = resized_size(pre, image_bgr.shape[1], image_bgr.shape[0])
    resized = resize_uint8(image_bgr, (rw, rh), pre.interpolation)
    if not pre.keep_aspect:
        return np.ascontiguousarray(resized)
    # The window starts where the host crop starts, minus the module's fixed crop offset.
    x, y = pre.crop_xy or ((rw - pre.crop_hw[1]) // 2, (rh - pre.crop_hw[0]) // 2)
    mx, my = _module_crop_xy(pre)
    width, height = fused_input_size(pre)
    return np.ascontiguousarray(resized[y - my:y - my + height, x - mx:x - mx + width])


def fuse_preprocessing(model: onnx.ModelProto, input_name: str, batch: int | str,
                       pre: Preprocessing) -> onnx.ModelProto:
    """`model` (input `input_name`, NCHW float) with the preprocessing prefix in front: its input,
    under the same name, becomes uint8 [batch, H, W, 3] BGR (`fused_input`'s output)."""
    width, height = fused_input_size(pre)
    x, y = _module_crop_xy(pre)
    scale, offset = pre.scale_offset()
    inner = f"{input_name}_nchw"
    graph = model.graph
    for node in graph.node:
        node.input[:] = [inner if name == input_name else name for name in node.input]

    def const(name: str, value: np.ndarray) -> str:
        graph.initializer.append(numpy_helper.from_array(value, f"pre_{name}"))
        return f"pre_{name}"

    ordered = "pre_float"
    nodes = [
        helper.make_node("Slice", [input_name, const("starts", np.array([y, x], np.int64)),
                                   const("ends", np.array([y + pre.crop_hw[0], x + pre.crop_hw[1]], np.int64)),
                                   const("axes", np.array([1, 2], np.int64))], ["pre_crop"]),
        helper.make_node("Cast", ["pre_crop"], ["pre_float"], to=TensorProto.FLOAT),
    ]
    if pre.rgb:  # decoded images are BGR: reverse the channels
        ordered = "pre_rgb"
        nodes += [helper.make_node("Split", ["pre_float", const("split", np.ones(3, np.int64))],
                                   ["pre_b", "pre_g", "pre_r"], axis=3),
                  helper.make_node("Concat", ["pre_r", "pre_g", "pre_b"], [ordered], axis=3)]
    nodes += [
        helper.make_node("Mul", [ordered, const("scale", scale.reshape(1, 1, 1, 3))], ["pre_scaled"]),
        helper.make_node("Add", ["pre_scaled", const("offset", offset.reshape(1, 1, 1, 3))], ["pre_normed"]),
        helper.make_node("Transpose", ["pre_normed"], [inner], perm=[0, 3, 1, 2]),
    ]
    network = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + network)
    old = next(i for i in graph.input if i.name == input_name)
    new = helper.make_tensor_value_info(input_name, TensorProto.UINT8, [batch, height, width, 3])
    graph.input.remove(old)
    graph.input.insert(0, new)
    return model


def fuse_for_build(model: onnx.ModelProto, spec, pre: Preprocessing | None, where: object):
    """compiler hook: (model, InputSpec) -> the fused model and its uint8 NHWC InputSpec."""
    from ..errors import ConfigError

    if pre is None:
        raise ConfigError(f"{where}: graph.preprocess: fused needs the preprocessing: add dataset.process_ops "
                          "or a model: section (whose family knows its default preprocessing).")
    height, width = spec.size_hw
    if pre.crop_hw != (height, width):
        raise ConfigError(f"{where}: graph.preprocess: fused crops {pre.crop_hw[1]}x{pre.crop_hw[0]} but the network "
                          f"input is {width}x{height}; make the crop (CenterCrop crop_size) match frontend.shape.")
    fw, fh = fused_input_size(pre)
    fused = fuse_preprocessing(model, spec.name, spec.shape[0], pre)
    return fused, dataclasses.replace(spec, shape=(spec.shape[0], fh, fw, 3), dtype=INPUT_DTYPE,
                                      layout=INPUT_LAYOUT)
