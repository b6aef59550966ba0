"""vamp flags from the vendor model-zoo READMEs that mean nothing on a CPU: accepted, each with a note.

Seen in those READMEs: `-i 8 -p 1 -b 22`, `-i 2 p 2 -b 1` (the dash dropped), `-d 0`, `--instance 6
--processes 2 --batch_size 1`, `--dtype uint32`, `-s [3,224,224]` / `-s 3,736,1280`.
"""
from __future__ import annotations

from collections.abc import Sequence

from ..errors import TvmzooError


def vendor_notes(processes: int | None, device_ids: str, dtype: str | None, extra: Sequence[str],
                 input_dtype: str | None = None) -> list[str]:
    """One note per vendor flag ignored here; a clear error for anything else vamp cannot read."""
    notes = []
    extra = list(extra)
    if len(extra) == 2 and extra[0] == "p" and extra[1].isdigit():  # `-i 2 p 2`: READMEs drop the dash
        processes, extra = int(extra[1]), []
        notes.append("read 'p %s' as -p %s (the dash is missing)" % (processes, processes))
    if extra:
        raise TvmzooError(f"vamp: cannot read {' '.join(extra)!r}: every option starts with - (e.g. -p 2); "
                          "see vamp --help.")
    if processes is not None:
        notes.append(f"-p/--processes {processes}: processes per accelerator card, ignored on a CPU; "
                     "-i N -t T runs N instances of T threads each in this process")
    if device_ids.strip("[] ") not in ("", "0"):
        notes.append(f"-d {device_ids}: a CPU host is one device (0); ignored (--rpc-tracker runs on several)")
    if dtype is not None and dtype != input_dtype:
        notes.append(f"--dtype {dtype}: the input type is the module's own ({input_dtype or 'from mod.json'}); "
                     "ignored")
    return notes
