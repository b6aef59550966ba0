"""Which shipped tuning records a build uses: those tuned for its CPU, else those of the nearest CPU with
the same vector ISA (tvmzoo.compile.cpu.nearest_records); the log says which and why."""
from __future__ import annotations

import logging
from pathlib import Path

from .cpu import nearest_records
from .records import RECORD_FILE
from .target import target_key

log = logging.getLogger(__name__)


def records_for(model_root: Path, target: dict, build: str) -> Path:
    """`model_root/<target folder>/<build>` when records were tuned for this CPU; else the folder of the
    nearest CPU with the same vector ISA that has records for `build`; else this CPU's (empty) folder."""
    own = model_root / target_key(target)
    kind = f"{target.get('kind')}-"
    tuned = {d.name[len(kind):] for d in model_root.glob(f"{kind}*") if (d / build / RECORD_FILE).is_file()}
    if target.get("kind") != "llvm" or not target.get("mcpu"):
        return own / build
    cpu, why = nearest_records(str(target["mcpu"]), tuned)
    if cpu is None:
        log.info("tuning records (%s, %s): none used: %s", model_root.name, build, why)
        return own / build
    log.info("tuning records (%s, %s): %s", model_root.name, build, why)
    return model_root / f"{kind}{cpu}" / build
