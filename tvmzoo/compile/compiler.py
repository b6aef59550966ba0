"""Step 3: deploy ONNX -> Relax -> the named pipeline (tvmzoo.compile.pipeline) -> build ->
<workspace>/<name>/mod.so + mod.json."""
from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import onnx
import tvm
from onnx import helper

from .. import __version__
from ..io.atomic import atomic_dir
from ..io.package_data import build_in
from ..config import PRECISIONS, BuildConfig, Quantize
from ..errors import ConfigError, ModuleError, TvmzooError, in_context
from ..models.export import ExportSpec, export_onnx
from ..preprocess import MAX_PIXELS, Preprocessing
from ..run.runtime import META_FILE, MODULE_FILE, file_sha256
from .cpu import host_cpu, host_flags
from .pipeline import KernelCount, pass_names, run_pipeline
from .schedules import AMX_RULES
from .preflight import beside_yaml, check_build_inputs, check_build_output
from .target import required_features, resolve_target

if TYPE_CHECKING:
    from ..run.devices import RemoteSpec

log = logging.getLogger(__name__)

TUNING_ROOT = build_in("tuning")


@dataclass(frozen=True)
class InputSpec:
    name: str
    shape: tuple[int, ...]      # a fixed batch: a symbolic one gets no schedules (15x slower) and no int8
    dtype: str = "float32"
    layout: str = "NCHW"

    @property
    def size_hw(self) -> tuple[int, int]:
        """(height, width) of the NCHW image input."""
        return int(self.shape[2]), int(self.shape[3])


def input_spec(cfg: BuildConfig) -> InputSpec:
    if len(cfg.frontend.shape) != 1:
        raise ConfigError(f"{cfg.path}: frontend.shape names {len(cfg.frontend.shape)} inputs; "
                          "tvmzoo compiles image classifiers with exactly one input.")
    (name, shape), = cfg.frontend.shape.items()
    dims = tuple(int(d) for d in shape)   # the schema took integers >= 1
    if len(dims) != 4 or dims[1] != 3:
        raise ConfigError(f"{cfg.path}: frontend.shape.{name} is {list(shape)}; expected [N, 3, H, W] "
                          "with N the batch size (build one model per batch size you deploy) and H, W the input size.")
    if dims[2] * dims[3] > MAX_PIXELS or math.prod(dims) >= 2 ** 31:   # TVM indexes tensors with int32
        raise ConfigError(f"{cfg.path}: frontend.shape.{name} is {list(shape)}: too large to compile (at most "
                          f"{MAX_PIXELS} pixels per image and 2^31 values per batch; the models here take "
                          "e.g. 224 x 224). Set the input size the model was trained at.")
    return InputSpec(name, dims)


def ensure_onnx(cfg: BuildConfig, spec: InputSpec) -> Path:
    """The deploy ONNX of the YAML; exported first (step 1) when it does not exist and a model section says how.
    Callers run check_build_inputs first (it checks the ONNX or the model section, once per build)."""
    path = Path(cfg.frontend.checkpoint)
    if path.is_file():
        return path
    log.info("%s not found: exporting it from %s", path, cfg.model.weights)
    try:
        return export_onnx(ExportSpec(cfg.model.family, cfg.model.arch, cfg.model.source, str(cfg.model.weights),
                                      size_hw=spec.size_hw), path)
    except TvmzooError as exc:  # name the YAML whose model section led here
        raise in_context(exc, f"{cfg.path}: model") from None


def append_softmax(model: onnx.ModelProto) -> onnx.ModelProto:
    """graph.extra_ops: softmax — add a Softmax over the class axis of the (single) output."""
    graph = model.graph
    out = graph.output[0]
    logits = out.name + "_logits"
    for node in graph.node:
        node.output[:] = [logits if o == out.name else o for o in node.output]
    graph.node.append(helper.make_node("Softmax", [logits], [out.name], axis=-1, name="extra_softmax"))
    return model


def prepare_onnx(cfg: BuildConfig, spec: InputSpec) -> tuple[onnx.ModelProto, Path]:
    path = ensure_onnx(cfg, spec)
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # onnx raises DecodeError and friends
        raise ConfigError(f"{path} is not a readable ONNX model ({exc}). Re-export it with tvmzoo export.") from exc
    if not model.graph.node:  # protobuf reads an empty file (or one of zeros) as an empty model
        raise ConfigError(f"{cfg.path}: frontend.checkpoint {path} holds no ONNX graph ({path.stat().st_size} "
                          "bytes): it is empty or not an ONNX model. Re-export it with tvmzoo export.")
    names = [i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    if names != [spec.name]:
        raise ConfigError(f"{cfg.path}: frontend.shape names input '{spec.name}' but {path} has inputs {names}. "
                          f"Change the key under frontend.shape to '{names[0] if names else '?'}'.")
    if cfg.graph.extra_ops == "softmax":
        model = append_softmax(model)
    return model, path


def records_dir(cfg: BuildConfig, spec: InputSpec, target: dict, precision: str | None = None,
                nearest: bool = True) -> Path | None:
    """Where this build's tuning records live: the YAML's tuning.records, else
    build_in/tuning/<family>-<arch>/<target-key>/<precision>-b<batch>-<HxW>/ (shipped records; with
    `nearest`, those of the nearest CPU with the same vector ISA when this CPU has none)."""
    if cfg.tuning and cfg.tuning.get("records"):
        return Path(cfg.tuning["records"])
    if cfg.model is None:
        return None
    from ..models import get_family, resolve_arch
    from .record_folder import records_for
    from .target import target_key

    arch = resolve_arch(get_family(cfg.model.family), cfg.model.arch)
    root = TUNING_ROOT / f"{cfg.model.family}-{arch}".lower()
    build = f"{precision or cfg.backend.dtype}-b{spec.shape[0]}-{spec.shape[2]}x{spec.shape[3]}"
    return records_for(root, target, build) if nearest else root / target_key(target) / build


def _check_records(cfg: BuildConfig, records: Path | None) -> None:
    from .records import records_problem

    named = bool(cfg.tuning and cfg.tuning.get("records"))
    problem = records and records_problem(records, named)
    if problem:
        raise ConfigError(f"{cfg.path}: {'tuning.records' if named else 'the shipped tuning records'} "
                          f"{records} {problem}{beside_yaml(cfg, records)}.")


def to_relax(model: onnx.ModelProto, spec: InputSpec) -> tvm.IRModule:
    from tvm.relax.frontend.onnx import from_onnx

    return from_onnx(model, shape_dict={spec.name: list(spec.shape)}, dtype_dict={spec.name: spec.dtype},
                     keep_params_in_input=False)


def build_module(model: onnx.ModelProto, spec: InputSpec, precision: str, target: dict,
                 records: Path | None = None) -> tuple[tvm.runtime.Executable, dict]:
    """Compile; returns the executable and how its kernels were scheduled."""
    tvm_target = tvm.target.Target(target)
    count, built = KernelCount(), False
    try:
        mod, _ = run_pipeline(to_relax(model, spec), tvm_target, precision, records, count)
        built = True
        return tvm.compile(mod, tvm_target), {"tuned": count.tuned, "default": count.default,
                                              "rules": count.rules,
                                              "records": str(records) if records else None,
                                              "pipeline": pass_names(precision, records)}
    except TvmzooError:
        raise
    except Exception as exc:  # TVM's internal errors: keep the user-facing message to one line
        detail = next((line for line in str(exc).splitlines() if "Error" in line or "failed" in line),
                      str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        step = "build" if built else count.current or "import"
        raise ModuleError(f"TVM could not compile the model ({precision}, step '{step}'): "
                          f"{detail.strip()[:300]}. Try another backend.dtype; if it persists, report it "
                          "with the YAML and the ONNX.") from exc


def preprocessing_of(cfg: BuildConfig) -> Preprocessing | None:
    """What the module expects: the YAML's process_ops, else that of the model's weights entry
    (tvmzoo.models.weights), else unknown (the runner then asks for a vdsp JSON)."""
    if cfg.dataset is not None and cfg.dataset.process_ops:
        return Preprocessing.from_process_ops(cfg.dataset.process_ops)
    if cfg.model is not None:
        from ..models import weights_for

        try:
            return weights_for(cfg.model.family, cfg.model.arch, cfg.model.source).preprocessing
        except ConfigError as err:
            log.warning("%s: no preprocessing recorded in the module (%s)", cfg.path, err)
    return None


def output_shapes(model: onnx.ModelProto) -> list[dict]:
    def dims(value_info) -> list:
        return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]

    return [{"name": o.name, "shape": dims(o)} for o in model.graph.output]


def plan_for(cfg: BuildConfig, target: dict, features: list[str] | None = None, measure: bool = True):
    """What backend.dtype computes in on this target (tvmzoo.compile.precision); logs what it did and
    which precisions are fastest on the target's CPU. `features`: required_features(target), if known.
    A bf16 build on AVX512-BF16 without AMX is measured on this host (tvmzoo.compile.bf16_probe) when
    `measure` and the target is this host's CPU."""
    from .precision import bf16_needs_probe, describe_fastest, plan_precision

    features = required_features(target) if features is None else features
    cpu, choice = str(target.get("mcpu", "generic")), cfg.backend.bf16_compute
    probe = None
    if cfg.backend.dtype == "bf16" and bf16_needs_probe(features, choice) and measure and runs_here(target):
        from . import bf16_probe

        probe = bf16_probe.measure(target)
    plan = plan_precision(cfg.backend.dtype, cpu, features, probe, choice)
    if plan.note:
        log.warning("%s", plan.note)
    log.info("precisions on %s, fastest first: %s", cpu,
             describe_fastest(features, PRECISIONS, bf16_fast=probe is not None and plan.compute == "bf16"))
    return plan


def runs_here(target: dict) -> bool:
    """Whether `target` is this host's CPU (the one LLVM and the CPU flags name), with no instruction set
    the host lacks: a module built for it can be timed here. Cross-compiles cannot."""
    host = host_flags()
    return (target.get("kind") == "llvm" and target.get("mcpu") == host_cpu().name and host is not None
            and set(required_features(target)) <= host)


def _check_tuning_here(target: dict) -> None:
    """Tuning measures candidates on this CPU: for another CPU's target, an error where this one cannot
    run its code, else a warning (the records are stored under that CPU's name, measured on this one)."""
    missing = sorted(set(required_features(target)) - (host_flags() or set()))
    mcpu = target.get("mcpu")
    if missing:
        raise ConfigError(f"cannot tune for -mcpu={mcpu} here: this CPU lacks {', '.join(missing)}, so the "
                          "candidates cannot run. Tune on such a CPU, or measure there with --rpc / --rpc-tracker.")
    log.warning("tuning for -mcpu=%s on this CPU (%s): the records are measured here, not on a %s; tune there "
                "(or with --rpc) for records that fit it", mcpu, host_cpu().name, mcpu)


def compile_model(cfg: BuildConfig) -> Path:
    """Compile the YAML's model; returns the model directory holding mod.so and mod.json."""
    precision = cfg.backend.dtype
    for key, value in (cfg.backend.compile or {}).items():
        log.debug("backend.compile.%s=%r is a vendor hardware knob: ignored", key, value)
    spec = input_spec(cfg)
    target = resolve_target(cfg.backend.target)
    check_build_inputs(cfg)
    out_dir = check_build_output(cfg)  # replaces only an earlier build: never a user's folder
    features = required_features(target)
    plan = plan_for(cfg, target, features)
    model, onnx_path = prepare_onnx(cfg, spec)
    pre = preprocessing_of(cfg)
    records = records_dir(cfg, spec, target, plan.compute)  # the same kernels with fused preprocessing
    _check_records(cfg, records)
    t0 = time.perf_counter()
    with atomic_dir(out_dir) as tmp:
        _carry_over(out_dir, tmp)
        if precision == "int8":
            model = quantize_for_build(cfg, model, spec, pre, tmp / "calib.json")
        if cfg.graph.preprocess == "fused":  # crop / normalize / layout inside the module (tvmzoo.preprocess.fused)
            from ..preprocess.fused import fuse_for_build
            model, spec = fuse_for_build(model, spec, pre, cfg.path)
        executable, kernels = build_module(model, spec, plan.compute, target, records)
        executable.export_library(str(tmp / MODULE_FILE))
        meta = {
            "tvmzoo_version": __version__,
            "tvm_version": tvm.__version__,
            "name": cfg.name,
            "precision": precision,
            "compute": {"precision": plan.compute, "note": plan.note,
                        "measured": plan.probe.to_meta() if plan.probe else None},
            "target": target,
            "cpu_features": features,
            "amx_kernels": sum(n for rule, n in kernels["rules"].items() if rule in AMX_RULES),
            "target_choice": "backend.target" if cfg.backend.target else host_cpu().reason,
            "input": {**asdict(spec), "shape": list(spec.shape)},
            "outputs": output_shapes(model),
            "softmax": cfg.graph.extra_ops == "softmax",
            "preprocess": cfg.graph.preprocess,      # fused: the input is the resized uint8 BGR NHWC image
            "preprocessing": pre.to_meta() if pre is not None else None,
            "module_sha256": file_sha256(tmp / MODULE_FILE),  # the runtime refuses a mod.so that differs
            "kernels": kernels,
            "source": {"onnx": str(onnx_path), "sha256": file_sha256(onnx_path),
                       "yaml": str(cfg.path) if cfg.path else None},
            "build_seconds": round(time.perf_counter() - t0, 2),
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    log.info("compiled %s (%s, %s) in %.1fs -> %s; kernels: %s", cfg.name, precision, target.get("mcpu"),
             time.perf_counter() - t0, out_dir, describe_kernels(kernels))
    return out_dir


def describe_kernels(kernels: dict) -> str:
    """How the kernels were scheduled, in words: records pin only the kernels where tuning beat the
    default schedule, so "none from records" is not a failure."""
    rules = ", ".join(f"{rule.removeprefix('Schedule')} {n}" for rule, n in sorted(kernels["rules"].items()))
    if kernels["records"] is None:
        source = "no tuning records for this target"
    elif kernels["tuned"] == 0:
        source = "the tuning records beat none of the default schedules"
    else:
        source = f"{kernels['tuned']} from tuning records"
    return f"{kernels['default']} on default schedules ({rules}); {source}"


def _carry_over(old_dir: Path, new_dir: Path) -> None:
    """Keep the calibration cache of the previous build: it is reused when nothing it depends on changed."""
    calib = old_dir / "calib.json"
    if calib.is_file():
        (new_dir / "calib.json").write_bytes(calib.read_bytes())


def quantize_for_build(cfg: BuildConfig, model: onnx.ModelProto, spec: InputSpec,
                       pre: Preprocessing | None, cache: Path) -> onnx.ModelProto:
    """Calibrate and insert QDQ; with backend.quantize.max_drop, hold out a quarter of the calibration
    images and keep the worst layers in float until the top-1 drop on them is within bound."""
    from .quant.calibration import calibration_batches
    from .quant.quant_report import quantize_with_fallback
    from .quant.quantize import quantize_model

    if cfg.dataset is None:
        raise ConfigError(f"{cfg.path}: backend.dtype int8 needs a dataset section (calibration images: "
                          "dataset.path, dataset.sampler, dataset.process_ops).")
    if pre is None:
        raise ConfigError(f"{cfg.path}: dataset.process_ops is empty; int8 calibration needs the preprocessing.")
    qcfg = cfg.backend.quantize
    batches = calibration_batches(cfg.dataset, pre)
    if qcfg.max_drop is None:
        return quantize_model(model, batches, qcfg, cache)
    split = max(1, len(batches) * 3 // 4)
    if split >= len(batches):
        raise ConfigError(f"{cfg.path}: backend.quantize.max_drop needs held-out images: raise "
                          "dataset.sampler.get_data_num (a quarter of them are held out).")
    qdq, kept = quantize_with_fallback(model, batches[:split], batches[split:], qcfg, cache_path=cache)
    log.info("accuracy fallback kept %d layer(s) in float: %s", len(kept), ", ".join(kept) or "none")
    return qdq


def quant_report(cfg: BuildConfig, out_dir: Path | None = None) -> tuple[Path, Path]:
    """`tvmzoo quant-report`: quantize as compile would and write the per-layer table (CSV and markdown)."""
    from .quant.calibration import calibration_batches
    from .quant.quant_report import layer_report, write_report
    from .quant.quantize import quantize_model

    spec = input_spec(cfg)
    check_build_inputs(cfg, calibrate=True)
    model, _ = prepare_onnx(cfg, spec)
    pre = preprocessing_of(cfg)
    if cfg.dataset is None or pre is None:
        raise ConfigError(f"{cfg.path}: the int8 report needs a dataset section with process_ops.")
    out_dir = Path(out_dir) if out_dir else Path(cfg.workspace) / f"{cfg.name}_quant_report"
    qcfg = cfg.backend.quantize or Quantize()   # an fp32 / fp16 YAML: the defaults its int8 build would use
    batches = calibration_batches(cfg.dataset, pre)
    qdq = quantize_model(model, batches, qcfg, out_dir / "calib.json")
    paths = out_dir / "quant_report.csv", out_dir / "quant_report.md"
    write_report(layer_report(model, qdq, batches, qcfg.calibrate_mode), *paths)
    return paths


def tune_build(cfg: BuildConfig, trials: int, per_task: int | None = None,
               remote: RemoteSpec | None = None) -> Path:
    """`vamc tune`: MetaSchedule over this build's kernels into its records folder (resumable:
    a second run continues from the records there), measured here or on `remote`'s RPC devices.
    Returns the records folder."""
    from .tuning import tune

    try:
        import xgboost  # noqa: F401 - MetaSchedule's cost model; fail before minutes of set-up
    except ImportError:
        raise ConfigError("tuning needs MetaSchedule's cost model: pip install 'tvmzoo[tune]' "
                          "(xgboost-cpu, scipy).") from None
    spec = input_spec(cfg)
    target = resolve_target(cfg.backend.target)
    if remote is None and not runs_here(target):
        _check_tuning_here(target)
    plan = plan_for(cfg, target, measure=remote is None)  # an RPC device's CPU is not measured here
    records = records_dir(cfg, spec, target, plan.compute, nearest=False)  # this CPU's own records
    if records is None:
        raise ConfigError(f"{cfg.path}: no place for tuning records: add a model: section or tuning.records.")
    check_build_inputs(cfg)
    model, _ = prepare_onnx(cfg, spec)
    if cfg.backend.dtype == "int8":
        with tempfile.TemporaryDirectory() as tmp:
            model = quantize_for_build(cfg, model, spec, preprocessing_of(cfg), Path(tmp) / "calib.json")
    count = tune(to_relax(model, spec), tvm.target.Target(target), records, trials, per_task,
                 precision=plan.compute, remote=remote)
    log.info("%d tuning records in %s", count, records)
    return records
