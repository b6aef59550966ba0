"""Step 4 across TVM RPC devices: the images in shards handed out from one queue to one thread per
device (tvmzoo.run.devices opens the sessions); a device that drops out puts its shard back."""
from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from ..errors import ModuleError
from ..preprocess import Preprocessing
from .devices import RemoteSpec, checked_module, load_remote, open_sessions
from .results import Prediction
from .runner import RunSummary, classify

log = logging.getLogger(__name__)


@dataclass
class ShardedRun:
    predictions: list[Prediction]
    failed: list[tuple[str, str]]
    seconds: float
    devices: int
    reassigned: int             # shards re-run on another device after theirs dropped out


class _ShardQueue:
    """Shards handed out from one queue to the device threads; a shard counts once it completes."""

    def __init__(self, shards: list[list[Path]], progress: bool,
                 on_prediction: Callable[[Prediction], None] | None) -> None:
        self.shards, self.on_prediction = shards, on_prediction
        self.todo: queue.Queue[int] = queue.Queue()
        for index in range(len(shards)):
            self.todo.put(index)
        self.done: dict[int, RunSummary] = {}
        self.lock = threading.Lock()
        self.reassigned = 0
        self.bar = tqdm(total=sum(map(len, shards)), disable=not progress or sum(map(len, shards)) < 20,
                        unit="img")

    def device_loop(self, number: int, session, prefix: str | Path, pre: Preprocessing, batch: int) -> None:
        try:
            model = load_remote(prefix, session)
        except Exception as exc:  # noqa: BLE001 - a device that cannot load the module takes no shard
            log.warning("device %d: cannot load the module (%s); continuing without it", number, exc)
            return
        while len(self.done) < len(self.shards):
            try:
                index = self.todo.get(timeout=0.1)
            except queue.Empty:
                continue
            try:
                summary = classify(model, self.shards[index], pre, batch=batch, progress=False,
                                   isolate_failures=False)
            except Exception as exc:  # noqa: BLE001 - TVM's RPC errors have no common type
                with self.lock:
                    self.reassigned += 1
                self.todo.put(index)
                log.warning("device %d dropped out (%s); its shard of %d images goes to another device",
                            number, str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
                            len(self.shards[index]))
                return
            self.finish(index, summary)

    def finish(self, index: int, summary: RunSummary) -> None:
        with self.lock:
            self.done[index] = summary
            self.bar.update(len(self.shards[index]))
            if self.on_prediction is not None:
                for pred in summary.predictions:
                    self.on_prediction(pred)


def classify_sharded(prefix: str | Path, paths: Sequence[Path], pre: Preprocessing, spec: RemoteSpec, *,
                     batch: int = 1, shard_size: int | None = None, progress: bool = True,
                     on_prediction: Callable[[Prediction], None] | None = None) -> ShardedRun:
    """Classify `paths` across every device of `spec`; results in input order. Shards are handed out
    from one queue; a device that fails puts its unfinished shard back for another device, and a
    shard's results count only once it completes, so nothing is lost or duplicated."""
    checked_module(prefix)  # a damaged or foreign module is one clear error, not every device dropping out
    sessions = open_sessions(spec)
    size = shard_size or max(batch, min(256, math.ceil(len(paths) / (4 * len(sessions)))))
    shards = _ShardQueue([list(paths[i:i + size]) for i in range(0, len(paths), size)], progress, on_prediction)
    log.info("%d images in %d shards on %d device(s) under %s", len(paths), len(shards.shards), len(sessions),
             spec.describe())
    t0 = time.perf_counter()
    threads = [threading.Thread(target=shards.device_loop, args=(n, s, prefix, pre, batch), daemon=True)
               for n, s in enumerate(sessions)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    shards.bar.close()
    if len(shards.done) < len(shards.shards):
        missing = sum(len(s) for i, s in enumerate(shards.shards) if i not in shards.done)
        raise ModuleError(f"every device under {spec.describe()} dropped out; {missing} images were not "
                          "classified. Restart the servers and run again with --resume to finish.")
    ordered = [shards.done[i] for i in range(len(shards.shards))]
    return ShardedRun([p for s in ordered for p in s.predictions], [f for s in ordered for f in s.failed],
                      time.perf_counter() - t0, len(sessions), shards.reassigned)
