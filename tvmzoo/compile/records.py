"""Tuning records: MetaSchedule's JSON database in a folder (`database_workload.json` +
`database_tuning_record.json`), compacted, and applied at build time (`ApplyTuningRecords`).

Records hold MetaSchedule's schedules and tvmzoo's default schedules measured against them
(tvmzoo.compile.seeding); a MetaSchedule trace always contains an `EnterPostproc` instruction, a
default-schedule trace never does: that tells the two apart. Where the default won, the kernel
gets the *current* default schedule (the stored default trace may be an older tvmzoo's).
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

import tvm
from tvm import relax, s_tir, tirx
from tvm.ir import IRModule
from tvm.s_tir import meta_schedule as ms
from tvm.target import Target

log = logging.getLogger(__name__)

WORKLOAD_FILE = "database_workload.json"
RECORD_FILE = "database_tuning_record.json"
FAILED_RUN_SECS = 1e9  # MetaSchedule records failed runs with 1e10 s


def is_default_trace(trace: s_tir.Trace) -> bool:
    """A default-schedule trace (tvmzoo.compile.schedules), not one MetaSchedule searched."""
    return not any(inst.kind.name == "EnterPostproc" for inst in trace.insts)


def mean_secs(secs) -> float:
    return sum(float(x) for x in secs) / len(secs) if secs else float("inf")


def normalize(func: tirx.PrimFunc) -> IRModule:
    return tvm.get_global_func("tvm.s_tir.meta_schedule.normalize_mod")(func)


def fmt_ms(secs: float | None) -> str:
    return "n/a" if secs is None else f"{secs * 1e3:.3f} ms"


def tuned_winners(prepared: IRModule, target: Target, work_dir: Path) -> ms.database.MemoryDatabase:
    """The records where a tuned schedule beat the default. Where the default won, the kernel gets
    the *current* default schedule (the stored default trace may be an older tvmzoo's)."""
    db = ms.database.JSONDatabase(work_dir=str(work_dir))
    winners = ms.database.MemoryDatabase()
    for gv, func in prepared.functions_items():
        if not isinstance(func, tirx.PrimFunc):
            continue
        query = normalize(func)
        rec = db.query_tuning_record(query, target, gv.name_hint)
        if rec is None:
            continue
        default = is_default_trace(rec.trace)
        log.debug("%s: %s won (%s)", gv.name_hint, "default schedule" if default else "tuned schedule",
                  fmt_ms(mean_secs(rec.run_secs)))
        if not default:
            winners.commit_tuning_record(ms.database.TuningRecord(
                rec.trace, winners.commit_workload(query), rec.run_secs, target, rec.args_info))
    return winners


def read_records(work_dir: Path) -> list[list]:
    path = Path(work_dir) / RECORD_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def record_secs(record: list) -> float:
    secs = record[1][1]
    mean = mean_secs(secs) if secs else float("inf")
    return mean if mean < FAILED_RUN_SECS else float("inf")


def json_is_default(record: list) -> bool:
    return not any(inst[0] == "EnterPostproc" for inst in record[1][0][0])


def compact_records(work_dir: Path) -> tuple[int, int]:
    """Keep per workload the fastest MetaSchedule record and the newest default-schedule record
    (a later measurement of the same trace replaces an earlier one); failed runs are dropped.
    The workload file is untouched (records refer to it by line). Returns (before, after)."""
    path = Path(work_dir) / RECORD_FILE
    records = read_records(work_dir)
    newest: dict[tuple[int, str], tuple[int, list]] = {}
    for pos, rec in enumerate(records):
        newest[(rec[0], json.dumps(rec[1][0]))] = (pos, rec)  # later lines are newer
    best: dict[tuple[int, bool], tuple[int, list]] = {}
    for pos, rec in newest.values():
        if record_secs(rec) == float("inf"):
            continue
        key = (rec[0], json_is_default(rec))
        kept = best.get(key)
        if key[1]:
            better = kept is None or pos > kept[0]
        else:
            better = kept is None or record_secs(rec) < record_secs(kept[1])
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


def records_problem(work_dir: Path, named: bool) -> str | None:
    """Why the records in `work_dir` cannot be applied, or None. TVM's own parse errors name neither the
    folder nor a fix; a folder the YAML names (`named`) must exist: a typo would build untuned without a word."""
    if not work_dir.exists():
        return "does not exist: fix the path, or run `vamc tune` to create it" if named else None
    if not work_dir.is_dir():
        return "is not a folder: set it to the folder holding database_workload.json and database_tuning_record.json"
    if not has_records(work_dir):
        return None
    try:
        ms.database.JSONDatabase(work_dir=str(work_dir), allow_missing=False)
    except Exception as exc:  # noqa: BLE001 - TVM raises its own error types
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        return (f"cannot be read ({reason}): a records file is corrupt or truncated. Move the folder away and "
                "run `vamc tune` again, or remove tuning.records to build with the default schedules")
    return None




@tvm.transform.module_pass(opt_level=0, name="ApplyTuningRecords")
class ApplyTuningRecords:
    """Kernels with a tuned record in `work_dir` that beat the default schedule get it (None, or a
    folder without records: nothing to apply)."""

    def __init__(self, work_dir: Path | None) -> None:
        self.work_dir = Path(work_dir) if work_dir is not None else None

    def transform_module(self, mod: IRModule, _ctx: tvm.transform.PassContext) -> IRModule:
        if self.work_dir is not None and has_records(self.work_dir):
            with tuned_winners(mod, Target.current(), self.work_dir):
                return relax.transform.MetaScheduleApplyDatabase()(mod)
        if self.work_dir is not None:  # a warning only where records were expected: the folder exists
            (log.warning if self.work_dir.exists() else log.info)(
                "no tuning records in %s: every kernel uses its default schedule", self.work_dir)
        return mod
