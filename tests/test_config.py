"""Build YAML loading: the vendor files as they are, our optional keys, and one clear ConfigError
naming the file and the key path for every kind of bad input."""
from __future__ import annotations

import copy
import logging
import re
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tvmzoo.config import (
    Backend, BuildConfig, Quantize, apply_overrides, build_config_from_dict, load_build_config,
)
from tvmzoo.errors import ConfigError
from tvmzoo.preprocess import Preprocessing

# The example of /work/shared/FORMATS.md, verbatim.
VENDOR_YAML = """\
name: official_repvgg_int8            # the compiled model lands in <workspace.path>/<name>/mod.*
frontend:
  shape:
    input: [1, 3, 224, 224]           # input name -> shape
  type: onnx
  checkpoint: /path/to/repvgg_a0.onnx
  dtype: fp32
backend:
  type: tvm_vacc                      # the vendor's backend name; tvmzoo's own is up to you, accept this one too
  dtype: int8                         # fp16 | int8 (tvmzoo: also fp32, and what else pays)
  compile:
    cluster_mode: 0                   # vendor hardware knobs: accept and ignore, with a debug log line
    data_transport_mode: 1
  quantize:                           # only with int8
    calibrate_mode: percentile        # seen: percentile, max
    quantize_per_channel: true
    skip_matmul_layers: [0, 1]        # seen on other models: layer indices kept in float
    calibrate_chunk_by: -1            # seen on other models
graph:
  extra_ops:
    type: softmax                     # or null: append softmax to the outputs
dataset:                              # calibration data, only with int8
  type: tvm
  path: /path/to/ILSVRC2012_img_calib
  sampler:
    suffix: JPEG
    get_data_num: 50
  process_ops:
    - type: DecodeImage
    - type: Resize
      size: [256, 256]
    - type: CenterCrop
      crop_size: [224, 224]
    - type: Normalize
      mean: [0.485, 0.456, 0.406]
      std: [0.229, 0.224, 0.225]
      # seen elsewhere: div255: true, mean: [0, 0, 0], std: [1, 1, 1]
    - type: ToTensor
    # seen elsewhere: - type: CustomFunc {module_path, func_name, input_shape}
workspace:
  path: ./deploy_weights/
"""

FP16_YAML = """\
name: official_repvgg_fp16
frontend:
  shape:
    input: [1, 3, 224, 224]
  type: onnx
  checkpoint: ./onnx/repvgg_a0.onnx
  dtype: fp32
backend:
  type: tvm_vacc
  dtype: fp16
  compile:
    cluster_mode: 0
workspace:
  path: ./deploy_weights/
"""


def _write(tmp_path: Path, text: str, name: str = "build.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_full_vendor_yaml(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    path = _write(tmp_path, VENDOR_YAML, "official_repvgg.yaml")
    with caplog.at_level(logging.DEBUG, logger="tvmzoo.config"):
        cfg = load_build_config(path)
    assert isinstance(cfg, BuildConfig) and cfg.path == path
    assert cfg.name == "official_repvgg_int8"
    assert cfg.frontend.shape == {"input": [1, 3, 224, 224]} and cfg.frontend.type == "onnx"
    assert cfg.frontend.checkpoint == Path("/path/to/repvgg_a0.onnx") and cfg.frontend.dtype == "fp32"
    assert cfg.backend.type == "tvm" and cfg.backend.dtype == "int8" and cfg.backend.target is None
    assert cfg.backend.compile == {"cluster_mode": 0, "data_transport_mode": 1}
    assert "cluster_mode" in caplog.text  # the ignored knobs are logged at debug level
    assert cfg.backend.quantize == Quantize(calibrate_mode="percentile", quantize_per_channel=True,
                                            skip_matmul_layers=[0, 1], calibrate_chunk_by=-1)
    assert cfg.graph.extra_ops == "softmax" and cfg.graph.preprocess == "host"
    ds = cfg.dataset
    assert ds.type == "tvm" and ds.path == Path("/path/to/ILSVRC2012_img_calib")
    assert ds.suffix == "JPEG" and ds.get_data_num == 50 and len(ds.process_ops) == 5
    assert ds.preprocessing == Preprocessing()
    # relative paths resolve against the working directory, not the YAML's folder
    assert cfg.workspace == tmp_path / "deploy_weights"
    assert cfg.output_dir == tmp_path / "deploy_weights" / "official_repvgg_int8"
    assert cfg.model is None and cfg.tuning is None


def test_fp16_short_form(tmp_path, monkeypatch):
    sub = tmp_path / "build_in" / "build"
    sub.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    cfg = load_build_config(_write(sub, FP16_YAML))
    assert cfg.backend == Backend(type="tvm", dtype="fp16", compile={"cluster_mode": 0})
    assert cfg.frontend.checkpoint == tmp_path / "onnx" / "repvgg_a0.onnx"
    assert cfg.graph.extra_ops is None and cfg.dataset is None


def test_our_optional_keys(tmp_path):
    data = yaml.safe_load(FP16_YAML)
    data["backend"].update(dtype="int8", target={"kind": "llvm", "mcpu": "skylake"},
                           quantize={"calibrate_mode": "kl_divergence", "percentile": 99.9, "max_drop": 1.0,
                                     "skip_layers": ["stage0"], "keep_first_last_float": True,
                                     "weight_scale": "power2"})  # a vendor key: accepted, ignored
    data["graph"] = {"extra_ops": "softmax", "preprocess": "fused"}
    data["model"] = {"family": "repvgg", "arch": "RepVGG-A0", "source": "official", "weights": "w.pth"}
    data["tuning"] = {"trials": 64}
    data["workspace"] = "/tmp/ws"
    cfg = build_config_from_dict(data, tmp_path / "x.yaml")
    q = cfg.backend.quantize
    assert q.calibrate_mode == "kl" and q.percentile == 99.9 and q.max_drop == 1.0 and q.keep_first_last_float
    assert cfg.backend.target == {"kind": "llvm", "mcpu": "skylake"}
    assert cfg.graph.preprocess == "fused" and cfg.model.family == "repvgg" and cfg.tuning == {"trials": 64}
    assert cfg.model.weights == Path.cwd() / "w.pth"
    assert cfg.workspace == Path("/tmp/ws")
    data["model"]["weights"] = "package"  # a pip-installed checkpoint: kept as a word, not made a path
    assert build_config_from_dict(data).model.weights == "package"
    data["backend"].pop("quantize")
    assert build_config_from_dict(data).backend.quantize == Quantize()  # int8 gets the defaults


def test_overrides(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = _write(tmp_path, VENDOR_YAML)
    cfg = load_build_config(path, {"backend.dtype": "fp16", "name": "x", "dataset.sampler.get_data_num": 20,
                                   "backend.target": "llvm -mcpu=native", "workspace.path": "out"})
    assert cfg.backend.dtype == "fp16" and cfg.name == "x" and cfg.dataset.get_data_num == 20
    assert cfg.backend.target == "llvm -mcpu=native" and cfg.workspace == tmp_path / "out"
    assert load_build_config(path, {"backend.quantize.calibrate_mode": "max"}).backend.quantize.calibrate_mode == "max"
    with pytest.raises(ConfigError,
                       match=r"build.yaml: backend.dtype: 'fp8' is not one of fp32, fp16, bf16, int8"):
        load_build_config(path, {"backend.dtype": "fp8"})
    with pytest.raises(ConfigError, match=r"--set name.first: 'name' is a string, not a mapping"):
        load_build_config(path, {"name.first": "x"})
    original = yaml.safe_load(VENDOR_YAML)
    apply_overrides(original, {"backend.dtype": "fp16"}, path)
    assert original["backend"]["dtype"] == "int8"  # the input is not modified


@pytest.mark.reliability
@pytest.mark.parametrize("text", ["null", "1.10", "0x1F", "010", "true", "no", "1e3", "[1]"])
def test_set_value_parsed_once_keeps_a_quoted_string(tmp_path, text):
    """--set name="'null'" reaches the config as the string null (parse_set reads the value as YAML once,
    load_build_config uses it as given); a workspace path that looks like a number stays a path."""
    from tvmzoo.config import parse_set

    path = _write(tmp_path, VENDOR_YAML)
    cfg = load_build_config(path, parse_set([f"name='{text}'", f"workspace.path='{text}'"]))
    assert cfg.name == text and cfg.workspace.name == text
    assert load_build_config(path, {"workspace.path": text}).workspace.name == text   # library: as given
    assert parse_set(["a=null", "b=010", "c=0x1F", "d=1.10"]) == {"a": None, "b": 8, "c": 31, "d": 1.1}


def _set(data: dict, dotted: str, value) -> dict:
    data = copy.deepcopy(data)
    *parents, last = dotted.split(".")
    node = data
    for part in parents:
        node = node[part]
    node[last] = value
    return data


def _drop(data: dict, dotted: str) -> dict:
    data = copy.deepcopy(data)
    *parents, last = dotted.split(".")
    node = data
    for part in parents:
        node = node[part]
    del node[last]
    return data


BASE = yaml.safe_load(VENDOR_YAML)


@pytest.mark.parametrize("data, key, words", [
    (_set(BASE, "backend.quantize.calibrate_mode", "kl_div"), "backend.quantize.calibrate_mode", "is not one of"),
    (_set(BASE, "backend.dtyp", "fp16"), "backend.dtyp", "Did you mean 'backend.dtype'"),
    (_set(BASE, "frontend.checkpiont", "x.onnx"), "frontend.checkpiont", "Did you mean 'frontend.checkpoint'"),
    (_drop(BASE, "frontend.checkpoint"), "frontend.checkpoint", "missing: add `checkpoint: ...` under `frontend:`"),
    (_drop(BASE, "name"), "name", "missing"),
    (_set(BASE, "frontend.shape.input", [1, 3, 0, 224]), r"frontend.shape.input\[2\]", "must be >= 1"),
    (_set(BASE, "frontend.shape", []), "frontend.shape", "expected a mapping"),
    (_set(BASE, "frontend.type", "caffe"), "frontend.type", "is not one of onnx"),
    (_set(BASE, "backend.type", "tvm_vac"), "backend.type", "Did you mean 'tvm_vacc'"),
    (_set(BASE, "backend.quantize.percentile", 120), "backend.quantize.percentile", "must be > 50.0 and <= 100.0"),
    # what the quantizer rejects, the config rejects at load time (not in the middle of a compile)
    (_set(BASE, "backend.quantize.percentile", 40), "backend.quantize.percentile", "must be > 50.0 and <= 100.0"),
    (_set(BASE, "backend.quantize.quantize_per_channel", "yes"), "backend.quantize.quantize_per_channel",
     "expected true or false"),
    (_set(BASE, "backend.quantize.skip_matmul_layers", [0, "a"]), r"backend.quantize.skip_matmul_layers\[1\]",
     "expected an integer"),
    (_set(BASE, "backend.quantize.calibrate_chunk_by", True), "backend.quantize.calibrate_chunk_by",
     "expected an integer"),
    (_set(BASE, "backend.quantize.bogus", 1), "backend.quantize.bogus", "unknown key"),
    (_set(BASE, "backend.target", 5.5), "backend.target", "expected a target string .* or a mapping"),
    (_set(BASE, "backend.compile", [1]), "backend.compile", "expected a mapping"),
    (_set(BASE, "graph.extra_ops", {"type": "sigmoid"}), "graph.extra_ops.type", "is not one of softmax"),
    (_set(BASE, "graph.preprocess", "gpu"), "graph.preprocess", "is not one of host, fused"),
    (_set(BASE, "dataset.sampler.get_data_num", 0), "dataset.get_data_num", "must be >= 1"),
    (_set(BASE, "dataset.sampler.shuffle", True), "dataset.sampler.shuffle", "unknown key"),
    (_set(BASE, "dataset.process_ops", [{"type": "CustomFunc", "module_path": "m.py"}]),
     r"dataset.process_ops\[0\] \(CustomFunc\)", "not supported, because"),
    (_set(BASE, "dataset.process_ops", [{"type": "Resize", "size": [256, 256]},
                                        {"type": "CenterCrop", "crop_size": [300, 300]}]),
     "dataset.process_ops", "does not fit"),
    (_set(BASE, "dataset.path", None), "dataset.path", "expected a non-empty string"),
    (_set(BASE, "workspace", {"pth": "x"}), "workspace.pth", "unknown key"),
    (_set(BASE, "name", "../evil"), "name", "folder name"),
    (_set(BASE, "model", {"family": "resnet", "arch": "r50"}), "model.family", "is not one of"),
    (_set(BASE, "frontend", "onnx"), "frontend", "expected a mapping"),
])
@pytest.mark.reliability
def test_bad_input_names_the_key(data, key, words):
    with pytest.raises(ConfigError) as info:
        build_config_from_dict(data, "build_in/build/official_repvgg.yaml")
    message = str(info.value)
    assert message.startswith("build_in/build/official_repvgg.yaml: ")
    assert re.search(key, message) and re.search(words, message), message


@pytest.mark.reliability
def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match=r"build config .*nope.yaml does not exist"):
        load_build_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="is a folder: give the .yaml file"):
        load_build_config(tmp_path)
    broken = _write(tmp_path, "name: x\nfrontend:\n  shape: [1, 2\n  type: onnx\n", "broken.yaml")
    with pytest.raises(ConfigError, match=r"broken.yaml: YAML syntax error at line \d+, column \d+"):
        load_build_config(broken)
    for text, kind in (("", "null"), ("- a\n- b\n", "a list"), ("just text\n", "a string")):
        with pytest.raises(ConfigError, match=f"the document must be a mapping .* got {kind}"):
            load_build_config(_write(tmp_path, text, "odd.yaml"))
        with pytest.raises(ConfigError, match="must be a mapping"):
            load_build_config(_write(tmp_path, text, "odd.yaml"), {"name": "x"})
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError, match="binary.yaml is not UTF-8 text"):
        load_build_config(binary)


# ---- property test: any mutation of a valid config gives a config or one ConfigError ----
_KEY_PATHS = []


def _collect(node, prefix=()):
    if isinstance(node, dict):
        for k, v in node.items():
            _KEY_PATHS.append(prefix + (k,))
            _collect(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            _KEY_PATHS.append(prefix + (i,))
            _collect(v, prefix + (i,))


_collect(BASE)

_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True),
                     st.text(max_size=12), st.sampled_from(["fp16", "int8", "softmax", "onnx", "Resize", "max"]))
_VALUES = st.recursive(_SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.one_of(st.text(max_size=8), st.integers()), inner, max_size=4)),
    max_leaves=8)
_MUTATION = st.tuples(st.sampled_from(["drop", "set", "add"]), st.sampled_from(_KEY_PATHS), _VALUES,
                      st.text(min_size=1, max_size=10))


def _mutate(data, action, path, value, new_key):
    data = copy.deepcopy(data)
    parent = data
    for part in path[:-1]:
        parent = parent[part]
    last = path[-1]
    if action == "drop":
        parent.pop(last) if isinstance(parent, dict) else parent.pop(last)
    elif action == "set":
        parent[last] = value
    elif isinstance(parent, dict):
        parent[new_key] = value
    else:
        parent.append(value)
    return data


@pytest.mark.reliability
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_MUTATION, min_size=1, max_size=3))
def test_mutated_configs_give_config_or_config_error(mutations):
    data = BASE
    for action, path, value, new_key in mutations:
        try:
            data = _mutate(data, action, path, value, new_key)
        except (KeyError, IndexError, TypeError, AttributeError):
            continue  # an earlier mutation removed or replaced this path
    try:
        cfg = build_config_from_dict(data, "mutated.yaml")
    except ConfigError as err:
        assert str(err).startswith("mutated.yaml: ")
    else:
        assert isinstance(cfg, BuildConfig)
