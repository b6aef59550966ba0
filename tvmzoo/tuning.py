"""MetaSchedule tuning of a model's kernels, and applying the records at build time.

Both sides prepare the module the same way (`tuning_passes`), so the kernels tuned are
structurally the kernels looked up later. Records are MetaSchedule's JSON database in `work_dir`:
`database_workload.json` + `database_tuning_record.json` (MetaSchedule's own logs go to
`work_dir/logs/`). Tuning is resumable: every `tune` call runs `max_trials_global` new trials,
and the evolutionary search starts from the best records already in the database.

Weights must be bound as constants: the tuned kernels read pre-packed weight layouts
(AttachAttrLayoutFreeBuffers -> MetaSchedule's RewriteLayout), and the packing is folded into
the constants at build time (SplitLayoutRewritePreproc, LiftTransformParams, FoldConstant).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import tvm
from tvm import relax, tirx
from tvm.ir import IRModule
from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms
from tvm.target import Target

from .errors import ConfigError
from .schedules import canonicalize, fuse_passes, layout_passes, prepack_passes, schedule_pass

log = logging.getLogger(__name__)

WORKLOAD_FILE = "database_workload.json"
RECORD_FILE = "database_tuning_record.json"
# Kernels worth tuning (task names are the fused kernel names); the rest keep default schedules.
TUNED_OPS = ["conv2d", "matmul", "dense", "pool", "mean"]
# MetaSchedule's 30 s default kills builds on a busy 2-core machine (a worker importing tvm
# alone takes ~5 s there).
BUILD_TIMEOUT_S = 120.0


def tuning_passes(target: Target) -> tvm.transform.Pass:
    """The module exactly as tuned: canonical form, NHWC, fused kernels, layout-free weights."""
    return tvm.transform.Sequential([*layout_passes(), *fuse_passes(),
                                     relax.transform.AttachAttrLayoutFreeBuffers()])


def _prepare(mod: IRModule, target: Target) -> IRModule:
    with target:
        return tuning_passes(target)(canonicalize(mod))


@derived_object
class _Progress(ms.measure_callback.PyMeasureCallback):
    """Logs trials done and each task's best latency after every measured batch."""

    def __init__(self, total: int) -> None:
        super().__init__()
        self.total = total
        self.done = 0
        self.best: dict[int, float] = {}
        self.start = time.monotonic()

    def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results) -> None:
        self.done += len(runner_results)
        for res in runner_results:
            if res.error_msg is None and res.run_secs:
                secs = sum(float(s) for s in res.run_secs) / len(res.run_secs)
                self.best[task_id] = min(self.best.get(task_id, secs), secs)
        best = self.best.get(task_id)
        log.info("tuning: %d/%d trials (%.0f s); task %d best %s", self.done, self.total,
                 time.monotonic() - self.start, task_id,
                 f"{best * 1e3:.3f} ms" if best is not None else "none yet")


def _search_strategy(per_task: int) -> ms.search_strategy.EvolutionarySearch:
    """MetaSchedule's evolutionary search; a small population when only a few trials per task
    are wanted (the default 512 spends minutes per task before the first trial)."""
    population = 512 if per_task >= 64 else 32
    return ms.search_strategy.EvolutionarySearch(population_size=population,
                                                 init_min_unmeasured=min(50, population))


def tune(mod: IRModule, target: Target, work_dir: Path, max_trials_global: int,
         max_trials_per_task: int | None = None, *, seed: int | None = None) -> int:
    """Tune the conv / matmul / pooling kernels of `mod` (a Relax module from ONNX, weights bound
    as constants, precision already applied) into the JSON database in `work_dir`.
    Returns the number of tuning records in the database afterwards."""
    if max_trials_global < 1:
        raise ConfigError(f"max_trials_global must be >= 1, got {max_trials_global}: "
                          "pass the number of tuning trials to run.")
    if "num-cores" not in target.attrs:
        raise ConfigError(f"target {target} has no 'num-cores': MetaSchedule needs it; "
                          "build the target with tvmzoo.target.")
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    prepared = _prepare(mod, target)
    per_task = max_trials_per_task or max_trials_global
    log.info("tuning into %s: %d trials, at most %d per task", work_dir, max_trials_global, per_task)
    database = ms.relax_integration.tune_relax(
        prepared, params={}, target=target, work_dir=str(work_dir),
        max_trials_global=max_trials_global, max_trials_per_task=per_task, op_names=TUNED_OPS,
        num_trials_per_iter=min(64, per_task), seed=seed,
        builder=ms.builder.LocalBuilder(timeout_sec=BUILD_TIMEOUT_S),
        strategy=_search_strategy(per_task),
        measure_callbacks=[*ms.measure_callback.MeasureCallback.create("default"),
                           _Progress(max_trials_global)],
    )
    return len(database)


def has_records(work_dir: Path) -> bool:
    return (Path(work_dir) / WORKLOAD_FILE).is_file() and (Path(work_dir) / RECORD_FILE).is_file()


def _scheduled(mod: IRModule) -> set[str]:
    return {gv.name_hint for gv, f in mod.functions_items()
            if isinstance(f, tirx.PrimFunc) and f.attrs.get("tirx.is_scheduled", False)}


def apply_records(mod: IRModule, target: Target, work_dir: Path | None) -> tuple[IRModule, int, int]:
    """Tuned schedules from `work_dir` (if it holds records), default schedules for every other
    kernel. Returns (module ready for tvm.compile, kernels tuned, kernels on default schedules)."""
    prepared = _prepare(mod, target)
    with target:
        if work_dir is not None and has_records(work_dir):
            prepared = relax.transform.MetaScheduleApplyDatabase(str(work_dir))(prepared)
        elif work_dir is not None:
            log.warning("no tuning records in %s: every kernel uses its default schedule", work_dir)
        tuned = _scheduled(prepared)
        prepared = schedule_pass()(prepared)
        fallback = _scheduled(prepared) - tuned
        prepared = tvm.transform.Sequential(prepack_passes())(prepared)
    log.info("kernels: %d tuned, %d default schedules", len(tuned), len(fallback))
    return prepared, len(tuned), len(fallback)
