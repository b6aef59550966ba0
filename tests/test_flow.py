"""The vendor flow end to end through the real CLIs, on a RepVGG-A0 checkpoint in PaddleClas format
(random weights, non-trivial BN statistics) at a small input so untuned builds stay fast."""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import yaml

from conftest import ROOT, copy_images, cosine, run_cli
from tvmzoo.models import repvgg
from tvmzoo.preprocess import Preprocessing, apply, read_image
from tvmzoo.run.results import read_results
from tvmzoo.run.runtime import ALIGNMENT, CompiledModel, stack_aligned

SIZE = 64


@pytest.fixture(scope="module")
def project(tmp_path_factory, sample_images):
    """A user's project folder: a checkpoint, a build YAML, a vdsp JSON, a folder of photos."""
    root = tmp_path_factory.mktemp("flow")
    state = repvgg.random_state_dict("A0", "ppcls", np.random.default_rng(0))
    weights = root / "RepVGG_A0_pretrained.pdparams"
    weights.write_bytes(pickle.dumps(state, protocol=4))
    cfg = {
        "name": "repvgg_a0_fp32",
        "frontend": {"shape": {"input": [1, 3, SIZE, SIZE]}, "type": "onnx",
                     "checkpoint": str(root / "onnx" / "repvgg_a0.onnx"), "dtype": "fp32"},
        "backend": {"type": "tvm_vacc", "dtype": "fp32", "compile": {"cluster_mode": 0, "data_transport_mode": 1}},
        "graph": {"extra_ops": {"type": "softmax"}},
        "workspace": {"path": str(root / "deploy_weights")},
        "model": {"family": "repvgg", "arch": "A0", "source": "ppcls", "weights": str(weights)},
    }
    (root / "build.yaml").write_text(yaml.safe_dump(cfg))
    pre = Preprocessing(resize_hw=(73, 73), crop_hw=(SIZE, SIZE), crop_xy=(4, 4))
    (root / "vdsp.json").write_text(json.dumps(pre.to_vdsp()))
    images = copy_images(sample_images[::50], root / "photos")           # 10 photos, 10 classes
    (root / "photos" / "broken.JPEG").write_bytes(b"not a jpeg at all")
    return {"root": root, "yaml": root / "build.yaml", "vdsp": root / "vdsp.json", "pre": pre, "images": images,
            "model": root / "deploy_weights" / "repvgg_a0_fp32" / "mod"}


@pytest.fixture(scope="module")
def compiled(project):
    proc = run_cli("vamc", "compile", project["yaml"])
    assert "compiled repvgg_a0_fp32" in proc.stdout
    return project["model"]


def test_compile_writes_module_and_metadata(compiled, project):
    meta = json.loads((compiled.parent / "mod.json").read_text())
    assert (compiled.parent / "mod.so").stat().st_size > 0
    assert meta["input"]["name"] == "input" and meta["input"]["shape"] == [1, 3, SIZE, SIZE]
    assert meta["precision"] == "fp32" and meta["softmax"] is True
    assert meta["outputs"][0]["shape"][-1] == 1000
    assert len(meta["source"]["sha256"]) == 64 and meta["target"]["kind"] == "llvm"
    pipeline = meta["kernels"]["pipeline"]  # the named phases and passes the build ran
    assert list(pipeline) == ["import", "layout", "legalize", "schedule", "prepack"]
    assert pipeline["import"] == ["Canonicalize"] and pipeline["schedule"] == ["ApplyTuningRecords", "DefaultSchedules",
                                                                               "HoistAmxTileSetup"]
    assert meta["kernels"]["default"] >= 1
    assert not list(compiled.parent.parent.glob(".*.tmp")), "a temporary build directory was left behind"


def _reference(project, precision_model: CompiledModel, images) -> tuple[np.ndarray, np.ndarray]:
    batch = np.stack([apply(project["pre"], read_image(p)) for p in images])
    sess = ort.InferenceSession(str(project["root"] / "onnx" / "repvgg_a0.onnx"))
    ref = np.concatenate([sess.run(None, {"input": x[None]})[0] for x in batch])
    out = precision_model.run(batch)
    return ref, out


def test_fp32_equals_onnxruntime(compiled, project):
    ref, out = _reference(project, CompiledModel.load(compiled), project["images"])
    probs = np.exp(ref - ref.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    assert cosine(out, probs) > 0.99999
    np.testing.assert_array_equal(out.argmax(1), ref.argmax(1))


def test_aligned_input_is_read_in_place(compiled, project):
    """An aligned batch goes to the VM without a copy; unaligned and read-only ones are copied; all
    give the same outputs."""
    model = CompiledModel.load(compiled)
    x = np.stack([apply(project["pre"], read_image(p)) for p in project["images"][:1]])
    aligned = stack_aligned(list(x))
    unaligned = np.empty(x.size + 1, np.float32)[1:].reshape(x.shape)
    unaligned[...] = x
    read_only = aligned.copy()
    read_only.flags.writeable = False
    assert aligned.ctypes.data % ALIGNMENT == 0 and unaligned.ctypes.data % ALIGNMENT != 0
    seen_aligned, seen_unaligned = model._input_tensor(aligned), model._input_tensor(unaligned)
    aligned[0, 0, 0, 0] += 1.0
    unaligned[0, 0, 0, 0] += 1.0
    assert seen_aligned.numpy()[0, 0, 0, 0] == aligned[0, 0, 0, 0]         # the same memory
    assert seen_unaligned.numpy()[0, 0, 0, 0] == x[0, 0, 0, 0]             # a copy
    aligned[...] = x
    unaligned[...] = x
    want = model.run(x)
    for batch in (aligned, unaligned, read_only):
        np.testing.assert_array_equal(model.run(batch), want)


def test_fp16_close_to_onnxruntime(project, compiled):
    run_cli("vamc", "compile", project["yaml"], "--set", "backend.dtype=fp16", "--set", "name=repvgg_a0_fp16",
            "--set", "graph.extra_ops=null")
    model = CompiledModel.load(project["model"].parent.parent / "repvgg_a0_fp16" / "mod")
    assert model.meta["precision"] == "fp16"
    ref, out = _reference(project, model, project["images"])
    assert cosine(out, ref) > 0.999
    assert (out.argmax(1) == ref.argmax(1)).mean() >= 0.9


def test_runstream_and_npz_routes_agree(compiled, project, tmp_path):
    classification = ROOT / "common" / "vsx" / "classification.py"
    result = tmp_path / "result.txt"
    proc = run_cli(classification, "--infer_mode", "sync", "--file_path", project["root"] / "photos",
                   "--model_prefix_path", compiled, "--vdsp_params_info", project["vdsp"],
                   "--label_txt", ROOT / "common" / "label" / "imagenet.txt", "--save_dir", tmp_path,
                   "--save_result_txt", "result.txt", check=False)
    assert proc.returncode == 1, proc.stderr            # one broken image: reported, the rest classified
    assert "broken.JPEG" in proc.stderr and "Traceback" not in proc.stderr
    assert "10 images in" in proc.stdout and "images/second" in proc.stdout
    lines = result.read_text().splitlines()
    assert len(lines) == 5 * len(project["images"])
    assert all(": Relay top-" in line and ", class name: " in line for line in lines)

    topk = run_cli(ROOT / "common" / "eval" / "eval_topk.py", result).stdout
    assert topk.startswith("top1_rate: ") and "top5_rate: " in topk

    npz_dir, out_dir, datalist = tmp_path / "npz", tmp_path / "vamp_out", tmp_path / "npz.txt"
    run_cli(ROOT / "common" / "utils" / "image2npz.py", "--dataset_path", project["root"] / "photos",
            "--target_path", npz_dir, "--text_path", datalist, check=False)
    assert len(datalist.read_text().splitlines()) == len(project["images"])
    run_cli("vamp", "-m", compiled, "--vdsp_params", project["vdsp"], "--datalist", datalist,
            "--path_output", out_dir)
    result2 = tmp_path / "result_npz.txt"
    run_cli(ROOT / "common" / "eval" / "vamp_npz_decode.py", datalist, out_dir, result2,
            ROOT / "common" / "label" / "imagenet.txt")
    by_stem = {Path(p.path).stem: p.ids for p in read_results(result)}
    by_stem2 = {Path(p.path).stem: p.ids for p in read_results(result2)}
    assert by_stem.keys() == by_stem2.keys()
    assert all(by_stem[k][0] == by_stem2[k][0] for k in by_stem)
    assert run_cli(ROOT / "common" / "eval" / "eval_topk.py", result2).stdout == topk


def test_async_runner_matches_sync(compiled, project, tmp_path):
    common = ["run", "--file_path", project["images"][0].parent, "--model_prefix_path", compiled,
              "--vdsp_params_info", project["vdsp"], "--save_dir", tmp_path]
    run_cli("tvmzoo", *common, "--infer_mode", "sync", "--save_result_txt", "sync.txt", check=False)
    run_cli("tvmzoo", *common, "--infer_mode", "async", "--batch", "3", "--save_result_txt", "async.txt",
            check=False)
    assert (tmp_path / "sync.txt").read_text() == (tmp_path / "async.txt").read_text()


def test_vamp_report(compiled):
    proc = run_cli("vamp", "-m", compiled, "-s", f"3,{SIZE},{SIZE}", "--iterations", "5", "-i", "2", "-t", "1",
                   "--json")
    report = json.loads(proc.stdout)
    assert report["samples"] == 10 and report["throughput_qps"] > 0
    assert report["instances"] == 2 and report["threads_per_instance"] == 1
    lat = report["latency_ms"]
    assert lat["min"] <= lat["p50"] <= lat["p99"] <= lat["max"]


@pytest.mark.parametrize("change, expected", [
    ({"model": {"family": "repvgg", "arch": "A7", "source": "ppcls", "weights": "w"}}, "unknown repvgg arch 'A7'"),
    ({"frontend": None}, "frontend"),
    ({"model": {"family": "repvgg", "arch": "B0", "source": "ppcls", "weights": "WEIGHTS"}}, "does not fit"),
    ({"model": {"family": "repvgg", "arch": "A0", "source": "ppcls", "weights": "/no/such.pdparams"}},
     "checkpoint not found"),
])
def test_bad_input_is_one_clear_error(project, tmp_path, change, expected):
    cfg = yaml.safe_load(project["yaml"].read_text())
    cfg["frontend"]["checkpoint"] = str(tmp_path / "fresh.onnx")      # force step 1
    cfg["workspace"]["path"] = str(tmp_path / "ws")
    for key, value in change.items():
        if value is None:
            del cfg[key]
        else:
            if isinstance(value, dict) and value.get("weights") == "WEIGHTS":
                value = {**value, "weights": cfg["model"]["weights"]}
            cfg[key] = value
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = run_cli("vamc", "compile", path, check=False)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert expected in proc.stderr, proc.stderr
    assert not (tmp_path / "ws" / cfg["name"]).exists()


def test_missing_yaml_is_clear(tmp_path):
    proc = run_cli("vamc", "compile", tmp_path / "nope.yaml", check=False)
    assert proc.returncode == 2 and "nope.yaml" in proc.stderr and "Traceback" not in proc.stderr


def test_missing_model_is_clear(tmp_path):
    proc = run_cli("vamp", "-m", tmp_path / "nothing" / "mod", check=False)
    assert proc.returncode == 2 and "vamc compile" in proc.stderr and "Traceback" not in proc.stderr
