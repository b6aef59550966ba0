"""Weights entries: one per published checkpoint, keyed `family:arch:source[.tag]` as timm's pretrained
configs and torchvision's Weights enums are. An entry carries what its source evaluates the weights
with (the preprocessing, hence the input size), the class count and the figures the source publishes.
Each family module lists its own (`ModelFamily.weights`); tvmzoo.models.weights_for finds one.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..preprocess import Preprocessing


@dataclass(frozen=True)
class Weights:
    family: str
    arch: str                      # an arch of the family's table
    source: str                    # the checkpoint key layout, one of ModelFamily.sources
    preprocessing: Preprocessing   # the source's evaluation transform
    tag: str = ""                  # which of the source's releases, e.g. torchvision's 'v1' / 'v2'
    num_classes: int = 1000
    top1: float | None = None      # ImageNet-1k validation top-1 (%) as the source publishes it
    top5: float | None = None
    url: str | None = None         # where the source publishes the file
    packaged: Callable[[], str] | None = None   # the path of the file a pip package installs

    @property
    def key(self) -> str:
        return f"{self.family}:{self.arch}:{self.source}" + (f".{self.tag}" if self.tag else "")

    @property
    def size_hw(self) -> tuple[int, int]:
        """The evaluation input (height, width): the preprocessing's crop."""
        return self.preprocessing.crop_hw

    def describe(self) -> str:
        """One line for `tvmzoo models`: key, input, classes, published top-1."""
        h, w = self.size_hw
        top1 = f"top-1 {self.top1:.2f}%" if self.top1 is not None else "top-1 not recorded"
        where = "pip package" if self.packaged is not None else (self.url or "no published file known")
        return f"{self.key:38} {h}x{w}  {self.num_classes} classes  {top1:20}  {where}"


def split_source(source: str) -> tuple[str, str]:
    """'torchvision.v2' -> ('torchvision', 'v2'); 'pycls' -> ('pycls', '')."""
    layout, _, tag = source.partition(".")
    return layout, tag
