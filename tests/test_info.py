"""tvmzoo.models.info: parameters, multiply-adds and layer counts from a deploy ONNX, against hand counts on a
small graph and against the published tables of RepVGG, RegNetX and EfficientNet-Lite."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from tvmzoo.config.model_info import info_for
from tvmzoo.errors import ConfigError
from tvmzoo.models.info import ModelInfo, family_info, model_info
from tvmzoo.models import regnet, repvgg
from tvmzoo.io.onnx_graph import GraphBuilder

REPO = Path(__file__).resolve().parents[1]

# pycls MODEL_ZOO.md, RegNetX table: (params M, flops B); pycls's "flops" are multiply-adds at 224x224
# (pycls/models/blocks.py conv2d_cx counts k*k*w_in*w_out*h*w/groups). PaddleClas' RegNet.md repeats them
# (with 22.2 / 39.7 / 46.2 / 54.4 M for 4GF / 8GF / 12GF / 16GF, within the same tolerance).
PYCLS_TABLE = {
    "200MF": (2.7, 0.2), "400MF": (5.2, 0.4), "600MF": (6.2, 0.6), "800MF": (7.3, 0.8),
    "1600MF": (9.2, 1.6), "3200MF": (15.3, 3.2), "4GF": (22.1, 4.0), "6400MF": (26.2, 6.5),
    "8GF": (39.6, 8.0), "12GF": (46.1, 12.1), "16GF": (54.3, 15.9), "32GF": (107.8, 31.7),
}


# ---------------------------------------------------------------- counting rules on a hand-made graph

def _small_graph(symbolic: bool = False) -> onnx.ModelProto:
    """conv 3->8 3x3/2 (bias) -> grouped conv 8->8 3x3 groups 4 (no bias) -> GAP -> Flatten -> Gemm 8->5
    -> MatMul 5->4 (weight only), on a 3x20x20 input."""
    rng = np.random.default_rng(0)
    g = GraphBuilder("small")
    x = g.input(["N", 3, "H", "W"] if symbolic else ["N", 3, 20, 20])
    x = g.relu(g.conv(x, rng.normal(size=(8, 3, 3, 3)), np.zeros(8), "c1", stride=2))
    x = g.conv(x, rng.normal(size=(8, 2, 3, 3)), None, "c2", groups=4)
    x = g.gemm(g.flatten(g.global_avg_pool(x)), rng.normal(size=(5, 8)), np.zeros(5), "fc")
    x = g.op("MatMul", [x, g.const(rng.normal(size=(5, 4)).astype(np.float32), "mm")])
    g.output(x, ["N", 4])
    return g.build()


def test_counts_on_a_small_graph():
    info = model_info(_small_graph())
    # params: c1 8*3*9 + 8, c2 8*2*9, fc 5*8 + 5, mm 5*4
    assert info.params_deploy == 216 + 8 + 144 + 45 + 20
    # MACs: c1 out 8x10x10, 27 each; c2 out 8x10x10, 2*9 each; fc 5*8; mm 4*5
    assert info.macs == 800 * 27 + 800 * 18 + 40 + 20
    assert (info.conv_layers, info.gemm_layers, info.input_shape) == (2, 2, (3, 20, 20))
    assert info.params_train is None


def test_symbolic_input_needs_a_size():
    with pytest.raises(ConfigError, match="symbolic size"):
        model_info(_small_graph(symbolic=True))
    assert model_info(_small_graph(symbolic=True), size_hw=(20, 20)) == model_info(_small_graph())
    assert model_info(_small_graph(symbolic=True), size_hw=(40, 40)).macs == 4 * (800 * 45) + 60


def test_text_format():
    info = ModelInfo(params_deploy=8_309_384, macs=1_361_451_008, input_shape=(3, 224, 224), conv_layers=22,
                     gemm_layers=1, params_train=9_109_736, name="repvgg A0")
    assert info.text().splitlines() == [
        "model: repvgg A0", "parameters (deploy): 8.31 M", "parameters (train): 9.11 M",
        "multiply-adds: 1.36 G", "input: 3x224x224", "layers: 22 conv, 1 gemm"]


# ---------------------------------------------------------------- against the published tables

def test_repvgg_a0():
    info = family_info("repvgg", "A0")
    # mmpretrain RepVGG model zoo: 9.11 (train) | 8.31 (deploy) M params, 1.52 (train) | 1.36 (deploy) G
    # "Flops" (mmcv counts multiply-adds; 1.52 G is the three-branch train graph, 1.36 G the deploy graph)
    assert abs(info.params_deploy - 8.31e6) < 0.01e6
    assert abs(info.params_train - 9.11e6) < 0.01e6
    assert info.params_deploy == repvgg.param_count("A0")
    assert abs(info.macs / 1.36e9 - 1) < 0.03
    assert (info.conv_layers, info.gemm_layers, info.input_shape) == (22, 1, (3, 224, 224))
    lines = info.text().splitlines()
    assert "parameters (deploy): 8.31 M" in lines and "multiply-adds: 1.36 G" in lines
    assert "layers: 22 conv, 1 gemm" in lines


@pytest.mark.parametrize("arch", [pytest.param(a, marks=pytest.mark.slow) if regnet.param_count(a) > 45e6 else a
                                  for a in PYCLS_TABLE])
def test_regnetx_vs_pycls_model_zoo(arch):
    params_m, gmacs = PYCLS_TABLE[arch]
    info = family_info("regnet", arch)               # the reference source (pycls) at its 224 input
    assert info.input_shape == (3, 224, 224)
    assert abs(info.params_train - params_m * 1e6) <= max(0.05e6, 0.01 * params_m * 1e6)
    assert abs(info.macs / (gmacs * 1e9) - 1) < 0.03
    assert info.params_deploy == regnet.param_count(arch)
    blocks = regnet.blocks(arch)
    assert info.conv_layers == 1 + 3 * len(blocks) + len(regnet.stages(arch)) and info.gemm_layers == 1


def test_regnetx_400mf_torchvision_and_ppcls():
    tv = family_info("regnet", "400MF_tv", source="torchvision")
    assert tv.params_train == 5_495_976          # torchvision RegNet_X_400MF_Weights meta["num_params"]
    assert abs(tv.macs / 0.4e9 - 1) < 0.05       # its "_ops": 0.4 (one decimal)
    pp = family_info("regnet", "400MF", source="ppcls")
    assert pp.input_shape == (3, 256, 256)       # PaddleClas evaluates at 256
    assert pp.params_train == family_info("regnet", "400MF").params_train
    assert family_info("regnet", "400MF", source="ppcls", size_hw=(224, 224)).macs == \
        family_info("regnet", "400MF").macs


def test_efficientnet_lite0():
    info = family_info("efficientnet_lite", "lite0")
    assert abs(info.params_train - 4.65e6) < 0.01e6      # 4,652,008 (timm / the PyTorch port)
    # conv + FC multiply-adds 0.385 G; the TF lite README says 407M "MAdds", 5% more, counted by its own
    # profiler on the TF graph, so the check is against the conv + FC figure.
    assert abs(info.macs / 0.39e9 - 1) < 0.03
    assert info.input_shape == (3, 224, 224) and info.gemm_layers == 1


# ---------------------------------------------------------------- info_for

def test_info_for_family_targets():
    assert info_for("repvgg:A0").params_deploy == repvgg.param_count("A0")
    assert info_for("regnet:RegNetX-400MF_tv:torchvision").params_train == 5_495_976
    assert info_for("regnet:800MF:torchvision.v2").input_shape == (3, 224, 224)
    for bad in ("repvgg", "repvgg:A0:official:x", ":A0"):
        with pytest.raises(ConfigError, match="neither a build YAML nor family:arch"):
            info_for(bad)
    with pytest.raises(ConfigError, match="unknown model family 'resnet'"):
        info_for("resnet:50")


def _yaml(tmp_path: Path, checkpoint: Path, model: bool = True) -> Path:
    text = (REPO / "build_in" / "build" / "ppcls_regnet.yaml").read_text()
    text = text.replace("./workspace/onnx/ppcls_regnetx_400mf.onnx", str(checkpoint))
    if not model:
        start = text.index("model:")
        text = text[:start] + text[text.index("frontend:"):]
    path = tmp_path / "build.yaml"
    path.write_text(text)
    return path


def test_info_for_yaml_without_onnx_uses_the_model_section(tmp_path):
    info = info_for(str(_yaml(tmp_path, tmp_path / "missing.onnx")))
    assert info.name == "ppcls_regnetx_400mf_int8"
    assert info.input_shape == (3, 256, 256)                    # frontend.shape
    assert info.params_train == regnet.param_count("400MF", deploy=False, source="ppcls")
    with pytest.raises(ConfigError, match="does not exist and there is no model: section"):
        info_for(str(_yaml(tmp_path, tmp_path / "missing.onnx", model=False)))


def test_info_for_yaml_with_onnx_counts_the_file(tmp_path):
    state = regnet.random_state_dict("400MF", "ppcls", np.random.default_rng(1), num_classes=10)
    onnx_path = tmp_path / "ppcls_regnetx_400mf.onnx"
    onnx.save(regnet.deploy_onnx(state, "400MF", "ppcls"), str(onnx_path))   # symbolic batch, 224
    info = info_for(str(_yaml(tmp_path, onnx_path)))
    # the file's weights (10 classes); frontend.shape gives the size for counting
    assert info.params_deploy == regnet.param_count("400MF", num_classes=10, source="ppcls")
    assert info.params_train == regnet.param_count("400MF", num_classes=10, deploy=False, source="ppcls")
    assert info.input_shape == (3, 256, 256)
    assert info_for(str(_yaml(tmp_path, onnx_path, model=False))).params_train is None
