"""MetaSchedule tuning of a model's kernels, and applying the records at build time.

Both sides prepare the module the same way (`tuning_passes`), so the kernels tuned are
structurally the kernels looked up later. Records are MetaSchedule's JSON database in `work_dir`:
`database_workload.json` + `database_tuning_record.json` (MetaSchedule's own logs go to
`work_dir/logs/`). Tuning is resumable: every `tune` call runs `max_trials_global` new trials,
and the evolutionary search starts from the best records already in the database.

Tuning never loses to the default schedules: after tuning, `seed_default_schedules` measures
tvmzoo's default schedule (tvmzoo.compile.schedules) of every tuned kernel head to head with the best
tuned record (same builder / runner as tuning, interleaved rounds, so both see the same load) and
commits both as records; MetaScheduleApplyDatabase then applies whichever measured faster.
`compact_records` keeps, per workload, the best MetaSchedule record (the seed a resumed tuning
starts from) and the newest default-schedule record. A MetaSchedule trace always contains an
`EnterPostproc` instruction; a default-schedule trace never does: that tells the two apart.

Candidates are measured on this machine, or with a `RemoteSpec` on TVM RPC devices (MetaSchedule's
RPCRunner: through a tracker, one measurement per free device at a time, or on one server); tuning
and the default-vs-tuned head to head then both run on the remote devices.

Weights must be bound as constants: the tuned kernels read pre-packed weight layouts
(AttachAttrLayoutFreeBuffers -> MetaSchedule's RewriteLayout), and the packing is folded into
the constants at build time (SplitLayoutRewritePreproc, LiftTransformParams, FoldConstant).
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import tvm
import tvm_ffi
from tvm import relax, s_tir, tirx
from tvm.ir import IRModule
from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms
from tvm.target import Target

from ..errors import ConfigError, ModuleError
from .passes.graph_passes import canonicalize, fuse_passes, layout_passes
from .schedules import prepack_passes, schedule_pass

if TYPE_CHECKING:
    from ..run.devices import RemoteSpec

log = logging.getLogger(__name__)

WORKLOAD_FILE = "database_workload.json"
RECORD_FILE = "database_tuning_record.json"
# Kernels worth tuning (task names are the fused kernel names); the rest keep default schedules.
TUNED_OPS = ["conv2d", "matmul", "dense", "pool", "mean"]
# MetaSchedule's 30 s default kills builds on a busy 2-core machine (a worker importing tvm
# alone takes ~5 s there).
BUILD_TIMEOUT_S = 120.0
# Head-to-head measurement rounds of default vs tuned schedule (interleaved; min per candidate).
MEASURE_ROUNDS = 3
FAILED_RUN_SECS = 1e9  # MetaSchedule records failed runs with 1e10 s


def make_runner(remote: RemoteSpec | None = None) -> ms.runner.Runner:
    """Where candidates are measured: this machine, or the RPC device(s) of `remote`."""
    if remote is None:
        return ms.runner.LocalRunner(timeout_sec=BUILD_TIMEOUT_S)
    if remote.server is not None:  # no tracker: RPCConfig's tracker fields carry the server's address
        config = ms.runner.RPCConfig(*remote.server, "server", session_timeout_sec=int(BUILD_TIMEOUT_S))
        return ms.runner.RPCRunner(config, f_create_session=connect_server, max_workers=1)
    devices = _count_devices(remote)
    log.info("measuring on %d device(s) under %s", devices, remote.describe())
    config = ms.runner.RPCConfig(*remote.tracker, remote.key, session_timeout_sec=int(BUILD_TIMEOUT_S))
    return ms.runner.RPCRunner(config, max_workers=devices)  # one measurement per device at a time


def _count_devices(remote: RemoteSpec) -> int:
    """Servers registered under the key (busy or free), as MetaSchedule's RPCConfig counts them."""
    from tvm import rpc

    try:
        servers = rpc.connect_tracker(*remote.tracker).summary()["server_info"]
    except (OSError, RuntimeError) as exc:  # tvm's RPC raises RuntimeError / TVMError (a RuntimeError)
        raise ModuleError(f"cannot reach {remote.describe()}: {str(exc).splitlines()[0]}. "
                          "Is the tracker running (tvmzoo device tracker)?") from exc
    devices = sum(1 for server in servers if server["key"].partition(":")[2] == remote.key)
    if devices == 0:
        raise ConfigError(f"no device under {remote.describe()} to measure on: start one with "
                          f"`tvmzoo device serve --tracker {remote.tracker[0]}:{remote.tracker[1]} "
                          f"--key {remote.key}`.")
    return devices


def connect_server(config: ms.runner.RPCConfig):
    """RPCRunner's session factory for one server (`--rpc host:port`, no tracker); module level:
    MetaSchedule's worker processes import it by name."""
    from tvm import rpc

    return rpc.connect(config.tracker_host, config.tracker_port, session_timeout=config.session_timeout_sec)


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
         max_trials_per_task: int | None = None, *, seed: int | None = None,
         remote: RemoteSpec | None = None) -> int:
    """Tune the conv / matmul / pooling kernels of `mod` (a Relax module from ONNX, weights bound
    as constants, precision already applied) into the JSON database in `work_dir`; then measure
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
    if max_trials_global == 0:  # e.g. after an upgrade changed the default schedules
        log.info("0 trials: re-measuring the default schedules against the records in %s", work_dir)
        seed_default_schedules(mod, target, work_dir, remote)
        return len(_read_records(work_dir))
    work_dir.mkdir(parents=True, exist_ok=True)
    prepared = _prepare(mod, target)
    per_task = max_trials_per_task or max_trials_global
    log.info("tuning into %s: %d trials, at most %d per task", work_dir, max_trials_global, per_task)
    runner = make_runner(remote)
    database = ms.relax_integration.tune_relax(
        prepared, params={}, target=target, work_dir=str(work_dir),
        max_trials_global=max_trials_global, max_trials_per_task=per_task, op_names=TUNED_OPS,
        num_trials_per_iter=min(64, per_task), seed=seed,
        builder=ms.builder.LocalBuilder(timeout_sec=BUILD_TIMEOUT_S), runner=runner,
        strategy=_search_strategy(per_task),
        measure_callbacks=[*ms.measure_callback.MeasureCallback.create("default"),
                           _Progress(max_trials_global)],
    )
    del database  # the JSON files are rewritten below
    seed_default_schedules(mod, target, work_dir, remote)
    return len(_read_records(work_dir))


# ---------------------------------------------------------------- default schedules as records

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


def is_default_trace(trace: s_tir.Trace) -> bool:
    """A default-schedule trace (tvmzoo.compile.schedules), not one MetaSchedule searched."""
    return not any(inst.kind.name == "EnterPostproc" for inst in trace.insts)


def default_schedule(func: tirx.PrimFunc, target: Target) -> s_tir.Schedule | None:
    """The schedule `schedule_pass` gives `func` (first rule that applies), with its trace."""
    with target:
        for rule in schedule_pass().rules:
            sch = rule.apply(func, target, False)
            if isinstance(sch, list):
                sch = sch[0] if sch else None
            if sch is not None:
                return sch
    return None


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


def _measure(cands: list[_Candidate], target: Target, remote: RemoteSpec | None = None) -> None:
    """Sets each candidate's run_secs with tune()'s builder and runner (settings included); all
    candidates run in turn, MEASURE_ROUNDS times, so each sees the same load; each keeps its
    fastest round (None: failed to build or run)."""
    built = ms.builder.LocalBuilder(timeout_sec=BUILD_TIMEOUT_S).build(
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
                if cand.run_secs is None or _mean(secs) < _mean(cand.run_secs):
                    cand.run_secs = secs
    finally:
        for _cand, path in ok:
            ms.utils.remove_build_dir(path)


def _mean(secs) -> float:
    return sum(float(x) for x in secs) / len(secs) if secs else float("inf")


def seed_default_schedules(mod: IRModule, target: Target, work_dir: Path,
                           remote: RemoteSpec | None = None) -> list[SeedResult]:
    """For every kernel of `mod` (as given to `tune`) with a workload in `work_dir`'s records:
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
    cands = _candidates(_prepare(mod, target), target, db)
    if not cands:
        log.warning("no kernel of the module has a workload in %s: records from another model?", work_dir)
        return []
    _measure(cands, target, remote)
    for c in cands:
        if c.run_secs is not None:
            db.commit_tuning_record(ms.database.TuningRecord(
                c.trace, c.workload, [tirx.FloatImm("float64", s) for s in c.run_secs], target, c.args_info))
    del db
    compact_records(work_dir)
    results = []
    for kernel in dict.fromkeys(c.kernel for c in cands):
        secs = {c.is_default: _mean(c.run_secs) for c in cands if c.kernel == kernel and c.run_secs}
        results.append(SeedResult(kernel, secs.get(True), secs.get(False)))
        log.info("%s: default %s, tuned %s -> %s", kernel, _ms(secs.get(True)), _ms(secs.get(False)),
                 results[-1].winner)
    return results


def _candidates(prepared: IRModule, target: Target, db: ms.database.Database) -> list[_Candidate]:
    """Per workload of the module's kernels: its default schedule and its best tuned record."""
    cands: list[_Candidate] = []
    seen: set[int] = set()
    for gv, func in prepared.functions_items():
        if not isinstance(func, tirx.PrimFunc):
            continue
        query = _normalize(func)  # what MetaScheduleApplyDatabase looks up
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


def _normalize(func: tirx.PrimFunc) -> IRModule:
    return tvm.get_global_func("tvm.s_tir.meta_schedule.normalize_mod")(func)


def _ms(secs: float | None) -> str:
    return "n/a" if secs is None else f"{secs * 1e3:.3f} ms"


def _tuned_winners(prepared: IRModule, target: Target, work_dir: Path) -> ms.database.MemoryDatabase:
    """The records where a tuned schedule beat the default. Where the default won, the kernel gets
    the *current* default schedule (the stored default trace may be an older tvmzoo's)."""
    db = ms.database.JSONDatabase(work_dir=str(work_dir))
    winners = ms.database.MemoryDatabase()
    for gv, func in prepared.functions_items():
        if not isinstance(func, tirx.PrimFunc):
            continue
        query = _normalize(func)
        rec = db.query_tuning_record(query, target, gv.name_hint)
        if rec is None:
            continue
        default = is_default_trace(rec.trace)
        log.debug("%s: %s won (%s)", gv.name_hint, "default schedule" if default else "tuned schedule",
                  _ms(_mean(rec.run_secs)))
        if not default:
            winners.commit_tuning_record(ms.database.TuningRecord(
                rec.trace, winners.commit_workload(query), rec.run_secs, target, rec.args_info))
    return winners


def _read_records(work_dir: Path) -> list[list]:
    path = Path(work_dir) / RECORD_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _record_secs(record: list) -> float:
    secs = record[1][1]
    mean = _mean(secs) if secs else float("inf")
    return mean if mean < FAILED_RUN_SECS else float("inf")


def _json_is_default(record: list) -> bool:
    return not any(inst[0] == "EnterPostproc" for inst in record[1][0][0])


def compact_records(work_dir: Path) -> tuple[int, int]:
    """Keep per workload the fastest MetaSchedule record and the newest default-schedule record
    (a later measurement of the same trace replaces an earlier one); failed runs are dropped.
    The workload file is untouched (records refer to it by line). Returns (before, after)."""
    path = Path(work_dir) / RECORD_FILE
    records = _read_records(work_dir)
    newest: dict[tuple[int, str], tuple[int, list]] = {}
    for pos, rec in enumerate(records):
        newest[(rec[0], json.dumps(rec[1][0]))] = (pos, rec)  # later lines are newer
    best: dict[tuple[int, bool], tuple[int, list]] = {}
    for pos, rec in newest.values():
        if _record_secs(rec) == float("inf"):
            continue
        key = (rec[0], _json_is_default(rec))
        kept = best.get(key)
        if key[1]:
            better = kept is None or pos > kept[0]
        else:
            better = kept is None or _record_secs(rec) < _record_secs(kept[1])
        if better:
            best[key] = (pos, rec)
    kept = [rec for _, rec in sorted(best.values(), key=lambda pr: pr[0])]
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".records-")
    with os.fdopen(fd, "w") as f:
        f.writelines(json.dumps(rec, separators=(",", ":")) + "\n" for rec in kept)
    os.replace(tmp, path)
    log.info("compacted %s: %d -> %d records", path, len(records), len(kept))
    return len(records), len(kept)


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
            with _tuned_winners(prepared, target, Path(work_dir)):
                prepared = relax.transform.MetaScheduleApplyDatabase()(prepared)
        elif work_dir is not None:  # a warning only where records were expected: the folder exists
            (log.warning if Path(work_dir).exists() else log.info)(
                "no tuning records in %s: every kernel uses its default schedule", work_dir)
        tuned = _scheduled(prepared)
        prepared = schedule_pass()(prepared)
        fallback = _scheduled(prepared) - tuned
        prepared = tvm.transform.Sequential(prepack_passes())(prepared)
    log.info("kernels: %d tuned, %d default schedules", len(tuned), len(fallback))
    return prepared, len(tuned), len(fallback)
