"""Step 4, runstream: images -> preprocessing -> compiled module -> top-5 predictions.

`sync` decodes, preprocesses and infers in turn. `async` overlaps the stages: decode + preprocess on
a pool of threads, inference on `instances` model instances (one thread each), both through bounded
windows of in-flight work, results consumed in input order, so both modes write the same file.
A fused module (graph.preprocess: fused) gets the resized uint8 image; the rest happens inside it.
tvmzoo.run.runstream writes the result file (here, or sharded across TVM RPC devices by tvmzoo.run.sharded).
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

from ..errors import ConfigError, ImageError, ModuleError
from ..preprocess import Preprocessing, apply, read_image
from .results import Prediction, predictions
from .runtime import CompiledModel, model_dir, read_meta, stack_aligned
from .threads import check_per_core, instance_cores, pin_this_thread_pool, threads_per_instance

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
        if self.remote is None:   # over RPC one instance runs per device
            check_per_core("--instances", self.instances)


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
        return _finite_predictions(indices, names, model.run(inputs))
    except ModuleError:   # the module, not this batch, is wrong: no image would get through
        raise
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


def _finite_predictions(indices: list[int], names: list[str], outputs: np.ndarray) -> Outcome:
    """Predictions of the rows with finite scores; the others fail (was: written as "prob: nan", class 0 on top)."""
    finite = np.isfinite(outputs.reshape(len(outputs), -1)).all(axis=1)
    if finite.all():
        return indices, predictions(names, outputs), []
    failed = [(indices[r], names[r], "the model's scores for it hold NaN or infinite values (broken weights or "
               "build?): its top-k would mean nothing") for r in np.flatnonzero(~finite)]
    for _, name, reason in failed:
        log.warning("%s: %s", name, reason)
    keep = np.flatnonzero(finite)
    return [indices[r] for r in keep], predictions([names[r] for r in keep], outputs[keep]), failed


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
