"""The build YAML's schema (vendor keys and tvmzoo's) and its loader: load_build_config reads the
file, applies --set overrides and walks the document with the validators of validate.py."""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError
from ..limits import load_yaml, read_text_file
from ..models import FAMILIES, PACKAGED_WEIGHTS
from ..preprocess import Preprocessing
from .overrides import apply_overrides
from .spec import (BACKEND_ALIASES, BACKEND_TYPES, BF16_CHOICES, CALIBRATE_ALIASES, CALIBRATE_MODES, DATASET_TYPES,
                   EXTRA_OPS, FRONTEND_TYPES, PERCENTILE_RANGE, PRECISIONS, PREPROCESS_MODES, Backend, BuildConfig,
                   Dataset, Frontend, Graph, ModelSpec, Quantize)
from .validate import (Bad, Validator, any_of, as_bool, as_float, as_int, as_list, as_path, as_str, kind, mapping,
                       optional, section, show)

log = logging.getLogger(__name__)

SYMBOLIC_BATCH = (-1, None, "N", "n", "?", "-1")   # how ONNX tools write a batch of any size
MAX_VALUES = 100_000  # a build YAML has ~50; YAML aliases can make a small file expand to billions


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



# ---- vendor shapes ----
def _shape(value: Any, key: str) -> dict[str, list[int]]:
    shapes = mapping(value, key)
    if not shapes:
        raise Bad(key, "expected at least one `<input name>: [N, C, H, W]` entry.")
    for name, dims in shapes.items():
        if isinstance(dims, list) and dims and dims[0] in SYMBOLIC_BATCH and not isinstance(dims[0], bool):
            raise Bad(f"{key}.{name}[0]", f"the batch must be a size, got {show(dims[0])}: a symbolic batch runs "
                      "no tuned or default schedule (15x slower) and int8 does not build. Build one model per batch "
                      "size you deploy (e.g. 1 and 8); tvmzoo serve pads smaller batches.")
    return {str(as_str()(name, key)): _list_nonempty(as_int(1))(dims, f"{key}.{name}") for name, dims in shapes.items()}


def _list_nonempty(item: Validator) -> Validator:
    def check(value: Any, key: str) -> list:
        out = as_list(item)(value, key)
        if not out:
            raise Bad(key, "expected a non-empty list.")
        return out
    return check


def _compile_knobs(value: Any, key: str) -> dict:
    knobs = mapping({} if value is None else value, key)
    if knobs:
        log.debug("%s: vendor hardware knobs accepted and ignored: %s", key, sorted(map(str, knobs)))
    return knobs


def _extra_ops(value: Any, key: str) -> str | None:
    """`extra_ops: {type: softmax}` (vendor), `extra_ops: softmax` or null."""
    if isinstance(value, dict):
        unknown = set(value) - {"type"}
        if unknown:
            raise Bad(f"{key}.{sorted(map(str, unknown))[0]}", "unknown key. Keys allowed here: type.")
        value = value.get("type")
    return optional(as_str(EXTRA_OPS))(value, f"{key}.type" if value is not None else key)


def _flatten_sampler(value: Any, key: str) -> Any:
    """The vendor nests suffix / get_data_num under `sampler:`; the dataclass has them flat."""
    if isinstance(value, dict) and "sampler" in value:
        value = dict(value)
        sampler = value.pop("sampler")
        if sampler is not None:
            for name, raw in mapping(sampler, f"{key}.sampler").items():
                if name not in ("suffix", "get_data_num"):
                    raise Bad(f"{key}.sampler.{name}", "unknown key. Keys allowed here: suffix, get_data_num.")
                value[name] = raw
    return value


def _check_process_ops(dataset: Dataset, key: str) -> Dataset:
    if dataset.process_ops:
        try:
            Preprocessing.from_process_ops(dataset.process_ops, f"{key}.process_ops")
        except ConfigError as err:  # its message starts with the key path already
            raise Bad("", str(err)) from None
    return dataset


def _workspace(value: Any, key: str) -> Path:
    """`workspace: {path: ./deploy_weights/}` (vendor; `workers` ignored) or `workspace: <path>`."""
    if isinstance(value, dict):
        for name in value:
            if name not in ("path", "workers"):
                raise Bad(f"{key}.{name}", "unknown key. Keys allowed here: path, workers.")
        if "path" not in value:
            raise Bad(f"{key}.path", "missing: add `path: ./deploy_weights/` under `workspace:`.")
        return as_path(value["path"], f"{key}.path")
    return as_path(value, key)


def _backend_finish(backend: Backend, key: str) -> Backend:
    if backend.dtype == "int8" and backend.quantize is None:
        return dataclasses.replace(backend, quantize=Quantize())
    if backend.dtype != "int8" and backend.quantize is not None:
        log.debug("%s.quantize is ignored with dtype %s", key, backend.dtype)
    return backend


def _weights(value: Any, key: str) -> Path | str:
    return PACKAGED_WEIGHTS if value == PACKAGED_WEIGHTS else as_path(value, key)


def _name(value: Any, key: str) -> str:
    name = as_str()(value, key)
    if "/" in name or "\\" in name or "\0" in name or name.strip() in (".", ".."):
        raise Bad(key, f"{show(name)} is used as a folder name under the workspace: use letters, digits, "
                  "'_', '-' or '.', without path separators.")
    return name


def _check_model(model: ModelSpec, key: str) -> ModelSpec:
    """Unknown archs and checkpoint layouts fail at load time, naming the key, not at export."""
    from ..models import get_family, resolve_arch, resolve_source, weights_for

    family = get_family(model.family)
    for name, resolve in (("arch", resolve_arch), ("source", resolve_source)):
        try:
            resolve(family, getattr(model, name))
        except ConfigError as err:
            raise Bad(f"{key}.{name}", str(err)) from None
    if "." in model.source:  # a tag names one release: it must be a weights entry
        try:
            weights_for(model.family, model.arch, model.source)
        except ConfigError as err:
            raise Bad(f"{key}.source", str(err)) from None
    return model


_VENDOR_QUANTIZE_KEYS = ("weight_scale", "calibrate_range", "skip_conv_layers", "quantize_dsp_ops",
                         "nearest_interpol_on_dsp")

_QUANTIZE = section(Quantize, {
    "calibrate_mode": as_str(CALIBRATE_MODES, CALIBRATE_ALIASES),
    "percentile": as_float(*PERCENTILE_RANGE, low_open=True),
    "quantize_per_channel": as_bool,
    "skip_matmul_layers": as_list(as_int(0)),
    "skip_layers": as_list(as_str()),
    "keep_first_last_float": as_bool,
    "calibrate_chunk_by": as_int(-1),
    "max_drop": optional(as_float(0.0)),
}, ignored=_VENDOR_QUANTIZE_KEYS)

_SCHEMA = section(BuildConfig, {
    "name": _name,
    "frontend": section(Frontend, {
        "shape": _shape,
        "type": as_str(FRONTEND_TYPES),
        "checkpoint": as_path,
        "dtype": as_str(("fp32", "fp16")),
    }),
    "backend": section(Backend, {
        "type": as_str(BACKEND_TYPES, BACKEND_ALIASES),
        "dtype": as_str(PRECISIONS),
        "target": optional(any_of(as_str(numbers=False), mapping, what="a target string (e.g. 'llvm -mcpu=native') "
                                                                       "or a mapping (e.g. {kind: llvm, mcpu: native})")),
        "bf16_compute": as_str(BF16_CHOICES),
        "compile": _compile_knobs,
        "quantize": optional(_QUANTIZE),
    }, finish=_backend_finish),
    "graph": optional(section(Graph, {"extra_ops": _extra_ops, "preprocess": as_str(PREPROCESS_MODES)})),
    "dataset": optional(section(Dataset, {
        "type": as_str(DATASET_TYPES),
        "path": as_path,
        "suffix": as_str(),
        "get_data_num": as_int(1),
        "process_ops": as_list(mapping),
    }, prepare=_flatten_sampler, finish=_check_process_ops)),
    "workspace": _workspace,
    "model": optional(section(ModelSpec, {
        "family": as_str(tuple(FAMILIES)),
        "arch": as_str(),
        "source": as_str(),
        "weights": optional(_weights),
    }, finish=_check_model)),
    "tuning": optional(mapping),
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
                          f"workspace (and optionally graph, dataset, model, tuning), got {kind(data)}.")
    if "path" in data:
        raise ConfigError(f"{path}: path: unknown key (the config's own path is not a setting); remove it.")
    data = dict(data)
    data.setdefault("workspace", "./deploy_weights/")
    if data.get("graph") is None:
        data.pop("graph", None)
    data["path"] = path
    try:
        return _SCHEMA(data, "")
    except Bad as bad:
        where = f"{bad.key}: " if bad.key else ""
        raise ConfigError(f"{path}: {where}{bad.message}") from None


def load_build_config(path: str | Path, overrides: Mapping[str, Any] | None = None) -> BuildConfig:
    """Read and validate a build YAML; `overrides` ({"backend.dtype": "fp16"}) are the CLI's --set.
    Relative paths inside resolve against the current working directory."""
    path = Path(path)
    text = read_text_file(path, "build config", f"relative paths are from the current directory, {Path.cwd()}; "
                          "check the path", "give the .yaml file inside it")
    try:
        data = load_yaml(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err)
        if "'\\t'" in problem:
            problem += " (YAML indents with spaces, never tabs)"
        fix = "" if "given twice" in problem else "; fix the indentation or quoting there"
        raise ConfigError(f"{path}: YAML syntax error{where}: {problem}{fix}.") from None
    if _count_values(data) > MAX_VALUES:
        raise ConfigError(f"{path}: the document expands to more than {MAX_VALUES} values (YAML anchors and "
                          "aliases repeated?); a build config needs about 50: remove the repetition.")
    if overrides:
        if not isinstance(data, dict):
            return build_config_from_dict(data, path)
        data = apply_overrides(data, overrides, path)
    return build_config_from_dict(data, path)
