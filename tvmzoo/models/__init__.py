"""One registry of model families. Each family module carries its own arch table, checkpoint
key layouts ("sources") and default preprocessing, and exposes the same three names:

    ARCHS: dict[str, <arch spec>]
    SOURCES: tuple[str, ...]                 # checkpoint key layouts it reads, e.g. official, mmcls, ppcls
    deploy_onnx(state, arch, source, *, input_size=(224, 224), batch=None) -> onnx.ModelProto
    default_preprocessing(arch, source) -> tvmzoo.preprocess.Preprocessing

`state` is a {name: np.ndarray} dict from tvmzoo.io.checkpoint.load_state_dict; the class count
comes from the checkpoint's classifier weight, never from a constant.
"""
from __future__ import annotations

import difflib
import re
import importlib
from types import ModuleType

from ..errors import ConfigError

FAMILIES: dict[str, str] = {
    "repvgg": "tvmzoo.models.repvgg",
    "efficientnet_lite": "tvmzoo.models.efficientnet_lite",
    "regnet": "tvmzoo.models.regnet",
}


def _suggest(name: str, choices) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" Did you mean '{close[0]}'?" if close else ""


def get_family(name: str) -> ModuleType:
    """The family module for `name` (e.g. 'repvgg'); a clear ConfigError for unknown names."""
    key = name.lower().replace("-", "_")
    if key not in FAMILIES:
        raise ConfigError(f"unknown model family '{name}'.{_suggest(key, FAMILIES)} "
                          f"Known families: {', '.join(FAMILIES)}.")
    return importlib.import_module(FAMILIES[key])


def resolve_arch(family: ModuleType, arch: str) -> str:
    """The canonical arch key of `family` for a user-written name ('a0', 'RepVGG-A0' -> 'A0')."""
    def squash(text: str) -> str:
        # drop separators, but not between two digits: '1_6gf' must not become '16gf'
        return re.sub(r"(?<!\d)[-_]|[-_](?!\d)", "", text.lower())

    family_name = squash(family.__name__.rsplit(".", 1)[-1])
    prefixes = ("", family_name, family_name.replace("lite", ""), family_name + "x")
    wanted = squash(arch)
    for key in family.ARCHS:
        if any(wanted == prefix + squash(key) for prefix in prefixes):
            return key
    raise ConfigError(f"unknown {family.__name__.rsplit('.', 1)[-1]} arch '{arch}'."
                      f"{_suggest(arch, family.ARCHS)} Known archs: {', '.join(family.ARCHS)}.")


def resolve_source(family: ModuleType, source: str) -> str:
    key = source.lower()
    if key not in family.SOURCES:
        raise ConfigError(f"unknown checkpoint layout '{source}' for "
                          f"{family.__name__.rsplit('.', 1)[-1]}.{_suggest(key, family.SOURCES)} "
                          f"Known layouts: {', '.join(family.SOURCES)}.")
    return key
