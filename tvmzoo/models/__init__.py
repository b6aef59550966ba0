"""One registry of model families. Each family module implements the `ModelFamily` interface
(tvmzoo.models.family) as its `FAMILY`: arch table, checkpoint key layouts ("sources"), expected
shapes, state check, BN / re-param folding into a deploy ONNX, parameter count, random test weights
and its weights entries (tvmzoo.models.weights: `family:arch:source[.tag]`, each with the
preprocessing, input size, class count and published figures of one released checkpoint).

`state` is a {name: np.ndarray} dict from tvmzoo.io.checkpoint.load_state_dict; the class count
comes from the checkpoint's classifier weight, never from a constant.
"""
from __future__ import annotations

import importlib
import re

from ..errors import ConfigError, did_you_mean
from .family import ModelFamily
from .weights import Weights, split_source

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
    """The checkpoint layout of `source` ('torchvision.v2' -> 'torchvision': a tag names one release)."""
    key = split_source(source.lower())[0]
    if key not in family.sources:
        raise ConfigError(f"unknown checkpoint layout '{source}' for {family.name}."
                          f"{did_you_mean(key, family.sources)} Known layouts: {', '.join(family.sources)}.")
    return key


def all_weights() -> list[Weights]:
    """Every weights entry of every family, in registry order."""
    return [w for name in FAMILIES for w in get_family(name).weights]


def weights_for(family: str, arch: str, source: str) -> Weights:
    """The entry `family:arch:source[.tag]` (names as the user writes them); without a tag, the source's
    first release (torchvision: v1). One ConfigError naming the entries there are otherwise."""
    fam = get_family(family)
    arch, layout = resolve_arch(fam, arch), resolve_source(fam, source)
    tag = split_source(source.lower())[1]
    found = [w for w in fam.weights if w.arch == arch and w.source == layout and (not tag or w.tag == tag)]
    if not found:
        known = [w.key for w in fam.weights if w.arch == arch] or [w.key for w in fam.weights[:6]]
        raise ConfigError(f"no published weights {fam.name}:{arch}:{source}. Known: {', '.join(known)}"
                          f"{' ...' if len(known) == 6 else ''} (`tvmzoo models` lists them all).")
    return found[0]


def get_weights(key: str) -> Weights:
    """The entry for a key 'family:arch:source[.tag]' (e.g. 'regnet:800MF:torchvision.v2')."""
    parts = key.split(":")
    if len(parts) != 3 or not all(parts):
        raise ConfigError(f"'{key}' is not a weights key family:arch:source[.tag] (e.g. repvgg:A0:official, "
                          "regnet:800MF:torchvision.v2).")
    return weights_for(*parts)
