"""The build YAML's typed form: one frozen dataclass per section, and the values each key allows
(defined once: the compiler, the quantizer and the CLIs read them from here)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..preprocess import Preprocessing

BACKEND_TYPES = ("tvm",)
BACKEND_ALIASES = {"tvm_vacc": "tvm"}
PRECISIONS = ("fp32", "fp16", "bf16", "int8")  # backend.dtype
# backend.bf16_compute: what a bf16 build computes in on AVX512-BF16 without AMX (tvmzoo.compile.precision)
BF16_CHOICES = ("auto", "bf16", "fp32")
CALIBRATE_MODES = ("max", "percentile", "kl", "mse")
CALIBRATE_ALIASES = {"kl_divergence": "kl", "minmax": "max"}
PERCENTILE_RANGE = (50.0, 100.0)  # backend.quantize.percentile: the share of values kept, in (50, 100]
FRONTEND_TYPES = ("onnx",)
DATASET_TYPES = ("tvm",)
PREPROCESS_MODES = ("host", "fused")
EXTRA_OPS = ("softmax",)


@dataclass(frozen=True)
class Frontend:
    shape: dict[str, list[int]]
    checkpoint: Path
    type: str = "onnx"
    dtype: str = "fp32"


@dataclass(frozen=True)
class Quantize:
    calibrate_mode: str = "percentile"
    percentile: float = 99.99
    quantize_per_channel: bool = True
    skip_matmul_layers: list[int] = field(default_factory=list)
    skip_layers: list[str] = field(default_factory=list)
    keep_first_last_float: bool = False
    calibrate_chunk_by: int = -1
    max_drop: float | None = None


@dataclass(frozen=True)
class Backend:
    type: str = "tvm"
    dtype: str = "fp32"
    target: str | dict | None = None
    bf16_compute: str = "auto"
    compile: dict = field(default_factory=dict)
    quantize: Quantize | None = None


@dataclass(frozen=True)
class Graph:
    extra_ops: str | None = None
    preprocess: str = "host"


@dataclass(frozen=True)
class Dataset:
    path: Path
    type: str = "tvm"
    suffix: str = "JPEG"
    get_data_num: int = 50
    process_ops: list[dict] = field(default_factory=list)

    @property
    def preprocessing(self) -> Preprocessing | None:
        """The process_ops as a Preprocessing (validated at load time), None when there are none."""
        return Preprocessing.from_process_ops(self.process_ops, "dataset.process_ops") if self.process_ops else None


@dataclass(frozen=True)
class ModelSpec:
    family: str
    arch: str
    source: str = "official"
    weights: Path | str | None = None  # a checkpoint path, or "package" (weights a pip package installs)


@dataclass(frozen=True)
class BuildConfig:
    name: str
    frontend: Frontend
    backend: Backend
    workspace: Path
    path: Path
    graph: Graph = field(default_factory=Graph)
    dataset: Dataset | None = None
    model: ModelSpec | None = None
    tuning: dict | None = None

    @property
    def output_dir(self) -> Path:
        """Where the compiled model lands: <workspace>/<name>/."""
        return self.workspace / self.name
