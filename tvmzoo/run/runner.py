"""Step 4, runstream: images -> preprocessing -> compiled module -> top-5 predictions.

`sync` decodes, preprocesses and infers in turn. `async` overlaps the stages: decode + preprocess on
a pool of threads, inference on `instances` model instances (one thread each), both through bounded
windows of in-flight work, results consumed in input order, so both modes write the same file.
A fused module (graph.preprocess: fused) gets the resized uint8 image; the rest happens inside it.
With a RemoteSpec the images are sharded across TVM RPC devices (tvmzoo.run.sharded).
"""
from __future__ import annotations

import itertools
import logging
import queue
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..io.atomic import write_text
from ..errors import ConfigError, ImageError
from ..io.outputs import check_output_file
from ..preprocess import Preprocessing, apply, read_image
from .results import TOP_K, Prediction, format_prediction, predictions, read_results
from .claim import SettingsRecord, claim, run_settings
from .runtime import CompiledModel, stack_aligned
from .threads import instance_cores, pin_this_thread_pool, threads_per_instance

log = logging.getLogger(__name__)

INFER_MODES = ("sync", "async")


@dataclass
class RunSummary:
    predictions: list[Prediction] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)   # (path, reason)
    seconds: float = 0.0
    skipped: int = 0          # --resume: images already in the result file

    @property
    def images_per_second(self) -> float:
        return len(self.predictions) / self.seconds if self.seconds > 0 else 0.0

    def speed_line(self) -> str:
        return (f"{len(self.predictions)} images in {self.seconds:.3f} seconds, "
                f"({self.images_per_second:.3f} images/second)")


@dataclass(frozen=True)
class RunOptions:
    mode: str = "sync"            # sync | async
    batch: int = 1
    instances: int = 1            # model instances (async)
    workers: int = 2              # decode / preprocess threads (async)
    resume: bool = False          # keep images that already have five lines in the result file
    remote: object = None         # tvmzoo.run.devices.RemoteSpec: run on TVM RPC devices
    progress: bool = True

    def __post_init__(self) -> None:
        if self.mode not in INFER_MODES:
            raise ConfigError(f"infer mode '{self.mode}' is not one of {', '.join(INFER_MODES)}.")
        for name in ("batch", "instances", "workers"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be at least 1, got {getattr(self, name)}.")


def model_input(pre: Preprocessing, image_bgr: np.ndarray, fused: bool) -> np.ndarray:
    """What the module takes for one decoded image: the normalized CHW tensor, or for a fused
    module the resized uint8 HWC image."""
    if fused:
        from ..preprocess.fused import fused_input
        return fused_input(pre, image_bgr)
    return apply(pre, image_bgr)


def _load(path: Path, pre: Preprocessing, fused: bool) -> np.ndarray | ImageError:
    try:
        return model_input(pre, read_image(path), fused)
    except ImageError as exc:
        return exc


def _ordered(pool: ThreadPoolExecutor, fn: Callable, items: Iterable, depth: int) -> Iterator:
    """pool.map with at most `depth` items in flight (a bounded queue), results in input order."""
    pending: deque = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= depth:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


Batch = tuple[list[int], list[str], np.ndarray]           # input indices, paths, stacked inputs
Outcome = tuple[list[int], list[Prediction], list[tuple[int, str, str]]]


def _batches(paths: Sequence[Path], loaded: Iterable, batch: int,
             failed: list[tuple[int, str, str]]) -> Iterator[Batch]:
    indices: list[int] = []
    arrays: list[np.ndarray] = []
    for index, (path, item) in enumerate(zip(paths, loaded)):
        if isinstance(item, ImageError):
            log.warning("skipped %s", item)
            failed.append((index, str(path), str(item)))
            continue
        indices.append(index)
        arrays.append(item)
        if len(arrays) == batch:
            yield indices, [str(paths[i]) for i in indices], stack_aligned(arrays)
            indices, arrays = [], []
    if arrays:
        yield indices, [str(paths[i]) for i in indices], stack_aligned(arrays)


def _infer(model: CompiledModel, item: Batch, isolate: bool) -> Outcome:
    """Run one batch; with `isolate`, a failing batch is retried image by image and the failing
    images are reported instead of stopping the run."""
    indices, names, inputs = item
    try:
        return indices, predictions(names, model.run(inputs)), []
    except Exception as exc:  # noqa: BLE001 - TVM raises its own error types
        if not isolate:
            raise
        if len(indices) == 1:
            reason = f"inference failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
            log.warning("%s: %s", names[0], reason)
            return [], [], [(indices[0], names[0], reason)]
    kept, preds, failed = [], [], []
    for i in range(len(indices)):
        one = _infer(model, ([indices[i]], [names[i]], inputs[i:i + 1]), isolate)
        kept += one[0]
        preds += one[1]
        failed += one[2]
    return kept, preds, failed


def classify(model: CompiledModel | Sequence[CompiledModel], paths: Sequence[Path], pre: Preprocessing, *,
             batch: int = 1, mode: str = "sync", workers: int = 2, progress: bool = True,
             isolate_failures: bool = True,
             on_prediction: Callable[[Prediction], None] | None = None) -> RunSummary:
    """Classify `paths` in input order. `model` may be several instances of one model (async mode
    runs them in parallel). Undecodable images, and with `isolate_failures` images whose inference
    fails, are skipped, logged and listed in the summary."""
    models = list(model) if isinstance(model, (list, tuple)) else [model]
    fused = models[0].fused
    summary = RunSummary()
    failed: list[tuple[int, str, str]] = []
    bar = tqdm(total=len(paths), disable=not progress or len(paths) < 20, unit="img")
    t0 = time.perf_counter()
    pools: list[ThreadPoolExecutor] = []
    try:
        if mode == "sync":
            batches = _batches(paths, (_load(p, pre, fused) for p in paths), batch, failed)
            outcomes = (_infer(models[0], b, isolate_failures) for b in batches)
        else:
            decode = ThreadPoolExecutor(workers, thread_name_prefix="decode")
            infer = _inference_threads(len(models))
            pools += [decode, infer]
            free: queue.Queue[CompiledModel] = queue.Queue()
            for instance in models:
                free.put(instance)

            def on_free_instance(item: Batch) -> Outcome:
                instance = free.get()
                try:
                    return _infer(instance, item, isolate_failures)
                finally:
                    free.put(instance)

            loaded = _ordered(decode, lambda p: _load(p, pre, fused), paths, depth=2 * workers + batch * len(models))
            outcomes = _ordered(infer, on_free_instance, _batches(paths, loaded, batch, failed),
                                depth=2 * len(models))
        counted = 0
        for indices, preds, bad in outcomes:
            summary.predictions.extend(preds)
            failed.extend(bad)
            if on_prediction is not None:
                for pred in preds:
                    on_prediction(pred)
            bar.update(len(indices) + len(failed) - counted)     # failed: undecodable ones too
            counted = len(failed)
    finally:
        for pool in pools:
            pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
    summary.failed = [(path, reason) for _, path, reason in sorted(failed)]
    summary.seconds = time.perf_counter() - t0
    return summary


def _inference_threads(instances: int) -> ThreadPoolExecutor:
    """One inference thread per model instance. With several, each thread's TVM pool is pinned to its own
    cores (tvmzoo.run.threads, as vamp's throughput mode does): unpinned, every pool would take the same
    first cores."""
    if instances < 2:
        return ThreadPoolExecutor(instances, thread_name_prefix="infer")
    threads, numbers = threads_per_instance(instances, None), itertools.count()

    def pin() -> None:
        pin_this_thread_pool(instance_cores(next(numbers), threads))

    return ThreadPoolExecutor(instances, thread_name_prefix="infer", initializer=pin)


def resolve_preprocessing(model_prefix: str | Path, vdsp: str | Path | None) -> Preprocessing:
    """The vdsp JSON when given, else the preprocessing the module recorded at compile time.
    A fused module has its preprocessing compiled in: a different vdsp JSON is refused."""
    from .runtime import model_dir, read_meta

    meta = read_meta(model_dir(model_prefix))
    recorded = CompiledModel.preprocessing_from_meta(meta)
    if vdsp is not None:
        given = Preprocessing.from_vdsp(vdsp)
        if meta.get("preprocess") == "fused" and given != recorded:
            raise ConfigError(f"{model_prefix} has its preprocessing compiled in (graph.preprocess: fused) and "
                              f"{vdsp} describes another one; drop --vdsp_params_info or recompile with it.")
        return given
    if recorded is None:
        raise ConfigError(f"{model_prefix}: the module records no preprocessing; pass --vdsp_params_info <json>.")
    return recorded


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
    from .runtime import model_dir, read_meta

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
            from .sharded import classify_sharded

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
    from ..io.images import check_label_count, find_images, load_labels
    from .runtime import model_dir, output_classes, read_meta

    pre = resolve_preprocessing(model_prefix, vdsp)
    names = load_labels(labels).names
    check_label_count(names, output_classes(read_meta(model_dir(model_prefix))), labels, model_prefix)
    paths = find_images(Path(file_path))
    if not paths:
        raise ConfigError(f"no images found at {file_path} (looked for .jpg/.jpeg/.png/.bmp/.webp, recursively).")
    return run_to_file(model_prefix, paths, pre, Path(save_dir) / result_txt, names, options)
