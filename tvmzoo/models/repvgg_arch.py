"""RepVGG's arch table and checkpoint layouts: widths, depths and groups of every arch (the
official override_groups_map), and the key names of the official, mmcls and ppcls checkpoints."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import ConfigError
from .state import lookup

SE_RATIO = 16          # official SEBlock(internal_neurons=channels // 16); mmcls SELayer(ratio=16, divisor=1)
STEM_MAX_CHANNELS = 64


@dataclass(frozen=True)
class RepVGGArch:
    """num_blocks / width_multiplier per stage 1-4; groups: layer index -> conv groups (stage1's first
    block is layer 1, the stem is layer 0 and never grouped); use_se: an SE block in every block."""

    num_blocks: tuple[int, int, int, int]
    width_multiplier: tuple[float, float, float, float]
    groups: dict[int, int] = field(default_factory=dict)
    use_se: bool = False


# The official optional_groupwise_layers: every second layer, from layer 2.
_GROUPWISE_LAYERS = tuple(range(2, 27, 2))
G2 = {layer: 2 for layer in _GROUPWISE_LAYERS}
G4 = {layer: 4 for layer in _GROUPWISE_LAYERS}
_A = (2, 4, 14, 1)
_B = (4, 6, 16, 1)

ARCHS: dict[str, RepVGGArch] = {
    "A0": RepVGGArch(_A, (0.75, 0.75, 0.75, 2.5)),
    "A1": RepVGGArch(_A, (1, 1, 1, 2.5)),
    "A2": RepVGGArch(_A, (1.5, 1.5, 1.5, 2.75)),
    "B0": RepVGGArch(_B, (1, 1, 1, 2.5)),
    "B1": RepVGGArch(_B, (2, 2, 2, 4)),
    "B1g2": RepVGGArch(_B, (2, 2, 2, 4), G2),
    "B1g4": RepVGGArch(_B, (2, 2, 2, 4), G4),
    "B2": RepVGGArch(_B, (2.5, 2.5, 2.5, 5)),
    "B2g4": RepVGGArch(_B, (2.5, 2.5, 2.5, 5), G4),
    "B3": RepVGGArch(_B, (3, 3, 3, 5)),
    "B3g4": RepVGGArch(_B, (3, 3, 3, 5), G4),
    "D2se": RepVGGArch((8, 14, 24, 1), (2.5, 2.5, 2.5, 5), use_se=True),
}

SOURCES = ("official", "mmcls", "ppcls")


@dataclass(frozen=True)
class Layout:
    """Key names of one checkpoint source (module names below a block prefix)."""

    stem: str                      # the stem block's prefix
    stage: str                     # stage prefix, formatted with the stage number 1-4
    dense: str
    one: str
    identity: str
    bn: str
    bn_stats: tuple[str, str]      # (running mean, running variance)
    reparam: str
    se_down: str
    se_up: str
    head: str
    head_transposed: bool          # Linear weight stored [in, out] (paddle) instead of [out, in]

    def block_prefix(self, stage: int, index: int) -> str:
        return self.stem if stage == 0 else f"{self.stage.format(stage)}.{index}"


LAYOUTS: dict[str, Layout] = {
    # DingXiaoH/RepVGG repvgg.py + se_block.py (train: conv_bn 'conv'/'bn'; deploy: rbr_reparam)
    "official": Layout("stage0", "stage{}", "rbr_dense", "rbr_1x1", "rbr_identity", "bn",
                       ("running_mean", "running_var"), "rbr_reparam", "se.down", "se.up", "linear", False),
    # open-mmlab/mmpretrain backbones/repvgg.py (stem, stage_1..4) + utils/se_layer.py (ConvModule: conv1.conv);
    # ImageClassifier puts the backbone under 'backbone.' and LinearClsHead's Linear at 'head.fc'
    "mmcls": Layout("backbone.stem", "backbone.stage_{}", "branch_3x3", "branch_1x1", "branch_norm", "norm",
                    ("running_mean", "running_var"), "branch_reparam", "se_layer.conv1.conv",
                    "se_layer.conv2.conv", "head.fc", False),
    # PaddleClas ppcls/arch/backbone/model_zoo/repvgg.py: official names, paddle BN and Linear conventions
    "ppcls": Layout("stage0", "stage{}", "rbr_dense", "rbr_1x1", "rbr_identity", "bn", ("_mean", "_variance"),
                    "rbr_reparam", "se.down", "se.up", "linear", True),
}

# Keys a framework adds that carry no weights: torch BN step counters, paddle's name table.


@dataclass(frozen=True)
class Block:
    layer: int        # 0 = stem (stage0), then 1, 2, ... as in the official override_groups_map
    stage: int        # 0..4
    index: int        # position within its stage
    cin: int
    cout: int
    stride: int
    groups: int

    @property
    def has_identity(self) -> bool:
        return self.cin == self.cout and self.stride == 1

    @property
    def se_channels(self) -> int:
        return max(1, self.cout // SE_RATIO)


def get_arch(arch: str | RepVGGArch) -> RepVGGArch:
    """An ARCHS entry by name ('A0', 'RepVGG-A0', 'b1g4'), or a custom RepVGGArch as given."""
    if isinstance(arch, RepVGGArch):
        return arch
    wanted = str(arch).lower().replace("repvgg", "").strip("-_ ")
    for name, spec in ARCHS.items():
        if name.lower() == wanted:
            return spec
    raise ConfigError(f"unknown RepVGG arch '{arch}'. Known archs: {', '.join(ARCHS)}.")


def arch_name(arch: str | RepVGGArch) -> str:
    spec = get_arch(arch)
    return next((f"RepVGG-{n}" for n, a in ARCHS.items() if a == spec), "RepVGG (custom arch)")


def blocks(arch: str | RepVGGArch) -> list[Block]:
    """The blocks in forward order, with channels, stride and groups as the official RepVGG builds them."""
    spec = get_arch(arch)
    cin = min(STEM_MAX_CHANNELS, int(64 * spec.width_multiplier[0]))
    out = [Block(0, 0, 0, 3, cin, 2, 1)]
    for stage, (n, width) in enumerate(zip(spec.num_blocks, spec.width_multiplier), start=1):
        cout = int(64 * 2 ** (stage - 1) * width)
        for index in range(n):
            layer, groups = len(out), spec.groups.get(len(out), 1)
            if cin % groups or cout % groups:
                raise ConfigError(f"RepVGG arch: layer {layer} ({cin} -> {cout} channels) cannot be split into "
                                  f"{groups} groups; choose widths whose channels the groups divide.")
            out.append(Block(layer, stage, index, cin, cout, 2 if index == 0 else 1, groups))
            cin = cout
    return out


def _source(source: str) -> Layout:
    return lookup(LAYOUTS, source, "RepVGG checkpoint layout", "layouts")
