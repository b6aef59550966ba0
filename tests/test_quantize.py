"""int8: calibration modes and cache, QDQ accuracy on a RepVGG-like net with weight outliers and
heavy-tailed activations (real photos), lower_int8 vs ONNX Runtime, the per-layer report, the fallback."""
from __future__ import annotations

import logging
import math
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest

from tvmzoo.compile.quant import quantize as tq
from tvmzoo.config import Quantize as QCfg
from tvmzoo.errors import ConfigError
from tvmzoo.io.onnx_graph import GraphBuilder
from tvmzoo.compile.quant.quant_report import layer_report, quantize_with_fallback, tensor_values, write_report
from tvmzoo.compile.passes.lower_int8 import int8_op_counts, lower_int8
from tvmzoo.compile.quant.quantize import excluded_nodes, mse_range, quantize_model, quantized_layers, run_ort

DATA = Path(__file__).parents[1].parent / "shared" / "data" / "imagenet-sample"
SIZE = 64
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


def _photos(first: int, count: int) -> list[np.ndarray]:
    if not DATA.is_dir():
        pytest.skip(f"no sample photos at {DATA}")
    batches = []
    for path in sorted(DATA.glob("*.JPEG"))[first:first + count]:
        bgr = cv2.imread(str(path))
        rgb = cv2.resize(bgr, (SIZE, SIZE), interpolation=cv2.INTER_LINEAR)[:, :, ::-1].astype(np.float32) / 255
        batches.append(((rgb - MEAN) / STD).transpose(2, 0, 1)[None].astype(np.float32))
    return batches


@pytest.fixture(scope="module")
def calib() -> list[np.ndarray]:
    return _photos(0, 16)


@pytest.fixture(scope="module")
def holdout() -> list[np.ndarray]:
    return _photos(250, 32)


GROUPS = (1, 2, 1, 1)  # conv1 is a grouped conv, as in RepVGG-B*g2


def _build(ws, bs, fc_w, fc_b) -> onnx.ModelProto:
    g = GraphBuilder("repvgg_like")
    x = g.input([1, 3, SIZE, SIZE])
    for k, (w, b) in enumerate(zip(ws, bs)):
        x = g.relu(g.conv(x, w, b, f"conv{k}", stride=2 if k in (0, 2) else 1, groups=GROUPS[k]))
    x = g.flatten(g.global_avg_pool(x))
    x = g.gemm(x, fc_w, fc_b, "fc")
    g.output(x, [1, fc_w.shape[0]])
    return g.build()


def repvgg_like(calib: list[np.ndarray], outlier: float = 300.0, seed: int = 0) -> onnx.ModelProto:
    """Deploy-form RepVGG-like net (conv3x3+ReLU x4, GAP, Gemm) with the two things that break int8:

    - weight outliers: per conv one output channel scaled by `outlier` (the next conv's input channel
      compensates), so one channel's weights dwarf the rest of the tensor;
    - heavy-tailed activations: that channel's bias puts the ReLU threshold at its 99.9th percentile on
      the photos, so it is zero almost everywhere and a rare, huge spike elsewhere.
    """
    rng = np.random.default_rng(seed)
    widths, cin = (16, 16, 32, 32), 3
    ws, bs = [], []
    for c, groups in zip(widths, GROUPS):
        per_group = cin // groups
        w = rng.normal(0, np.sqrt(2 / (per_group * 9)), (c, per_group, 3, 3)).astype(np.float32)
        w[:, :, 1, 1] += rng.normal(0, np.sqrt(2 / per_group), (c, per_group)).astype(np.float32) * 0.5  # 1x1
        if c == cin and len(ws) % 2:  # the identity branch
            w[np.arange(c), np.arange(c) % per_group, 1, 1] += rng.uniform(0.5, 1.5, c).astype(np.float32)
        ws.append(w)
        bs.append(rng.normal(0, 0.1, c).astype(np.float32))
        cin = c
    fc_w = rng.normal(0, 1, (10, cin)).astype(np.float32)
    fc_b = np.zeros(10, np.float32)
    for k in range(len(ws) - 1):
        z = tensor_values(_build(ws, bs, fc_w, fc_b), [f"conv{k}"], calib)[f"conv{k}"][:, k]
        ws[k][k] *= outlier
        bs[k][k] = outlier * (bs[k][k] - np.quantile(z, 0.999))
        out_per_group = ws[k + 1].shape[0] // GROUPS[k + 1]
        group, local = divmod(k, ws[k + 1].shape[1])  # input channel k of conv k+1
        ws[k + 1][group * out_per_group:(group + 1) * out_per_group, local] /= outlier
    # centre the logits on the photos so the top-1 class varies from image to image
    feat = tensor_values(_build(ws, bs, fc_w, fc_b), ["flatten"], calib)["flatten"]
    fc_w /= feat.std(0).mean()
    fc_b = -(feat.mean(0) @ fc_w.T).astype(np.float32)
    return _build(ws, bs, fc_w.astype(np.float32), fc_b)


@pytest.fixture(scope="module")
def model(calib) -> onnx.ModelProto:
    return repvgg_like(calib)


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_photos_pick_different_classes(model, holdout):
    logits = run_ort(model, holdout)
    assert len(set(logits.argmax(1))) >= 4  # otherwise top-1 agreement below would be meaningless


def test_per_channel_percentile_and_mse_keep_accuracy_per_tensor_max_does_not(model, calib, holdout):
    ref = run_ort(model, holdout)
    cos = {}
    for name, cfg in {"per-tensor max": QCfg(calibrate_mode="max", quantize_per_channel=False),
                      "per-channel max": QCfg(calibrate_mode="max"),
                      "per-channel percentile": QCfg(calibrate_mode="percentile"),
                      "per-channel mse": QCfg(calibrate_mode="mse")}.items():
        qdq = quantize_model(model, calib, cfg)
        assert quantized_layers(qdq) == ["conv0", "conv1", "conv2", "conv3", "fc"]
        cos[name] = float(_cos(ref, run_ort(qdq, holdout)).mean())
    assert cos["per-tensor max"] < 0.99, cos  # weight outliers: the other channels round to a few levels
    assert cos["per-channel percentile"] >= 0.99, cos
    # mse keeps most of the rare spikes (their squared error is large where they occur), so it clips less
    # than percentile here, but it still beats max clearly
    assert cos["per-channel mse"] > cos["per-channel max"] + 0.01, cos


def test_kl_mode_runs(model, calib, holdout):
    qdq = quantize_model(model, calib[:8], QCfg(calibrate_mode="kl"))
    assert _cos(run_ort(model, holdout[:8]), run_ort(qdq, holdout[:8])).mean() > 0.95


def test_mse_range_finds_the_least_squared_error_clip():
    x = np.abs(np.random.default_rng(1).standard_t(3, 200_000)).astype(np.float32)  # heavy-tailed, like ReLU outputs
    hist, edges = np.histogram(x, bins=2048, range=(-x.max(), x.max()))
    lo, hi = mse_range(hist, edges, 0.0, float(x.max()))

    def mse(lo_, hi_):
        s = (hi_ - lo_) / 255
        return float(np.mean((np.clip(np.round((x - lo_) / s), 0, 255) * s + lo_ - x) ** 2))

    best = min(mse(0.0, h) for h in np.geomspace(0.1, float(x.max()), 300))
    assert lo == 0.0 and hi < 0.9 * x.max()
    assert mse(lo, hi) <= 1.02 * best and mse(lo, hi) < 0.85 * mse(0.0, float(x.max()))


def test_calibration_cache_is_reused_and_invalidated(model, calib, tmp_path, caplog, monkeypatch):
    cache = tmp_path / "m" / "calib.json"
    first = quantize_model(model, calib[:4], QCfg(), cache)
    assert cache.is_file() and not list(cache.parent.glob("*.tmp"))
    stamp = cache.stat().st_mtime_ns

    def no_calibration(*args, **kwargs):
        raise AssertionError("recalibrated although nothing changed")

    monkeypatch.setattr(tq, "compute_ranges", no_calibration)
    with caplog.at_level(logging.INFO, logger="tvmzoo.compile.quant.quantize"):
        again = quantize_model(model, calib[:4], QCfg(quantize_per_channel=True, skip_layers=["conv1"]), cache)
    assert "reusing" in caplog.text and cache.stat().st_mtime_ns == stamp
    assert "conv1" not in quantized_layers(again) and "conv1" in quantized_layers(first)
    with pytest.raises(AssertionError, match="recalibrated"):  # other images: the cache is stale
        quantize_model(model, calib[4:8], QCfg(), cache)
    with pytest.raises(AssertionError, match="recalibrated"):  # other mode: stale too
        quantize_model(model, calib[:4], QCfg(calibrate_mode="max"), cache)


def test_calibration_logs_the_image_count(model, calib, caplog):
    with caplog.at_level(logging.INFO, logger="tvmzoo.compile.quant.quantize"):
        quantize_model(model, calib[:3], QCfg(calibrate_mode="max"))
    assert "on 3 images" in caplog.text


def test_skip_options_keep_layers_float(model, calib):
    cfg = QCfg(calibrate_mode="max", skip_matmul_layers=[1], keep_first_last_float=True)
    assert excluded_nodes(model, cfg) == ["conv1", "conv0", "fc"]
    assert quantized_layers(quantize_model(model, calib[:2], cfg)) == ["conv2", "conv3"]


@pytest.mark.parametrize("cfg, message", [
    (QCfg(skip_layers=["conv9"]), "skip_layers names 'conv9'"),
    (QCfg(skip_matmul_layers=[5]), "indices 0..4"),
    (QCfg(calibrate_mode="minmax"), "calibrate_mode 'minmax'"),
    (QCfg(percentile=0.9999), "percentile 0.9999 is out of range"),
])
def test_bad_settings_are_config_errors(model, calib, cfg, message):
    with pytest.raises(ConfigError, match=message):
        quantize_model(model, calib[:1], cfg)


def test_empty_calibration_set_is_a_config_error(model):
    with pytest.raises(ConfigError, match="calibration set is empty"):
        quantize_model(model, [], QCfg())


def test_lower_int8_runs_integer_kernels_and_matches_onnxruntime(model, calib, holdout):
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    # keep_first_last_float=False: the first conv sees the input's non-zero zero point (the correction term)
    qdq = quantize_model(model, calib, QCfg())
    mod = from_onnx(qdq, shape_dict={"input": [1, 3, SIZE, SIZE]}, keep_params_in_input=False)
    assert int8_op_counts(mod) == {"conv2d": 0, "matmul": 0, "float_conv2d": 4, "float_matmul": 1}
    lowered = lower_int8(mod)
    assert int8_op_counts(lowered) == {"conv2d": 4, "matmul": 1, "float_conv2d": 0, "float_matmul": 0}
    # the first conv pads its uint8 input with the zero point: its zp term is one int32 per channel
    tensors = []
    relax.analysis.post_order_visit(lowered["main"], lambda e: tensors.append(e.value.numpy()) if isinstance(
        e, tvm.ir.Constant) and hasattr(e.value, "numpy") else None)
    zp_terms = [t.shape for t in tensors if t.dtype == np.int32]
    assert zp_terms and all(shape[2:] in ((1, 1), ()) for shape in zp_terms), zp_terms
    assert "R.nn.pad(" in lowered.script(show_meta=False)
    vm = relax.VirtualMachine(tvm.compile(lowered, target=tvm.target.Target({"kind": "llvm"})), tvm.cpu())
    out = np.concatenate([vm["main"](tvm.runtime.tensor(b)).numpy() for b in holdout])
    ref = run_ort(qdq, holdout)
    assert _cos(ref, out).min() > 0.999
    assert np.mean(ref.argmax(1) == out.argmax(1)) >= 0.99
    assert _cos(run_ort(model, holdout), out).mean() >= 0.99


def test_layer_report_lists_every_quantized_layer(model, calib, tmp_path):
    qdq = quantize_model(model, calib[:4], QCfg())
    per_tensor = quantize_model(model, calib[:4], QCfg(quantize_per_channel=False))
    stats = layer_report(model, qdq, calib[:4], "percentile")
    assert [s.name for s in stats] == ["conv0", "conv1", "conv2", "conv3", "fc"]
    for s in stats:
        assert s.quantized and s.mode == "int8 per-channel, percentile"
        assert all(math.isfinite(v) for v in (s.weight_sqnr_db, s.act_sqnr_db, s.input_sqnr_db, *s.range))
        assert s.weight_sqnr_db > 30
    worse = {s.name: s.weight_sqnr_db for s in layer_report(model, per_tensor, calib[:4])}
    for s in stats[:3]:  # the outlier layers: per-tensor weights lose most of their precision
        assert worse[s.name] < s.weight_sqnr_db - 20
    write_report(stats, tmp_path / "r.csv", tmp_path / "r.md")
    assert len((tmp_path / "r.csv").read_text().splitlines()) == 1 + len(stats)
    assert "| conv2 | Conv | int8 per-channel, percentile |" in (tmp_path / "r.md").read_text()


def test_fallback_keeps_noisy_layers_float(model, calib, holdout, caplog):
    cfg = QCfg(calibrate_mode="max", quantize_per_channel=False, max_drop=20.0)
    ref = run_ort(model, holdout).argmax(1)
    before = np.mean(run_ort(quantize_model(model, calib[:8], cfg), holdout).argmax(1) != ref)
    assert before > 0.5  # per-tensor weights with outliers: most predictions change
    with caplog.at_level(logging.INFO, logger="tvmzoo"):
        qdq, kept = quantize_with_fallback(model, calib[:8], holdout, cfg)
    assert kept[0] == "conv0"  # the first layer fed by a clean input loses the most SQNR
    assert not set(kept) & set(quantized_layers(qdq)) and quantized_layers(qdq)
    assert np.mean(run_ort(qdq, holdout).argmax(1) != ref) <= 0.2
    assert "keeping conv0 in float" in caplog.text and f"fallback kept {len(kept)} layers" in caplog.text
    # without max_drop nothing is kept in float
    assert quantize_with_fallback(model, calib[:2], holdout[:2], replace(cfg, max_drop=None))[1] == []


def test_lower_int8_symbolic_batch_and_the_fold_constant_trap(model, calib, caplog):
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    qdq = quantize_model(model, calib[:2], QCfg())
    batch = tvm.tirx.Var("N", "int64")
    mod = from_onnx(qdq, shape_dict={"input": [batch, 3, SIZE, SIZE]}, keep_params_in_input=False)
    assert int8_op_counts(lower_int8(mod))["conv2d"] == 4
    folded = relax.transform.FoldConstant()(mod)  # folds dequantize(int8 weight) into float weights
    with caplog.at_level(logging.WARNING, logger="tvmzoo.compile.passes.lower_int8"):
        assert int8_op_counts(lower_int8(folded))["conv2d"] == 0
    assert "before FoldConstant" in caplog.text
