"""One registry of model families. Each family module implements the `ModelFamily` interface
(tvmzoo.models.family) as its `FAMILY`: arch table, checkpoint key layouts ("sources"), expected
shapes, state check, BN / re-param folding into a deploy ONNX, default preprocessing, parameter
count and random test weights.

`state` is a {name: np.ndarray} dict from tvmzoo.io.checkpoint.load_state_dict; the class count
comes from the checkpoint's classifier weight, never from a constant.
"""
from __future__ import annotations

import importlib
import re

from ..errors import ConfigError, did_you_mean
from .family import ModelFamily

FAMILIES: dict[str, str] = {
    "repvgg": "tvmzoo.models.repvgg",
    "efficientnet_lite": "tvmzoo.models.efficientnet_lite",
    "regnet": "tvmzoo.models.regnet",
}
PACKAGED_WEIGHTS = "package"  # model.weights: the weights a pip package installs (kept as is, not a path)


def get_family(name: str) -> ModelFamily:
    """The family registered as `name` (e.g. 'repvgg'); a clear ConfigError for unknown names."""
    key = name.lower().replace("-", "_")
    if key not in FAMILIES:
        raise ConfigError(f"unknown model family '{name}'.{did_you_mean(key, FAMILIES)} "
                          f"Known families: {', '.join(FAMILIES)}.")
    return importlib.import_module(FAMILIES[key]).FAMILY


def resolve_arch(family: ModelFamily, arch: str) -> str:
    """The canonical arch key of `family` for a user-written name ('a0', 'RepVGG-A0' -> 'A0')."""
    def squash(text: str) -> str:
        # drop separators, but not between two digits: '1_6gf' must not become '16gf'
        return re.sub(r"(?<!\d)[-_]|[-_](?!\d)", "", text.lower())

    family_name = squash(family.name)
    prefixes = ("", family_name, family_name.replace("lite", ""), family_name + "x")
    wanted = squash(arch)
    for key in family.archs:
        if any(wanted == prefix + squash(key) for prefix in prefixes):
            return key
    raise ConfigError(f"unknown {family.name} arch '{arch}'.{did_you_mean(arch, family.archs)} "
                      f"Known archs: {', '.join(family.archs)}.")


def resolve_source(family: ModelFamily, source: str) -> str:
    key = source.lower()
    if key not in family.sources:
        raise ConfigError(f"unknown checkpoint layout '{source}' for {family.name}."
                          f"{did_you_mean(key, family.sources)} Known layouts: {', '.join(family.sources)}.")
    return key
