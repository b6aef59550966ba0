"""The transform itself: resize (OpenCV or Pillow-exact bilinear), colour order, crop, normalize,
planar float32 tensor: one implementation for calibration, the runner and evaluation."""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import cv2
import numpy as np

from ..errors import ImageError
from .decode import MAX_PIXELS

if TYPE_CHECKING:
    from . import Preprocessing

_CV_INTERPOLATION = {
    "BILINEAR_CV": cv2.INTER_LINEAR,
    "BILINEAR": cv2.INTER_LINEAR,  # the vendor's plain bilinear: same half-pixel sampling as OpenCV
    "NEAREST": cv2.INTER_NEAREST,
    "BICUBIC": cv2.INTER_CUBIC,
}


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
        return pre.resize_hw[1], pre.resize_hw[0]
    short = pre.short_side
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
    ch, cw = pre.crop_hw
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
