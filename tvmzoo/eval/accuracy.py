"""The accuracy harness: compile a YAML at several precisions, classify one labelled folder with each,
and tabulate top-1 / top-5, agreement with fp32 and speed."""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..compile.compiler import compile_model
from ..compile.preflight import check_build_inputs, check_build_output
from ..config import load_build_config
from ..io.images import find_images
from ..errors import ConfigError
from .topk import ground_truth_of
from ..io.outputs import check_output_file
from ..run.results import Prediction, read_results, top_k
from ..run.runner import RunOptions, resolve_preprocessing
from ..run.runstream import run_to_file

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AccuracyRow:
    precision: str
    top1: float
    top5: float
    agreement: float | None     # % of images whose top-1 equals the fp32 build's
    images_per_second: float
    images: int


def agreement(a: Sequence[Prediction], b: Sequence[Prediction]) -> float:
    same = sum(x.ids[0] == y.ids[0] for x, y in zip(a, b))
    return 100.0 * same / max(len(a), 1)


def evaluate_precisions(yaml_path: str | Path, images: str | Path, precisions: Sequence[str],
                        limit: int | None = None, workspace: str | Path | None = None,
                        mode: str = "async", options: RunOptions | None = None,
                        overrides: dict | None = None) -> list[AccuracyRow]:
    """Each precision's predictions go to <workspace>/<name>-eval-<precision>.result.txt (resumable
    with options.resume; run locally or on RPC devices with options.remote). `overrides` are the CLI's
    --set. Every build's inputs and outputs are checked before the first one compiles."""
    from ..io.images import load_labels

    options = options or RunOptions(mode=mode)
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit must be at least 1 (the number of images to use), got {limit}.")
    names = load_labels(None).names
    paths = find_images(Path(images))[:limit]
    if not paths:
        raise ConfigError(f"no images found at {images}.")
    truth = ground_truth_of([str(p) for p in paths])
    if not truth:
        raise ConfigError(f"no image under {images} has a ground truth: name files or folders by wnid "
                          "(n01440764_tench.JPEG or n01440764/<any>.JPEG).")
    rows: list[AccuracyRow] = []
    reference: list[Prediction] | None = None
    base = load_build_config(yaml_path, overrides)
    configs = []
    # fp32 first: the others are compared with it
    for precision in sorted(precisions, key=lambda p: p != "fp32"):
        changes = {**(overrides or {}), "backend.dtype": precision, "name": f"{base.name}-eval-{precision}"}
        if workspace is not None:
            changes["workspace.path"] = str(workspace)
        cfg = load_build_config(yaml_path, changes)
        check_build_inputs(cfg)
        check_build_output(cfg)
        check_output_file(_result_path(cfg), "result file")
        configs.append((precision, cfg))
    for precision, cfg in configs:
        directory = compile_model(cfg)
        pre = resolve_preprocessing(directory, None)
        result = _result_path(cfg)
        summary = run_to_file(directory, paths, pre, result, names, options)
        preds = read_results(result)
        if precision == "fp32":
            reference = preds
        score = top_k(preds, truth)
        rows.append(AccuracyRow(precision, score.top1, score.top5,
                                agreement(preds, reference) if reference is not None else None,
                                summary.images_per_second, len(preds)))
        log.info("%s: %s", precision, score.line())
    return rows


def _result_path(cfg) -> Path:
    return Path(cfg.workspace) / f"{cfg.name}.result.txt"


def format_table(rows: Sequence[AccuracyRow]) -> str:
    lines = ["| precision | images | top-1 % | top-5 % | top-1 agreement with fp32 % | images/s |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        agree = "-" if r.agreement is None else f"{r.agreement:.1f}"
        lines.append(f"| {r.precision} | {r.images} | {r.top1:.2f} | {r.top5:.2f} | {agree} | "
                     f"{r.images_per_second:.1f} |")
    return "\n".join(lines)
