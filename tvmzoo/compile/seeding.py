"""Tuning never loses to the default schedules: after tuning, `seed_default_schedules` measures
tvmzoo's default schedule (tvmzoo.compile.schedules) of every tuned kernel head to head with the best
tuned record (same builder / runner as tuning, interleaved rounds, so both see the same load) and
commits both as records; ApplyTuningRecords then applies whichever measured faster.
`compact_records` keeps, per workload, the best MetaSchedule record (the seed a resumed tuning
starts from) and the newest default-schedule record."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import tvm_ffi
from tvm import s_tir, tirx
from tvm.ir import IRModule
from tvm.s_tir import meta_schedule as ms
from tvm.target import Target

from ..errors import ConfigError
from .measure import make_builder, make_runner
from .records import compact_records, fmt_ms, has_records, is_default_trace, mean_secs, normalize
from .schedules import default_schedule

if TYPE_CHECKING:
    from ..run.devices import RemoteSpec

log = logging.getLogger(__name__)

# Head-to-head measurement rounds of default vs tuned schedule (interleaved; min per candidate).
MEASURE_ROUNDS = 3


@dataclass(frozen=True)
class SeedResult:
    """One tuned kernel, its default and best tuned schedule measured head to head (seconds;
    None: no such schedule, or it failed to build / run)."""
    kernel: str
    default_s: float | None
    tuned_s: float | None

    @property
    def winner(self) -> str:
        if self.default_s is None:
            return "tuned"
        return "default" if self.tuned_s is None or self.default_s <= self.tuned_s else "tuned"


@dataclass
class _Candidate:
    kernel: str
    workload: ms.database.Workload
    trace: s_tir.Trace
    is_default: bool
    mod: IRModule
    args_info: list
    run_secs: list[float] | None = None


def _candidate(kernel: str, workload: ms.database.Workload, trace: s_tir.Trace,
               is_default: bool) -> _Candidate | None:
    """The kernel as MetaScheduleApplyDatabase builds it from a record with `trace` (None: the
    trace does not replay on the workload)."""
    sch = s_tir.Schedule(workload.mod)
    try:
        trace.apply_to_schedule(sch, remove_postproc=False)
    except Exception as err:  # TVM raises many kinds; the kernel keeps its other schedule
        log.warning("%s: a schedule trace does not replay: %s", kernel, str(err).strip().splitlines()[-1])
        return None
    # args as the tuning runner passes them: a tuned kernel may read a re-laid-out weight
    args_info = ms.arg_info.ArgInfo.from_entry_func(sch.mod, remove_preproc=True)
    return _Candidate(kernel, workload, trace, is_default, sch.mod, args_info)


def measure(cands: list[_Candidate], target: Target, remote: RemoteSpec | None = None) -> None:
    """Sets each candidate's run_secs with tune()'s builder and runner (settings included); all
    candidates run in turn, MEASURE_ROUNDS times, so each sees the same load; each keeps its
    fastest round (None: failed to build or run)."""
    built = make_builder().build(
        [ms.builder.BuilderInput(c.mod, target) for c in cands])
    ok = []
    for cand, res in zip(cands, built):
        if res.error_msg is None:
            ok.append((cand, res.artifact_path))
        else:
            log.warning("%s: schedule failed to build: %s", cand.kernel,
                        res.error_msg.strip().splitlines()[-1][:300])
    runner = make_runner(remote)
    inputs = [ms.runner.RunnerInput(path, "cpu", c.args_info) for c, path in ok]
    try:
        for _ in range(MEASURE_ROUNDS):
            for (cand, _path), future in zip(ok, runner.run(inputs)):
                res = future.result()
                if res.error_msg is not None or not res.run_secs:
                    log.warning("%s: schedule failed to run: %s", cand.kernel,
                                (res.error_msg or "no result").strip().splitlines()[-1][:300])
                    continue
                secs = [float(x) for x in res.run_secs]
                if cand.run_secs is None or mean_secs(secs) < mean_secs(cand.run_secs):
                    cand.run_secs = secs
    finally:
        for _cand, path in ok:
            ms.utils.remove_build_dir(path)


def seed_default_schedules(prepared: IRModule, target: Target, work_dir: Path,
                           remote: RemoteSpec | None = None) -> list[SeedResult]:
    """For every kernel of `prepared` (the module as tuned) with a workload in `work_dir`'s records:
    measure its default schedule and its best tuned record head to head (here, or on `remote`'s
    RPC devices, as tuning did) and commit both as
    records, so that MetaScheduleApplyDatabase applies the faster. Compacts the records before
    (only the best tuned record is measured) and after (fresh measurements replace older ones)."""
    work_dir = Path(work_dir)
    if not has_records(work_dir):
        raise ConfigError(f"no tuning records in {work_dir}: run `vamc tune` (tvmzoo.compile.tuning.tune) "
                          "into that folder first.")
    compact_records(work_dir)
    db = ms.database.JSONDatabase(work_dir=str(work_dir))
    cands = _candidates(prepared, target, db)
    if not cands:
        log.warning("no kernel of the module has a workload in %s: records from another model?", work_dir)
        return []
    measure(cands, target, remote)
    for c in cands:
        if c.run_secs is not None:
            db.commit_tuning_record(ms.database.TuningRecord(
                c.trace, c.workload, [tirx.FloatImm("float64", s) for s in c.run_secs], target, c.args_info))
    del db
    compact_records(work_dir)
    results = []
    for kernel in dict.fromkeys(c.kernel for c in cands):
        secs = {c.is_default: mean_secs(c.run_secs) for c in cands if c.kernel == kernel and c.run_secs}
        results.append(SeedResult(kernel, secs.get(True), secs.get(False)))
        log.info("%s: default %s, tuned %s -> %s", kernel, fmt_ms(secs.get(True)), fmt_ms(secs.get(False)),
                 results[-1].winner)
    return results


def _candidates(prepared: IRModule, target: Target, db: ms.database.Database) -> list[_Candidate]:
    """Per workload of the module's kernels: its default schedule and its best tuned record."""
    cands: list[_Candidate] = []
    seen: set[int] = set()
    for gv, func in prepared.functions_items():
        if not isinstance(func, tirx.PrimFunc):
            continue
        query = normalize(func)  # what MetaScheduleApplyDatabase looks up
        if not db.has_workload(query):
            continue
        workload = db.commit_workload(query)
        key = tvm_ffi.structural_hash(workload.mod)
        if key in seen:
            continue
        seen.add(key)
        sch = default_schedule(workload.mod["main"], target)
        tuned = next((r for r in db.get_top_k(workload, 2) if not is_default_trace(r.trace)), None)
        traces = [(sch.trace, True)] if sch is not None else []
        traces += [(tuned.trace, False)] if tuned is not None else []
        for trace, is_default in traces:
            cand = _candidate(gv.name_hint, workload, trace, is_default)
            if cand is not None:
                cands.append(cand)
    return cands
