"""RepVGG (Ding et al., CVPR 2021, github.com/DingXiaoH/RepVGG): arch table, checkpoint layouts,
structural re-parameterization and ONNX export, numpy only.

Every block is three branches at train time, y = ReLU(SE(BN(conv3x3 x) + BN(conv1x1 x) + BN(x))),
and one 3x3 conv at deploy time: each BN is folded into its conv, the 1x1 kernel is padded to 3x3 and
the identity BN becomes a 3x3 kernel with a 1 at the centre of its own channel (per group).
"""
from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import onnx

from ..io.onnx_graph import GraphBuilder
from ..preprocess import Preprocessing
from .repvgg_arch import (ARCHS, Block, LAYOUTS, Layout, RepVGGArch, SOURCES, _source, arch_name, blocks, get_arch)
from .family import ModelFamily
from .weights import Weights
from .state import check_state as state_check
from .state import fold_bn, guess_hint, strip_framework_keys
from .state import guess_arch as state_guess
from .state import random_state_dict as random_state

log = logging.getLogger(__name__)

BN_EPS = 1e-5          # torch BatchNorm2d eps and paddle BatchNorm2D epsilon defaults
# ---------------------------------------------------------------- expected keys and checking

def _bn_keys(prefix: str, channels: int, lay: Layout) -> dict[str, tuple[int, ...]]:
    names = ("weight", "bias", *lay.bn_stats)
    return {f"{prefix}.{n}": (channels,) for n in names}


def _block_keys(b: Block, lay: Layout, deploy: bool, use_se: bool) -> dict[str, tuple[int, ...]]:
    p = lay.block_prefix(b.stage, b.index)
    cin_g = b.cin // b.groups
    if deploy:
        keys = {f"{p}.{lay.reparam}.weight": (b.cout, cin_g, 3, 3), f"{p}.{lay.reparam}.bias": (b.cout,)}
    else:
        keys = {f"{p}.{lay.dense}.conv.weight": (b.cout, cin_g, 3, 3),
                **_bn_keys(f"{p}.{lay.dense}.{lay.bn}", b.cout, lay),
                f"{p}.{lay.one}.conv.weight": (b.cout, cin_g, 1, 1),
                **_bn_keys(f"{p}.{lay.one}.{lay.bn}", b.cout, lay)}
        if b.has_identity:
            keys.update(_bn_keys(f"{p}.{lay.identity}", b.cin, lay))
    if use_se:
        s = b.se_channels
        keys.update({f"{p}.{lay.se_down}.weight": (s, b.cout, 1, 1), f"{p}.{lay.se_down}.bias": (s,),
                     f"{p}.{lay.se_up}.weight": (b.cout, s, 1, 1), f"{p}.{lay.se_up}.bias": (b.cout,)})
    return keys


def _is_deploy_block(state: Mapping[str, np.ndarray], b: Block, lay: Layout) -> bool:
    return f"{lay.block_prefix(b.stage, b.index)}.{lay.reparam}.weight" in state


def expected_shapes(arch: str | RepVGGArch, source: str, num_classes: int = 1000,
                    deploy: bool | Mapping[str, np.ndarray] = False) -> dict[str, tuple[int, ...]]:
    """Every weight key of a checkpoint and its shape. `deploy` is a bool for the whole net, or a
    state dict: then each block is taken in the form (train or deploy) that the state dict has."""
    spec, lay = get_arch(arch), _source(source)
    keys: dict[str, tuple[int, ...]] = {}
    bl = blocks(spec)
    for b in bl:
        is_deploy = _is_deploy_block(deploy, b, lay) if isinstance(deploy, Mapping) else deploy
        keys.update(_block_keys(b, lay, is_deploy, spec.use_se))
    features = bl[-1].cout
    keys[f"{lay.head}.weight"] = (features, num_classes) if lay.head_transposed else (num_classes, features)
    keys[f"{lay.head}.bias"] = (num_classes,)
    return keys






def guess_arch(state: Mapping[str, np.ndarray]) -> tuple[str, str] | None:
    """(arch, source) of the first ARCHS entry and layout the state dict fits exactly, else None."""
    return state_guess(state, LAYOUTS, ARCHS, lambda arch, source, n, s: expected_shapes(arch, source, n, deploy=s))


def check_state(state: Mapping[str, np.ndarray], arch: str | RepVGGArch, source: str) -> tuple[dict, int]:
    """(state without prefixes / framework keys, num_classes) if the checkpoint fits arch and source
    exactly (every key used, every shape right), else one CheckpointError naming the first problem."""
    spec, lay = get_arch(arch), _source(source)
    return state_check(state, lay, lambda n: expected_shapes(spec, source, n, deploy=strip_framework_keys(state)),
                       f"{arch_name(spec)} ({source} layout)", lambda s: guess_hint(guess_arch(s), "RepVGG"),
                       f"Pass the arch and --source ({', '.join(SOURCES)}) the weights were trained with.")


# ---------------------------------------------------------------- re-parameterization

@dataclass
class BN:
    gamma: np.ndarray
    beta: np.ndarray
    mean: np.ndarray
    var: np.ndarray

    def scale_shift(self) -> tuple[np.ndarray, np.ndarray]:
        t = self.gamma / np.sqrt(self.var + BN_EPS)
        return t, self.beta - self.mean * t


@dataclass
class BlockWeights:
    """One block's weights: the three train-time branches (float64, folded exactly), or the deploy conv."""

    block: Block
    reparam: tuple[np.ndarray, np.ndarray] | None = None
    dense: tuple[np.ndarray, BN] | None = None
    one: tuple[np.ndarray, BN] | None = None
    identity: BN | None = None
    se: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None   # down w, b, up w, b


def identity_kernel(channels: int, groups: int) -> np.ndarray:
    """The 3x3 grouped-conv kernel of the identity map: weight[i, i % (channels/groups), 1, 1] = 1."""
    per_group = channels // groups
    k = np.zeros((channels, per_group, 3, 3))
    k[np.arange(channels), np.arange(channels) % per_group, 1, 1] = 1.0
    return k


def fold(kernel: np.ndarray, bn: BN) -> tuple[np.ndarray, np.ndarray]:
    """conv followed by BN as one conv (tvmzoo.models.state.fold_bn)."""
    return fold_bn(kernel, bn.gamma, bn.beta, bn.mean, bn.var, BN_EPS)


def reparameterize(w: BlockWeights) -> tuple[np.ndarray, np.ndarray]:
    """The equivalent 3x3 conv (kernel, bias) of a block."""
    if w.reparam is not None:
        return w.reparam
    k3, b3 = fold(*w.dense)
    k1, b1 = fold(*w.one)
    kernel, bias = k3 + np.pad(k1, ((0, 0), (0, 0), (1, 1), (1, 1))), b3 + b1
    if w.identity is not None:
        kid, bid = fold(identity_kernel(w.block.cin, w.block.groups), w.identity)
        kernel, bias = kernel + kid, bias + bid
    return kernel, bias


def _f64(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def _read_bn(state: Mapping, prefix: str, lay: Layout) -> BN:
    mean, var = lay.bn_stats
    return BN(*(_f64(state[f"{prefix}.{n}"]) for n in ("weight", "bias", mean, var)))


def read_blocks(state: Mapping[str, np.ndarray], arch: str | RepVGGArch,
                source: str) -> Iterator[BlockWeights]:
    """The weights of each block of a checked state dict (see check_state), one block at a time."""
    spec, lay = get_arch(arch), _source(source)
    for b in blocks(spec):
        p = lay.block_prefix(b.stage, b.index)
        w = BlockWeights(b)
        if _is_deploy_block(state, b, lay):
            # already folded: kept in the checkpoint's float32 (no float64 copy of big deploy nets)
            w.reparam = (state[f"{p}.{lay.reparam}.weight"], state[f"{p}.{lay.reparam}.bias"])
        else:
            w.dense = (_f64(state[f"{p}.{lay.dense}.conv.weight"]), _read_bn(state, f"{p}.{lay.dense}.{lay.bn}", lay))
            w.one = (_f64(state[f"{p}.{lay.one}.conv.weight"]), _read_bn(state, f"{p}.{lay.one}.{lay.bn}", lay))
            if b.has_identity:
                w.identity = _read_bn(state, f"{p}.{lay.identity}", lay)
        if spec.use_se:
            w.se = tuple(_f64(state[f"{p}.{m}.{n}"]) for m in (lay.se_down, lay.se_up) for n in ("weight", "bias"))
        yield w


def _read_head(state: Mapping[str, np.ndarray], lay: Layout) -> tuple[np.ndarray, np.ndarray]:
    w = _f64(state[f"{lay.head}.weight"])
    return (w.T if lay.head_transposed else w), _f64(state[f"{lay.head}.bias"])


def deploy_state(state: Mapping[str, np.ndarray], arch: str | RepVGGArch, source: str) -> dict[str, np.ndarray]:
    """The state dict of `source`'s own deploy model (float32, its key names): per block the folded 3x3
    conv as `<block>.<reparam>.weight/bias` (official / ppcls `rbr_reparam`, mmcls `branch_reparam`)
    and the SE weights, then the classifier as stored. A deploy checkpoint passes through unchanged."""
    spec, lay = get_arch(arch), _source(source)
    state, _ = check_state(state, spec, source)
    out: dict[str, np.ndarray] = {}
    for w in read_blocks(state, spec, source):
        p = lay.block_prefix(w.block.stage, w.block.index)
        if w.se is not None:  # the sources create the SE module before the re-parameterized conv
            keys = (f"{p}.{m}.{n}" for m in (lay.se_down, lay.se_up) for n in ("weight", "bias"))
            out.update(zip(keys, (v.astype(np.float32) for v in w.se)))
        kernel, bias = reparameterize(w)
        out[f"{p}.{lay.reparam}.weight"] = np.asarray(kernel, np.float32)
        out[f"{p}.{lay.reparam}.bias"] = np.asarray(bias, np.float32)
    for name in ("weight", "bias"):
        out[f"{lay.head}.{name}"] = np.asarray(state[f"{lay.head}.{name}"], np.float32)
    return out


# ---------------------------------------------------------------- ONNX

def _se(g: GraphBuilder, x: str, se: tuple, name: str) -> str:
    # The official SEBlock pools with avg_pool2d(kernel=W): a global average for the square inputs it is used with.
    s = g.global_avg_pool(x)
    s = g.relu(g.conv(s, se[0], se[1], f"{name}.se.down"))
    s = g.op("Sigmoid", [g.conv(s, se[2], se[3], f"{name}.se.up")])
    return g.op("Mul", [x, s], name=f"{name}.se.mul")


def _bn_node(g: GraphBuilder, x: str, bn: BN, name: str) -> str:
    return g.batch_norm(x, bn.gamma, bn.beta, bn.mean, bn.var, name, BN_EPS)


def _train_block(g: GraphBuilder, x: str, w: BlockWeights, name: str) -> str:
    b = w.block
    if w.reparam is not None:
        return g.conv(x, *w.reparam, name, stride=b.stride, groups=b.groups)
    y = _bn_node(g, g.conv(x, w.dense[0], None, f"{name}.dense", stride=b.stride, groups=b.groups),
                 w.dense[1], f"{name}.dense.bn")
    y1 = _bn_node(g, g.conv(x, w.one[0], None, f"{name}.1x1", stride=b.stride, groups=b.groups),
                  w.one[1], f"{name}.1x1.bn")
    y = g.add(y, y1)
    if w.identity is not None:
        y = g.add(y, _bn_node(g, x, w.identity, f"{name}.identity.bn"))
    return y


def _build(state, arch, source, size_hw, batch, *, deploy: bool) -> onnx.ModelProto:
    spec, lay, name = get_arch(arch), _source(source), arch_name(arch)
    state, num_classes = check_state(state, spec, source)
    g = GraphBuilder.for_model(name, "deploy" if deploy else "train")
    n, x = g.image_input(batch, size_hw)
    for w in read_blocks(state, spec, source):
        b = w.block
        block_name = lay.block_prefix(b.stage, b.index)
        if deploy:
            x = g.conv(x, *reparameterize(w), block_name, stride=b.stride, groups=b.groups)
        else:
            x = _train_block(g, x, w, block_name)
        if w.se is not None:   # SE sits after the (re-parameterized) conv and before the ReLU
            x = _se(g, x, w.se, block_name)
        x = g.relu(x)
    weight, bias = _read_head(state, lay)
    g.classifier(x, weight, bias, lay.head, n, num_classes)
    log.debug("built %s %s graph (%s layout, %d classes)", name, "deploy" if deploy else "train", source,
              num_classes)
    return g.build(doc=f"{name} ({source} layout), {'re-parameterized deploy' if deploy else 'train-time'} graph")


def deploy_onnx(state: Mapping[str, np.ndarray], arch: str | RepVGGArch, source: str, *,
                size_hw: tuple[int, int] = (224, 224), batch: int | None = None) -> onnx.ModelProto:
    """The deploy graph: one 3x3 conv (+ SE) + ReLU per block, GlobalAveragePool, Flatten, Gemm.
    input 'input' [N, 3, H, W] with size_hw = (H, W); output 'output' [N, num_classes]."""
    return _build(state, arch, source, size_hw, batch, deploy=True)


def train_onnx(state: Mapping[str, np.ndarray], arch: str | RepVGGArch, source: str, *,
               size_hw: tuple[int, int] = (224, 224), batch: int | None = None) -> onnx.ModelProto:
    """The unfolded graph (three branches with BatchNormalization nodes): the reference for deploy_onnx."""
    return _build(state, arch, source, size_hw, batch, deploy=False)


# ---------------------------------------------------------------- preprocessing, sizes, test weights

def _eval_preprocessing(arch: str, source: str) -> Preprocessing:
    """The evaluation transform of the repository the weights come from (short side resized, centre crop,
    ImageNet mean / std in RGB)."""
    spec, _ = get_arch(arch), _source(source)
    big = spec.use_se and source != "mmcls"
    if source == "official":
        # DingXiaoH/RepVGG utils.get_default_val_trans (test.py): Resize(256) + CenterCrop(224) at 224,
        # Resize(320, BILINEAR) + CenterCrop(320) for RepVGG-D2se (README: "test.py ... -a RepVGG-D2se -r 320").
        # torchvision Resize on PIL images: Pillow bilinear.
        size = 320 if big else 224
        return Preprocessing(resize_hw=(320, 320) if big else (256, 256), keep_aspect=True, crop_hw=(size, size),
                             interpolation="BILINEAR_PILLOW")
    if source == "mmcls":
        # mmpretrain configs/_base_/datasets/imagenet_bs*_pil_resize*.py test pipeline:
        # ResizeEdge(scale=256, edge='short', backend='pillow') + CenterCrop(224), for D2se too
        # (its model zoo reports D2se at 224: 81.81% vs the official 81.82% at 224).
        return Preprocessing(resize_hw=(256, 256), keep_aspect=True, crop_hw=(224, 224),
                             interpolation="BILINEAR_PILLOW")
    # PaddleClas ppcls/configs/ImageNet/RepVGG/RepVGG_*.yaml Eval: ResizeImage(resize_short=256) (cv2 backend,
    # INTER_LINEAR) + CropImage(224); RepVGG_D2se.yaml: resize_short 320, bicubic, pil + CropImage(320).
    if big:
        return Preprocessing(resize_hw=(320, 320), keep_aspect=True, crop_hw=(320, 320), interpolation="BICUBIC")
    return Preprocessing(resize_hw=(256, 256), keep_aspect=True, crop_hw=(224, 224), interpolation="BILINEAR_CV")


# Top-1 as the sources publish it in text (the official README's full table is an image): A0 and B1 from its
# training section, D2se at 320 from its updates (81.82 at 224); mmpretrain's D2se at 224.
# Official figures from DingXiaoH's README; PaddleClas's from its RepVGG model page (its own re-evaluation).
_TOP1 = {("official", "A0"): 72.41, ("official", "A1"): 74.46, ("official", "A2"): 76.48, ("official", "B0"): 75.14,
         ("official", "B1"): 78.37, ("official", "B2"): 78.78, ("official", "D2se"): 83.55, ("mmcls", "D2se"): 81.81,
         ("ppcls", "A0"): 71.31, ("ppcls", "A1"): 73.80, ("ppcls", "A2"): 75.71, ("ppcls", "B0"): 74.50,
         ("ppcls", "B1"): 77.73, ("ppcls", "B2"): 78.13}
_WHERE = {"official": "https://github.com/DingXiaoH/RepVGG (Google Drive / Baidu Cloud links)",
          "mmcls": "https://mmpretrain.readthedocs.io/en/latest/papers/repvgg.html",
          "ppcls": "https://paddle-imagenet-models-name.bj.bcebos.com/dygraph/RepVGG_{arch}_pretrained.pdparams"}
WEIGHTS = tuple(Weights("repvgg", arch, source, _eval_preprocessing(arch, source), top1=_TOP1.get((source, arch)),
                        url=_WHERE[source].format(arch=arch))
                for source in SOURCES for arch in ARCHS)


def param_count(arch: str | RepVGGArch, num_classes: int = 1000, deploy: bool = True) -> int:
    """Trainable parameters (BN running statistics are buffers, not counted): A0 8.31M deploy, 9.11M train."""
    lay = LAYOUTS["official"]
    stats = tuple(f".{s}" for s in lay.bn_stats)
    shapes = expected_shapes(arch, "official", num_classes, deploy=deploy)
    return int(sum(np.prod(s) for k, s in shapes.items() if not k.endswith(stats)))


def random_state_dict(arch: str | RepVGGArch, source: str, rng: np.random.Generator, deploy: bool = False,
                      num_classes: int = 1000) -> dict[str, np.ndarray]:
    """A random checkpoint dict of `arch` in `source`'s layout (tvmzoo.models.state.random_state_dict)."""
    return random_state(expected_shapes(arch, source, num_classes, deploy=deploy), _source(source), rng,
                        counters=source != "ppcls")


FAMILY = ModelFamily(
    name="repvgg", archs=ARCHS, sources=SOURCES, reference_source="official",
    expected_shapes=lambda arch, source, n: expected_shapes(arch, source, n),
    check_state=check_state, deploy_onnx=deploy_onnx, weights=WEIGHTS,
    param_count=lambda arch, _source, n, deploy: param_count(arch, n, deploy),
    random_state_dict=lambda arch, source, rng, n: random_state_dict(arch, source, rng, num_classes=n),
    deploy_state=deploy_state)
