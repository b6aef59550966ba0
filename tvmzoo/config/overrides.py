"""`--set key.path=value`: each value read as YAML once (parse_set), then set into the parsed
document before it is validated (apply_overrides)."""
from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import ConfigError, TvmzooError
from .validate import kind


def parse_set(items: Sequence[str]) -> dict:
    """--set key.path=value, the value read as YAML once ('null' -> None, "'null'" -> the string null)."""
    import yaml

    from ..limits import load_yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise TvmzooError(f"--set {item}: write it as key.path=value, e.g. --set backend.dtype=fp16")
        try:
            out[key] = load_yaml(value)  # nesting bounded: a value nested 100000 deep is kept as text
        except yaml.YAMLError:  # not a YAML scalar or list: the text as is; the config check says if it fits
            out[key] = value
    return out


def apply_overrides(data: dict, overrides: Mapping[str, Any], path: Path) -> dict:
    """A copy of `data` with {"backend.dtype": "fp16", ...} set. Values are used as given (a string stays a
    string): the CLI reads each --set value as YAML once (`parse_set`) before it comes here."""
    data = copy.deepcopy(data)
    for dotted, value in overrides.items():
        parts = str(dotted).split(".")
        if not all(parts):
            raise ConfigError(f"--set {dotted}: not a key path; write it like backend.dtype=fp16.")
        node = data
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"{path}: --set {dotted}: '{'.'.join(parts[:i + 1])}' is {kind(child)}, "
                                  "not a mapping, so it has no keys to set.")
            node = child
        node[parts[-1]] = value
    return data
