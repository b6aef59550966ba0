"""RegNetX: widths from the RegNet rule, checkpoint layouts (ppcls / pycls / torchvision files read by
tvmzoo.io.checkpoint), BN folding (deploy graph vs BatchNormalization graph on ONNX Runtime, and vs a torch
reference), checkpoint validation messages, preprocessing and build configs."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import rel_err, run_onnx, write_checkpoint
from tvmzoo.io.checkpoint import load_state_dict
from tvmzoo.errors import CheckpointError, ConfigError
from tvmzoo.models import get_family, regnet, resolve_arch, weights_for
from tvmzoo.preprocess import Preprocessing

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
SIZE = 32            # five stride-2 stages leave 1x1: the smallest input that runs every layer
MAX_REL_ERR = 1e-4
SMALL = ("200MF", "400MF", "600MF", "800MF", "1600MF", "3200MF")   # two photos; the larger archs get one


# ---------------------------------------------------------------- helpers

def _photos(size: int, count: int) -> np.ndarray:
    paths = sorted((DATA / "imagenet-sample").glob("*.JPEG"))[::125][:count]
    assert len(paths) == count, f"need the sample photos in {DATA / 'imagenet-sample'}"
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    batch = []
    for p in paths:
        img = cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB)
        img = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA) / 255.0
        batch.append(((img - mean) / std).transpose(2, 0, 1))
    return np.stack(batch).astype(np.float32)


@pytest.fixture(scope="module")
def photos() -> np.ndarray:
    """Two real photos, normalized NCHW float32 at SIZE x SIZE."""
    return _photos(SIZE, 2)


def roundtrip(state: dict[str, np.ndarray], source: str, tmp_path: Path) -> dict[str, np.ndarray]:
    path = write_checkpoint(state, source, tmp_path / ("ckpt.pdparams" if source == "ppcls" else "ckpt.pth"))
    try:
        return load_state_dict(path)
    finally:
        path.unlink()   # the large archs' files are hundreds of MB


# ---------------------------------------------------------------- the RegNet rule

def test_stage_widths_follow_each_implementation():
    # Widths and depths as pycls generate_regnet + adjust_block_compatibility compute them (also PaddleClas').
    assert [(s.width, s.depth, s.group_w) for s in regnet.stages("200MF")] == [
        (24, 1, 8), (56, 1, 8), (152, 4, 8), (368, 7, 8)]
    assert [s.width for s in regnet.stages("400MF")] == [32, 64, 160, 384]
    # torchvision's _make_divisible rounds 392 up to 400 (its regnet_x_400mf has 5,495,976 parameters): its own
    # arch 400MF_tv; for 4GF it would round 96 to 120 (torchvision has no 4GF); its other archs are pycls's
    assert [s.width for s in regnet.stages("400MF_tv")] == [32, 64, 160, 400]
    tv_4gf = dataclasses.replace(regnet.ARCHS["4GF"], make_divisible=True)
    assert [s.width for s in regnet.stages(tv_4gf)] == [120, 240, 560, 1360]
    for entry in regnet.WEIGHTS:
        if entry.source == "torchvision" and entry.arch != "400MF_tv":
            assert regnet.stages(dataclasses.replace(regnet.ARCHS[entry.arch], make_divisible=True)) == \
                regnet.stages(entry.arch)
    # group width capped by the stage width (8GF stage 1: 80 < 120)
    assert [s.group_w for s in regnet.stages("8GF")] == [80, 120, 120, 120]
    assert [s.depth for s in regnet.stages("32GF")] == [2, 7, 13, 1]
    for arch in regnet.ARCHS:
        assert sum(s.depth for s in regnet.stages(arch)) == regnet.ARCHS[arch].depth
        assert all(s.width % s.group_w == 0 for s in regnet.stages(arch))


@pytest.mark.parametrize("arch, published", [
    ("400MF_tv", 5495976), ("800MF", 7259656), ("1600MF", 9190136), ("3200MF", 15296552),
    ("8GF", 39572648), ("16GF", 54278536), ("32GF", 107811560)])
def test_train_param_count_equals_torchvision_num_params(arch, published):
    # torchvision/models/regnet.py RegNet_X_*_Weights meta["num_params"]
    assert regnet.param_count(arch, deploy=False, source="torchvision") == published


def test_deploy_param_count_drops_one_bn_scale_per_channel():
    channels = sum(int(np.prod(s)) for k, s in regnet.expected_shapes("200MF", "pycls").items()
                   if k.endswith("running_mean"))
    assert regnet.param_count("200MF", deploy=False) - regnet.param_count("200MF") == channels
    assert regnet.param_count("200MF", num_classes=10) == regnet.param_count("200MF") - 990 * 369


def test_arch_names():
    assert regnet.get_arch("RegNetX-1.6GF") is regnet.ARCHS["1600MF"]
    assert regnet.get_arch("regnetx_4.0gf") is regnet.ARCHS["4GF"]
    assert resolve_arch(get_family("regnet"), "RegNetX_400MF") == "400MF"
    assert regnet.arch_name("8GF") == "RegNetX-8GF"
    with pytest.raises(ConfigError, match="unknown RegNetX arch '300MF'"):
        regnet.get_arch("300MF")


# ---------------------------------------------------------------- BN folding, every arch and layout

@pytest.mark.parametrize("source", regnet.SOURCES)
@pytest.mark.parametrize("arch", [pytest.param(a, marks=pytest.mark.slow) if regnet.param_count(a) > 45e6 else a
                                  for a in regnet.ARCHS])
def test_bn_folding_is_exact(arch, source, photos, tmp_path):
    x = photos if arch in SMALL else photos[:1]
    state = regnet.random_state_dict(arch, source, np.random.default_rng(0))
    loaded = roundtrip(state, source, tmp_path)
    for key, value in state.items():
        if not key.endswith("num_batches_tracked"):
            np.testing.assert_array_equal(loaded[key], value)

    deploy = regnet.deploy_onnx(loaded, arch, source, size_hw=(SIZE, SIZE))
    assert [i.name for i in deploy.graph.input] == ["input"]
    assert [o.name for o in deploy.graph.output] == ["output"]
    assert deploy.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    assert not any(n.op_type == "BatchNormalization" for n in deploy.graph.node)
    bl = regnet.blocks(arch)
    assert sum(n.op_type == "Conv" for n in deploy.graph.node) == 1 + 3 * len(bl) + sum(b.has_proj for b in bl)
    groups = [a.i for n in deploy.graph.node if n.op_type == "Conv" for a in n.attribute if a.name == "group"]
    assert max(groups) == max(b.groups for b in bl) > 1

    unfolded = regnet.unfolded_onnx(loaded, arch, source, size_hw=(SIZE, SIZE), batch=len(x))
    ref = run_onnx(unfolded, x)
    out = run_onnx(deploy, x)
    assert out.shape == (len(x), 1000)
    assert np.abs(ref).max() > 1e-2 and ref.std(axis=1).min() > 1e-3      # not a degenerate net
    assert rel_err(out, ref) < MAX_REL_ERR


# ---------------------------------------------------------------- the graphs vs torch

def _torch_forward(state: dict[str, np.ndarray], arch: str, x: np.ndarray) -> np.ndarray:
    """RegNetX in eval mode with torch.nn.functional, pycls key names (pycls AnyNet / ResBottleneckBlock)."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    t = {k: torch.from_numpy(v) for k, v in state.items() if v.dtype == np.float32}

    def conv_bn(y, conv, bn, stride=1, groups=1):
        w = t[f"{conv}.weight"]
        y = F.conv2d(y, w, stride=stride, padding=w.shape[-1] // 2, groups=groups)
        return F.batch_norm(y, t[f"{bn}.running_mean"], t[f"{bn}.running_var"], t[f"{bn}.weight"],
                            t[f"{bn}.bias"], training=False, eps=1e-5)

    y = F.relu(conv_bn(torch.from_numpy(x), "stem.conv", "stem.bn", stride=2))
    for b in regnet.blocks(arch):
        p = f"s{b.stage}.b{b.index + 1}"
        f = F.relu(conv_bn(y, f"{p}.f.a", f"{p}.f.a_bn"))
        f = F.relu(conv_bn(f, f"{p}.f.b", f"{p}.f.b_bn", stride=b.stride, groups=b.cout // b.group_w))
        f = conv_bn(f, f"{p}.f.c", f"{p}.f.c_bn")
        short = conv_bn(y, f"{p}.proj", f"{p}.bn", stride=b.stride) if b.has_proj else y
        y = F.relu(short + f)
    return F.linear(y.mean(dim=(2, 3)), t["head.fc.weight"], t["head.fc.bias"]).numpy()


@pytest.mark.parametrize("arch", ["200MF", "800MF"])
def test_graphs_match_torch(arch):
    x = _photos(64, 2)
    state = regnet.random_state_dict(arch, "pycls", np.random.default_rng(1))
    ref = _torch_forward(state, arch, x)
    assert rel_err(run_onnx(regnet.unfolded_onnx(state, arch, "pycls", size_hw=(64, 64)), x), ref) < MAX_REL_ERR
    assert rel_err(run_onnx(regnet.deploy_onnx(state, arch, "pycls", size_hw=(64, 64)), x), ref) < MAX_REL_ERR


def _rename(state: dict[str, np.ndarray], arch: str, old: str, new: str) -> dict[str, np.ndarray]:
    """`state` (in `old`'s layout) under `new`'s key names: both tables list the same tensors in the same
    order (stem, then per block proj, a, b, c, then the head); paddle's Linear is transposed."""
    out = {}
    for a, b in zip(regnet.expected_shapes(arch, old), regnet.expected_shapes(arch, new)):
        flip = regnet.LAYOUTS[old].head_transposed != regnet.LAYOUTS[new].head_transposed
        out[b] = state[a].T if flip and a.endswith(f"{regnet.LAYOUTS[old].head}.weight") else state[a]
    return out


def test_layouts_give_the_same_network(photos):
    """The same weights under pycls and ppcls names give the same logits."""
    pycls = regnet.random_state_dict("600MF", "pycls", np.random.default_rng(2))
    ppcls = _rename(pycls, "600MF", "pycls", "ppcls")
    assert ppcls["out.weight"].shape == (528, 1000) and "s2_b3.conv1._batch_norm._variance" in ppcls
    a = run_onnx(regnet.deploy_onnx(pycls, "600MF", "pycls", size_hw=(SIZE, SIZE)), photos)
    b = run_onnx(regnet.deploy_onnx(ppcls, "600MF", "ppcls", size_hw=(SIZE, SIZE)), photos)
    np.testing.assert_array_equal(a, b)


def test_torchvision_model_cross_check(photos):
    try:  # repvgg-pytorch (a test extra) brings PyPI's torchvision, which does not load beside torch 2.13.0's CPU wheel
        import torchvision
    except (ImportError, RuntimeError) as exc:
        pytest.skip(f"torchvision does not import with this torch ({type(exc).__name__}: {str(exc)[:80]})")
    import torch
    state = regnet.random_state_dict("400MF_tv", "torchvision", np.random.default_rng(3))
    model = torchvision.models.regnet_x_400mf().eval()
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
    with torch.no_grad():
        ref = model(torch.from_numpy(photos)).numpy()
    assert rel_err(run_onnx(regnet.deploy_onnx(state, "400MF_tv", "torchvision", size_hw=(SIZE, SIZE)), photos),
                   ref) < MAX_REL_ERR


def test_pycls_pyth_checkpoint(tmp_path, photos):
    """A pycls .pyth: torch.save({'epoch', 'model_state', 'optimizer_state', 'cfg'}) (pycls/core/checkpoint.py)."""
    torch = pytest.importorskip("torch")
    state = regnet.random_state_dict("200MF", "pycls", np.random.default_rng(4))
    tensors = {k: torch.from_numpy(v) for k, v in state.items()}
    optimizer = {"state": {0: {"momentum_buffer": torch.zeros(3)}},
                 "param_groups": [{"lr": 0.8, "momentum": 0.9, "params": [0]}]}
    path = tmp_path / "RegNetX-200MF_dds_8gpu.pyth"
    torch.save({"epoch": 99, "model_state": tensors, "optimizer_state": optimizer,
                "cfg": "MODEL:\n  TYPE: regnet\n"}, path)
    loaded = load_state_dict(path)
    ref = run_onnx(regnet.unfolded_onnx(state, "200MF", "pycls", size_hw=(SIZE, SIZE)), photos)
    assert rel_err(run_onnx(regnet.deploy_onnx(loaded, "200MF", "pycls", size_hw=(SIZE, SIZE)), photos),
                   ref) < MAX_REL_ERR


# ---------------------------------------------------------------- checkpoint validation

@pytest.fixture(scope="module")
def x400() -> dict[str, np.ndarray]:
    return regnet.random_state_dict("400MF", "pycls", np.random.default_rng(6))


def test_wrong_arch_names_the_key_and_the_right_arch(x400):
    with pytest.raises(CheckpointError) as e:
        regnet.deploy_onnx(x400, "600MF", "pycls")
    msg = str(e.value)
    assert "RegNetX-600MF (pycls layout)" in msg
    assert "key 's1.b1.proj.weight' has shape [32, 32, 1, 1], expected [48, 32, 1, 1]" in msg
    assert "looks like RegNetX-400MF in the pycls layout" in msg


def test_torchvision_400mf_is_not_pycls_400mf(x400):
    tv = regnet.random_state_dict("400MF_tv", "torchvision", np.random.default_rng(7))
    assert regnet.guess_arch(tv) == ("400MF_tv", "torchvision")
    # pycls 400MF weights renamed to torchvision's keys do not fit torchvision's 400MF (384 vs 400 channels)
    with pytest.raises(CheckpointError, match=r"RegNetX-400MF_tv \(torchvision layout\): key "
                                              r"'trunk_output\.block4\.block4-0\.proj\.0\.weight' has shape "
                                              r"\[384, 160, 1, 1\], expected \[400, 160, 1, 1\]"):
        regnet.check_state(_rename(x400, "400MF", "pycls", "torchvision"), "400MF_tv", "torchvision")
    # and torchvision's 400MF under the pycls arch name says which arch it is
    with pytest.raises(CheckpointError, match=r"looks like RegNetX-400MF_tv in the torchvision layout"):
        regnet.check_state(tv, "400MF", "torchvision")


def test_wrong_source_is_named(x400):
    with pytest.raises(CheckpointError, match=r"classifier weight 'fc\.weight' is missing.*"
                                              r"looks like RegNetX-400MF in the pycls layout"):
        regnet.check_state(x400, "400MF", "torchvision")


# ---------------------------------------------------------------- preprocessing and build configs

def test_weights_entries_preprocessing():
    pp = weights_for("regnet", "400MF", "ppcls").preprocessing
    assert (pp.resize_hw, pp.keep_aspect, pp.crop_hw, pp.interpolation, pp.rgb) == ((256, 256), True, (256, 256),
                                                                               "BILINEAR_CV", True)
    py = weights_for("regnet", "400MF", "pycls").preprocessing
    assert (py.crop_hw, py.rgb, py.mean, py.std) == ((224, 224), False, (0.406, 0.456, 0.485), (0.225, 0.224, 0.229))
    tv = weights_for("regnet", "32GF", "torchvision").preprocessing     # no tag: torchvision's v1
    assert (tv.resize_hw, tv.crop_hw, tv.interpolation, tv.rgb) == ((256, 256), (224, 224), "BILINEAR_PILLOW", True)
    tv2 = weights_for("regnet", "32GF", "torchvision.v2")
    assert tv2.preprocessing == dataclasses.replace(tv, resize_hw=(232, 232)) and tv2.top1 == 83.014


def _vdsp_cases():   # the vdsp JSONs: one per published (source, arch), torchvision's v1 transform
    return [(w.source, w.arch) for w in regnet.WEIGHTS if w.tag in ("", "v1")]


@pytest.mark.parametrize("source, arch", _vdsp_cases())
def test_vdsp_params(source, arch):
    name = arch.lower().removesuffix("_tv")
    path = REPO / "build_in" / "vdsp_params" / f"{source}-regnetx_{name}-vdsp_params.json"
    cfg = json.loads(path.read_text())["OpConfig"]
    want = weights_for("regnet", arch, source).preprocessing
    assert cfg["Mean"] == [float(np.float16(m)) for m in want.mean]     # the vendor files' fp16 rounding
    assert cfg["Std"] == [float(np.float16(s)) for s in want.std]
    got = Preprocessing.from_vdsp(path)
    assert got == Preprocessing(**{**want.__dict__, "mean": got.mean, "std": got.std})


@pytest.mark.parametrize("source", regnet.SOURCES)
def test_build_yaml(source):
    from tvmzoo.config import load_build_config
    cfg = load_build_config(REPO / "build_in" / "build" / f"{source}_regnet.yaml")
    assert (cfg.model.family, cfg.model.source) == ("regnet", source)
    pre = weights_for("regnet", cfg.model.arch, source).preprocessing
    assert cfg.dataset.preprocessing == pre
    assert cfg.frontend.shape == {"input": [1, 3, *pre.crop_hw]}
    assert cfg.backend.dtype == "int8"
