"""The vendor build YAML -> typed, validated, frozen dataclasses.

    cfg = load_build_config("build_in/build/official_repvgg.yaml", {"backend.dtype": "fp16"})

The vendor files are accepted as they are (`backend.type: tvm_vacc`, `compile:` hardware knobs,
`dataset.sampler`, `graph.extra_ops.type`, `workspace.path`); tvmzoo's additions are optional keys
(`backend.target`, `backend.quantize.percentile` and friends, `graph.preprocess`, `model:`,
`tuning:`). Relative paths in the YAML are resolved against the *current working directory*, as
the vendor tools do (their YAMLs say `./deploy_weights/` and are run from the model folder), not
against the YAML's own directory.

Every problem is one ConfigError: "<file>: <key.path>: <what is wrong>. <how to fix>". Unknown
keys are errors (with a close-match suggestion), except under `backend.compile` (vendor hardware
knobs: accepted, logged at debug level, ignored) and the vendor quantize / workspace keys listed in
_VENDOR_IGNORED.

The loader is a schema walk: each key maps to a small validator (see _SCHEMA at the bottom).
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import math
import reprlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError, did_you_mean
from .limits import check_text_size, load_yaml
from .models import FAMILIES, PACKAGED_WEIGHTS
from .preprocess import Preprocessing

log = logging.getLogger(__name__)

BACKEND_TYPES = ("tvm",)
BACKEND_ALIASES = {"tvm_vacc": "tvm"}
PRECISIONS = ("fp32", "fp16", "bf16", "int8")  # backend.dtype
CALIBRATE_MODES = ("max", "percentile", "kl", "mse")
CALIBRATE_ALIASES = {"kl_divergence": "kl", "minmax": "max"}
PERCENTILE_RANGE = (50.0, 100.0)  # backend.quantize.percentile: the share of values kept, in (50, 100]
FRONTEND_TYPES = ("onnx",)
DATASET_TYPES = ("tvm",)
PREPROCESS_MODES = ("host", "fused")
EXTRA_OPS = ("softmax",)


@dataclass(frozen=True)
class Frontend:
    shape: dict[str, list[int]]
    checkpoint: Path
    type: str = "onnx"
    dtype: str = "fp32"


@dataclass(frozen=True)
class Quantize:
    calibrate_mode: str = "percentile"
    percentile: float = 99.99
    quantize_per_channel: bool = True
    skip_matmul_layers: list[int] = field(default_factory=list)
    skip_layers: list[str] = field(default_factory=list)
    keep_first_last_float: bool = False
    calibrate_chunk_by: int = -1
    max_drop: float | None = None


@dataclass(frozen=True)
class Backend:
    type: str = "tvm"
    dtype: str = "fp32"
    target: str | dict | None = None
    compile: dict = field(default_factory=dict)
    quantize: Quantize | None = None


@dataclass(frozen=True)
class Graph:
    extra_ops: str | None = None
    preprocess: str = "host"


@dataclass(frozen=True)
class Dataset:
    path: Path
    type: str = "tvm"
    suffix: str = "JPEG"
    get_data_num: int = 50
    process_ops: list[dict] = field(default_factory=list)

    @property
    def preprocessing(self) -> Preprocessing | None:
        """The process_ops as a Preprocessing (validated at load time), None when there are none."""
        return Preprocessing.from_process_ops(self.process_ops, "dataset.process_ops") if self.process_ops else None


@dataclass(frozen=True)
class ModelSpec:
    family: str
    arch: str
    source: str = "official"
    weights: Path | str | None = None  # a checkpoint path, or "package" (weights a pip package installs)


@dataclass(frozen=True)
class BuildConfig:
    name: str
    frontend: Frontend
    backend: Backend
    workspace: Path
    path: Path
    graph: Graph = field(default_factory=Graph)
    dataset: Dataset | None = None
    model: ModelSpec | None = None
    tuning: dict | None = None

    @property
    def output_dir(self) -> Path:
        """Where the compiled model lands: <workspace>/<name>/."""
        return self.workspace / self.name


# ---------------------------------------------------------------------------------------------
# the schema walk
# ---------------------------------------------------------------------------------------------
class _Bad(Exception):
    """A problem at one key path; load_build_config turns it into ConfigError with the file."""

    def __init__(self, key: str, message: str):
        super().__init__(key, message)
        self.key, self.message = key, message


Validator = Callable[[Any, str], Any]


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict, _REPR.maxstring, _REPR.maxother = 3, 4, 4, 60, 60
MAX_VALUES = 100_000  # a build YAML has ~50; YAML aliases can make a small file expand to billions


def _show(value: Any) -> str:
    text = _REPR.repr(value)  # bounded: never walks a whole (possibly alias-exploded) structure
    return text if len(text) <= 60 else text[:57] + "..."


def _count_values(data: Any, limit: int = MAX_VALUES) -> int:
    """Values in the document as the loader would walk them (shared aliases counted each time), up to limit+1."""
    count, stack = 0, [data]
    while stack and count <= limit:
        node = stack.pop()
        count += 1
        if isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return count


def _kind(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def _str(choices: tuple[str, ...] | None = None, aliases: Mapping[str, str] | None = None,
         numbers: bool = True) -> Validator:
    def check(value: Any, key: str) -> str:
        if numbers and isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)  # `name: 123` or a --set value parsed as a number
        if not isinstance(value, str) or not value.strip():
            raise _Bad(key, f"expected a non-empty string, got {_kind(value)} {_show(value)}.")
        if choices is None:
            return value
        name = value.strip().lower()
        name = (aliases or {}).get(name, name)
        if name in choices:
            return name
        hint = did_you_mean(name, list(choices) + list(aliases or {}))
        raise _Bad(key, f"{_show(value)} is not one of {', '.join(choices)}.{hint}")
    return check


def _int(minimum: int | None = None) -> Validator:
    def check(value: Any, key: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Bad(key, f"expected an integer, got {_kind(value)} {_show(value)}.")
        if minimum is not None and value < minimum:
            raise _Bad(key, f"must be >= {minimum}, got {value}.")
        return value
    return check


def _float(low: float | None = None, high: float | None = None, low_open: bool = False) -> Validator:
    def check(value: Any, key: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise _Bad(key, f"expected a finite number, got {_kind(value)} {_show(value)}.")
        too_low = low is not None and (value <= low if low_open else value < low)
        if too_low or (high is not None and value > high):
            lo = f"{'>' if low_open else '>='} {low}" if low is not None else ""
            hi = f"<= {high}" if high is not None else ""
            raise _Bad(key, f"must be {' and '.join(filter(None, (lo, hi)))}, got {value}.")
        return float(value)
    return check


def _bool(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise _Bad(key, f"expected true or false, got {_kind(value)} {_show(value)}.")
    return value


def _path(value: Any, key: str) -> Path:
    text = _str()(value, key)
    if "\0" in text:
        raise _Bad(key, "a path cannot contain a NUL character.")
    path = Path(text).expanduser()
    return path if path.is_absolute() else Path.cwd() / path


def _list(item: Validator) -> Validator:
    def check(value: Any, key: str) -> list:
        if not isinstance(value, list):
            raise _Bad(key, f"expected a list, got {_kind(value)} {_show(value)}.")
        return [item(v, f"{key}[{i}]") for i, v in enumerate(value)]
    return check


def _mapping(value: Any, key: str) -> dict:
    if not isinstance(value, dict):
        raise _Bad(key, f"expected a mapping, got {_kind(value)} {_show(value)}.")
    return dict(value)


def _optional(inner: Validator) -> Validator:
    return lambda value, key: None if value is None else inner(value, key)


def _any_of(*options: Validator, what: str) -> Validator:
    def check(value: Any, key: str) -> Any:
        for option in options:
            try:
                return option(value, key)
            except _Bad:
                pass
        raise _Bad(key, f"expected {what}, got {_kind(value)} {_show(value)}.")
    return check


def _section(cls: type, fields: Mapping[str, Validator], *, ignored: tuple[str, ...] = (),
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
            raise _Bad(key, f"expected a mapping with keys {', '.join(fields)}, got {_kind(value)} {_show(value)}.")
        kwargs = {}
        for name, raw in value.items():
            here = f"{key}.{name}" if key else str(name)
            if name in fields:
                kwargs[name] = fields[name](raw, here)
            elif name in ignored:
                log.debug("%s: vendor key accepted and ignored (%s)", here, _show(raw))
            else:
                hint = did_you_mean(name, fields, prefix=key + "." if key else "")
                raise _Bad(here, f"unknown key.{hint} Keys allowed here: {', '.join(fields)}.")
        for name in fields:
            if name not in kwargs and name not in defaults:
                here = f"{key}.{name}" if key else name
                under = f" under `{key.rsplit('.', 1)[-1]}:`" if key else ""
                raise _Bad(here, f"missing: add `{name}: ...`{under}.")
        obj = cls(**kwargs)
        return finish(obj, key) if finish is not None else obj
    return check


# ---- vendor shapes ----
def _shape(value: Any, key: str) -> dict[str, list[int]]:
    shapes = _mapping(value, key)
    if not shapes:
        raise _Bad(key, "expected at least one `<input name>: [N, C, H, W]` entry.")
    return {str(_str()(name, key)): _list_nonempty(_int(1))(dims, f"{key}.{name}") for name, dims in shapes.items()}


def _list_nonempty(item: Validator) -> Validator:
    def check(value: Any, key: str) -> list:
        out = _list(item)(value, key)
        if not out:
            raise _Bad(key, "expected a non-empty list.")
        return out
    return check


def _compile_knobs(value: Any, key: str) -> dict:
    knobs = _mapping({} if value is None else value, key)
    if knobs:
        log.debug("%s: vendor hardware knobs accepted and ignored: %s", key, sorted(map(str, knobs)))
    return knobs


def _extra_ops(value: Any, key: str) -> str | None:
    """`extra_ops: {type: softmax}` (vendor), `extra_ops: softmax` or null."""
    if isinstance(value, dict):
        unknown = set(value) - {"type"}
        if unknown:
            raise _Bad(f"{key}.{sorted(map(str, unknown))[0]}", "unknown key. Keys allowed here: type.")
        value = value.get("type")
    return _optional(_str(EXTRA_OPS))(value, f"{key}.type" if value is not None else key)


def _flatten_sampler(value: Any, key: str) -> Any:
    """The vendor nests suffix / get_data_num under `sampler:`; the dataclass has them flat."""
    if isinstance(value, dict) and "sampler" in value:
        value = dict(value)
        sampler = value.pop("sampler")
        if sampler is not None:
            for name, raw in _mapping(sampler, f"{key}.sampler").items():
                if name not in ("suffix", "get_data_num"):
                    raise _Bad(f"{key}.sampler.{name}", "unknown key. Keys allowed here: suffix, get_data_num.")
                value[name] = raw
    return value


def _check_process_ops(dataset: Dataset, key: str) -> Dataset:
    if dataset.process_ops:
        try:
            Preprocessing.from_process_ops(dataset.process_ops, f"{key}.process_ops")
        except ConfigError as err:  # its message starts with the key path already
            raise _Bad("", str(err)) from None
    return dataset


def _workspace(value: Any, key: str) -> Path:
    """`workspace: {path: ./deploy_weights/}` (vendor; `workers` ignored) or `workspace: <path>`."""
    if isinstance(value, dict):
        for name in value:
            if name not in ("path", "workers"):
                raise _Bad(f"{key}.{name}", "unknown key. Keys allowed here: path, workers.")
        if "path" not in value:
            raise _Bad(f"{key}.path", "missing: add `path: ./deploy_weights/` under `workspace:`.")
        return _path(value["path"], f"{key}.path")
    return _path(value, key)


def _backend_finish(backend: Backend, key: str) -> Backend:
    if backend.dtype == "int8" and backend.quantize is None:
        return dataclasses.replace(backend, quantize=Quantize())
    if backend.dtype != "int8" and backend.quantize is not None:
        log.debug("%s.quantize is ignored with dtype %s", key, backend.dtype)
    return backend


def _weights(value: Any, key: str) -> Path | str:
    return PACKAGED_WEIGHTS if value == PACKAGED_WEIGHTS else _path(value, key)


def _name(value: Any, key: str) -> str:
    name = _str()(value, key)
    if "/" in name or "\\" in name or "\0" in name or name.strip() in (".", ".."):
        raise _Bad(key, f"{_show(name)} is used as a folder name under the workspace: use letters, digits, "
                   "'_', '-' or '.', without path separators.")
    return name


def _check_model(model: ModelSpec, key: str) -> ModelSpec:
    """Unknown archs and checkpoint layouts fail at load time, naming the key, not at export."""
    from .models import get_family, resolve_arch, resolve_source

    family = get_family(model.family)
    for name, resolve in (("arch", resolve_arch), ("source", resolve_source)):
        try:
            resolve(family, getattr(model, name))
        except ConfigError as err:
            raise _Bad(f"{key}.{name}", str(err)) from None
    return model


_VENDOR_QUANTIZE_KEYS = ("weight_scale", "calibrate_range", "skip_conv_layers", "quantize_dsp_ops",
                         "nearest_interpol_on_dsp")

_QUANTIZE = _section(Quantize, {
    "calibrate_mode": _str(CALIBRATE_MODES, CALIBRATE_ALIASES),
    "percentile": _float(*PERCENTILE_RANGE, low_open=True),
    "quantize_per_channel": _bool,
    "skip_matmul_layers": _list(_int(0)),
    "skip_layers": _list(_str()),
    "keep_first_last_float": _bool,
    "calibrate_chunk_by": _int(-1),
    "max_drop": _optional(_float(0.0)),
}, ignored=_VENDOR_QUANTIZE_KEYS)

_SCHEMA = _section(BuildConfig, {
    "name": _name,
    "frontend": _section(Frontend, {
        "shape": _shape,
        "type": _str(FRONTEND_TYPES),
        "checkpoint": _path,
        "dtype": _str(("fp32", "fp16")),
    }),
    "backend": _section(Backend, {
        "type": _str(BACKEND_TYPES, BACKEND_ALIASES),
        "dtype": _str(PRECISIONS),
        "target": _optional(_any_of(_str(numbers=False), _mapping, what="a target string (e.g. 'llvm -mcpu=native') "
                                                           "or a mapping (e.g. {kind: llvm, mcpu: native})")),
        "compile": _compile_knobs,
        "quantize": _optional(_QUANTIZE),
    }, finish=_backend_finish),
    "graph": _optional(_section(Graph, {"extra_ops": _extra_ops, "preprocess": _str(PREPROCESS_MODES)})),
    "dataset": _optional(_section(Dataset, {
        "type": _str(DATASET_TYPES),
        "path": _path,
        "suffix": _str(),
        "get_data_num": _int(1),
        "process_ops": _list(_mapping),
    }, prepare=_flatten_sampler, finish=_check_process_ops)),
    "workspace": _workspace,
    "model": _optional(_section(ModelSpec, {
        "family": _str(tuple(FAMILIES)),
        "arch": _str(),
        "source": _str(),
        "weights": _optional(_weights),
    }, finish=_check_model)),
    "tuning": _optional(_mapping),
    "path": lambda value, key: value,  # set by the loader, not read from the YAML
})


# ---------------------------------------------------------------------------------------------
# public entry points
# ---------------------------------------------------------------------------------------------
def build_config_from_dict(data: Any, path: str | Path = "<dict>") -> BuildConfig:
    """Validate an already-parsed YAML document; `path` names it in errors."""
    path = Path(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the document must be a mapping with keys name, frontend, backend, "
                          f"workspace (and optionally graph, dataset, model, tuning), got {_kind(data)}.")
    if "path" in data:
        raise ConfigError(f"{path}: path: unknown key (the config's own path is not a setting); remove it.")
    data = dict(data)
    data.setdefault("workspace", "./deploy_weights/")
    if data.get("graph") is None:
        data.pop("graph", None)
    data["path"] = path
    try:
        return _SCHEMA(data, "")
    except _Bad as bad:
        where = f"{bad.key}: " if bad.key else ""
        raise ConfigError(f"{path}: {where}{bad.message}") from None


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
                raise ConfigError(f"{path}: --set {dotted}: '{'.'.join(parts[:i + 1])}' is {_kind(child)}, "
                                  "not a mapping, so it has no keys to set.")
            node = child
        node[parts[-1]] = value
    return data


def load_build_config(path: str | Path, overrides: Mapping[str, Any] | None = None) -> BuildConfig:
    """Read and validate a build YAML; `overrides` ({"backend.dtype": "fp16"}) are the CLI's --set.
    Relative paths inside resolve against the current working directory."""
    path = Path(path)
    check_text_size(path, "build config")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"build config {path} does not exist (relative paths are from the current "
                          f"directory, {Path.cwd()}): check the path.") from None
    except IsADirectoryError:
        raise ConfigError(f"build config {path} is a directory: give the .yaml file inside it.") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read build config {path}: {err}.") from None
    try:
        data = load_yaml(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigError(f"{path}: YAML syntax error{where}: {problem}; fix the indentation or quoting there.") from None
    if _count_values(data) > MAX_VALUES:
        raise ConfigError(f"{path}: the document expands to more than {MAX_VALUES} values (YAML anchors and "
                          "aliases repeated?); a build config needs about 50: remove the repetition.")
    if overrides:
        if not isinstance(data, dict):
            return build_config_from_dict(data, path)
        data = apply_overrides(data, overrides, path)
    return build_config_from_dict(data, path)
