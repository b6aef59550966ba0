"""A result file belongs to one run at a time (a lock beside it), and records the settings it was made
with (`<result>.settings.json` beside it), so that --resume never mixes results of another model,
preprocessing or label list into it."""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

from ..io.atomic import write_text
from ..errors import ConfigError

log = logging.getLogger(__name__)


@contextlib.contextmanager
def claim(result: Path) -> Iterator[None]:
    """Hold `.<result name>.lock` beside the result file for the run; a second run into it fails at once."""
    result.parent.mkdir(parents=True, exist_ok=True)
    lock_path = result.parent / f".{result.name}.lock"
    with open(lock_path, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"another run is writing {result} (it holds {lock_path}): wait for it to finish, "
                              "or give this run another --save_dir or --save_result_txt.") from None
        yield


def run_settings(meta: dict, preprocessing, names: Sequence[str], top_k: int) -> dict:
    """What a result file's lines depend on: the module (its checksum), the preprocessing, the labels."""
    settings = {"module_sha256": meta.get("module_sha256"), "module": meta.get("name"),
                "precision": meta.get("precision"), "preprocessing": preprocessing.to_meta(),
                "labels_sha256": hashlib.sha256("\n".join(names).encode("utf-8", "surrogateescape")).hexdigest(),
                "top_k": top_k}
    return json.loads(json.dumps(settings))  # as it reads back (tuples -> lists)


class SettingsRecord:
    """`<result>.settings.json`: removed before a result file of other settings is written, written after
    it, so a kill in between leaves a result file without a record (never one with a wrong record)."""

    def __init__(self, result: Path, settings: dict) -> None:
        self.path = result.with_name(result.name + ".settings.json")
        self.result, self.settings = result, settings
        self.current = self.read() == settings

    def read(self) -> dict | None:
        try:
            return json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def check_resumable(self) -> None:
        recorded = self.read()
        if recorded is None:
            log.warning("--resume: %s records no settings (%s is missing: an older tvmzoo or another tool "
                        "wrote it); its results are kept unchecked", self.result, self.path.name)
            return
        differ = [key for key in self.settings if recorded.get(key) != self.settings[key]]
        if differ:
            raise ConfigError(f"--resume: {self.result} was made with other settings ({', '.join(differ)} differ; "
                              f"see {self.path}): its results would mix with this run's. Run without --resume "
                              "to start over, or write to another --save_result_txt.")

    def before_write(self) -> None:
        if not self.current:
            self.path.unlink(missing_ok=True)

    def after_write(self) -> None:
        if not self.current:
            write_text(self.path, json.dumps(self.settings, indent=2) + "\n")
            self.current = True
