"""MetaSchedule tuning of a model's kernels into a records folder (tvmzoo.compile.records).

The module is tuned as the build pipeline prepares it (`tuning_pipeline`: the phases before
scheduling), so the kernels tuned are structurally the kernels looked up at build time.
MetaSchedule's own logs go to `work_dir/logs/`. Tuning is resumable: every `tune` call runs
`max_trials_global` new trials, and the evolutionary search starts from the best records already
in the database; then the default schedules are measured against the tuned ones
(tvmzoo.compile.seeding). Candidates run here or on TVM RPC devices (tvmzoo.compile.measure).

Weights must be bound as constants: the tuned kernels read pre-packed weight layouts
(AttachAttrLayoutFreeBuffers -> MetaSchedule's RewriteLayout), and the packing is folded into
the constants at build time (the pipeline's prepack phase).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

from tvm.ir import IRModule
from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms
from tvm.target import Target

from ..errors import ConfigError
from .measure import make_builder, make_runner
from .pipeline import tuning_pipeline
from .records import read_records
from .seeding import seed_default_schedules

if TYPE_CHECKING:
    from ..run.devices import RemoteSpec

log = logging.getLogger(__name__)

# Kernels worth tuning (task names are the fused kernel names); the rest keep default schedules.
TUNED_OPS = ["conv2d", "matmul", "dense", "pool", "mean"]


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
         max_trials_per_task: int | None = None, *, precision: str = "fp32", seed: int | None = None,
         remote: RemoteSpec | None = None) -> int:
    """Tune the conv / matmul / pooling kernels of `mod` (a Relax module from ONNX, weights bound
    as constants) built at `precision` into the JSON database in `work_dir`; then measure
    the default schedules against the tuned ones and compact the records (seed_default_schedules;
    with 0 trials, only that). Candidates run on this machine, or on `remote`'s RPC devices.
    Returns the number of tuning records in the database afterwards."""
    if max_trials_global < 0:
        raise ConfigError(f"max_trials_global must be >= 0, got {max_trials_global}: pass the number of "
                          "tuning trials to run (0: only re-measure the default schedules against the records).")
    if "num-cores" not in target.attrs:
        raise ConfigError(f"target {target} has no 'num-cores': MetaSchedule needs it; "
                          "build the target with tvmzoo.compile.target.")
    work_dir = Path(work_dir)
    prepared = tuning_pipeline(target, precision)(mod)
    if max_trials_global == 0:  # e.g. after an upgrade changed the default schedules
        log.info("0 trials: re-measuring the default schedules against the records in %s", work_dir)
        seed_default_schedules(prepared, target, work_dir, remote)
        return len(read_records(work_dir))
    work_dir.mkdir(parents=True, exist_ok=True)
    per_task = max_trials_per_task or max_trials_global
    log.info("tuning into %s: %d trials, at most %d per task", work_dir, max_trials_global, per_task)
    runner = make_runner(remote)
    database = ms.relax_integration.tune_relax(
        prepared, params={}, target=target, work_dir=str(work_dir),
        max_trials_global=max_trials_global, max_trials_per_task=per_task, op_names=TUNED_OPS,
        num_trials_per_iter=min(64, per_task), seed=seed,
        builder=make_builder(), runner=runner,
        strategy=_search_strategy(per_task),
        measure_callbacks=[*ms.measure_callback.MeasureCallback.create("default"),
                           _Progress(max_trials_global)],
    )
    del database  # the JSON files are rewritten below
    seed_default_schedules(prepared, target, work_dir, remote)
    return len(read_records(work_dir))
