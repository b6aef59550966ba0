"""Per-layer int8 report: weight and activation SQNR of every Conv / Gemm / MatMul of a QDQ model
against its fp32 model on the calibration images (both run by ONNX Runtime)."""
from __future__ import annotations

import csv
import io
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from ...io.atomic import write_text
from .quantize import (LAYER_OPS, _as_batches, _named, calibration_ranges, excluded_nodes, layer_names,
                       quantize_with_ranges, run_ort, sqnr_db)


log = logging.getLogger(__name__)

@dataclass(frozen=True)
class LayerStat:
    """One Conv / Gemm / MatMul layer.

    weight_sqnr_db: dequantized int8 weight vs fp32 weight, the mean over output channels of each
        channel's SQNR (a whole-tensor SQNR hides ruined small channels behind one outlier channel).
    input_sqnr_db / act_sqnr_db: what the layer reads / writes in the QDQ model (after its
        QuantizeLinear/DequantizeLinear) vs the same tensor of the fp32 model: all error so far.
    sqnr_loss_db: input minus output SQNR: what this layer costs; the fallback keeps the largest in float.
    range: (low, high) the layer's output is quantized to (its float min / max when not quantized).
    mode: how it runs.
    """

    name: str
    op_type: str
    quantized: bool
    mode: str
    weight_sqnr_db: float
    act_sqnr_db: float
    input_sqnr_db: float
    range: tuple[float, float]

    @property
    def sqnr_loss_db(self) -> float:
        return self.input_sqnr_db - self.act_sqnr_db


def _consts(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _dequantize(node: onnx.NodeProto, consts: dict[str, np.ndarray]) -> tuple[np.ndarray, bool]:
    """Float value of a constant DequantizeLinear, and whether its scale is per-channel."""
    q = consts[node.input[0]].astype(np.float64)
    scale = consts[node.input[1]].astype(np.float64)
    zp = consts[node.input[2]].astype(np.float64) if len(node.input) > 2 else np.zeros_like(scale)
    axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
    if scale.size > 1:
        shape = [1] * q.ndim
        shape[axis] = -1
        scale, zp = scale.reshape(shape), zp.reshape(shape)
    return (q - zp) * scale, scale.size > 1


def tensor_values(model: onnx.ModelProto, names: Sequence[str],
                  batches: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    """Values of the named tensors (any in the graph) over all batches, concatenated along axis 0."""
    import onnxruntime as ort

    model = onnx.ModelProto.FromString(model.SerializeToString())
    have = {o.name for o in model.graph.output}
    for n in names:
        if n not in have:
            model.graph.output.append(onnx.ValueInfoProto(name=n))
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    # no graph optimization: keep QuantizeLinear/DequantizeLinear pairs apart so both sides are visible
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0].name
    runs = [sess.run(list(names), {inp: b}) for b in batches]
    return {n: np.concatenate([r[i] for r in runs]) for i, n in enumerate(names)}


def _qdq_pair(tensor: str, consumers: dict[str, list[onnx.NodeProto]]):
    """(QuantizeLinear, DequantizeLinear) applied to `tensor`, or None."""
    for q in consumers.get(tensor, []):
        if q.op_type == "QuantizeLinear":
            for dq in consumers.get(q.output[0], []):
                if dq.op_type == "DequantizeLinear":
                    return q, dq
    return None


def _range(q: onnx.NodeProto, consts: dict[str, np.ndarray]) -> tuple[float, float]:
    scale = float(consts[q.input[1]].reshape(-1)[0])
    zp_arr = consts[q.input[2]] if len(q.input) > 2 else np.array(0, np.uint8)
    info = np.iinfo(zp_arr.dtype)
    zp = float(zp_arr.reshape(-1)[0])
    return (info.min - zp) * scale, (info.max - zp) * scale


def layer_report(fp32_model: onnx.ModelProto, qdq_model: onnx.ModelProto, calib: Iterable[np.ndarray],
                 calibrate_mode: str = "") -> list[LayerStat]:
    """One LayerStat per Conv / Gemm / MatMul of `qdq_model` (matched to `fp32_model` by node name)."""
    batches = _as_batches(calib)
    fconsts, qconsts = _consts(fp32_model), _consts(qdq_model)
    fnodes = {n.name: n for n in fp32_model.graph.node}
    producers = {o: n for n in qdq_model.graph.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in qdq_model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    fp32_tensors = {v for n in fp32_model.graph.node for v in n.output} | {i.name for i in fp32_model.graph.input}

    plans = []  # (node, fp32 weight name, weight DequantizeLinear, tensor the layer reads, output, output Q/DQ)
    for node in qdq_model.graph.node:
        if node.op_type not in LAYER_OPS or node.name not in fnodes:
            continue
        wprod = producers.get(node.input[1])
        dqw = wprod if wprod is not None and wprod.op_type == "DequantizeLinear" \
            and wprod.input[0] in qconsts else None
        plans.append((node, fnodes[node.name].input[1], dqw, _float_source(node.input[0], producers), node.input[0],
                      node.output[0], _qdq_pair(node.output[0], consumers)))

    want_q = {t for p in plans for t in (p[4], p[6][1].output[0] if p[6] else p[5])}
    want_f = {t for p in plans for t in (p[3], p[5]) if t in fp32_tensors}
    qvals = tensor_values(qdq_model, sorted(want_q), batches)
    fvals = tensor_values(fp32_model, sorted(want_f), batches)

    stats = []
    for node, wname, dqw, src, read, out, opair in plans:
        nan = math.nan
        w_sqnr, per_channel = math.inf, False
        if dqw is not None and wname in fconsts:
            wq, per_channel = _dequantize(dqw, qconsts)
            w_sqnr = _channel_sqnr(fconsts[wname], wq.reshape(fconsts[wname].shape), node)
        x_sqnr = sqnr_db(fvals[src], qvals[read]) if src in fvals else nan
        a_sqnr = sqnr_db(fvals[out], qvals[opair[1].output[0] if opair else out]) if out in fvals else nan
        quantized = dqw is not None
        mode = ("int8 " + ("per-channel" if per_channel else "per-tensor")
                + (f", {calibrate_mode}" if calibrate_mode else "")) if quantized else "float"
        rng = _range(opair[0], qconsts) if opair else (float(fvals[out].min()), float(fvals[out].max())) \
            if out in fvals else (nan, nan)
        stats.append(LayerStat(node.name, node.op_type, quantized, mode, w_sqnr, a_sqnr, x_sqnr, rng))
    return stats


def _float_source(tensor: str, producers: dict[str, onnx.NodeProto]) -> str:
    """The float tensor behind a DequantizeLinear(QuantizeLinear(t)) chain (t itself otherwise)."""
    dq = producers.get(tensor)
    if dq is not None and dq.op_type == "DequantizeLinear":
        q = producers.get(dq.input[0])
        if q is not None and q.op_type == "QuantizeLinear":
            return q.input[0]
    return tensor


def _channel_sqnr(ref: np.ndarray, test: np.ndarray, node: onnx.NodeProto) -> float:
    """Mean SQNR over output channels (axis 0 of a Conv weight / Gemm transB weight, else axis 1)."""
    trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
    axis = 0 if node.op_type == "Conv" or trans_b else 1
    ref, test = np.moveaxis(ref, axis, 0), np.moveaxis(test, axis, 0)
    return float(np.mean([sqnr_db(r, t) for r, t in zip(ref, test)]))


def write_report(stats: Sequence[LayerStat], csv_path: Path | str, md_path: Path | str) -> None:
    """The stats as CSV (one row per layer) and as a Markdown table, each written atomically."""
    cols = [f.name for f in fields(LayerStat)]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(cols[:-1] + ["range_low", "range_high"])
    for s in stats:
        row = asdict(s)
        w.writerow([row[c] if not isinstance(row[c], float) else f"{row[c]:.4g}" for c in cols[:-1]]
                   + [f"{s.range[0]:.6g}", f"{s.range[1]:.6g}"])
    write_text(csv_path, buf.getvalue())

    lines = ["| layer | op | mode | weight SQNR dB | input SQNR dB vs fp32 | output SQNR dB vs fp32 | range |",
             "|---|---|---|---|---|---|---|"]
    for s in stats:
        lines.append(f"| {s.name} | {s.op_type} | {s.mode} | {s.weight_sqnr_db:.1f} | {s.input_sqnr_db:.1f} | "
                     f"{s.act_sqnr_db:.1f} | [{s.range[0]:.4g}, {s.range[1]:.4g}] |")
    write_text(md_path, "\n".join(lines) + "\n")


# ---------------------------------------------------------------- accuracy-aware fallback


def top1_drop(fp32_logits: np.ndarray, int8_logits: np.ndarray, labels: Sequence[int] | None = None) -> float:
    """Top-1 accuracy lost (a fraction): against `labels` when given, else 1 - top-1 agreement with fp32
    (an upper bound of the drop)."""
    a, b = fp32_logits.argmax(1), int8_logits.argmax(1)
    if labels is None:
        return float(np.mean(a != b))
    y = np.asarray(labels)
    return float(np.mean(a == y) - np.mean(b == y))


def quantize_with_fallback(model: onnx.ModelProto, calib: Iterable[np.ndarray], holdout: Iterable[np.ndarray],
                           qcfg: Any, labels: Sequence[int] | None = None,
                           cache_path: Path | None = None) -> tuple[onnx.ModelProto, list[str]]:
    """Quantize, then while the top-1 drop on `holdout` exceeds qcfg.max_drop (in points: 1.0 = one
    percentage point of top-1) keep the layers that lose the most SQNR vs fp32 (input SQNR - output SQNR) in float.

    Returns the QDQ model and the layers the fallback kept in float (beyond the configured skips)."""
    model = _named(model)
    batches = _as_batches(calib)
    held = _as_batches(holdout)
    ranges = calibration_ranges(model, batches, qcfg, cache_path)
    exclude = excluded_nodes(model, qcfg)
    qdq = quantize_with_ranges(model, ranges, qcfg, exclude)
    max_drop = getattr(qcfg, "max_drop", None)
    if max_drop is None:
        return qdq, []
    max_drop /= 100.0
    ref = run_ort(model, held)
    drop = top1_drop(ref, run_ort(qdq, held), labels)
    kept: list[str] = []
    step = max(1, len(layer_names(model)) // 10)
    while drop > max_drop:
        stats = [s for s in layer_report(model, qdq, batches) if s.quantized]
        if not stats:
            break
        worst = sorted(stats, key=lambda s: s.sqnr_loss_db, reverse=True)[:step]
        kept += [s.name for s in worst]
        log.info("top-1 drop %.2f%% > %.2f%%: keeping %s in float (SQNR lost %s dB)", 100 * drop, 100 * max_drop,
                 ", ".join(s.name for s in worst), ", ".join(f"{s.sqnr_loss_db:.1f}" for s in worst))
        qdq = quantize_with_ranges(model, ranges, qcfg, exclude + kept)
        drop = top1_drop(ref, run_ort(qdq, held), labels)
    log.info("int8 top-1 drop %.2f%% on %d held-out images; fallback kept %d layers in float: %s",
             100 * drop, len(ref), len(kept), ", ".join(kept) or "none")
    if drop > max_drop:
        log.warning("int8 top-1 drop %.2f%% is still above max_drop %.2f%% with every Conv/Gemm/MatMul in float: "
                    "the remaining loss is in other quantized tensors; consider a different calibrate_mode or fp16",
                    100 * drop, 100 * max_drop)
    return qdq, kept
