"""Step 4 as the runstream job: images -> the five-line result file, classified here (tvmzoo.run.runner) or
across TVM RPC devices (tvmzoo.run.sharded). The file is held by one run at a time, written atomically as
the run goes (an interrupted run resumes with --resume), its settings recorded beside it (run/claim.py)."""
from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

from ..errors import ConfigError
from ..io.atomic import write_text
from ..io.images import check_label_count, find_images, load_labels
from ..io.outputs import check_output_file
from ..preprocess import Preprocessing
from .claim import SettingsRecord, claim, run_settings
from .results import TOP_K, Prediction, format_prediction, read_results
from .runner import RunOptions, RunSummary, classify, resolve_preprocessing
from .runtime import CompiledModel, model_dir, output_classes, read_meta
from .sharded import classify_sharded

log = logging.getLogger(__name__)


class ResultFile:
    """The five-line result file in input order, always replaced atomically: while running every
    `every` seconds (so an interrupted run can be resumed) and at the end. With `resume`, images that
    already have five lines in it are kept and need not be classified again."""

    def __init__(self, path: Path, order: Sequence[str], names: Sequence[str], resume: bool,
                 every: float = 10.0, settings: dict | None = None) -> None:
        self.path, self.order, self.names, self.every = path, list(order), names, every
        self.records: dict[str, str] = {}
        self.settings = SettingsRecord(path, settings) if settings is not None else None
        if resume and path.is_file():
            if self.settings is not None:
                self.settings.check_resumable()
            wanted = set(self.order)
            self.records = {p.path: format_prediction(p, names) for p in read_results(path)
                            if p.path in wanted and len(p.ids) == TOP_K}
            log.info("resume: %d of %d images already in %s", len(self.records), len(self.order), path)
        self._last = time.monotonic()
        self.changed = False

    def done(self, path: str) -> bool:
        return path in self.records

    def add(self, pred: Prediction) -> None:
        self.records[pred.path] = format_prediction(pred, self.names)
        self.changed = True
        if time.monotonic() - self._last > self.every:
            self.write()

    def write(self) -> None:
        if self.settings is not None:
            self.settings.before_write()
        write_text(self.path, "".join(self.records[p] for p in self.order if p in self.records))
        if self.settings is not None:
            self.settings.after_write()
        self._last = time.monotonic()


def run_to_file(model_prefix: str | Path, paths: Sequence[Path], pre: Preprocessing, out: Path,
                names: Sequence[str], options: RunOptions = RunOptions()) -> RunSummary:
    """Classify `paths` (locally, or on the RPC devices of options.remote) into the result file `out`,
    which this run holds alone (a lock) and whose settings it records beside it (see run/claim.py)."""
    check_output_file(out, "result file")
    settings = run_settings(read_meta(model_dir(model_prefix)), pre, names, TOP_K)
    with claim(out):
        return _run_claimed(model_prefix, paths, pre, ResultFile(out, [str(p) for p in paths], names,
                                                                  options.resume, settings=settings), options)


def _run_claimed(model_prefix: str | Path, paths: Sequence[Path], pre: Preprocessing, results: ResultFile,
                 options: RunOptions) -> RunSummary:
    todo = [p for p in paths if not results.done(str(p))]
    completed = False
    try:
        if options.remote is not None:
            run = classify_sharded(model_prefix, todo, pre, options.remote, batch=options.batch,
                                   progress=options.progress, on_prediction=results.add)
            summary = RunSummary(run.predictions, run.failed, run.seconds)
        else:
            count = options.instances if options.mode == "async" else 1
            models = [CompiledModel.load(model_prefix) for _ in range(count)]
            summary = classify(models, todo, pre, batch=options.batch, mode=options.mode,
                               workers=options.workers, progress=options.progress, on_prediction=results.add)
        completed = True
    finally:
        # also when interrupted: what is done stays done for --resume; a run that classified
        # nothing (e.g. the model was refused) leaves the previous file alone
        if completed or results.changed:
            results.write()
    summary.skipped = len(paths) - len(todo)
    log.info("wrote %s", results.path)
    return summary


def classify_to_file(model_prefix: str | Path, file_path: str | Path, result_txt: str | Path, *,
                     vdsp: str | Path | None = None, labels: str | Path | None = None,
                     save_dir: str | Path = ".", options: RunOptions = RunOptions()) -> RunSummary:
    """The runstream job: classify an image or folder and (re)write the five-line result file."""
    pre = resolve_preprocessing(model_prefix, vdsp)
    names = load_labels(labels).names
    check_label_count(names, output_classes(read_meta(model_dir(model_prefix))), labels, model_prefix)
    paths = find_images(Path(file_path))
    if not paths:
        raise ConfigError(f"no images found at {file_path} (looked for .jpg/.jpeg/.png/.bmp/.webp, recursively).")
    check_output_file(Path(save_dir) / result_txt, "result file", {"label file": labels, "vdsp params file": vdsp})
    return run_to_file(model_prefix, paths, pre, Path(save_dir) / result_txt, names, options)
