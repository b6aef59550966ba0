"""RegNetX through the real CLI. Checkpoints in the PaddleClas (.pdparams) and torchvision (.pth) formats
with random weights and non-trivial BN statistics; YAMLs derived from the shipped
build_in/build/<source>_regnet.yaml at a 64x64 input; `vamc compile` for fp32 and fp16, compared with ONNX
Runtime on the exported deploy ONNX on real photos; then the vendor flow on the fp32 RegNetX build:
runstream -> eval_topk, and image2npz -> vamp -> vamp_npz_decode."""
from __future__ import annotations

import functools
import json
import shutil
from dataclasses import replace
from pathlib import Path
from unittest.mock import ANY

import numpy as np
import onnxruntime as ort
import pytest
import yaml

from conftest import ROOT, SHARED_DATA, copy_images, cosine, run_cli, write_checkpoint
from tvmzoo.models import regnet, weights_for
from tvmzoo.preprocess import Preprocessing, apply, read_image
from tvmzoo.run.results import read_results
from tvmzoo.run.runtime import CompiledModel

SIZE = 64
RESIZE_SHORT = 73
# One checkpoint per file format; torchvision's 400MF is also the arch whose widths differ from pycls's.
CASES = [("200MF", "ppcls"), ("400MF_tv", "torchvision")]
CHECKPOINT_NAMES = {"ppcls": "RegNetX_{arch}_pretrained.pdparams", "torchvision": "regnet_x_{arch}.pth"}


class Builds:
    """The user's folder for one test module: checkpoints, derived YAMLs and compiled models, each made
    once and shared by the tests; `images` are the photos they are compared on."""

    def __init__(self, root: Path, images: list[Path]) -> None:
        self.root, self.images = root, images
        self._yamls: dict[tuple[str, str], Path] = {}
        self._models: dict[tuple[str, str, str], CompiledModel] = {}

    def onnx(self, arch: str, source: str) -> Path:
        return self.root / "onnx" / f"{source}_regnetx_{arch.lower()}.onnx"

    def yaml(self, arch: str, source: str) -> Path:
        """The shipped YAML with what a user edits: arch, weights, paths, input size and crop."""
        key = (arch, source)
        if key not in self._yamls:
            state = regnet.random_state_dict(arch, source, np.random.default_rng(CASES.index(key)))
            weights = write_checkpoint(state, source, self.root / CHECKPOINT_NAMES[source].format(arch=arch))
            cfg = yaml.safe_load((ROOT / "build_in" / "build" / f"{source}_regnet.yaml").read_text())
            cfg["model"].update(arch=arch, weights=str(weights))
            cfg["frontend"].update(shape={"input": [1, 3, SIZE, SIZE]}, checkpoint=str(self.onnx(arch, source)))
            cfg["workspace"]["path"] = str(self.root / "deploy_weights")
            ops = {op["type"]: op for op in cfg["dataset"]["process_ops"]}
            ops["Resize"]["resize_short"] = RESIZE_SHORT
            ops["CenterCrop"]["crop_size"] = [SIZE, SIZE]
            path = self.root / f"{source}_regnetx_{arch.lower()}.yaml"
            path.write_text(yaml.safe_dump(cfg, sort_keys=False))
            self._yamls[key] = path
        return self._yamls[key]

    def model(self, arch: str, source: str, precision: str) -> CompiledModel:
        """`vamc compile` of the derived YAML (shipped as int8) with --set backend.dtype and name."""
        key = (arch, source, precision)
        if key not in self._models:
            name = f"{source}_regnetx_{arch.lower()}_{precision}"
            proc = run_cli("vamc", "compile", self.yaml(arch, source), "--set", f"backend.dtype={precision}",
                           "--set", f"name={name}")
            assert f"compiled {name} ({precision})" in proc.stdout
            self._models[key] = CompiledModel.load(self.root / "deploy_weights" / name / "mod")
        return self._models[key]


@pytest.fixture(scope="module")
def builds(tmp_path_factory, sample_images) -> Builds:
    return Builds(tmp_path_factory.mktemp("regnet_tvm"), sample_images[::50])      # 10 photos, 10 classes


def expected_preprocessing(arch: str, source: str) -> Preprocessing:
    """The source's evaluation transform at the test's size: what the derived YAML's process_ops must say."""
    return replace(weights_for("regnet", arch, source).preprocessing, resize_hw=(RESIZE_SHORT, RESIZE_SHORT),
                   crop_hw=(SIZE, SIZE))


def reference(builds: Builds, arch: str, source: str, model: CompiledModel) -> tuple[np.ndarray, np.ndarray]:
    """(ONNX Runtime logits on the exported deploy ONNX, the compiled module's outputs) on the photos."""
    assert model.preprocessing == expected_preprocessing(arch, source)
    batch = np.stack([apply(model.preprocessing, read_image(p)) for p in builds.images])
    sess = ort.InferenceSession(str(builds.onnx(arch, source)), providers=["CPUExecutionProvider"])
    return sess.run(["output"], {"input": batch})[0], model.run(batch)


def top5(scores: np.ndarray) -> np.ndarray:
    return np.argsort(-scores, axis=1, kind="stable")[:, :5]


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def assert_top5(result: Path, images: list[Path], logits: np.ndarray) -> None:
    """result.txt holds, for every photo, the top-5 ids of `logits` and their softmax probabilities."""
    predictions = {Path(p.path).stem: p for p in read_results(result)}
    assert sorted(predictions) == sorted(p.stem for p in images)
    for path, ids, probs in zip(images, top5(logits), softmax(logits)):
        assert predictions[path.stem].ids == tuple(int(i) for i in ids)
        np.testing.assert_allclose(predictions[path.stem].probs, probs[ids], atol=1e-5)


@functools.cache
def wnids() -> list[str]:
    """ImageNet wnids in class order."""
    return [line.split("\t")[0] for line in (SHARED_DATA / "imagenet_synsets.txt").read_text().splitlines()]


def rates(images: list[Path], logits: np.ndarray) -> list[float]:
    """Top-1 and top-5 rates (%) of `logits` against the class named by each photo's wnid prefix."""
    truth = np.array([wnids().index(p.name.split("_")[0]) for p in images])
    ids = top5(logits)
    return [100 * float(np.mean(ids[:, 0] == truth)), 100 * float(np.mean((ids == truth[:, None]).any(1)))]


@pytest.mark.parametrize("arch, source", CASES)
def test_fp32_equals_onnxruntime(builds, arch, source):
    model = builds.model(arch, source, "fp32")
    assert model.meta["precision"] == "fp32" and model.meta["softmax"] is False
    assert model.meta["input"]["shape"] == [1, 3, SIZE, SIZE]
    ref, out = reference(builds, arch, source, model)
    assert out.shape == ref.shape == (len(builds.images), 1000)
    assert min(cosine(o, r) for o, r in zip(out, ref)) > 0.99999
    np.testing.assert_array_equal(top5(out), top5(ref))   # random weights favour one class: compare five


@pytest.mark.parametrize("arch, source", CASES)
def test_fp16_close_to_onnxruntime(builds, arch, source):
    model = builds.model(arch, source, "fp16")
    assert model.meta["precision"] == "fp16"
    ref, out = reference(builds, arch, source, model)
    assert min(cosine(o, r) for o, r in zip(out, ref)) > 0.999


def test_vendor_flow_with_a_regnet_yaml(builds, tmp_path):
    """Runstream and the npz route on the fp32 RegNetX-200MF (PaddleClas) build give ONNX Runtime's top-5."""
    arch, source = CASES[0]
    model = builds.model(arch, source, "fp32")
    vdsp = tmp_path / "vdsp.json"
    vdsp.write_text(json.dumps(model.preprocessing.to_vdsp()))
    ref, _ = reference(builds, arch, source, model)
    labels = ROOT / "common" / "label" / "imagenet.txt"
    # The photos, and two copies of the first named after its predicted top-1 and top-3 classes: random
    # weights rarely get a photo right, and eval_topk's rates should count something (1/12 and 2/12 here).
    photos = tmp_path / "photos"
    images = copy_images(builds.images, photos)
    for k in (0, 2):
        wnid = wnids()[top5(ref)[0][k]]
        images.append(Path(shutil.copy(images[0], photos / f"{wnid}_relabelled_top{k + 1}.JPEG")))
    ref = np.concatenate([ref, ref[:1], ref[:1]])

    result = tmp_path / "result.txt"
    proc = run_cli(ROOT / "common" / "vsx" / "classification.py", "--infer_mode", "sync",
                   "--file_path", photos, "--model_prefix_path", model.directory / "mod",
                   "--vdsp_params_info", vdsp, "--label_txt", labels, "--save_dir", tmp_path,
                   "--save_result_txt", result.name)
    assert f"{len(images)} images in" in proc.stdout
    assert_top5(result, images, ref)
    topk = run_cli(ROOT / "common" / "eval" / "eval_topk.py", result).stdout
    assert topk.split() == ["top1_rate:", ANY, "top5_rate:", ANY]
    np.testing.assert_allclose([float(v) for v in topk.split()[1::2]], rates(images, ref), atol=1e-3)

    npz_dir, out_dir, datalist = tmp_path / "npz", tmp_path / "vamp_out", tmp_path / "npz.txt"
    run_cli(ROOT / "common" / "utils" / "image2npz.py", "--dataset_path", photos,
            "--target_path", npz_dir, "--text_path", datalist)
    assert len(datalist.read_text().splitlines()) == len(images)
    run_cli("vamp", "-m", model.directory / "mod", "--vdsp_params", vdsp, "--datalist", datalist,
            "--path_output", out_dir)
    result_npz = tmp_path / "result_npz.txt"
    run_cli(ROOT / "common" / "eval" / "vamp_npz_decode.py", datalist, out_dir, result_npz, labels)
    assert_top5(result_npz, images, ref)
    assert run_cli(ROOT / "common" / "eval" / "eval_topk.py", result_npz).stdout == topk
