"""int8: calibration (ranges cached per model + data + mode), ONNX Runtime QDQ quantization,
an accuracy-aware fallback, and `lower_int8`, the Relax pass that turns the imported QDQ pattern
into integer convolutions / matmuls (uint8 x int8 -> int32).

Activations are uint8 (asymmetric; ReLU outputs get zero point 0), weights int8 symmetric:
that is what ONNX Runtime fuses to QLinearConv and what VNNI / AMX multiply natively (u8 x s8).
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from tqdm import tqdm

from ...io.atomic import write_text
from ...config import CALIBRATE_MODES, PERCENTILE_RANGE
from ...errors import ConfigError

log = logging.getLogger(__name__)

LAYER_OPS = ("Conv", "Gemm", "MatMul")  # the vendor's "matmul layers": what skip_matmul_layers indexes
CACHE_VERSION = 1
_HIST_BINS = 2048
_CHUNK = 16  # calibration batches per ORT collect call when calibrate_chunk_by is -1


# ---------------------------------------------------------------------------------------------
# calibration data
# ---------------------------------------------------------------------------------------------

def _as_batches(calib: Iterable[np.ndarray]) -> list[np.ndarray]:
    batches = []
    for i, b in enumerate(calib):
        b = np.asarray(b)
        if b.ndim != 4 or not np.issubdtype(b.dtype, np.floating):
            raise ConfigError(f"calibration batch {i} has shape {b.shape} and dtype {b.dtype}; expected a float "
                              "NCHW batch from the preprocessing. Check dataset.process_ops.")
        batches.append(np.ascontiguousarray(b, dtype=np.float32))
    if not batches:
        raise ConfigError("the calibration set is empty: int8 needs calibration images. Point dataset.path at a "
                          "folder of images and check dataset.sampler (suffix, get_data_num).")
    return batches


def _data_digest(batches: Sequence[np.ndarray]) -> str:
    h = hashlib.sha256()
    for b in batches:
        h.update(str(b.shape).encode())
        h.update(b.tobytes())
    return h.hexdigest()


class _Reader:
    """An ONNX Runtime CalibrationDataReader over in-memory batches, with a progress bar."""

    def __init__(self, input_name: str, batches: Sequence[np.ndarray], bar: tqdm) -> None:
        self._items = iter(batches)
        self._name = input_name
        self._bar = bar

    def get_next(self) -> dict[str, np.ndarray] | None:
        b = next(self._items, None)
        if b is None:
            return None
        self._bar.update(len(b))
        return {self._name: b}


def _input_name(model: onnx.ModelProto) -> str:
    inits = {t.name for t in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in inits]
    if len(names) != 1:
        raise ConfigError(f"int8 calibration supports models with one input; this model has {names}.")
    return names[0]


@contextlib.contextmanager
def _quiet_ort() -> Iterator[None]:
    """ORT's quantization tools print progress and warn about pre-processing on the root logger."""
    class _Drop(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            if "onnxruntime" in record.pathname and record.levelno < logging.WARNING:
                return False  # e.g. one "Increased scale[i] for weight ..." line per channel
            return "pre-processing" not in record.getMessage()

    root, drop = logging.getLogger(), _Drop()
    root.addFilter(drop)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.removeFilter(drop)


# ---------------------------------------------------------------------------------------------
# ranges
# ---------------------------------------------------------------------------------------------

def mse_range(hist: np.ndarray, edges: np.ndarray, lo: float, hi: float, levels: int = 255,
              steps: int = 128) -> tuple[float, float]:
    """The clip range [a*lo, a*hi] (a in (0, 1]) minimizing the expected uint8 quantization MSE of the
    histogram: clipping error of values outside plus step**2/12 rounding error of values inside."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if hi - lo <= 0 or hist.sum() == 0:
        return lo, hi
    centres = (edges[:-1] + edges[1:]).astype(np.float64) / 2
    hist = hist.astype(np.float64)
    a = np.geomspace(1.0 / 256, 1.0, steps)  # clips down to 1/256 of the range: 8 histogram bins
    l, h = a * lo, a * hi
    clipped = np.clip(centres[None, :], l[:, None], h[:, None])
    inside = (centres[None, :] >= l[:, None]) & (centres[None, :] <= h[:, None])
    step = (h - l) / levels
    err = ((clipped - centres) ** 2) @ hist + (inside @ hist) * step ** 2 / 12
    best = int(np.argmin(err))
    return float(l[best]), float(h[best])


def _calibrator(model_path: Path, mode: str, qcfg: Any, tmp: Path):
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator

    method, extra = {
        "max": (CalibrationMethod.MinMax, {}),
        "percentile": (CalibrationMethod.Percentile,
                       {"percentile": _percentile(qcfg), "symmetric": False,
                        "num_bins": _HIST_BINS}),
        # ORT's default 128 bins leave the KL search a single candidate (the full range)
        "kl": (CalibrationMethod.Entropy, {"num_bins": _HIST_BINS, "num_quantized_bins": 128}),
        # mse: ORT's percentile calibrater only to collect the signed histograms, ranges are ours
        "mse": (CalibrationMethod.Percentile, {"symmetric": False, "num_bins": _HIST_BINS}),
    }[mode]
    return create_calibrator(model_path, None, augmented_model_path=str(tmp / "augmented.onnx"),
                             calibrate_method=method, extra_options=extra)


def compute_ranges(model: onnx.ModelProto, batches: Sequence[np.ndarray], qcfg: Any) -> dict[str, list[float]]:
    """Calibrate every float tensor of `model` on `batches`: {tensor name: [low, high]}."""
    mode = _mode(qcfg)
    n_images = sum(len(b) for b in batches)
    # ORT keeps every intermediate tensor of a collect_data call in memory: feed it bounded chunks
    chunk = int(getattr(qcfg, "calibrate_chunk_by", -1) or -1)
    chunk = chunk if chunk > 0 else _CHUNK
    chunks = [batches[i:i + chunk] for i in range(0, len(batches), chunk)]
    with tempfile.TemporaryDirectory(prefix="tvmzoo-calib-") as d, _quiet_ort():
        tmp = Path(d)
        onnx.save(model, str(tmp / "model.onnx"))
        calibrator = _calibrator(tmp / "model.onnx", mode, qcfg, tmp)
        with tqdm(total=n_images, desc=f"calibrating ({mode})", unit="img", leave=False) as bar:
            for part in chunks:
                calibrator.collect_data(_Reader(_input_name(model), part, bar))
        if mode == "mse":
            hists = calibrator.collector.get_histogram_dict()
            ranges = {k: mse_range(h[0], h[1], float(h[2]), float(h[3])) for k, h in hists.items()}
        else:
            ranges = {k: (float(np.min(t.range_value[0])), float(np.max(t.range_value[1])))
                      for k, t in calibrator.compute_data().items()}
    log.info("calibrated %d tensors on %d images (%s)", len(ranges), n_images, mode)
    return {k: [float(lo), float(hi)] for k, (lo, hi) in ranges.items()}


def _mode(qcfg: Any) -> str:
    mode = str(qcfg.calibrate_mode).lower()
    if mode not in CALIBRATE_MODES:
        raise ConfigError(f"backend.quantize.calibrate_mode '{qcfg.calibrate_mode}' is not one of "
                          f"{', '.join(CALIBRATE_MODES)}.")
    return mode


def _percentile(qcfg: Any) -> float:
    p = getattr(qcfg, "percentile", None)
    p = 99.99 if p is None else float(p)
    if not PERCENTILE_RANGE[0] < p <= PERCENTILE_RANGE[1]:
        raise ConfigError(f"backend.quantize.percentile {p} is out of range: give the share of values kept, "
                          "in percent, e.g. 99.99.")
    return p


def _cache_key(model: onnx.ModelProto, digest: str, qcfg: Any) -> str:
    # Only what the ranges depend on: skip lists and per-channel change the quantizer, not the ranges.
    settings = {"version": CACHE_VERSION, "mode": _mode(qcfg),
                "percentile": _percentile(qcfg),
                "chunk": int(getattr(qcfg, "calibrate_chunk_by", -1) or -1)}
    h = hashlib.sha256(model.SerializeToString(deterministic=True))
    h.update(digest.encode())
    h.update(json.dumps(settings, sort_keys=True).encode())
    return h.hexdigest()


def calibration_ranges(model: onnx.ModelProto, batches: Sequence[np.ndarray], qcfg: Any,
                       cache_path: Path | None = None) -> dict[str, list[float]]:
    """Ranges from the cache at `cache_path` when model, data and calibration settings are unchanged,
    else freshly computed (and cached)."""
    n_images = sum(len(b) for b in batches)
    key = _cache_key(model, _data_digest(batches), qcfg)
    if cache_path is not None and Path(cache_path).is_file():
        try:
            cached = json.loads(Path(cache_path).read_text())
        except (OSError, ValueError):
            cached = {}
        if cached.get("key") == key:
            log.info("calibration cache %s is up to date (%s, %d images): reusing it",
                     cache_path, cached.get("mode"), cached.get("images", 0))
            return cached["ranges"]
        log.info("calibration cache %s is stale (model, images or settings changed): recalibrating", cache_path)
    log.info("calibrating on %d images (%s)", n_images, _mode(qcfg))
    ranges = compute_ranges(model, batches, qcfg)
    if cache_path is not None:
        write_text(cache_path, json.dumps({"key": key, "mode": _mode(qcfg), "images": n_images,
                                           "ranges": ranges}, indent=1, sort_keys=True) + "\n")
    return ranges


# ---------------------------------------------------------------------------------------------
# QDQ model
# ---------------------------------------------------------------------------------------------

def _named(model: onnx.ModelProto) -> onnx.ModelProto:
    """nodes_to_exclude works by node name: give unnamed nodes a stable one."""
    if all(n.name for n in model.graph.node):
        return model
    model = onnx.ModelProto.FromString(model.SerializeToString())
    for i, n in enumerate(model.graph.node):
        if not n.name:
            n.name = f"{n.op_type}_{i}"
    return model


def layer_names(model: onnx.ModelProto) -> list[str]:
    """Conv / Gemm / MatMul node names in graph order: what skip_matmul_layers indexes."""
    return [n.name for n in model.graph.node if n.op_type in LAYER_OPS]


def excluded_nodes(model: onnx.ModelProto, qcfg: Any) -> list[str]:
    """Node names kept in float: skip_layers, skip_matmul_layers (indices) and the first conv / last
    Gemm|MatMul with keep_first_last_float."""
    names = {n.name for n in model.graph.node}
    layers = layer_names(model)
    out: list[str] = []
    for name in getattr(qcfg, "skip_layers", None) or []:
        if name not in names:
            raise ConfigError(f"backend.quantize.skip_layers names '{name}', which is not a node of the model. "
                              f"Quantizable layers: {', '.join(layers[:8])}{' ...' if len(layers) > 8 else ''}.")
        out.append(name)
    for i in getattr(qcfg, "skip_matmul_layers", None) or []:
        if not 0 <= int(i) < len(layers):
            raise ConfigError(f"backend.quantize.skip_matmul_layers has index {i}, but the model has "
                              f"{len(layers)} Conv/Gemm/MatMul layers (indices 0..{len(layers) - 1}).")
        out.append(layers[int(i)])
    if getattr(qcfg, "keep_first_last_float", False):
        convs = [n.name for n in model.graph.node if n.op_type == "Conv"]
        dense = [n.name for n in model.graph.node if n.op_type in ("Gemm", "MatMul")]
        out += convs[:1] + dense[-1:]
    return list(dict.fromkeys(out))


def quantize_with_ranges(model: onnx.ModelProto, ranges: dict[str, list[float]], qcfg: Any,
                         exclude: Sequence[str] = ()) -> onnx.ModelProto:
    """The QDQ model for given activation ranges (uint8 activations, int8 symmetric weights)."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import CalibrationMethod, TensorsData, save_tensors_data

    data = {k: (np.float32(lo), np.float32(hi)) for k, (lo, hi) in ranges.items()}
    with tempfile.TemporaryDirectory(prefix="tvmzoo-qdq-") as d, _quiet_ort():
        tmp = Path(d)
        onnx.save(model, str(tmp / "model.onnx"))
        save_tensors_data(TensorsData(CalibrationMethod.MinMax, data), tmp / "ranges.json")
        quantize_static(str(tmp / "model.onnx"), str(tmp / "qdq.onnx"), None,
                        quant_format=QuantFormat.QDQ, per_channel=bool(qcfg.quantize_per_channel),
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        nodes_to_exclude=list(exclude), calibrate_method=CalibrationMethod.MinMax,
                        calibration_cache_path=str(tmp / "ranges.json"),
                        # logits stay float: an 8-bit softmax input costs accuracy and buys nothing
                        extra_options={"OpTypesToExcludeOutputQuantization": ["Gemm", "MatMul"]})
        return onnx.load(str(tmp / "qdq.onnx"))


def quantize_model(model: onnx.ModelProto, calib: Iterable[np.ndarray], qcfg: Any,
                   cache_path: Path | None = None) -> onnx.ModelProto:
    """The QDQ int8 model of `model`, calibrated on `calib` (preprocessed NCHW float32 batches)."""
    model = _named(model)
    batches = _as_batches(calib)
    ranges = calibration_ranges(model, batches, qcfg, cache_path)
    exclude = excluded_nodes(model, qcfg)
    if exclude:
        log.info("kept in float: %s", ", ".join(exclude))
    qdq = quantize_with_ranges(model, ranges, qcfg, exclude)
    log.info("quantized %d of %d Conv/Gemm/MatMul layers (%s, per-%s weights)",
             len(quantized_layers(qdq)), len(layer_names(model)), _mode(qcfg),
             "channel" if qcfg.quantize_per_channel else "tensor")
    return qdq


def quantized_layers(qdq: onnx.ModelProto) -> list[str]:
    """Names of the Conv/Gemm/MatMul nodes of a QDQ model whose weight comes from a DequantizeLinear."""
    dq_out = {n.output[0] for n in qdq.graph.node if n.op_type == "DequantizeLinear"}
    return [n.name for n in qdq.graph.node if n.op_type in LAYER_OPS and len(n.input) > 1 and n.input[1] in dq_out]


# ---------------------------------------------------------------------------------------------
# accuracy-aware fallback
# ---------------------------------------------------------------------------------------------

def run_ort(model: onnx.ModelProto, batches: Sequence[np.ndarray]) -> np.ndarray:
    """First output of `model` on each batch (ONNX Runtime, CPU), concatenated."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: b})[0] for b in batches])


def sqnr_db(ref: np.ndarray, test: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio in dB, finite (noise floored at float eps)."""
    ref = np.asarray(ref, np.float64).ravel()
    noise = ref - np.asarray(test, np.float64).ravel()
    eps = np.finfo(np.float32).eps
    return 10 * math.log10(max(float(ref @ ref), eps) / max(float(noise @ noise), eps))
