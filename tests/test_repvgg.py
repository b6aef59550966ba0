"""RepVGG: checkpoint layouts, re-parameterization (deploy graph vs train graph on ONNX Runtime, train graph
vs a torch reference), checkpoint validation messages, arch table sizes, build configs."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest

from conftest import rel_err, run_onnx, write_checkpoint
from tvmzoo.errors import CheckpointError, ConfigError
from tvmzoo.models import repvgg, weights_for
from tvmzoo.models.repvgg_arch import G4, LAYOUTS, RepVGGArch
from tvmzoo.io.onnx_graph import GraphBuilder

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
SIZE = 64   # small input: five stride-2 blocks leave 2x2
MAX_REL_ERR = 1e-4

# Narrow archs keep untuned runs fast. Two blocks per stage give identity branches;
# NARROW_G4 uses the official g4 map (layers 2, 4, 6 grouped, each with an identity branch).
NARROW = RepVGGArch((2, 2, 2, 1), (0.125, 0.125, 0.125, 0.125))
NARROW_G4 = RepVGGArch((2, 2, 2, 1), (0.125, 0.125, 0.125, 0.125), G4)
NARROW_SE = RepVGGArch((2, 2, 1, 1), (0.25, 0.25, 0.25, 0.25), use_se=True)   # 16..128 channels: SE internal >= 1


# ---------------------------------------------------------------- helpers

@pytest.fixture(scope="module")
def photos() -> np.ndarray:
    """Four real photos as a normalized NCHW float32 batch at SIZE x SIZE."""
    paths = sorted((DATA / "imagenet-sample").glob("*.JPEG"))[::125][:4]
    assert len(paths) == 4, f"need the sample photos in {DATA / 'imagenet-sample'}"
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    batch = []
    for p in paths:
        img = cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB)
        img = cv2.resize(img, (SIZE, SIZE), interpolation=cv2.INTER_LINEAR) / 255.0
        batch.append(((img - mean) / std).transpose(2, 0, 1))
    return np.stack(batch).astype(np.float32)


def load_checkpoint(state: dict[str, np.ndarray], source: str, tmp_path: Path) -> dict[str, np.ndarray]:
    """Write the checkpoint to a real file and read it back with tvmzoo.io.checkpoint when that exists."""
    suffix = ".pdparams" if source == "ppcls" else ".pth"
    path = write_checkpoint(state, source, tmp_path / f"{source}{suffix}")
    try:
        from tvmzoo.io.checkpoint import load_state_dict
    except ImportError:
        return state
    return load_state_dict(path)


def deploy_state(state: dict[str, np.ndarray], arch, source: str) -> dict[str, np.ndarray]:
    """The deploy-form checkpoint (rbr_reparam / branch_reparam) the source's own converter writes."""
    lay = LAYOUTS[source]
    checked, _ = repvgg.check_state(state, arch, source)
    out = {k: v for k, v in checked.items()
           if k.startswith(lay.head) or ".se." in k or ".se_layer." in k}
    for w in repvgg.read_blocks(checked, arch, source):
        p = lay.block_prefix(w.block.stage, w.block.index)
        kernel, bias = repvgg.reparameterize(w)
        out[f"{p}.{lay.reparam}.weight"] = kernel.astype(np.float32)
        out[f"{p}.{lay.reparam}.bias"] = bias.astype(np.float32)
    return out


# ---------------------------------------------------------------- re-parameterization on real photos

@pytest.mark.parametrize("arch, source", [
    (NARROW, "official"), (NARROW, "mmcls"), (NARROW, "ppcls"),
    (NARROW_G4, "official"), (NARROW_G4, "ppcls"),
    (NARROW_SE, "official"), (NARROW_SE, "mmcls"), (NARROW_SE, "ppcls"),
], ids=["official", "mmcls", "ppcls", "g4-official", "g4-ppcls", "se-official", "se-mmcls", "se-ppcls"])
def test_deploy_matches_train_graph(arch, source, photos, tmp_path):
    state = repvgg.random_state_dict(arch, source, np.random.default_rng(0))
    state = load_checkpoint(state, source, tmp_path)
    deploy = repvgg.deploy_onnx(state, arch, source, size_hw=(SIZE, SIZE))
    train = repvgg.train_onnx(state, arch, source, size_hw=(SIZE, SIZE))
    assert [i.name for i in deploy.graph.input] == ["input"]
    assert [o.name for o in deploy.graph.output] == ["output"]
    assert deploy.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    convs = [n for n in deploy.graph.node if n.op_type == "Conv"]
    per_block = 3 if arch.use_se else 1
    assert len(convs) == per_block * len(repvgg.blocks(arch))
    assert not any(n.op_type == "BatchNormalization" for n in deploy.graph.node)

    ref = run_onnx(train, photos)
    out = run_onnx(deploy, photos)
    assert out.shape == (4, 1000)
    assert np.abs(ref).max() > 1e-3 and ref.std(axis=1).min() > 1e-4   # not a degenerate net
    assert rel_err(out, ref) < MAX_REL_ERR
    # a deploy-form checkpoint (rbr_reparam / branch_reparam) gives the same output
    from_deploy = run_onnx(repvgg.deploy_onnx(deploy_state(state, arch, source), arch, source,
                                         size_hw=(SIZE, SIZE)), photos)
    assert rel_err(from_deploy, ref) < MAX_REL_ERR


def _torch_reference(state: dict[str, np.ndarray], arch: RepVGGArch, x: np.ndarray) -> np.ndarray:
    """The official train-time forward written with torch.nn.functional (official layout, eval mode)."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    t = {k: torch.from_numpy(v) for k, v in state.items() if v.dtype == np.float32}

    def bn(y, p):
        return F.batch_norm(y, t[f"{p}.running_mean"], t[f"{p}.running_var"], t[f"{p}.weight"],
                            t[f"{p}.bias"], training=False, eps=1e-5)

    y = torch.from_numpy(x)
    for b in repvgg.blocks(arch):
        p = "stage0" if b.stage == 0 else f"stage{b.stage}.{b.index}"
        out = bn(F.conv2d(y, t[f"{p}.rbr_dense.conv.weight"], stride=b.stride, padding=1, groups=b.groups),
                 f"{p}.rbr_dense.bn")
        out = out + bn(F.conv2d(y, t[f"{p}.rbr_1x1.conv.weight"], stride=b.stride, groups=b.groups),
                       f"{p}.rbr_1x1.bn")
        if b.has_identity:
            out = out + bn(y, f"{p}.rbr_identity")
        if arch.use_se:
            s = F.avg_pool2d(out, kernel_size=out.size(3))
            s = F.relu(F.conv2d(s, t[f"{p}.se.down.weight"], t[f"{p}.se.down.bias"]))
            out = out * torch.sigmoid(F.conv2d(s, t[f"{p}.se.up.weight"], t[f"{p}.se.up.bias"]))
        y = F.relu(out)
    y = y.mean(dim=(2, 3))
    return F.linear(y, t["linear.weight"], t["linear.bias"]).numpy()


@pytest.mark.parametrize("arch", [NARROW_G4, NARROW_SE], ids=["g4", "se"])
def test_train_graph_matches_torch(arch, photos):
    state = repvgg.random_state_dict(arch, "official", np.random.default_rng(1))
    ref = _torch_reference(state, arch, photos)
    out = run_onnx(repvgg.train_onnx(state, arch, "official", size_hw=(SIZE, SIZE)), photos)
    assert rel_err(out, ref) < MAX_REL_ERR


def test_identity_kernel_is_identity_per_group():
    k = repvgg.identity_kernel(8, 4)
    assert k.shape == (8, 2, 3, 3)
    x = np.random.default_rng(2).normal(size=(1, 8, 5, 5)).astype(np.float32)
    g = GraphBuilder("id")
    g.output(g.conv(g.input([1, 8, 5, 5]), k, None, "id", groups=4), [1, 8, 5, 5])
    sess = ort.InferenceSession(g.build().SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(None, {"input": x})[0], x, atol=1e-6)


# ---------------------------------------------------------------- checkpoint validation

@pytest.fixture(scope="module")
def a0_state() -> dict[str, np.ndarray]:
    return repvgg.random_state_dict("A0", "official", np.random.default_rng(4))


def test_wrong_arch_names_key_and_suggests_the_right_one(a0_state):
    with pytest.raises(CheckpointError) as e:
        repvgg.check_state(a0_state, "B0", "official")
    msg = str(e.value)
    assert "RepVGG-B0" in msg and "stage0.rbr_dense.conv.weight" in msg
    assert "[64, 3, 3, 3]" in msg and "[48, 3, 3, 3]" in msg
    assert "looks like RepVGG-A0" in msg
    assert repvgg.guess_arch(a0_state) == ("A0", "official")


def test_grouped_arch_is_told_apart(a0_state):
    state = repvgg.random_state_dict(NARROW_G4, "official", np.random.default_rng(5))
    with pytest.raises(CheckpointError, match=r"stage1\.1\.rbr_dense\.conv\.weight.*\[8, 2, 3, 3\].*\[8, 8, 3, 3\]"):
        repvgg.check_state(state, NARROW, "official")


def test_wrong_source_is_named(a0_state):
    mm = repvgg.random_state_dict(NARROW_SE, "mmcls", np.random.default_rng(6))
    with pytest.raises(CheckpointError, match=r"'linear\.weight' is missing"):
        repvgg.check_state(mm, NARROW_SE, "official")
    with pytest.raises(CheckpointError, match="looks like RepVGG-A0 in the official layout"):
        repvgg.check_state(a0_state, "A0", "mmcls")


# ---------------------------------------------------------------- arch table

def test_param_counts():
    assert abs(repvgg.param_count("A0") - 8.31e6) < 0.01e6
    assert abs(repvgg.param_count("A0", deploy=False) - 9.11e6) < 0.01e6
    assert abs(repvgg.param_count("D2se") - 120.39e6) < 0.01e6     # mmpretrain model zoo figures
    assert abs(repvgg.param_count("B1g4") - 36.13e6) < 0.01e6


def test_arch_table():
    assert list(repvgg.ARCHS) == ["A0", "A1", "A2", "B0", "B1", "B1g2", "B1g4", "B2", "B2g4", "B3", "B3g4", "D2se"]
    d2se = repvgg.ARCHS["D2se"]
    assert d2se.num_blocks == (8, 14, 24, 1) and d2se.width_multiplier == (2.5, 2.5, 2.5, 5) and d2se.use_se
    assert sorted(repvgg.ARCHS["B1g4"].groups) == list(range(2, 27, 2))
    assert repvgg.get_arch("RepVGG-b1g4") is repvgg.ARCHS["B1g4"]
    assert [b.groups for b in repvgg.blocks("B1g2")][:5] == [1, 1, 2, 1, 2]
    with pytest.raises(ConfigError, match="layer 2 .* cannot be split into 4 groups"):
        repvgg.blocks(RepVGGArch((1, 1, 1, 1), (0.03125,) * 4, G4))   # 2 -> 4 channels, 4 groups


@pytest.mark.parametrize("arch", [
    pytest.param(a, marks=pytest.mark.slow) if repvgg.param_count(a) > 75e6 else a for a in repvgg.ARCHS])
def test_every_arch_builds_a_deploy_graph(arch, monkeypatch):
    # Full width (up to 133M parameters): GraphBuilder.build already runs the checker; count its calls
    # rather than serializing a 0.5 GB model a second time.
    checked = []
    real_check = onnx.checker.check_model
    monkeypatch.setattr(onnx.checker, "check_model", lambda m, *a, **k: (checked.append(m), real_check(m, *a, **k)))
    state = repvgg.random_state_dict(arch, "official", np.random.default_rng(8), deploy=True)
    model = repvgg.deploy_onnx(state, arch, "official", size_hw=(32, 32), batch=1)
    assert checked and checked[-1] is model
    assert [d.dim_value for d in model.graph.output[0].type.tensor_type.shape.dim] == [1, 1000]
    n_convs = sum(n.op_type == "Conv" for n in model.graph.node)
    assert n_convs == len(repvgg.blocks(arch)) * (3 if arch == "D2se" else 1)


# ---------------------------------------------------------------- preprocessing and build configs

def _preprocessing(arch: str, source: str):
    return weights_for("repvgg", arch, source).preprocessing


def test_weights_entries_preprocessing():
    a0 = _preprocessing("A0", "official")
    assert (a0.resize_hw, a0.crop_hw, a0.keep_aspect) == ((256, 256), (224, 224), True)
    assert a0.mean == (0.485, 0.456, 0.406) and a0.std == (0.229, 0.224, 0.225) and a0.rgb
    assert _preprocessing("D2se", "official").crop_hw == (320, 320)
    assert _preprocessing("D2se", "ppcls").crop_hw == (320, 320)
    assert _preprocessing("D2se", "mmcls").crop_hw == (224, 224)


@pytest.mark.parametrize("arch", list(repvgg.ARCHS))
def test_vdsp_params(arch):
    path = REPO / "build_in" / "vdsp_params" / f"official-repvgg_{arch.lower()}-vdsp_params.json"
    doc = json.loads(path.read_text())
    assert doc["OpType"] == "FUSION_OP_RGB_RESIZE_CVTCOLOR_CROP_NORM_TENSOR"
    cfg = doc["OpConfig"]
    pre = _preprocessing(arch, "official")
    assert (cfg["OimageHeight"], cfg["OimageWidth"]) == pre.crop_hw
    assert (cfg["ResizeHeight"], cfg["ResizeWidth"]) == pre.resize_hw
    assert cfg["CropX"] == cfg["CropY"] == (pre.resize_hw[1] - pre.crop_hw[1]) // 2
    assert cfg["Mean"] == [float(np.float16(m)) for m in pre.mean]
    assert cfg["Std"] == [float(np.float16(s)) for s in pre.std]
    assert (cfg["NormaType"], cfg["ColorCvtCode"], cfg["ResizeType"]) == (
        "DIV255_MINUSMEAN_DIVSTD", "NO_CHANGE", "BILINEAR_CV")


@pytest.mark.parametrize("source", repvgg.SOURCES)
def test_build_yaml(source):
    from tvmzoo.config import load_build_config
    from tvmzoo.preprocess import Preprocessing

    for name, dtype in ((f"{source}_repvgg.yaml", "int8"), (f"{source}_repvgg_fp16.yaml", "fp16")):
        cfg = load_build_config(REPO / "build_in" / "build" / name)
        assert (cfg.model.family, cfg.model.arch, cfg.model.source) == ("repvgg", "A0", source)
        assert cfg.frontend.shape == {"input": [1, 3, 224, 224]} and cfg.backend.dtype == dtype
        assert cfg.frontend.checkpoint.name == f"{source}_repvgg_a0.onnx"
        if dtype == "int8":   # calibration sees the same preprocessing as the model's default
            assert Preprocessing.from_process_ops(cfg.dataset.process_ops) == \
                _preprocessing("A0", source)


# ---------------------------------------------------------------- through the real checkpoint reader

@pytest.mark.parametrize("source", repvgg.SOURCES)
def test_checkpoint_file_roundtrip(source, tmp_path):
    checkpoint = pytest.importorskip("tvmzoo.io.checkpoint")
    state = repvgg.random_state_dict(NARROW_SE, source, np.random.default_rng(9))
    suffix = ".pdparams" if source == "ppcls" else ".pth"
    loaded = checkpoint.load_state_dict(write_checkpoint(state, source, tmp_path / f"ckpt{suffix}"))
    checked, n = repvgg.check_state(loaded, NARROW_SE, source)
    assert n == 1000
    for k, v in repvgg.check_state(state, NARROW_SE, source)[0].items():
        np.testing.assert_array_equal(checked[k], v)
