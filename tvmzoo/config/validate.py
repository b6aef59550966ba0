"""The schema walk: each key of a YAML document maps to a small validator that returns the typed
value or raises Bad(key path, message); a `section` builds one dataclass from a mapping."""
from __future__ import annotations

import dataclasses
import logging
import math
import reprlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ..errors import did_you_mean

log = logging.getLogger(__name__)

class Bad(Exception):
    """A problem at one key path; load_build_config turns it into ConfigError with the file."""

    def __init__(self, key: str, message: str):
        super().__init__(key, message)
        self.key, self.message = key, message


Validator = Callable[[Any, str], Any]


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict, _REPR.maxstring, _REPR.maxother = 3, 4, 4, 60, 60


def show(value: Any) -> str:
    text = _REPR.repr(value)  # bounded: never walks a whole (possibly alias-exploded) structure
    return text if len(text) <= 60 else text[:57] + "..."



def kind(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def as_str(choices: tuple[str, ...] | None = None, aliases: Mapping[str, str] | None = None,
           numbers: bool = True) -> Validator:
    def check(value: Any, key: str) -> str:
        if numbers and isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)  # `name: 123` or a --set value parsed as a number
        if not isinstance(value, str) or not value.strip():
            raise Bad(key, f"expected a non-empty string, got {kind(value)} {show(value)}.")
        if choices is None:
            return value
        name = value.strip().lower()
        name = (aliases or {}).get(name, name)
        if name in choices:
            return name
        hint = did_you_mean(name, list(choices) + list(aliases or {}))
        raise Bad(key, f"{show(value)} is not one of {', '.join(choices)}.{hint}")
    return check


def as_int(minimum: int | None = None) -> Validator:
    def check(value: Any, key: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise Bad(key, f"expected an integer, got {kind(value)} {show(value)}.")
        if minimum is not None and value < minimum:
            raise Bad(key, f"must be >= {minimum}, got {value}.")
        return value
    return check


def as_float(low: float | None = None, high: float | None = None, low_open: bool = False) -> Validator:
    def check(value: Any, key: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise Bad(key, f"expected a finite number, got {kind(value)} {show(value)}.")
        too_low = low is not None and (value <= low if low_open else value < low)
        if too_low or (high is not None and value > high):
            lo = f"{'>' if low_open else '>='} {low}" if low is not None else ""
            hi = f"<= {high}" if high is not None else ""
            raise Bad(key, f"must be {' and '.join(filter(None, (lo, hi)))}, got {value}.")
        return float(value)
    return check


def as_bool(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise Bad(key, f"expected true or false, got {kind(value)} {show(value)}.")
    return value


def as_path(value: Any, key: str) -> Path:
    text = as_str()(value, key)
    if "\0" in text:
        raise Bad(key, "a path cannot contain a NUL character.")
    path = Path(text).expanduser()
    return path if path.is_absolute() else Path.cwd() / path


def as_list(item: Validator) -> Validator:
    def check(value: Any, key: str) -> list:
        if not isinstance(value, list):
            raise Bad(key, f"expected a list, got {kind(value)} {show(value)}.")
        return [item(v, f"{key}[{i}]") for i, v in enumerate(value)]
    return check


def mapping(value: Any, key: str) -> dict:
    if not isinstance(value, dict):
        raise Bad(key, f"expected a mapping, got {kind(value)} {show(value)}.")
    return dict(value)


def optional(inner: Validator) -> Validator:
    return lambda value, key: None if value is None else inner(value, key)


def any_of(*options: Validator, what: str) -> Validator:
    def check(value: Any, key: str) -> Any:
        for option in options:
            try:
                return option(value, key)
            except Bad:
                pass
        raise Bad(key, f"expected {what}, got {kind(value)} {show(value)}.")
    return check


def section(cls: type, fields: Mapping[str, Validator], *, ignored: tuple[str, ...] = (),
          prepare: Callable[[Any, str], Any] | None = None,
          finish: Callable[[Any, str], Any] | None = None) -> Validator:
    """A mapping whose keys are `fields`, built into dataclass `cls`. Keys missing from the
    mapping take the dataclass default; those without a default are required. `ignored` keys are
    known vendor keys: accepted, logged, dropped."""
    defaults = {f.name for f in dataclasses.fields(cls)
                if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING}

    def check(value: Any, key: str) -> Any:
        if prepare is not None:
            value = prepare(value, key)
        if not isinstance(value, dict):
            raise Bad(key, f"expected a mapping with keys {', '.join(fields)}, got {kind(value)} {show(value)}.")
        kwargs = {}
        for name, raw in value.items():
            here = f"{key}.{name}" if key else str(name)
            if name in fields:
                kwargs[name] = fields[name](raw, here)
            elif name in ignored:
                log.debug("%s: vendor key accepted and ignored (%s)", here, show(raw))
            else:
                hint = did_you_mean(name, fields, prefix=key + "." if key else "")
                raise Bad(here, f"unknown key.{hint} Keys allowed here: {', '.join(fields)}.")
        for name in fields:
            if name not in kwargs and name not in defaults:
                here = f"{key}.{name}" if key else name
                under = f" under `{key.rsplit('.', 1)[-1]}:`" if key else ""
                raise Bad(here, f"missing: add `{name}: ...`{under}.")
        obj = cls(**kwargs)
        return finish(obj, key) if finish is not None else obj
    return check
