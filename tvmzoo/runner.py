"""Step 4, runstream: images -> preprocessing -> compiled module -> top-5 predictions.

`sync` decodes and infers in turn; `async` decodes and preprocesses on worker threads while the
model runs, in input order, so both write the same result file.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .errors import ConfigError, ImageError
from .preprocess import Preprocessing, apply, read_image
from .results import Prediction, predictions, write_results
from .runtime import CompiledModel

log = logging.getLogger(__name__)

INFER_MODES = ("sync", "async")


@dataclass
class RunSummary:
    predictions: list[Prediction] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)   # (path, reason)
    seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        return len(self.predictions) / self.seconds if self.seconds > 0 else 0.0

    def speed_line(self) -> str:
        return (f"{len(self.predictions)} images in {self.seconds:.3f} seconds, "
                f"({self.images_per_second:.3f} images/second)")


def _load(path: Path, pre: Preprocessing) -> np.ndarray | ImageError:
    try:
        return apply(pre, read_image(path))
    except ImageError as exc:
        return exc


def _loaded(paths: Sequence[Path], pre: Preprocessing, mode: str, workers: int) -> Iterator:
    if mode == "sync":
        return (_load(p, pre) for p in paths)
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode")
    return pool.map(lambda p: _load(p, pre), paths)


def classify(model: CompiledModel, paths: Sequence[Path], pre: Preprocessing, *, batch: int = 1,
             mode: str = "sync", workers: int = 2, progress: bool = True) -> RunSummary:
    """Classify `paths` in order; undecodable images are skipped, logged and listed in the summary."""
    summary = RunSummary()
    pending_paths: list[str] = []
    pending: list[np.ndarray] = []
    t0 = time.perf_counter()

    def flush() -> None:
        if pending:
            summary.predictions.extend(predictions(pending_paths, model.run(np.stack(pending))))
            pending_paths.clear()
            pending.clear()

    for path, item in tqdm(zip(paths, _loaded(paths, pre, mode, workers)), total=len(paths),
                           disable=not progress or len(paths) < 20, unit="img"):
        if isinstance(item, ImageError):
            log.warning("skipped %s", item)
            summary.failed.append((str(path), str(item)))
            continue
        pending_paths.append(str(path))
        pending.append(item)
        if len(pending) == batch:
            flush()
    flush()
    summary.seconds = time.perf_counter() - t0
    return summary


def resolve_preprocessing(model_prefix: str | Path, vdsp: str | Path | None) -> Preprocessing:
    """The vdsp JSON when given, else the preprocessing the module recorded at compile time."""
    if vdsp is not None:
        return Preprocessing.from_vdsp(vdsp)
    from .runtime import model_dir, read_meta

    meta = read_meta(model_dir(model_prefix))
    if meta.get("preprocessing") is None:
        raise ConfigError(f"{model_prefix}: the module records no preprocessing; pass --vdsp_params_info <json>.")
    return CompiledModel.preprocessing_from_meta(meta)


def classify_to_file(model_prefix: str | Path, file_path: str | Path, result_txt: str | Path, *,
                     vdsp: str | Path | None = None, labels: str | Path | None = None,
                     save_dir: str | Path = ".", mode: str = "sync", batch: int = 1) -> RunSummary:
    """The runstream job: classify an image or folder and (re)write the five-line result file."""
    from .data import find_images, load_labels

    pre = resolve_preprocessing(model_prefix, vdsp)
    names = load_labels(labels).names
    model = CompiledModel.load(model_prefix)
    paths = find_images(Path(file_path))
    if not paths:
        raise ConfigError(f"no images found at {file_path} (looked for .jpg/.jpeg/.png/.bmp/.webp, recursively).")
    summary = classify(model, paths, pre, batch=batch, mode=mode)
    out = Path(save_dir) / result_txt
    write_results(out, summary.predictions, names)
    log.info("wrote %s", out)
    return summary
