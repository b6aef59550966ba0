"""The model repository: a folder of compiled builds (<name>/mod.so + mod.json, as `vamc compile`
writes them) or one build folder. Each build is loaded and checked (version, CPU features, checksum);
one that fails is kept, not ready, with the reason, and the others are served."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from ...errors import ConfigError, TvmzooError
from ...io.images import Labels, check_label_count, load_labels
from ..runtime import META_FILE, MODULE_FILE, CompiledModel, output_classes, read_meta

from . import native
from .batcher import DynamicBatcher
from .config import ServeConfig
from .metrics import VERSION, Metrics
from .native.batcher import NativeBatcher
from .tensors import ServeError, check_finite

log = logging.getLogger(__name__)

# TVM's pool workers spin TVM_THREAD_POOL_SPIN_COUNT sched_yield()s (300000 by default, tens of ms)
# after every parallel task before they sleep: between requests that burns the cores the event loop
# and the clients need (50-60 ms of CPU after each Lite0 request here). From 300 up a run makes no more
# futex sleeps than with 300000; 10000 also covers the ~1 ms between one client's requests, so the
# workers are still awake for the next one: c1 p50 0.2-1.1 ms lower than with 1000 on all 4 Lite0 builds
# over both protocols, c8 no worse (README, Serving), and an idle server still stops within a few ms.
POOL_SPIN_COUNT = "10000"


@dataclass
class ModelEntry:
    name: str
    directory: Path
    meta: dict | None = None
    problem: str | None = None                  # why the model is not ready
    labels: tuple[str, ...] | None = None
    batcher: DynamicBatcher | NativeBatcher | None = None
    instances: list[CompiledModel] = field(default_factory=list)

    @property
    def ready(self) -> bool:
        return self.problem is None and self.batcher is not None

    @property
    def fused(self) -> bool:
        return self.instances[0].fused if self.instances else self.meta.get("preprocess") == "fused"

    @property
    def input_name(self) -> str:
        return self.meta["input"]["name"]

    @property
    def input_datatype(self) -> str:
        return "UINT8" if self.meta["input"].get("dtype") == "uint8" else "FP32"

    @property
    def row_shape(self) -> tuple[int, ...]:
        """One image's input shape (the module's input without the batch axis)."""
        return tuple(self.meta["input"]["shape"][1:])

    @property
    def output_name(self) -> str:
        return self.meta["outputs"][0]["name"] if self.meta.get("outputs") else "output"

    @property
    def classes(self) -> int:
        return output_classes(self.meta) or -1

    def metadata(self) -> dict:
        """The protocol's model metadata; the batch axis is -1 (any number of rows per request)."""
        return {"name": self.name, "versions": [VERSION], "platform": "tvmzoo_tvm",
                "inputs": [{"name": self.input_name, "datatype": self.input_datatype,
                            "shape": [-1, *self.row_shape]}],
                "outputs": [{"name": self.output_name, "datatype": "FP32", "shape": [-1, self.classes]}]}

    def config(self, max_batch: int) -> dict:
        """A Triton model configuration (the fields its clients and perf_analyzer read)."""
        return {"name": self.name, "platform": "tvmzoo_tvm", "backend": "tvm", "max_batch_size": max_batch,
                "input": [{"name": self.input_name, "data_type": f"TYPE_{self.input_datatype}",
                           "dims": list(self.row_shape)}],
                "output": [{"name": self.output_name, "data_type": "TYPE_FP32", "dims": [self.classes],
                            **({"label_filename": "labels"} if self.labels else {})}],
                "dynamic_batching": {}}


def build_dirs(root: Path) -> list[Path]:
    """`root` itself when it is one build, else its subfolders that hold a build (or should: a
    folder with mod.so but no mod.json is listed, to be reported not ready)."""
    if (root / META_FILE).is_file():
        return [root]
    return sorted(p for p in root.iterdir()
                  if p.is_dir() and not p.name.startswith(".")
                  and ((p / META_FILE).is_file() or (p / MODULE_FILE).is_file()))


def model_labels(directory: Path, classes: int, labels_file: Path | None) -> tuple[str, ...] | None:
    """labels.txt next to mod.so, else --labels, else ImageNet-1k names for 1000 classes, else none."""
    local = directory / "labels.txt"
    path = local if local.is_file() else labels_file
    if path is None:
        return load_labels(None).names if classes == 1000 else None
    names = Labels.load(path).names if path == local else load_labels(path).names
    check_label_count(names, classes if classes > 0 else None, path, directory)
    return names


def load_entry(directory: Path, cfg: ServeConfig, metrics: Metrics, native_path: bool = False) -> ModelEntry:
    entry = ModelEntry(directory.name, directory)
    try:
        entry.instances = [CompiledModel.load(directory) for _ in range(cfg.instance_count)]
        entry.meta = entry.instances[0].meta
        entry.labels = model_labels(directory, entry.classes, cfg.labels)
    except TvmzooError as exc:
        entry.problem = str(exc)
        entry.meta = _readable_meta(directory)
        log.error("model %s is not ready: %s", entry.name, exc)
        return entry
    fixed = entry.instances[0].fixed_batch
    metrics.count_model(entry.name)
    if native_path:
        entry.batcher = NativeBatcher(entry.name, entry.instances, fixed, cfg.max_queue_delay_us * 1e-6, metrics,
                                      cfg.threads or 1, cfg.cores, entry.input_name)
    else:
        entry.batcher = DynamicBatcher(entry.name, entry.instances, fixed,
                                       cfg.max_queue_delay_us * 1e-6, metrics, cfg.threads or 1,
                                       cfg.cores, partial(check_finite, entry.input_name))
    log.info("model %s ready: %s %s, batch %s, %d instance(s) x %s%s", entry.name, entry.input_datatype,
             list(entry.meta["input"]["shape"]), fixed, cfg.instance_count,
             f"{cfg.threads} thread(s)" if cfg.threads else f"1-{len(cfg.cores)} threads (adaptive)",
             ", native" if native_path else "")
    return entry


def _readable_meta(directory: Path) -> dict | None:
    try:
        return read_meta(directory)
    except TvmzooError:
        return None


class Repository:
    def __init__(self, entries: list[ModelEntry], native_path: bool = False, native_why: str = "") -> None:
        self.models = {e.name: e for e in entries}
        self.native_path, self.native_why = native_path, native_why   # which data path serves, and why

    @classmethod
    def load(cls, cfg: ServeConfig, metrics: Metrics) -> Repository:
        if cfg.threads:  # TVM sizes each instance thread's pool from this when the thread first runs
            os.environ["TVM_NUM_THREADS"] = str(cfg.threads)
        os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", POOL_SPIN_COUNT)   # read at the first pool's start
        # built (or found built) before any model loads: with --native a build failure is one message
        native_path, why = native.choose(cfg.native)
        dirs = build_dirs(Path(cfg.repository))
        if not dirs:
            raise ConfigError(f"model repository {cfg.repository} holds no build: give a folder of compiled builds "
                              f"(<name>/{MODULE_FILE} + {META_FILE}, as `vamc compile` writes them) or one build folder.")
        return cls([load_entry(d, cfg, metrics, native_path) for d in dirs], native_path, why)

    @property
    def ready(self) -> bool:
        """Triton's strict readiness: every model in the repository is ready."""
        return bool(self.models) and all(e.ready for e in self.models.values())

    def get(self, name: str, version: str = "") -> ModelEntry:
        entry = self.models.get(name)
        if entry is None:
            known = ", ".join(sorted(self.models)) or "none"
            raise ServeError("NOT_FOUND", f"unknown model '{name}' (this server has: {known})")
        if version not in ("", VERSION):
            raise ServeError("NOT_FOUND", f"model '{name}' has no version '{version}' (it has: {VERSION})")
        return entry

    def get_ready(self, name: str, version: str = "") -> ModelEntry:
        entry = self.get(name, version)
        if not entry.ready:
            raise ServeError("UNAVAILABLE", f"model '{name}' is not ready: {entry.problem}")
        return entry

    def flush(self) -> None:
        for entry in self.models.values():
            if entry.batcher is not None:
                entry.batcher.flush()

    def close(self, timeout: float | None = None) -> None:
        for entry in self.models.values():
            if entry.batcher is not None:
                entry.batcher.close(timeout)
