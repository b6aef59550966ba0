"""Issue 4's RepVGG bar on the real RepVGG code path: a RepVGG checkpoint (official layout, narrow custom
arch) whose re-parameterized kernels carry outliers, exported by tvmzoo, quantized on real photos.

- per-channel weights + percentile / MSE calibration keep cos(int8 logits, fp32 logits) >= 0.99, per-tensor
  weights + max calibration do not (ONNX Runtime on the QDQ model);
- the same int8 build through `vamc compile` (TVM, integer kernels) keeps the bar;
- `tvmzoo quant-report` lists every quantized layer, and per-tensor weights show on the outlier layers;
- `backend.quantize.max_drop` keeps layers in float and the compile log names them.
"""
from __future__ import annotations

import csv
import math
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml

from conftest import run_cli
from tvmzoo.config import Quantize as QCfg
from tvmzoo.models import repvgg
from tvmzoo.preprocess import Preprocessing, apply, read_image
from tvmzoo.compile.quant.quant_report import tensor_values
from tvmzoo.compile.quant.quantize import quantize_model, quantized_layers, run_ort

# Six convs: stem, stage1, stage2 (two blocks: the second has an identity branch), stages 3-4; 16..128 channels.
ARCH = repvgg.RepVGGArch((1, 2, 1, 1), (0.25, 0.25, 0.25, 0.25))
SIZE = 64
LAYERS = ["stage0", "stage1.0", "stage2.0", "stage2.1", "stage3.0", "stage4.0"]
PROCESS_OPS = [  # the YAML's preprocessing; the test applies the very same steps through tvmzoo.preprocess
    {"type": "DecodeImage", "to_rgb": True},
    {"type": "Resize", "size": [SIZE + 8, SIZE + 8]},
    {"type": "CenterCrop", "crop_size": [SIZE, SIZE]},
    {"type": "Normalize", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
    {"type": "ToTensor"},
]
N_CALIB = 16
STRENGTH = 30.0      # gamma multiplier of the identity / 1x1 BN on the outlier channels
PER_BLOCK = 2        # outlier channels per block
FIRING = 0.999       # an outlier channel is above its ReLU threshold on 0.1 % of its positions


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over images of the cosine between two logit vectors."""
    return float(np.mean((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)))


def outlier_checkpoint(calib: list[np.ndarray], seed: int = 0) -> dict[str, np.ndarray]:
    """A train-time RepVGG checkpoint (official layout) whose re-parameterized kernels carry outliers.

    Per block, PER_BLOCK output channels get their identity BN gamma (blocks with an identity branch) or
    their 1x1 BN gamma multiplied by STRENGTH: once folded, those rows of the deploy 3x3 kernel dwarf the
    others (issue 4: re-parameterized models grow weight outliers). Those channels fire rarely (their
    dense-branch BN shift puts the ReLU threshold at their FIRING quantile on the photos) and the consumer
    reads them with weights / STRENGTH: heavy-tailed activations, what percentile calibration is for. (Were
    they dense, no per-tensor activation range could serve them and every mode would fail: cos ~0.93.)
    The head is centred on the photos so that the logits' image-to-image variation, not a constant offset,
    decides the cosine.
    """
    lay = repvgg.LAYOUTS["official"]
    state = repvgg.random_state_dict(ARCH, "official", np.random.default_rng(seed))
    rng = np.random.default_rng(seed + 1)
    blocks = repvgg.blocks(ARCH)

    def deploy() -> onnx.ModelProto:
        return repvgg.deploy_onnx(state, ARCH, "official", size_hw=(SIZE, SIZE))

    for k, b in enumerate(blocks):
        p = lay.block_prefix(b.stage, b.index)
        ch = rng.choice(b.cout, PER_BLOCK, replace=False)
        branch = f"{p}.{lay.identity}" if b.has_identity else f"{p}.{lay.one}.{lay.bn}"
        state[f"{branch}.weight"][ch] *= STRENGTH
        pre_relu = tensor_values(deploy(), [p], calib)[p]  # the block's conv output (GraphBuilder names it p)
        for c in ch:
            state[f"{p}.{lay.dense}.{lay.bn}.bias"][c] -= np.quantile(pre_relu[:, c], FIRING)
        if k + 1 < len(blocks):
            nxt = blocks[k + 1]
            q = lay.block_prefix(nxt.stage, nxt.index)
            for br in (lay.dense, lay.one):
                state[f"{q}.{br}.conv.weight"][:, ch] /= STRENGTH
            if nxt.has_identity:
                state[f"{q}.{lay.identity}.weight"][ch] /= STRENGTH
        else:
            state[f"{lay.head}.weight"][:, ch] /= STRENGTH
    model = deploy()
    flat = next(n.output[0] for n in model.graph.node if n.op_type == "Flatten")
    feat = tensor_values(model, [flat], calib)[flat].astype(np.float64)
    w = state[f"{lay.head}.weight"].astype(np.float64) / feat.std(0).mean()
    state[f"{lay.head}.weight"] = w.astype(np.float32)
    state[f"{lay.head}.bias"] = (-(feat.mean(0) @ w.T)).astype(np.float32)
    return state


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def photo_paths(sample_images) -> tuple[list[Path], list[Path]]:
    """(calibration photos, held-out photos): disjoint, deterministic."""
    return sample_images[:N_CALIB], sample_images[250:282]


@pytest.fixture(scope="module")
def calib(photo_paths) -> list[np.ndarray]:
    pre = Preprocessing.from_process_ops(PROCESS_OPS)
    return [apply(pre, read_image(p))[None] for p in photo_paths[0]]


@pytest.fixture(scope="module")
def photos(photo_paths) -> np.ndarray:
    pre = Preprocessing.from_process_ops(PROCESS_OPS)
    return np.stack([apply(pre, read_image(p)) for p in photo_paths[1]])


@pytest.fixture(scope="module")
def model(calib) -> onnx.ModelProto:
    return repvgg.deploy_onnx(outlier_checkpoint(calib), ARCH, "official", size_hw=(SIZE, SIZE))


@pytest.fixture(scope="module")
def fp32_logits(model, photos) -> np.ndarray:
    return run_ort(model, [photos])


@pytest.fixture(scope="module")
def project(tmp_path_factory, model, photo_paths) -> Path:
    """The deploy ONNX, a folder of the calibration photos (symlinks) and an int8 build YAML."""
    root = tmp_path_factory.mktemp("int8_repvgg")
    onnx.save(model, str(root / "repvgg_outliers.onnx"))
    (root / "calib").mkdir()
    for p in photo_paths[0]:
        (root / "calib" / p.name).symlink_to(p)
    cfg = {
        "name": "repvgg_outliers_int8",
        "frontend": {"shape": {"input": [1, 3, SIZE, SIZE]}, "type": "onnx",
                     "checkpoint": str(root / "repvgg_outliers.onnx")},
        "backend": {"type": "tvm", "dtype": "int8",
                    "quantize": {"calibrate_mode": "percentile", "quantize_per_channel": True}},
        "dataset": {"path": str(root / "calib"), "sampler": {"suffix": "JPEG", "get_data_num": N_CALIB},
                    "process_ops": PROCESS_OPS},
        "workspace": {"path": str(root / "ws")},
    }
    (root / "build.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return root


PER_TENSOR_MAX = ("--set", "backend.quantize.quantize_per_channel=false",
                  "--set", "backend.quantize.calibrate_mode=max")


# ---------------------------------------------------------------- the checkpoint


def test_deploy_kernels_carry_outliers_and_photos_pick_many_classes(model, fp32_logits):
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    for name in LAYERS:
        row_max = np.abs(weights[f"{name}.weight"]).reshape(len(weights[f"{name}.weight"]), -1).max(1)
        assert row_max.max() > 10 * np.median(row_max), name  # a few rows dwarf the rest
    assert len(set(fp32_logits.argmax(1))) >= 10  # top-1 on 32 photos is not one constant class


# ---------------------------------------------------------------- ONNX Runtime on the QDQ models


def test_per_channel_percentile_and_mse_keep_cos_where_per_tensor_max_does_not(model, calib, photos, fp32_logits):
    configs = {"per-tensor max": QCfg(calibrate_mode="max", quantize_per_channel=False),
               "per-channel max": QCfg(calibrate_mode="max"),
               "per-channel percentile": QCfg(calibrate_mode="percentile"),
               "per-channel mse": QCfg(calibrate_mode="mse")}
    cos = {}
    for name, cfg in configs.items():
        qdq = quantize_model(model, calib, cfg)
        assert quantized_layers(qdq) == [*LAYERS, "linear"]
        cos[name] = _cos(fp32_logits, run_ort(qdq, [photos]))
    print("cos(int8, fp32) on 32 photos:", {k: round(v, 4) for k, v in cos.items()})
    assert cos["per-channel percentile"] >= 0.99, cos
    assert cos["per-channel mse"] >= 0.99, cos
    assert cos["per-tensor max"] < 0.99, cos
    assert cos["per-tensor max"] < cos["per-channel percentile"] - 0.2, cos  # a real gap, not a rounding matter


# ---------------------------------------------------------------- through the CLIs and TVM


def test_int8_build_through_tvm_keeps_cos(project, model, calib, photos, fp32_logits):
    from tvmzoo.run.runtime import CompiledModel

    proc = run_cli("vamc", "compile", project / "build.yaml")
    assert f"on {N_CALIB} images" in proc.stderr  # the log says how many calibration images were used
    assert f"lower_int8: {len(LAYERS)} conv2d and 1 matmul now run on int8" in proc.stderr  # integer kernels
    out = project / "ws" / "repvgg_outliers_int8"
    assert (out / "calib.json").is_file()
    compiled = CompiledModel.load(out / "mod")
    assert compiled.meta["precision"] == "int8"
    logits = compiled.run(photos)
    cos_fp32 = _cos(fp32_logits, logits)
    # the same QDQ model (same photos, same settings) on ONNX Runtime: TVM's integer kernels compute it
    cos_ort = _cos(run_ort(quantize_model(model, calib, QCfg(calibrate_mode="percentile")), [photos]), logits)
    print(f"TVM int8 (per-channel percentile): cos vs fp32 {cos_fp32:.4f}, vs ORT QDQ {cos_ort:.5f}")
    assert cos_fp32 >= 0.99
    assert cos_ort >= 0.999


def _report(project: Path, out: str, *overrides: str) -> list[dict[str, str]]:
    proc = run_cli("tvmzoo", "quant-report", project / "build.yaml", "--output", project / out, *overrides)
    assert f"wrote {project / out / 'quant_report.csv'}" in proc.stdout
    md = (project / out / "quant_report.md").read_text()
    assert all(f"| {name} | Conv |" in md for name in LAYERS)
    with open(project / out / "quant_report.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_quant_report_lists_every_layer_and_shows_per_tensor_loss(project):
    per_channel = _report(project, "report_pc")
    per_tensor = _report(project, "report_pt", *PER_TENSOR_MAX)
    for rows, mode in ((per_channel, "int8 per-channel, percentile"), (per_tensor, "int8 per-tensor, max")):
        assert [r["name"] for r in rows] == [*LAYERS, "linear"]
        for r in rows:
            assert r["quantized"] == "True" and r["mode"] == mode
            values = [float(r[k]) for k in ("weight_sqnr_db", "act_sqnr_db", "input_sqnr_db",
                                            "range_low", "range_high")]
            assert all(math.isfinite(v) for v in values), r
    pc = {r["name"]: float(r["weight_sqnr_db"]) for r in per_channel}
    pt = {r["name"]: float(r["weight_sqnr_db"]) for r in per_tensor}
    print("weight SQNR dB per-channel / per-tensor:", {n: (round(pc[n], 1), round(pt[n], 1)) for n in LAYERS})
    for name in LAYERS:  # every conv carries outlier rows: per-tensor scales leave the other rows few levels
        assert pt[name] < pc[name] - 10, (name, pc[name], pt[name])


def test_fallback_keeps_layers_float_and_says_which(project, photos, fp32_logits):
    from tvmzoo.run.runtime import CompiledModel

    name = "repvgg_outliers_fallback"
    proc = run_cli("vamc", "compile", project / "build.yaml", "--set", f"name={name}",
                   "--set", "backend.quantize.max_drop=1.0", *PER_TENSOR_MAX)
    found = re.search(r"accuracy fallback kept (\d+) layer\(s\) in float: (.*)", proc.stderr)
    assert found, proc.stderr
    kept = found.group(2).strip().split(", ")
    print("fallback kept in float:", kept)
    assert int(found.group(1)) == len(kept) >= 1
    assert set(kept) <= {*LAYERS, "linear"}, kept
    for layer in kept:  # each step names the layers it kept, worst SQNR loss first
        assert re.search(rf"keeping .*\b{re.escape(layer)}\b.* in float \(SQNR lost", proc.stderr), layer
    # per-tensor max alone gives cos ~0.57 here (see above); the layers kept in float bring the bar back
    logits = CompiledModel.load(project / "ws" / name / "mod").run(photos)
    cos = _cos(fp32_logits, logits)
    print(f"TVM int8 per-tensor max + fallback: cos vs fp32 {cos:.4f}")
    assert cos >= 0.99
