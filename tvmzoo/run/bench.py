"""Step 5, vamp: throughput and latency of a compiled model, measured honestly (warm-up, percentiles,
first-inference time, peak memory), and the datalist mode that writes one output npz per input."""
from __future__ import annotations

import logging
import os
import resource
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..errors import ConfigError
from .bench_checks import check_memory, input_shape
from .npz import load_input, output_path, save_npz
from ..preprocess import Preprocessing
from .runtime import CompiledModel, stack_aligned
from .threads import check_per_core, instance_cores, pin_this_thread_pool, threads_per_instance

log = logging.getLogger(__name__)

_FLAGS = {"instances": "-i/--instance", "batch": "-b/--batch", "iterations": "--iterations",
          "warmup": "--warmup", "threads": "-t/--threads"}


@dataclass(frozen=True)
class BenchConfig:
    instances: int = 1
    batch: int = 1
    iterations: int = 100     # per instance
    warmup: int = 5
    shape: tuple[int, int, int] | None = None  # per sample; None: the module's
    threads: int | None = None  # per instance; None: the usable cores shared out among the instances

    def __post_init__(self) -> None:
        """Counts >= 1 (warm-up >= 0), a C,H,W shape: refused before the module is even loaded."""
        for name, flag in _FLAGS.items():
            value, least = getattr(self, name), 0 if name == "warmup" else 1
            if value is None and name == "threads":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ConfigError(f"vamp: {flag} must be an integer >= {least}, got {value!r}.")
        check_per_core(_FLAGS["instances"], self.instances)
        check_per_core(_FLAGS["threads"], self.threads)
        if self.shape is not None and (len(self.shape) != 3 or min(self.shape) < 1):
            raise ConfigError(f"vamp: -s/--shape must be three sizes >= 1 (C,H,W), got "
                              f"{','.join(map(str, self.shape))}.")


@dataclass(frozen=True)
class BenchReport:
    instances: int
    threads_per_instance: int
    batch: int
    samples: int
    forward_seconds: float
    throughput_qps: float
    first_inference_ms: float
    latency_ms: dict[str, float]   # avg min max p50 p90 p95 p99, per batch call
    peak_memory_mb: float
    cores: list[list[int]] = field(default_factory=list)  # each local instance's cores

    @property
    def images_per_second(self) -> float:
        return self.samples / self.forward_seconds

    def text(self) -> str:
        lat = self.latency_ms
        return "\n".join([
            f"- number of instances: {self.instances}",
            f"threads per instance: {self.threads_per_instance}" +
            (f" (cores: {' | '.join(','.join(map(str, c)) for c in self.cores)})" if self.cores else ""),
            "devices: [0]",
            f"batch size: {self.batch}",
            f"samples: {self.samples}",
            f"forward time (s): {self.forward_seconds:.4f}",
            f"throughput (qps): {self.throughput_qps:.4f}",
            f"throughput (images/s): {self.images_per_second:.2f}",
            f"first inference (ms): {self.first_inference_ms:.3f}",
            f"model latency (ms): avg {lat['avg']:.3f} / min {lat['min']:.3f} / max {lat['max']:.3f}",
            f"model latency (ms): p50 {lat['p50']:.3f} / p90 {lat['p90']:.3f} / p95 {lat['p95']:.3f} "
            f"/ p99 {lat['p99']:.3f}",
            f"peak memory (MB): {self.peak_memory_mb:.1f}",
        ])

    def as_dict(self) -> dict:
        return asdict(self)


def latency_stats(seconds: Sequence[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1e3
    stats = {"avg": ms.mean(), "min": ms.min(), "max": ms.max()}
    stats.update({f"p{q}": np.percentile(ms, q) for q in (50, 90, 95, 99)})
    return {k: float(v) for k, v in stats.items()}


def peak_memory_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def load_models(prefix: str | Path, count: int, remote=None) -> list[CompiledModel]:
    """`count` local instances, or with a tvmzoo.run.devices.RemoteSpec one instance per RPC device."""
    if remote is None:
        return [CompiledModel.load(prefix) for _ in range(count)]
    from .devices import checked_module, load_remote, open_sessions

    checked_module(prefix)  # refused before connecting to any device
    return [load_remote(prefix, session) for session in open_sessions(remote)]


def random_input(model: CompiledModel, batch: int, shape: tuple[int, ...] | None) -> np.ndarray:
    """Random NCHW float32 of the module's shape, or for a fused module uint8 images of the size it takes;
    `shape` must agree with the module's. Refused before allocating when it would not fit in memory."""
    shape = input_shape(model, shape)
    check_memory(batch, shape, np.uint8 if model.fused else np.float32)
    rng = np.random.default_rng(0)
    if model.fused:
        data = rng.integers(0, 256, (batch, *shape), dtype=np.uint8)
    else:
        data = rng.standard_normal((batch, *shape), dtype=np.float32)
    return stack_aligned(list(data))  # read in place, as a deployment's input binding would be


def benchmark(prefix: str | Path, cfg: BenchConfig, remote=None) -> BenchReport:
    """Run `cfg.instances` model instances (or every RPC device of `remote`) in parallel threads, each
    `cfg.iterations` batches of random input: the model alone, no decoding or preprocessing. Locally each
    instance runs on its own `threads` cores (tvmzoo.run.threads); images/s counts every instance."""
    threads = threads_per_instance(cfg.instances, cfg.threads)
    os.environ["TVM_NUM_THREADS"] = str(threads)  # what an unpinned pool (a remote one) sizes itself from
    models = load_models(prefix, cfg.instances, remote)
    data = random_input(models[0], cfg.batch, cfg.shape)
    cores = [instance_cores(i, threads) for i in range(len(models))] if remote is None else []
    latencies: list[list[float]] = [[] for _ in models]
    first_ms: list[float] = []
    ready = threading.Barrier(len(models) + 1)
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            if cores:
                pin_this_thread_pool(cores[i])
            start = time.perf_counter()
            models[i].run(data)
            first_ms.append((time.perf_counter() - start) * 1e3)
            for _ in range(cfg.warmup):
                models[i].run(data)
            ready.wait()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the calling thread
            errors.append(exc)
            ready.abort()
            return
        for _ in range(cfg.iterations):
            start = time.perf_counter()
            models[i].run(data)
            latencies[i].append(time.perf_counter() - start)

    workers = [threading.Thread(target=worker, args=(i,)) for i in range(len(models))]
    for t in workers:
        t.start()
    try:
        ready.wait()
    except threading.BrokenBarrierError:
        for t in workers:
            t.join()
        raise errors[0] from None
    t0 = time.perf_counter()
    for t in workers:
        t.join()
    elapsed = time.perf_counter() - t0
    samples = len(models) * cfg.iterations * cfg.batch
    return BenchReport(len(models), threads, cfg.batch, samples, elapsed, samples / elapsed, max(first_ms),
                       latency_stats([s for per in latencies for s in per]), peak_memory_mb(), cores)


def run_datalist(prefix: str | Path, datalist: Sequence[Path], out_dir: Path, pre: Preprocessing,
                 batch: int = 1, progress: bool = True, remote=None) -> int:
    """Infer every npz of the datalist and write `output_0` per input, named by datalist position."""
    from ..io.outputs import check_output_dir
    from .runner import model_input

    BenchConfig(batch=batch)  # -b checked as the timing mode checks it
    check_output_dir(out_dir, "--path_output")
    model = load_models(prefix, 1, remote)[0]
    done = 0
    for start in tqdm(range(0, len(datalist), batch), disable=not progress or len(datalist) < 20, unit="batch"):
        items = datalist[start:start + batch]
        outputs = model.run(np.stack([model_input(pre, load_input(p), model.fused) for p in items]))
        for offset, (item, row) in enumerate(zip(items, outputs)):
            save_npz(output_path(out_dir, start + offset, item), output_0=row[None])
            done += 1
    return done


@dataclass(frozen=True)
class EndToEndReport:
    """Images/s over real images, decode + preprocess + inference, as the runner does them."""
    images: int
    seconds: float
    images_per_second: float
    preprocess: str            # host | fused
    mode: str
    instances: int
    batch: int

    def text(self) -> str:
        return (f"end-to-end ({self.preprocess} preprocessing, {self.mode}, {self.instances} instance(s), "
                f"batch {self.batch}): {self.images} images in {self.seconds:.3f} s, "
                f"{self.images_per_second:.2f} images/s")


def end_to_end(prefix: str | Path, paths: Sequence[Path], pre: Preprocessing, mode: str = "sync",
               instances: int = 1, batch: int = 1, remote=None) -> EndToEndReport:
    """Time the runner over real images (decode, preprocess, infer, top-5); models are loaded and
    warmed up first so the time is the steady state."""
    from .runner import classify, model_input
    from ..preprocess import read_image

    models = load_models(prefix, instances if mode == "async" or remote is not None else 1, remote)
    warm = np.stack([model_input(pre, read_image(paths[0]), models[0].fused)] * batch)
    for model in models:
        model.run(warm)
    summary = classify(models, paths, pre, batch=batch, mode="async" if len(models) > 1 else mode,
                       progress=False)
    return EndToEndReport(len(summary.predictions), summary.seconds, summary.images_per_second,
                          "fused" if models[0].fused else "host", mode, len(models), batch)
