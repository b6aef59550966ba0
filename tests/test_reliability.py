"""Reliability (issue 7): bad input gives one clear error, a crash loses nothing, nothing runs that
should not. Each case goes through the real CLIs (vamc, tvmzoo, vamp, common/vsx/classification.py)
where a user would meet it; docs/reliability.md tables the inputs and outcomes.

Unit-level cases that already live elsewhere are not repeated here: the checkpoint fuzz and malicious
pickle tests (test_checkpoint.py), the config-dict property test (test_config.py), read_image on
corrupt files (test_preprocess.py). Models are a narrow RepVGG at 32x32 so every build takes seconds.
"""
from __future__ import annotations

import copy
import fcntl
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
import zlib
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import ROOT, run_cli
from tvmzoo.cli import classification_main, vamp_main
from tvmzoo.run.runtime import file_sha256
from tvmzoo.config import BuildConfig, load_build_config
from tvmzoo.errors import ConfigError, ImageError
from tvmzoo.models import repvgg
from tvmzoo.preprocess import Preprocessing, apply, read_image
from tvmzoo.run.results import read_results

pytestmark = pytest.mark.reliability

SIZE = 32
NARROW = repvgg.RepVGGArch((1, 1, 1, 1), (0.25, 0.25, 0.25, 0.25))
CLASSIFICATION = ROOT / "common" / "vsx" / "classification.py"
BIN = Path(sys.executable).parent


def run_main(main, *args, capsys) -> subprocess.CompletedProcess:
    """A console script's main() in this process (no interpreter start-up, no TVM import per case):
    the same argument parsing, error printing and exit code as the installed script."""
    capsys.readouterr()
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(["in-process", *map(str, args)], code, out, err)


def one_error(proc: subprocess.CompletedProcess, *words: str) -> str:
    """Exit code 2, no traceback, exactly one `error:` line holding every word; returns that line."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr
    for word in words:
        assert word in errors[0], (word, errors[0])
    return errors[0]


# ---------------------------------------------------------------------------------------------
# shared fixtures: a tiny model, compiled once
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("reliability")


@pytest.fixture(scope="module")
def tiny_onnx(root) -> Path:
    state = repvgg.random_state_dict(NARROW, "official", np.random.default_rng(0))
    path = root / "tiny.onnx"
    onnx.save(repvgg.deploy_onnx(state, NARROW, "official", size_hw=(SIZE, SIZE), batch=1), str(path))
    return path


def build_yaml(path: Path, onnx_path: Path, workspace: Path, **changes) -> Path:
    cfg = {"name": "tiny",
           "frontend": {"shape": {"input": [1, 3, SIZE, SIZE]}, "type": "onnx", "checkpoint": str(onnx_path)},
           "backend": {"type": "tvm_vacc", "dtype": "fp32"},
           "graph": {"extra_ops": {"type": "softmax"}},
           "dataset": {"path": str(path.parent), "sampler": {"suffix": "JPEG", "get_data_num": 2},
                       "process_ops": [{"type": "DecodeImage"}, {"type": "Resize", "resize_short": 36},
                                       {"type": "CenterCrop", "crop_size": [SIZE, SIZE]},
                                       {"type": "Normalize", "mean": [0.485, 0.456, 0.406],
                                        "std": [0.229, 0.224, 0.225]}, {"type": "ToTensor"}]},
           "workspace": {"path": str(workspace)}}
    cfg.update(changes)
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True))
    return path


@pytest.fixture(scope="module")
def compiled(root, tiny_onnx) -> Path:
    """<workspace>/tiny, compiled once with vamc; tests that damage it work on copies."""
    yaml_path = build_yaml(root / "tiny.yaml", tiny_onnx, root / "ws")
    run_cli("vamc", "compile", yaml_path)
    return root / "ws" / "tiny"


@pytest.fixture(scope="module")
def vdsp(root) -> Path:
    path = root / "vdsp.json"
    pre = Preprocessing(resize_hw=(36, 36), keep_aspect=True, crop_hw=(SIZE, SIZE))
    path.write_text(json.dumps(pre.to_vdsp()))
    return path


# ---------------------------------------------------------------------------------------------
# config: every kind of YAML / vdsp mistake is one message (file, key path, fix), exit 2
# ---------------------------------------------------------------------------------------------
def _drop(key):
    return lambda cfg: _walk(cfg, key, delete=True)


def _set(key, value):
    return lambda cfg: _walk(cfg, key, value=value)


def _walk(cfg, key, value=None, delete=False):
    *parents, last = key.split(".")
    node = cfg
    for part in parents:
        node = node[part]
    if delete:
        del node[last]
    else:
        node[last] = value
    return cfg


LAUGHS = "".join(f"  {a}: &{a} [{', '.join([f'*{p}'] * 9) if p else ', '.join(['lol'] * 9)}]\n"
                 for p, a in zip(["", *"abcdefg"], "abcdefgh"))

YAML_CASES = {
    "missing section": (_drop("backend"), ["backend", "missing: add `backend: ...`"]),
    "wrong type": (_set("frontend.shape.input", "1,3,32,32"), ["frontend.shape.input", "expected a list"]),
    "unknown key, close match": (_set("backend.dtyp", "fp16"), ["backend.dtyp", "Did you mean 'backend.dtype'"]),
    "negative size": (_set("frontend.shape.input", [1, 3, -32, 32]), ["frontend.shape.input[2]", "must be >= 1"]),
    "crop larger than resize": (
        _set("dataset.process_ops", [{"type": "Resize", "size": [36, 36]}, {"type": "CenterCrop", "crop_size": 40}]),
        ["dataset.process_ops", "does not fit", "make the crop smaller or the resize larger"]),
    "unknown calibrate_mode": (
        _set("backend.quantize", {"calibrate_mode": "kl_div"}),
        ["backend.quantize.calibrate_mode", "is not one of max, percentile, kl, mse", "Did you mean 'kl"]),
    "unknown arch": (_set("model", {"family": "repvgg", "arch": "A9", "source": "official", "weights": "w.pth"}),
                     ["model.arch", "unknown repvgg arch 'A9'", "Known archs: A0"]),
    "onnx path missing": (_set("frontend.checkpoint", "/no/such/model.onnx"),
                          ["frontend.checkpoint", "/no/such/model.onnx does not exist", "Export it first"]),
    "weights path missing": (
        lambda cfg: _set("model", {"family": "repvgg", "arch": "A0", "source": "official",
                                   "weights": "/no/such/w.pth"})(_set("frontend.checkpoint", "/no/such/fresh.onnx")(cfg)),
        ["model: checkpoint not found: /no/such/w.pth", "set model.weights"]),
    "dataset path missing": (
        lambda cfg: _set("dataset.path", "/no/such/calib")(_set("backend.dtype", "int8")(cfg)),
        ["dataset.path /no/such/calib does not exist", "set it to the folder of calibration images"]),
}


@pytest.mark.parametrize("case", list(YAML_CASES))
def test_yaml_error_through_vamc(case, root, tiny_onnx, tmp_path):
    change, words = YAML_CASES[case]
    good = yaml.safe_load(build_yaml(tmp_path / "good.yaml", tiny_onnx, tmp_path / "ws").read_text())
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(change(copy.deepcopy(good))))
    line = one_error(run_cli("vamc", "compile", path, check=False), *words)
    assert line.startswith(f"error: {path}: "), line
    assert not (tmp_path / "ws" / "tiny").exists()


@pytest.mark.parametrize("text, words", [
    ("name: x\nfrontend:\n  shape: [1, 3\n", ["YAML syntax error at line", "fix the indentation or quoting"]),
    ("tuning:\n" + LAUGHS + "name: *h\n", ["expands to more than 100000 values", "remove the repetition"]),
    ("", ["the document must be a mapping"]),
])
def test_unreadable_yaml_through_vamc(tmp_path, text, words):
    path = tmp_path / "odd.yaml"
    path.write_text(text)
    start = time.monotonic()
    line = one_error(run_cli("vamc", "compile", path, check=False), *words)
    assert str(path) in line
    assert time.monotonic() - start < 60  # the alias bomb is refused, not expanded


def test_bad_set_value_through_vamc(root, tiny_onnx, tmp_path):
    path = build_yaml(tmp_path / "good.yaml", tiny_onnx, tmp_path / "ws")
    one_error(run_cli("vamc", "compile", path, "--set", "frontend.shape.input=[1,3", check=False),
              "frontend.shape.input", "expected a list")
    one_error(run_cli("vamc", "compile", path, "--set", "backend", check=False), "write it as key.path=value")


VENDOR_YAML = (ROOT / "build_in" / "build" / "official_repvgg.yaml").read_text()


def _mutate_text(text: str, ops) -> str:
    lines = text.splitlines()
    for op, where, piece in ops:
        i = where % max(len(lines), 1)
        if not lines:
            lines = [piece]
        elif op == "delete":
            del lines[i]
        elif op == "duplicate":
            lines.insert(i, lines[i])
        elif op == "indent":
            lines[i] = "  " + lines[i]
        elif op == "dedent":
            lines[i] = lines[i][2:]
        elif op == "insert":
            lines.insert(i, piece)
        else:  # splice a fragment into the line
            cut = where % (len(lines[i]) + 1)
            lines[i] = lines[i][:cut] + piece + lines[i][cut:]
    return "\n".join(lines) + "\n"


_PIECES = st.one_of(st.sampled_from([":", "- ", "{", "}", "[", "]", "&a", "*a", "!!python/object:os.system",
                                     "\t", "'", '"', "#", "null", "-1", "1e999", "~", "? ", "|", ">"]),
                    st.text(max_size=8))
_TEXT_OP = st.tuples(st.sampled_from(["delete", "duplicate", "indent", "dedent", "insert", "splice"]),
                     st.integers(0, 10_000), _PIECES)
_FUZZ_DIR = Path(tempfile.mkdtemp(prefix="tvmzoo-yaml-fuzz-"))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_TEXT_OP, min_size=1, max_size=4))
def test_mutated_yaml_text_gives_config_or_one_clear_error(ops):
    """Mutated YAML *text* (not just dicts): the loader returns a config or raises ConfigError naming the file."""
    path = _FUZZ_DIR / "mutated.yaml"
    path.write_text(_mutate_text(VENDOR_YAML, ops), encoding="utf-8")
    try:
        cfg = load_build_config(path)
    except ConfigError as err:
        assert str(path) in str(err).splitlines()[0]
    else:
        assert isinstance(cfg, BuildConfig)


# ---- vdsp params JSON, through classification.py ----
VDSP = Preprocessing(resize_hw=(36, 36), crop_hw=(SIZE, SIZE)).to_vdsp()


def _opconfig(**changes):
    data = copy.deepcopy(VDSP)
    for key, value in changes.items():
        if value is None:
            del data["OpConfig"][key]
        else:
            data["OpConfig"][key] = value
    return json.dumps(data)


VDSP_CASES = {
    "invalid JSON": ('{"OpType": "X",\n "OpConfig": {,}}', ["invalid JSON at line 2"]),
    "not an object": ("[1, 2]", ["expected a JSON object"]),
    "missing key": (_opconfig(OimageWidth=None), ["OpConfig: missing key 'OimageWidth'"]),
    "wrong type": (_opconfig(OimageHeight="32"), ["OpConfig: 'OimageHeight' must be an integer"]),
    "unknown key, close match": (_opconfig(ResizeWdth=40), ["unknown key 'ResizeWdth'", "Did you mean 'ResizeWidth'"]),
    "negative size": (_opconfig(OimageHeight=-32), ["'OimageHeight' must be a positive integer, got -32"]),
    "crop larger than resize": (_opconfig(OimageWidth=40), ["does not fit", "OimageWidth x OimageHeight = 40x32",
                                                            "ResizeWidth x ResizeHeight = 36x36"]),
    "unknown NormaType": (_opconfig(NormaType="DIV255_MINUSMEAN"), ["Did you mean 'DIV255_MINUSMEAN_DIVSTD'"]),
}


@pytest.mark.parametrize("case", list(VDSP_CASES))
def test_vdsp_error_through_classification(case, compiled, tmp_path, sample_images, capsys):
    """classification_main in-process for the matrix; the installed script for one case."""
    text, words = VDSP_CASES[case]
    path = tmp_path / "vdsp.json"
    path.write_text(text)
    args = ("--file_path", sample_images[0], "--model_prefix_path", compiled / "mod",
            "--vdsp_params_info", path, "--save_dir", tmp_path)
    if case == "unknown key, close match":
        proc = run_cli(CLASSIFICATION, *args, check=False)
    else:
        proc = run_main(classification_main, *args, capsys=capsys)
    line = one_error(proc, *words)
    assert line.startswith(f"error: {path}: "), line
    assert not (tmp_path / "result.txt").exists()


def test_vdsp_path_missing_through_classification(compiled, tmp_path, sample_images):
    proc = run_cli(CLASSIFICATION, "--file_path", sample_images[0], "--model_prefix_path", compiled / "mod",
                   "--vdsp_params_info", tmp_path / "nope.json", "--save_dir", tmp_path, check=False)
    one_error(proc, "vdsp params file", "nope.json does not exist")


_JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-100, 3000), st.floats(allow_nan=True),
                          st.text(max_size=10), st.sampled_from(["RGB_PLANAR", "BGR888", "BILINEAR_PILLOW",
                                                                 "DIV255", "NO_CHANGE", "BGR2RGB"]))
_JSON_VALUES = st.one_of(_JSON_SCALARS, st.lists(_JSON_SCALARS, max_size=4))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(sorted(VDSP["OpConfig"]) + ["ResizeWdth", "TensorType0", "x"]),
                          st.one_of(st.none(), _JSON_VALUES)), min_size=1, max_size=4))
def test_mutated_vdsp_gives_preprocessing_or_config_error(changes):
    data = copy.deepcopy(VDSP)
    for key, value in changes:
        if value is None:
            data["OpConfig"].pop(key, None)
        else:
            data["OpConfig"][key] = value
    try:
        pre = Preprocessing.from_vdsp(data)
    except ConfigError as err:
        assert str(err).startswith("vdsp params: ")
    else:
        out = apply(pre, np.zeros((40, 50, 3), np.uint8))
        assert out.shape == (3, *pre.crop_hw) and out.dtype == np.float32


# ---------------------------------------------------------------------------------------------
# checkpoints through `tvmzoo export` and `vamc compile`
# ---------------------------------------------------------------------------------------------
class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch")


@pytest.fixture(scope="module")
def a0_pth(root, torch) -> Path:
    """A real torch.save zip checkpoint of RepVGG-A0 (official layout, random weights)."""
    state = repvgg.random_state_dict("A0", "official", np.random.default_rng(1))
    path = root / "RepVGG-A0-train.pth"
    torch.save({k: torch.from_numpy(v) for k, v in state.items()}, path)
    return path


def _export(weights: Path, output: Path, arch: str = "A0") -> subprocess.CompletedProcess:
    return run_cli("tvmzoo", "export", "--family", "repvgg", "--arch", arch, "--source", "official",
                   "--weights", weights, "--output", output, "--input-size", str(SIZE), check=False)


def _rewrite_zip(src: Path, dst: Path, change) -> None:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for name in zin.namelist():
            zout.writestr(name, change(name, zin.read(name)))


def _bad_checkpoint(kind: str, a0: Path, path: Path, torch) -> list[str]:
    data = a0.read_bytes()
    if kind == "truncated zip":
        path.write_bytes(data[: int(len(data) * 0.6)])
        return ["cannot read checkpoint", "download or save it again"]
    if kind == "wrong magic":
        path.write_bytes(b"\x00WAT" + data[4:])
        return ["Supported formats: PyTorch .pth"]
    if kind == "short storage":
        _rewrite_zip(a0, path, lambda name, blob: blob[:100] if name.endswith("/data/0") else blob)
        return ["storage '0' holds 100 bytes but claims"]
    if kind == "malicious pickle":
        torch.save({"w": torch.zeros(2), "x": _Evil(path.parent / "pwned")}, path)
        return ["refusing to load", "system"]
    if kind == "another arch":
        state = repvgg.random_state_dict(NARROW, "official", np.random.default_rng(2))
        torch.save({k: torch.from_numpy(v) for k, v in state.items()}, path)
        return ["does not fit"]
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["truncated zip", "wrong magic", "short storage", "malicious pickle",
                                  "another arch"])
def test_bad_checkpoint_through_export(kind, a0_pth, tmp_path, torch):
    path = tmp_path / "w.pth"
    words = _bad_checkpoint(kind, a0_pth, path, torch)
    line = one_error(_export(path, tmp_path / "out.onnx"), *words)
    assert str(path) in line or kind == "another arch"
    assert not (tmp_path / "out.onnx").exists() and not (tmp_path / "pwned").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["w.pth"]  # no temporary left


def test_bad_checkpoint_through_vamc(a0_pth, tiny_onnx, tmp_path, torch):
    weights = tmp_path / "w.pth"
    _bad_checkpoint("malicious pickle", a0_pth, weights, torch)
    path = build_yaml(tmp_path / "build.yaml", tmp_path / "fresh.onnx", tmp_path / "ws",
                      model={"family": "repvgg", "arch": "A0", "source": "official", "weights": str(weights)})
    one_error(run_cli("vamc", "compile", path, check=False), f"{path}: model: ", "refusing to load", str(weights))
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "ws" / "tiny").exists()


def test_nan_weights_warned_and_exported(a0_pth, tmp_path, torch):
    state = torch.load(a0_pth, weights_only=True)
    key = next(k for k, v in state.items() if v.ndim == 4)
    state[key][0, 0, 0, 0] = float("nan")
    state["linear.bias"][3] = float("inf")
    path = tmp_path / "nan.pth"
    torch.save(state, path)
    proc = _export(path, tmp_path / "out.onnx")
    assert proc.returncode == 0, proc.stderr
    assert "NaN or Inf" in proc.stderr and f"'{key}'" in proc.stderr and "(2 tensor(s) affected)" in proc.stderr
    assert onnx.load(str(tmp_path / "out.onnx")).graph.output[0].name == "output"


# ---------------------------------------------------------------------------------------------
# images through classification.py
# ---------------------------------------------------------------------------------------------
def write_big_png(path: Path, width: int, height: int) -> None:
    """A valid grayscale PNG of width x height zeros, streamed: ~0.5 MB on disk, never in memory whole."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    squeeze, row, parts = zlib.compressobj(6), b"\x00" * (width + 1), []
    for _ in range(height):
        parts.append(squeeze.compress(row))
    parts.append(squeeze.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"".join(parts))
                     + chunk(b"IEND", b""))


def _jpeg_claiming(src: bytes, width: int, height: int) -> bytes:
    """A real JPEG whose start-of-frame header says width x height."""
    i = 2
    while src[i + 1] not in (0xC0, 0xC1, 0xC2):
        i += 2 + int.from_bytes(src[i + 2:i + 4], "big")
    return src[:i + 5] + struct.pack(">HH", height, width) + src[i + 9:]


@pytest.fixture(scope="module")
def image_folder(root, sample_images):
    """Photos in every shape a user's folder holds: (good paths, {bad path: words of its reason})."""
    from PIL import Image  # test extra

    folder = root / "images"
    (folder / "ñ").mkdir(parents=True)
    photo_path = next(p for p in sample_images if p.name.startswith("n01440764"))
    photo = cv2.imread(str(photo_path))                     # 375x500 BGR
    rgb = Image.fromarray(photo[:, :, ::-1])
    good = []
    for src in (photo_path, *sample_images[100:102]):
        good.append(folder / src.name)
        shutil.copy(src, good[-1])

    def add(name: str, write) -> Path:
        path = folder / name
        write(path)
        good.append(path)
        return path

    add("gray.JPEG", lambda p: cv2.imwrite(str(p), cv2.cvtColor(photo, cv2.COLOR_BGR2GRAY)))
    add("cmyk.JPEG", lambda p: rgb.convert("CMYK").save(p, "JPEG", quality=95))
    add("deep16.png", lambda p: cv2.imwrite(str(p), photo.astype(np.uint16) * 257))
    add("alpha.png", lambda p: cv2.imwrite(str(p), np.dstack([photo, np.arange(photo.size // 3).reshape(
        photo.shape[:2]).astype(np.uint8)])))
    exif = Image.Exif()
    exif[0x0112] = 6                                        # stored turned left: display turns it right
    add("exif_rotated.JPEG", lambda p: Image.fromarray(np.rot90(photo[:, :, ::-1]).copy()).save(
        p, "JPEG", quality=95, exif=exif.tobytes()))
    for w, h in ((1, 1), (1, 3), (7, 1), (33, 17), (500, 1)):
        add(f"odd_{w}x{h}.png", lambda p, w=w, h=h: cv2.imwrite(str(p), cv2.resize(photo, (w, h))))
    add("a'b: c.JPEG", lambda p: shutil.copy(photo_path, p))
    add("ñ/猫.png", lambda p: cv2.imencode(".png", photo[100:300, 50:400])[1].tofile(p))

    data = photo_path.read_bytes()
    bad = {}
    for name, content, words in (
            ("truncated.JPEG", data[: len(data) // 2], ["truncated"]),
            ("zero_bytes.JPEG", b"", ["the file is empty (0 bytes)"]),
            ("notes.JPEG", b"this is a text file\n", ["not a supported image", "content starts with b'this is '"]),
            ("huge_header.JPEG", _jpeg_claiming(data, 20000, 20000),
             ["20000x20000 pixels is above the limit of 100000000 pixels"])):
        (folder / name).write_bytes(content)
        bad[folder / name] = words
    write_big_png(folder / "huge_20000x20000.png", 20000, 20000)
    bad[folder / "huge_20000x20000.png"] = ["20000x20000 pixels is above the limit of 100000000 pixels"]
    rgb.save(folder / "tiff_named.JPEG", "TIFF")
    bad[folder / "tiff_named.JPEG"] = ["not a supported image", "tvmzoo reads JPEG, PNG, BMP, WebP"]
    write_big_png(folder / "strip_1x100000.png", 1, 100_000)  # fine to decode, too long once resized
    bad[folder / "strip_1x100000.png"] = ["resized to keep its aspect ratio would be 36x3600000", "crop it first"]
    return good, bad, photo


@pytest.fixture(scope="module")
def classified(compiled, image_folder, vdsp, root):
    out = root / "run"
    proc = run_cli(CLASSIFICATION, "--file_path", root / "images", "--model_prefix_path", compiled / "mod",
                   "--vdsp_params_info", vdsp, "--save_dir", out, "--save_result_txt", "result.txt", check=False)
    return proc, out / "result.txt"


def test_good_images_classified_bad_ones_listed(classified, image_folder):
    good, bad, _ = image_folder
    proc, result = classified
    assert proc.returncode == 1, proc.stderr                         # some failed: the exit code says so
    assert "Traceback" not in proc.stderr
    assert f"{len(good)} images in" in proc.stdout
    assert f"{len(bad)} image(s) could not be read" in proc.stderr
    failed = [line for line in proc.stderr.splitlines() if line.startswith("failed: ")]
    assert len(failed) == len(bad), proc.stderr
    for path, words in bad.items():
        line, = [line for line in failed if line.startswith(f"failed: {path}: ")]
        for word in words:
            assert word in line, (word, line)
    preds = read_results(result)                                    # paths with ': ', quotes, non-ASCII
    assert sorted(p.path for p in preds) == sorted(str(p) for p in good)
    assert len(result.read_text(encoding="utf-8").splitlines()) == 5 * len(good)
    assert all(len(p.ids) == 5 and abs(sum(p.probs)) <= 1.0 + 1e-6 for p in preds)


def test_image2npz_writes_good_lists_bad(image_folder, root, tmp_path):
    good, bad, _ = image_folder
    datalist = tmp_path / "npz.txt"
    proc = run_cli(ROOT / "common" / "utils" / "image2npz.py", "--dataset_path", root / "images",
                   "--target_path", tmp_path / "npz", "--text_path", datalist, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    undecodable = [p for p in bad if "strip" not in p.name]     # the strip decodes; only resizing it is refused
    assert len(datalist.read_text(encoding="utf-8").splitlines()) == len(good) + 1
    failed = [line for line in proc.stderr.splitlines() if line.startswith("failed: ")]
    assert sorted(failed) == sorted(line for p in undecodable for line in failed if line.startswith(f"failed: {p}: "))
    assert len(failed) == len(undecodable)
    assert not [p for p in (tmp_path / "npz").rglob("*") if p.name.startswith(".")]


def test_odd_colour_forms_decode_to_the_photo(image_folder):
    """CMYK, EXIF-rotated, 16-bit and alpha files give the same picture as the plain photo."""
    good, _, photo = image_folder
    by_name = {p.name: p for p in good}
    np.testing.assert_array_equal(read_image(by_name["deep16.png"]), photo)
    np.testing.assert_array_equal(read_image(by_name["alpha.png"]), photo)
    for name in ("cmyk.JPEG", "exif_rotated.JPEG"):
        image = read_image(by_name[name])
        assert image.shape == photo.shape, name                  # rotated back upright
        assert np.abs(image.astype(int) - photo).mean() < 4, name


def test_huge_images_refused_with_bounded_memory(image_folder):
    """20000x20000 files (1.2 GB as BGR) are refused before decoding: peak RSS grows by a few MB only."""
    _, bad, _ = image_folder
    huge = [str(p) for p in bad if "huge" in p.name or "tiff" in p.name]
    code = ("import resource, sys\nfrom tvmzoo.preprocess import read_image\nfrom tvmzoo.errors import ImageError\n"
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "for path in sys.argv[1:]:\n"
            "    try:\n        read_image(path)\n        print('decoded', path)\n"
            "    except ImageError as err:\n        print('refused', err)\n"
            "print('grew_kb', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)\n")
    proc = subprocess.run([sys.executable, "-c", code, *huge], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert sum(line.startswith("refused") for line in lines) == len(huge), proc.stdout
    assert int(lines[-1].split()[1]) < 64 * 1024, proc.stdout


def test_keep_aspect_strip_is_refused_not_allocated():
    pre = Preprocessing(resize_hw=(36, 36), keep_aspect=True, crop_hw=(SIZE, SIZE))
    with pytest.raises(ImageError, match=r"would be 36x3600000, above the limit"):
        apply(pre, np.zeros((100_000, 1, 3), np.uint8))
    assert apply(pre, np.zeros((1000, 1, 3), np.uint8)).shape == (3, SIZE, SIZE)
    with pytest.raises(ConfigError, match=r"resize 20000x20000 is above the limit"):
        Preprocessing(resize_hw=(20000, 20000), crop_hw=(SIZE, SIZE))


# ---------------------------------------------------------------------------------------------
# compiled modules: refused before any machine code is loaded
# ---------------------------------------------------------------------------------------------
def _damage(directory: Path, case: str) -> list[str]:
    meta_path, so = directory / "mod.json", directory / "mod.so"
    meta = json.loads(meta_path.read_text())
    data = so.read_bytes()
    if case == "cpu feature missing":
        meta["cpu_features"].append("avx512_imaginary")
        so.write_bytes(os.urandom(len(data)))         # refused before loading: garbage is never dlopen'ed
        words = ["needs CPU features this host lacks (avx512_imaginary)", "illegal instruction", "Recompile"]
    elif case == "other TVM":
        meta["tvm_version"] = "0.19.0"
        words = ["built with TVM 0.19.0", "recompile it with `vamc compile`"]
    elif case == "other tvmzoo":
        meta["tvmzoo_version"] = "0.0.1"
        words = ["built by tvmzoo 0.0.1", "recompile"]
    elif case == "truncated mod.so":
        so.write_bytes(data[: len(data) // 2])     # dlopen of this dies with SIGBUS: must never be tried
        words = ["mod.so does not match mod.json", "corrupt, truncated"]
    elif case == "random mod.so":
        so.write_bytes(os.urandom(len(data)))
        words = ["mod.so does not match mod.json"]
    elif case == "random mod.so, no checksum":
        del meta["module_sha256"]
        so.write_bytes(os.urandom(len(data)))
        words = ["cannot load", "invalid ELF header", "recompile with `vamc compile`"]
    elif case == "mod.so missing":
        so.unlink()
        words = ["mod.so is missing"]
    elif case == "mod.json truncated":
        meta_path.write_text(meta_path.read_text()[:40])
        return ["mod.json is corrupt", "recompile"]
    elif case == "mod.json not a description":
        meta_path.write_text('{"input": [1, 3, 32, 32]}')
        return ["is not a tvmzoo module description", "'target' is missing"]
    else:
        raise AssertionError(case)
    meta_path.write_text(json.dumps(meta))
    return words


@pytest.mark.parametrize("case", ["cpu feature missing", "other TVM", "other tvmzoo", "truncated mod.so",
                                  "random mod.so", "random mod.so, no checksum", "mod.so missing",
                                  "mod.json truncated", "mod.json not a description"])
def test_bad_module_refused_through_vamp(case, compiled, tmp_path, capsys):
    """The installed vamp where loading machine code could crash the process; vamp's main in-process
    for the metadata cases (refused before TVM sees the module)."""
    directory = tmp_path / "tiny"
    shutil.copytree(compiled, directory)
    words = _damage(directory, case)
    args = ("-m", directory / "mod", "-s", f"3,{SIZE},{SIZE}", "--iterations", "1", "--warmup", "0")
    if "mod.so" in case or "cpu" in case:
        proc = run_cli("vamp", *args, check=False)
    else:
        proc = run_main(vamp_main, *args, capsys=capsys)
    one_error(proc, *words)  # exit 2, never a signal (negative return code)


def test_module_refused_through_classification(compiled, tmp_path, sample_images, vdsp):
    directory = tmp_path / "tiny"
    shutil.copytree(compiled, directory)
    _damage(directory, "cpu feature missing")
    proc = run_cli(CLASSIFICATION, "--file_path", sample_images[0], "--model_prefix_path", directory / "mod",
                   "--vdsp_params_info", vdsp, "--save_dir", tmp_path / "out", check=False)
    one_error(proc, "avx512_imaginary")


def test_refused_module_keeps_previous_results(compiled, tmp_path, sample_images, vdsp):
    directory = tmp_path / "tiny"
    shutil.copytree(compiled, directory)
    _damage(directory, "other TVM")
    result = tmp_path / "out" / "result.txt"
    result.parent.mkdir()
    result.write_text("previous results\n")
    proc = run_cli(CLASSIFICATION, "--file_path", sample_images[0], "--model_prefix_path", directory / "mod",
                   "--vdsp_params_info", vdsp, "--save_dir", result.parent, check=False)
    one_error(proc, "built with TVM 0.19.0")
    assert result.read_text() == "previous results\n"


# ---------------------------------------------------------------------------------------------
# no lost or half-written output
# ---------------------------------------------------------------------------------------------
def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_outputs_have_normal_permissions(compiled, classified):
    """Temporary files and directories are private (0600 / 0700); the renamed outputs must not be."""
    _, result = classified
    assert compiled.stat().st_mode & 0o777 == 0o777 & ~_umask()
    assert (compiled / "mod.json").stat().st_mode & 0o666 == 0o666 & ~_umask()
    assert result.stat().st_mode & 0o777 == 0o666 & ~_umask()


WRITER = '''
import itertools, sys
from pathlib import Path
import numpy as np
from tvmzoo.io.atomic import atomic_dir
from tvmzoo.run.npz import save_npz
from tvmzoo.run.results import Prediction, write_results

out, count = Path(sys.argv[1]), int(sys.argv[2])
names = [f"class {i}" for i in range(1000)]
print("ready", flush=True)
for gen in itertools.islice(itertools.count(int(sys.argv[3])), count or None):
    write_results(out / "result.txt", [Prediction(f"/data/gen{gen}/img: {k}.JPEG", (gen % 1000, 1, 2, 3, 4),
                                                  (0.6, 0.1, 0.1, 0.1, 0.1)) for k in range(300)], names)
    save_npz(out / "out.npz", output_0=np.full((1, 1000), gen, np.float32))
    with atomic_dir(out / "model") as tmp:
        (tmp / "first.txt").write_text(str(gen))
        (tmp / "blob.bin").write_bytes(bytes([gen % 256]) * 300_000)
        (tmp / "last.txt").write_text(str(gen))
'''


def _check_outputs(out: Path) -> int:
    """Every output is one complete generation; returns the result file's."""
    preds = read_results(out / "result.txt")
    gens = {p.path.split("/")[2] for p in preds}
    assert len(preds) == 300 and len(gens) == 1, gens
    with np.load(out / "out.npz") as npz:
        values = np.unique(npz["output_0"])
    assert values.size == 1
    model = out / "model"
    first, last = (model / "first.txt").read_text(), (model / "last.txt").read_text()
    blob = np.frombuffer((model / "blob.bin").read_bytes(), np.uint8)
    assert first == last and blob.size == 300_000 and (blob == int(first) % 256).all()
    for entry in out.iterdir():   # anything else is a hidden temporary the readers skip
        if entry.name not in ("result.txt", "out.npz", "model", ".model.lock"):
            assert entry.name.startswith(".") and entry.name.endswith((".tmp", ".old")), entry.name
    return int(gens.pop()[3:])


@pytest.mark.parametrize("seed", range(6))
def test_sigkill_during_writes_leaves_old_or_new(seed, tmp_path):
    """Result file, npz output and a model directory rewritten in a loop; SIGKILL at a random moment."""
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    out = tmp_path / "out"
    out.mkdir()
    subprocess.run([sys.executable, script, out, "1", "0"], check=True, capture_output=True, timeout=120)
    rng = random.Random(seed)
    for round_ in range(3):
        proc = subprocess.Popen([sys.executable, script, out, "0", str(1000 * (round_ + 1))],
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.0, 0.6))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        _check_outputs(out)
    subprocess.run([sys.executable, script, out, "1", "9999"], check=True, capture_output=True, timeout=120)
    assert _check_outputs(out) == 9999
    assert not [p for p in out.iterdir() if p.name.startswith(".model.") and p.is_dir()]  # cleaned up


def _check_model_dir(directory: Path) -> str:
    meta = json.loads((directory / "mod.json").read_text())
    assert file_sha256(directory / "mod.so") == meta["module_sha256"]
    return meta["precision"]


def test_sigkill_during_compile_keeps_a_complete_model(compiled, tiny_onnx, tmp_path):
    """vamc compile (fp16 over an fp32 build, and back) killed with SIGKILL, compiler children included."""
    ws = tmp_path / "ws"
    shutil.copytree(compiled, ws / "tiny")
    path = build_yaml(tmp_path / "build.yaml", tiny_onnx, ws)
    build_seconds = json.loads((compiled / "mod.json").read_text())["build_seconds"]
    rng = random.Random(7)
    seen, killed = set(), 0
    for attempt, dtype in enumerate(("fp16", "fp32", "fp16")):
        before = set(ws.glob(".tiny.*.tmp"))           # a killed attempt leaves one: wait for a new one
        proc = subprocess.Popen([BIN / "vamc", "compile", path, "--set", f"backend.dtype={dtype}"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 300
        while not set(ws.glob(".tiny.*.tmp")) - before and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)                          # the build has started once its temp dir exists
        time.sleep(rng.uniform(0.0, 1.3 * build_seconds))
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        killed += proc.wait() == -signal.SIGKILL
        seen.add(_check_model_dir(ws / "tiny"))       # the old build or the new one, whole
    run_cli("vamc", "compile", path, "--set", "backend.dtype=fp16")
    assert _check_model_dir(ws / "tiny") == "fp16"
    assert not list(ws.glob(".tiny.*.tmp")) and not list(ws.glob(".tiny.*.old"))
    assert seen <= {"fp32", "fp16"} and killed >= 2


def test_two_compiles_of_one_name_wait_in_turn(compiled, tiny_onnx, tmp_path):
    """Both start while the name is locked: both wait, then build one after the other; the result is whole."""
    ws = tmp_path / "ws"
    path = build_yaml(tmp_path / "build.yaml", tiny_onnx, ws)
    ws.mkdir()
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    with open(ws / ".tiny.lock", "w") as lock, open(logs[0], "w") as err_a, open(logs[1], "w") as err_b:
        fcntl.flock(lock, fcntl.LOCK_EX)
        procs = [subprocess.Popen([BIN / "vamc", "compile", path, "--set", f"backend.dtype={dtype}"],
                                  stdout=subprocess.DEVNULL, stderr=err)
                 for dtype, err in zip(("fp32", "fp16"), (err_a, err_b))]
        deadline = time.monotonic() + 300
        while not all("waiting for it to finish" in log.read_text() for log in logs):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), \
                [log.read_text() for log in logs]
            time.sleep(0.1)
        assert not (ws / "tiny").exists()
    for proc in procs:
        assert proc.wait(timeout=600) == 0, [log.read_text() for log in logs]
    assert _check_model_dir(ws / "tiny") in ("fp32", "fp16")
    assert sorted(p.name for p in ws.iterdir()) == [".tiny.lock", "tiny"]


def test_fallback_rename_interrupted_is_restored(tmp_path):
    """Where the atomic exchange is unavailable the swap is two renames; a kill between them leaves the old
    directory aside, and the next writer puts it back before anything else."""
    from tvmzoo.io.atomic import atomic_dir

    aside = tmp_path / ".model.abcd1234.old"
    (aside / "model").mkdir(parents=True)
    (aside / "model" / "v.txt").write_text("old")
    stale = tmp_path / ".model.zzzz9999.tmp"
    stale.mkdir()
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "model") as tmp:
            assert (tmp_path / "model" / "v.txt").read_text() == "old"   # restored under the lock
            assert not aside.exists() and not stale.exists()
            raise RuntimeError("build failed")
    assert (tmp_path / "model" / "v.txt").read_text() == "old"            # a failed build changes nothing
    assert sorted(p.name for p in tmp_path.iterdir()) == [".model.lock", "model"]
