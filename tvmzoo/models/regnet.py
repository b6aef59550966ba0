"""RegNetX (Radosavovic et al., "Designing Network Design Spaces", CVPR 2020): arch table, the
checkpoint layouts of pycls, PaddleClas and torchvision, BN folding and the deploy ONNX, numpy only.

Each arch is five numbers (depth d, initial width w0, slope wa, log-step wm, group width gw). The
per-block widths are w0 + wa * i quantized in log space to w0 * wm^k and rounded to a multiple of 8;
runs of equal widths are the stages (stride 2 each). With bottleneck ratio 1 the group width is
min(gw, stage width) and the stage width is rounded to a multiple of it. The network: a 3x3/2 stem
(32 channels) + BN + ReLU, then per block 1x1 conv-BN-ReLU, grouped 3x3 conv-BN-ReLU (stride on the
first block of a stage), 1x1 conv-BN, a 1x1/stride conv-BN projection where the shape changes, add,
ReLU; global average pooling and one linear layer. The deploy graph folds every BN into its conv.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx

from ..errors import ConfigError
from ..io.onnx_graph import GraphBuilder
from ..preprocess import Preprocessing
from .family import ModelFamily
from .weights import Weights
from .state import check_state as state_check
from .state import fold_bn, guess_hint, lookup
from .state import guess_arch as state_guess
from .state import random_state_dict as random_state

log = logging.getLogger(__name__)

BN_EPS = 1e-5        # pycls cfg.BN.EPS, torchvision _regnet's BatchNorm2d(eps=1e-05), paddle.nn.BatchNorm default
STEM_WIDTH = 32      # pycls cfg.REGNET.STEM_W; torchvision stem_width; PaddleClas stem_w
WIDTH_QUANTUM = 8    # q: block widths are multiples of 8
STAGE_STRIDE = 2


@dataclass(frozen=True)
class RegNetArch:
    """The RegNet parameters of one model (pycls configs/dds_baselines/regnetx/*.yaml REGNET section)."""

    depth: int
    w0: int
    wa: float
    wm: float
    group_w: int
    # stage widths rounded to a multiple of the group width as torchvision's _make_divisible does (half up,
    # never more than 10% down) instead of pycls's round half to even (timm's *_tv archs)
    make_divisible: bool = False


# Keys as PaddleClas names its models (RegNetX_<key>); pycls calls 1600MF "1.6GF", 3200MF "3.2GF", ...
ARCHS: dict[str, RegNetArch] = {
    "200MF": RegNetArch(13, 24, 36.44, 2.49, 8),
    "400MF": RegNetArch(22, 24, 24.48, 2.54, 16),
    "600MF": RegNetArch(16, 48, 36.97, 2.24, 24),
    "800MF": RegNetArch(16, 56, 35.73, 2.28, 16),
    "1600MF": RegNetArch(18, 80, 34.01, 2.25, 24),
    "3200MF": RegNetArch(25, 88, 26.31, 2.25, 48),
    "4GF": RegNetArch(23, 96, 38.65, 2.43, 40),
    "6400MF": RegNetArch(17, 184, 60.83, 2.07, 56),
    "8GF": RegNetArch(23, 80, 49.56, 2.88, 120),
    "12GF": RegNetArch(19, 168, 73.36, 2.37, 112),
    "16GF": RegNetArch(22, 216, 55.59, 2.1, 128),
    "32GF": RegNetArch(23, 320, 69.86, 2.0, 168),
}
# torchvision's regnet_x_400mf: the one torchvision arch whose widths differ (last stage 400, not 384)
ARCHS["400MF_tv"] = RegNetArch(22, 24, 24.48, 2.54, 16, make_divisible=True)
PYCLS_NAMES = {"1600MF": "1.6GF", "3200MF": "3.2GF", "4GF": "4.0GF", "6400MF": "6.4GF", "8GF": "8.0GF"}

SOURCES = ("ppcls", "pycls", "torchvision")
# The source whose model zoo defines the published figures (pycls MODEL_ZOO.md); tvmzoo.models.info uses it.
REFERENCE_SOURCE = "pycls"


@dataclass(frozen=True)
class Layout:
    """Key names of one checkpoint source. `block` is formatted with s (stage, from 1), b (block,
    from 1) and i (block, from 0); `parts` maps a, b, c, proj to (conv prefix, BN prefix) in a block."""

    stem: tuple[str, str]
    block: str
    parts: dict[str, tuple[str, str]]
    bn_stats: tuple[str, str]        # (running mean, running variance)
    head: str
    head_transposed: bool            # Linear weight stored [in, out] (paddle) instead of [out, in]


LAYOUTS: dict[str, Layout] = {
    # PaddleClas ppcls/arch/backbone/model_zoo/regnet.py: ConvBNLayer (_conv, _batch_norm) named conv (stem),
    # s{s}_b{b}.conv0/conv1/conv2 and .short (projection); Linear 'out'; paddle BN _mean/_variance.
    "ppcls": Layout(("conv._conv", "conv._batch_norm"), "s{s}_b{b}",
                    {"a": ("conv0._conv", "conv0._batch_norm"), "b": ("conv1._conv", "conv1._batch_norm"),
                     "c": ("conv2._conv", "conv2._batch_norm"), "proj": ("short._conv", "short._batch_norm")},
                    ("_mean", "_variance"), "out", True),
    # pycls pycls/models/anynet.py: SimpleStem (conv, bn), AnyStage s{s}.b{b}, ResBottleneckBlock (proj, bn, f),
    # BottleneckTransform (a, a_bn, b, b_bn, c, c_bn), AnyHead.fc.
    "pycls": Layout(("stem.conv", "stem.bn"), "s{s}.b{b}",
                    {"a": ("f.a", "f.a_bn"), "b": ("f.b", "f.b_bn"), "c": ("f.c", "f.c_bn"), "proj": ("proj", "bn")},
                    ("running_mean", "running_var"), "head.fc", False),
    # torchvision torchvision/models/regnet.py: Conv2dNormActivation = Sequential(conv, BN[, ReLU]) -> .0 / .1;
    # trunk_output.block{s} holds block{s}-{i}.
    "torchvision": Layout(("stem.0", "stem.1"), "trunk_output.block{s}.block{s}-{i}",
                          {"a": ("f.a.0", "f.a.1"), "b": ("f.b.0", "f.b.1"), "c": ("f.c.0", "f.c.1"),
                           "proj": ("proj.0", "proj.1")},
                          ("running_mean", "running_var"), "fc", False),
}

# Keys a framework adds that carry no weights: torch BN step counters, paddle's name table.


@dataclass(frozen=True)
class Stage:
    width: int
    depth: int
    group_w: int


@dataclass(frozen=True)
class Block:
    stage: int     # 1..4
    index: int     # 0.. within the stage
    cin: int
    cout: int
    stride: int
    group_w: int

    @property
    def groups(self) -> int:
        return self.cout // self.group_w

    @property
    def has_proj(self) -> bool:
        return self.cin != self.cout or self.stride != 1

    def prefix(self, lay: Layout) -> str:
        return lay.block.format(s=self.stage, b=self.index + 1, i=self.index)


# ---------------------------------------------------------------- arch table -> blocks

def get_arch(arch: str | RegNetArch) -> RegNetArch:
    """An ARCHS entry by name ('400MF', 'RegNetX-400MF', 'RegNetX_1.6GF'), or a custom RegNetArch as given."""
    if isinstance(arch, RegNetArch):
        return arch
    wanted = str(arch).upper().replace("REGNETX", "").replace("REGNET", "").strip("-_ ")
    for name in ARCHS:
        if wanted in (name.upper(), PYCLS_NAMES.get(name)):
            return ARCHS[name]
    raise ConfigError(f"unknown RegNetX arch '{arch}'. Known archs: {', '.join(ARCHS)} "
                      f"(pycls names {', '.join(PYCLS_NAMES.values())} are accepted too).")


def arch_name(arch: str | RegNetArch) -> str:
    spec = get_arch(arch)
    return next((f"RegNetX-{n}" for n, a in ARCHS.items() if a == spec), "RegNetX (custom arch)")


def _source(source: str) -> Layout:
    return lookup(LAYOUTS, source, "RegNet checkpoint layout", "layouts")


def block_widths(arch: str | RegNetArch) -> list[int]:
    """Per-block widths: w0 + wa * i, quantized to w0 * wm^round(log_wm((w0 + wa * i) / w0)), then to a
    multiple of 8 (np.round: half to even, as pycls, PaddleClas and torchvision's torch.round do)."""
    spec = get_arch(arch)
    if not (spec.wa >= 0 and spec.w0 > 0 and spec.wm > 1 and spec.w0 % WIDTH_QUANTUM == 0):
        raise ConfigError(f"invalid RegNet parameters {spec}: need wa >= 0, wm > 1, w0 a positive multiple of 8.")
    ws_cont = np.arange(spec.depth) * spec.wa + spec.w0
    ks = np.round(np.log(ws_cont / spec.w0) / np.log(spec.wm))
    widths = np.round(spec.w0 * np.power(spec.wm, ks) / WIDTH_QUANTUM) * WIDTH_QUANTUM
    return [int(w) for w in widths]


def _round_width(width: int, group_w: int, make_divisible: bool) -> int:
    """The stage width as a multiple of its group width. pycls (round, at least one group) and
    PaddleClas (quantize_float) round half to even; torchvision uses _make_divisible, which rounds half
    up and never goes more than 10% down. They differ for 400MF (392 -> 384 vs 400, so torchvision's
    regnet_x_400mf, arch 400MF_tv here, has 5.50 M parameters, pycls's 5.16 M) and 4GF (96 -> 80 vs 120)."""
    if make_divisible:
        out = max(group_w, int(width + group_w / 2) // group_w * group_w)
        return out + group_w if out < 0.9 * width else out
    return max(group_w, int(round(width / group_w) * group_w))


def stages(arch: str | RegNetArch) -> list[Stage]:
    """Width, depth and group width of each stage."""
    spec = get_arch(arch)
    runs: list[list[int]] = []                    # [width, depth]: consecutive equal widths form one stage
    for w in block_widths(spec):
        if runs and runs[-1][0] == w:
            runs[-1][1] += 1
        else:
            runs.append([w, 1])
    out = []
    for width, depth in runs:
        gw = min(spec.group_w, width)
        out.append(Stage(_round_width(width, gw, spec.make_divisible), depth, gw))
    return out


def blocks(arch: str | RegNetArch) -> list[Block]:
    """Every bottleneck block in forward order."""
    out, cin = [], STEM_WIDTH
    for s, st in enumerate(stages(arch), start=1):
        for i in range(st.depth):
            out.append(Block(s, i, cin, st.width, STAGE_STRIDE if i == 0 else 1, st.group_w))
            cin = st.width
    return out


# ---------------------------------------------------------------- expected keys and checking

def _conv_bn_keys(conv: str, bn: str, cout: int, cin_g: int, k: int, lay: Layout) -> dict[str, tuple[int, ...]]:
    keys = {f"{conv}.weight": (cout, cin_g, k, k)}
    keys.update({f"{bn}.{n}": (cout,) for n in ("weight", "bias", *lay.bn_stats)})
    return keys


def expected_shapes(arch: str | RegNetArch, source: str, num_classes: int = 1000) -> dict[str, tuple[int, ...]]:
    """Every weight key of a `source` checkpoint of `arch` and its shape (framework counters aside)."""
    lay = _source(source)
    keys = _conv_bn_keys(*lay.stem, STEM_WIDTH, 3, 3, lay)
    bl = blocks(arch)
    for b in bl:
        p = b.prefix(lay)
        conv = {part: (f"{p}.{c}", f"{p}.{n}") for part, (c, n) in lay.parts.items()}
        if b.has_proj:
            keys.update(_conv_bn_keys(*conv["proj"], b.cout, b.cin, 1, lay))
        keys.update(_conv_bn_keys(*conv["a"], b.cout, b.cin, 1, lay))
        keys.update(_conv_bn_keys(*conv["b"], b.cout, b.group_w, 3, lay))
        keys.update(_conv_bn_keys(*conv["c"], b.cout, b.cout, 1, lay))
    features = bl[-1].cout
    keys[f"{lay.head}.weight"] = (features, num_classes) if lay.head_transposed else (num_classes, features)
    keys[f"{lay.head}.bias"] = (num_classes,)
    return keys


def guess_arch(state: Mapping[str, np.ndarray]) -> tuple[str, str] | None:
    """(arch, source) of the first ARCHS entry and layout the state dict fits exactly, else None."""
    return state_guess(state, LAYOUTS, ARCHS, lambda arch, source, n, _state: expected_shapes(arch, source, n))


def check_state(state: Mapping[str, np.ndarray], arch: str | RegNetArch, source: str) -> tuple[dict, int]:
    """(state without prefixes / framework keys, num_classes) if the checkpoint fits arch and source
    exactly (every key used, every shape right), else one CheckpointError naming the first problem."""
    spec, lay = get_arch(arch), _source(source)
    return state_check(state, lay, lambda n: expected_shapes(spec, source, n), f"{arch_name(spec)} ({source} layout)",
                       lambda s: guess_hint(guess_arch(s), "RegNetX"),
                       f"Set model.arch and model.source ({', '.join(SOURCES)}) to what the weights were trained with.")


def deploy_state(state: Mapping[str, np.ndarray], arch: str | RegNetArch, source: str) -> dict[str, np.ndarray]:
    """Refused: no RegNet source has a deploy form. pycls, PaddleClas (ConvBNLayer) and torchvision
    (Conv2dNormActivation) define each conv with its BatchNorm and no BN-free variant, so their own code
    could not load a BN-folded checkpoint with strict key checking."""
    check_state(state, arch, source)
    raise ConfigError(f"RegNet ({source}) has no deploy checkpoint form: {source}'s own model code keeps every "
                      f"BatchNorm (no BN-folded variant to load it), so a folded file would fit no model of "
                      f"theirs. Keep the train checkpoint: `tvmzoo export` folds BN into the convs on the way "
                      f"to ONNX.")


# ---------------------------------------------------------------- ONNX

class _Writer:
    """Writes conv + BN layers, folded (deploy) or as Conv + BatchNormalization (the reference)."""

    def __init__(self, g: GraphBuilder, state: Mapping[str, np.ndarray], lay: Layout, fold: bool) -> None:
        self.g, self.state, self.lay, self.fold = g, state, lay, fold

    def _f64(self, key: str) -> np.ndarray:
        return np.asarray(self.state[key], dtype=np.float64)

    def conv_bn(self, x: str, conv: str, bn: str, *, stride: int = 1, groups: int = 1, relu: bool = True) -> str:
        w = self._f64(f"{conv}.weight")
        gamma, beta = self._f64(f"{bn}.weight"), self._f64(f"{bn}.bias")
        mean, var = (self._f64(f"{bn}.{s}") for s in self.lay.bn_stats)
        if self.fold:
            y = self.g.conv(x, *fold_bn(w, gamma, beta, mean, var, BN_EPS), conv, stride=stride, groups=groups)
        else:
            y = self.g.batch_norm(self.g.conv(x, w, None, conv, stride=stride, groups=groups),
                                  gamma, beta, mean, var, bn, BN_EPS)
        return self.g.relu(y) if relu else y

    def block(self, x: str, b: Block) -> str:
        p = b.prefix(self.lay)
        part = {name: (f"{p}.{c}", f"{p}.{n}") for name, (c, n) in self.lay.parts.items()}
        y = self.conv_bn(x, *part["a"])
        y = self.conv_bn(y, *part["b"], stride=b.stride, groups=b.groups)
        y = self.conv_bn(y, *part["c"], relu=False)
        short = self.conv_bn(x, *part["proj"], stride=b.stride, relu=False) if b.has_proj else x
        return self.g.relu(self.g.add(short, y))


def _build(state, arch, source, size_hw, batch, *, fold: bool) -> onnx.ModelProto:
    spec, lay, name = get_arch(arch), _source(source), arch_name(arch)
    state, num_classes = check_state(state, spec, source)
    g = GraphBuilder.for_model(name, "deploy" if fold else "unfolded")
    n, x = g.image_input(batch, size_hw)
    net = _Writer(g, state, lay, fold)
    x = net.conv_bn(x, *lay.stem, stride=2)
    for b in blocks(spec):
        x = net.block(x, b)
    w, bias = np.asarray(state[f"{lay.head}.weight"]), np.asarray(state[f"{lay.head}.bias"])
    g.classifier(x, w.T if lay.head_transposed else w, bias, lay.head, n, num_classes)
    log.debug("built %s %s graph (%s layout, %d classes)", name, "deploy" if fold else "unfolded", source,
              num_classes)
    return g.build(doc=f"{name} ({source} layout), {'BN folded' if fold else 'BatchNormalization kept'}")


def deploy_onnx(state: Mapping[str, np.ndarray], arch: str | RegNetArch, source: str, *,
                size_hw: tuple[int, int] = (224, 224), batch: int | None = None) -> onnx.ModelProto:
    """The inference graph with every BN folded into its conv: input 'input' [N, 3, H, W] with
    size_hw = (H, W); output 'output' [N, num_classes] logits (num_classes from the checkpoint)."""
    return _build(state, arch, source, size_hw, batch, fold=True)


def unfolded_onnx(state: Mapping[str, np.ndarray], arch: str | RegNetArch, source: str, *,
                  size_hw: tuple[int, int] = (224, 224), batch: int | None = None) -> onnx.ModelProto:
    """The same network with BatchNormalization nodes kept: the reference for deploy_onnx."""
    return _build(state, arch, source, size_hw, batch, fold=False)


# ---------------------------------------------------------------- preprocessing, sizes, test weights

def _eval_preprocessing(source: str, tag: str = "") -> Preprocessing:
    """The evaluation transform of the repository the weights come from."""
    if source == "ppcls":
        # PaddleClas ppcls/configs/ImageNet/RegNet/RegNetX_*.yaml Eval: DecodeImage(to_rgb) +
        # ResizeImage(resize_short=256) (cv2 backend, INTER_LINEAR) + CropImage(size=256), i.e. a 256 input
        # although training used 224; NormalizeImage with the ImageNet mean/std.
        return Preprocessing(resize_hw=(256, 256), keep_aspect=True, crop_hw=(256, 256), interpolation="BILINEAR_CV")
    if source == "pycls":
        # pycls/datasets/imagenet.py + transforms.scale_and_center_crop: short side to TEST.IM_SIZE 256
        # (cv2 INTER_LINEAR), centre crop TRAIN.IM_SIZE 224, ImageNet mean/std in RGB, then the channels
        # are flipped: pycls networks take BGR input ("CHW/BGR/float"), so mean/std are given in BGR here.
        return Preprocessing(resize_hw=(256, 256), keep_aspect=True, crop_hw=(224, 224), interpolation="BILINEAR_CV",
                             mean=(0.406, 0.456, 0.485), std=(0.225, 0.224, 0.229), rgb=False)
    # torchvision RegNet_X_*_Weights: ImageClassification(crop_size=224[, resize_size=232 for IMAGENET1K_V2]) =
    # Resize(256 | 232, bilinear, antialias: Pillow-style on PIL images) + CenterCrop(224), RGB, ImageNet mean/std.
    short = 232 if tag == "v2" else 256
    return Preprocessing(resize_hw=(short, short), keep_aspect=True, crop_hw=(224, 224),
                         interpolation="BILINEAR_PILLOW")


# pycls MODEL_ZOO.md (top-1 error, RegNetX table) as top-1; torchvision's RegNet_X_*_Weights meta
# (acc@1, acc@5) for IMAGENET1K_V1 and _V2; PaddleClas publishes its figures in its docs (not recorded here).
_PYCLS_TOP1 = {"200MF": 68.9, "400MF": 72.7, "600MF": 74.1, "800MF": 75.2, "1600MF": 77.0, "3200MF": 78.3,
               "4GF": 78.6, "6400MF": 79.2, "8GF": 79.3, "12GF": 79.7, "16GF": 80.0, "32GF": 80.5}
_TORCHVISION = {  # arch: (torchvision name, {tag: (file hash, acc@1, acc@5)})
    "400MF_tv": ("400mf", {"v1": ("adf1edd5", 72.834, 90.950), "v2": ("62229a5f", 74.864, 92.322)}),
    "800MF": ("800mf", {"v1": ("ad17e45c", 75.212, 92.348), "v2": ("94a99ebd", 77.522, 93.826)}),
    "1600MF": ("1_6gf", {"v1": ("e3633e7f", 77.040, 93.440), "v2": ("a12f2b72", 79.668, 94.922)}),
    "3200MF": ("3_2gf", {"v1": ("f342aeae", 78.364, 93.992), "v2": ("7071aa85", 81.196, 95.430)}),
    "8GF": ("8gf", {"v1": ("03ceed89", 79.344, 94.686), "v2": ("2b70d774", 81.682, 95.678)}),
    "16GF": ("16gf", {"v1": ("2007eb11", 80.058, 94.944), "v2": ("ba3796d7", 82.716, 96.196)}),
    "32GF": ("32gf", {"v1": ("9d47f8d0", 80.622, 95.248), "v2": ("6eb8fdc6", 83.014, 96.288)}),
}
WEIGHTS = (
    *(Weights("regnet", arch, "pycls", _eval_preprocessing("pycls"), top1=_PYCLS_TOP1[arch],
              url="https://dl.fbaipublicfiles.com/pycls/dds_baselines/ (pycls MODEL_ZOO.md)")
      for arch in ARCHS if arch in _PYCLS_TOP1),
    *(Weights("regnet", arch, "ppcls", _eval_preprocessing("ppcls"),
              url=f"https://paddle-imagenet-models-name.bj.bcebos.com/dygraph/RegNetX_{arch}_pretrained.pdparams")
      for arch in ARCHS if arch in _PYCLS_TOP1),
    *(Weights("regnet", arch, "torchvision", _eval_preprocessing("torchvision", tag), tag, top1=top1, top5=top5,
              url=f"https://download.pytorch.org/models/regnet_x_{name}-{sha}.pth")
      for arch, (name, releases) in _TORCHVISION.items() for tag, (sha, top1, top5) in releases.items()),
)


def param_count(arch: str | RegNetArch, num_classes: int = 1000, deploy: bool = True,
                source: str = REFERENCE_SOURCE) -> int:
    """Parameters of the deploy graph (BN folded: one bias per BN channel) or, with deploy=False, of the
    network as trained (BN scale and shift: the published figure, e.g. 400MF 5,157,512 in pycls,
    5,495,976 in torchvision). BN running statistics are buffers and never counted."""
    lay = _source(source)
    stats = tuple(f".{s}" for s in lay.bn_stats)
    shapes = expected_shapes(arch, source, num_classes)
    trained = sum(math.prod(s) for k, s in shapes.items() if not k.endswith(stats))
    bn_channels = sum(math.prod(s) for k, s in shapes.items() if k.endswith(stats[0]))
    return trained - bn_channels if deploy else trained   # folding drops one BN scale per channel


def random_state_dict(arch: str | RegNetArch, source: str, rng: np.random.Generator,
                      num_classes: int = 1000) -> dict[str, np.ndarray]:
    """A random checkpoint dict of `arch` in `source`'s layout (tvmzoo.models.state.random_state_dict)."""
    return random_state(expected_shapes(arch, source, num_classes), _source(source), rng, counters=source != "ppcls")


FAMILY = ModelFamily(
    name="regnet", archs=ARCHS, sources=SOURCES, reference_source=REFERENCE_SOURCE,
    expected_shapes=expected_shapes, check_state=check_state, deploy_onnx=deploy_onnx,
    weights=WEIGHTS,
    param_count=lambda arch, source, n, deploy: param_count(arch, n, deploy, source),
    random_state_dict=lambda arch, source, rng, n: random_state_dict(arch, source, rng, num_classes=n),
    deploy_state=deploy_state)
