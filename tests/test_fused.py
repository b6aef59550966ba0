"""Preprocessing compiled into the module (graph.preprocess: fused) equals the host pipeline on real
photos: the ONNX prefix exactly (ONNX Runtime), the compiled TVM module within 1e-3 in the logits
with identical top-1; the runner and vamp feed it resized uint8 images."""
from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from conftest import run_cli
from tiny import build_tiny, tiny_onnx
from tvmzoo.errors import ConfigError
from tvmzoo.preprocess.fused import fuse_preprocessing, fused_input, fused_input_size
from tvmzoo.preprocess import Preprocessing, apply, read_image
from tvmzoo.run.results import read_results
from tvmzoo.run.runtime import CompiledModel

SIZE = 32


@pytest.fixture(scope="module")
def photos(sample_images):
    return sample_images[::10]          # 50 photos, 50 classes, many sizes and aspect ratios


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("fused")
    return {"root": root,
            "host": build_tiny(root, "host", softmax=False, resize_short=40),
            "fused": build_tiny(root, "fused", softmax=False, resize_short=40, preprocess="fused"),
            "host_sm": build_tiny(root, "host_sm", resize_short=40),
            "fused_sm": build_tiny(root, "fused_sm", resize_short=40, preprocess="fused")}


@pytest.mark.parametrize("pre", [
    Preprocessing(resize_hw=(40, 40), crop_hw=(SIZE, SIZE)),
    Preprocessing(resize_hw=(37, 37), keep_aspect=True, crop_hw=(SIZE, SIZE)),
    Preprocessing(resize_hw=(39, 39), keep_aspect=True, crop_hw=(SIZE, SIZE), crop_xy=(1, 6), rgb=False,
                  norm="DIV127_5_MINUSONE"),
    Preprocessing(resize_hw=(41, 50), crop_hw=(SIZE, SIZE), crop_xy=(5, 2), interpolation="BILINEAR_PILLOW",
                  norm="MINUSMEAN_DIVSTD", mean=(123.7, 116.3, 103.5), std=(58.4, 57.1, 57.4)),
], ids=["square", "keep-aspect", "bgr-crop_xy", "pillow-0..255"])
def test_onnx_prefix_equals_host_pipeline(pre, photos, tmp_path):
    network = onnx.load(str(tiny_onnx(tmp_path / "tiny.onnx", SIZE)))
    fused = fuse_preprocessing(copy.deepcopy(network), "input", 1, pre)
    onnx.checker.check_model(fused, full_check=True)
    host, inside = ort.InferenceSession(network.SerializeToString()), ort.InferenceSession(fused.SerializeToString())
    for path in photos[:15]:
        image = read_image(path)
        small = fused_input(pre, image)
        assert small.dtype == np.uint8 and small.shape == (*fused_input_size(pre)[::-1], 3)
        want = host.run(None, {"input": apply(pre, image)[None]})[0]
        got = inside.run(None, {"input": small[None]})[0]
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_compiled_fused_module_equals_host_pipeline(built, photos):
    host, fused = CompiledModel.load(built["host"]), CompiledModel.load(built["fused"])
    assert fused.fused and not host.fused
    assert fused.meta["input"] == {"name": "input", "shape": [1, 40, 40, 3], "dtype": "uint8", "layout": "NHWC"}
    assert fused.meta["preprocess"] == "fused" and fused.preprocessing == host.preprocessing
    pre = host.preprocessing
    images = [read_image(p) for p in photos]
    want = host.run(np.stack([apply(pre, im) for im in images]))
    got = fused.run(np.stack([fused_input(pre, im) for im in images]))
    assert np.abs(got - want).max() < 1e-3
    np.testing.assert_array_equal(got.argmax(1), want.argmax(1))
    assert len(set(want.argmax(1))) > 3        # the comparison is not between constant answers


def test_runner_and_vamp_feed_a_fused_module(built, photos, tmp_path):
    folder = photos[0].parent
    for name in ("host_sm", "fused_sm"):
        run_cli("tvmzoo", "run", "--file_path", folder, "--model_prefix_path", built[name], "--save_dir", tmp_path,
                "--save_result_txt", f"{name}.txt", "--infer_mode", "async", "--instances", "2")
    host, fused = read_results(tmp_path / "host_sm.txt"), read_results(tmp_path / "fused_sm.txt")
    assert len(host) == len(fused) == 500
    assert [p.ids[0] for p in host] == [p.ids[0] for p in fused]
    assert max(abs(a - b) for h, f in zip(host, fused) for a, b in zip(h.probs, f.probs)) < 1e-4

    images = tmp_path / "few"
    images.mkdir()
    for p in photos[:20]:
        (images / p.name).symlink_to(p)
    proc = run_cli("vamp", "-m", built["fused_sm"], "--iterations", "3", "--images", images, "--json")
    report = json.loads(proc.stdout)
    assert report["end_to_end"]["preprocess"] == "fused" and report["end_to_end"]["images"] == 20
    assert report["end_to_end"]["images_per_second"] > 0 and report["throughput_qps"] > 0


def test_fused_errors_are_clear(built, tmp_path):
    other = Preprocessing(resize_hw=(48, 48), crop_hw=(SIZE, SIZE))
    (tmp_path / "vdsp.json").write_text(json.dumps(other.to_vdsp()))
    proc = run_cli("tvmzoo", "run", "--file_path", tmp_path, "--model_prefix_path", built["fused_sm"],
                   "--vdsp_params_info", tmp_path / "vdsp.json", check=False)
    assert proc.returncode == 2 and "compiled in" in proc.stderr and "Traceback" not in proc.stderr
    with pytest.raises(ConfigError, match="network input is 40x40"):
        _fuse_mismatch(built["root"])


def _fuse_mismatch(root):
    """A YAML whose crop (32) does not match its network input (40)."""
    import yaml

    from tvmzoo.compile.compiler import compile_model
    from tvmzoo.config import load_build_config

    cfg = yaml.safe_load((root / "fused.yaml").read_text())
    cfg["name"] = "mismatch"
    tiny_onnx(root / "tiny40.onnx", 40)
    cfg["frontend"] = {"shape": {"input": [1, 3, 40, 40]}, "type": "onnx", "checkpoint": str(root / "tiny40.onnx")}
    (root / "mismatch.yaml").write_text(yaml.safe_dump(cfg))
    compile_model(load_build_config(root / "mismatch.yaml"))
