"""`DynamicBatcher`'s interface over the native engine (engine.cc): the same batching policy, with the instance
threads, the staging of each batch, the NaN / Inf check and the batch statistics in C++, off the GIL.
A Python caller's rows are submitted by address (kept alive here until answered); the engine hands a batch's
Python requests back in one call (`_batch_done`), which settles their futures as DynamicBatcher does: concurrent
futures at once, an event loop's by one call_soon_threadsafe per batch. `handle` is what the HTTP pump passes
to `tvmzoo::EngineFromHandle` to submit to the same engine from C++."""
from __future__ import annotations

import asyncio
import itertools
import logging
from concurrent.futures import Future

import numpy as np

from ...runtime import CompiledModel, output_classes
from ..batcher import Closed, Pending, hand_back
from ..metrics import Metrics
from ..tensors import invalid
from ...threads import usable_cores
from . import load

log = logging.getLogger(__name__)
ANSWERED, REFUSED = 0, 1   # the engine's statuses; anything else: the run failed


class NativeBatcher:
    def __init__(self, name: str, instances: list[CompiledModel], max_batch: int, max_delay_s: float,
                 metrics: Metrics, threads: int = 1, cores: list[int] | None = None,
                 check_input: str | None = None) -> None:
        """As DynamicBatcher; `check_input`: the input's name, to refuse NaN / Inf rows (float inputs) with
        tensors.check_finite's message (None: no check)."""
        module = load()
        model = instances[0]
        self.name = name
        self.max_batch = max_batch
        self._dtype = model.input_dtype
        self._row_shape = model.input_shape[1:]
        self._pending: dict[int, Pending] = {}
        self._kicks: set[asyncio.AbstractEventLoop] = set()   # loops with a wake-up of an instance due
        self._tickets = itertools.count()
        self._submit = module.engine_submit
        self._module = module
        classes = output_classes(model.meta) or model.run(np.zeros((model.fixed_batch or 1, *self._row_shape),
                                                                    self._dtype)).shape[-1]
        check = check_input if check_input and self._dtype.kind == "f" else ""
        self.handle = module.engine_create(
            name, [m.vm["main"] for m in instances], list(self._row_shape), str(self._dtype),
            # adaptive: threads 0 and the cores it shares out; fixed: each instance's threads on its own of them
            model.fixed_batch or 0, max_batch, float(max_delay_s), 0 if cores else threads or 1,
            list(cores or usable_cores()), check,
            int(classes), list(metrics.batch_size.bounds), self._batch_done, self._log)
        metrics.read_batches(name, self._statistics)

    def submit(self, rows: np.ndarray) -> Future:
        """Queue `rows` (leading axis = batch); the future gets their outputs, or the run's exception."""
        item = Pending(self._rows(rows), Future())
        self._enqueue(item)
        return item.future

    async def infer(self, rows: np.ndarray) -> np.ndarray:
        """`submit` for a caller on an event loop: the outputs of `rows`, settled on this loop. The requests
        of one pass of the loop are queued unannounced and an instance is woken once, after them (call_soon):
        one batch for a burst. Woken at once, an instance took the first alone; the Python batcher's instance
        threads waited for the GIL meanwhile, so a b8 build at --max-queue-delay-us 0 and c8 ran 3.9 rows per
        execution natively against 8.0 (13.0 vs 7.6 ms of CPU per request; benchmarks/native_batcher.py).
        A batch-1 build has nothing to gather: its instance is woken at once."""
        loop = asyncio.get_running_loop()
        item = Pending(self._rows(rows), loop.create_future(), loop)
        alone = self.max_batch == 1
        self._enqueue(item, wake=alone)
        if not alone and loop not in self._kicks:
            self._kicks.add(loop)
            loop.call_soon(self._kick, loop)
        return await item.future

    def _kick(self, loop: asyncio.AbstractEventLoop) -> None:
        self._kicks.discard(loop)
        self._module.engine_kick(self.handle)

    def flush(self) -> None:
        """From now on run queued requests at once (SIGTERM)."""
        self._module.engine_flush(self.handle)

    def close(self, timeout: float | None = None) -> None:
        """Stop taking requests; the instances finish everything already queued, then stop."""
        if not self._module.engine_close(self.handle, -1.0 if timeout is None else float(timeout)):
            log.warning("model %s: instances still running after %s s", self.name, timeout)

    def _rows(self, rows: np.ndarray) -> np.ndarray:
        """The rows as the engine reads them: the module's dtype (converted only within its kind, as
        CompiledModel.run does), C-contiguous, one row of the module's shape each."""
        given = np.asarray(rows)
        if not np.can_cast(given.dtype, self._dtype, casting="same_kind"):
            raise ValueError(f"model {self.name} takes {self._dtype} input, got {given.dtype}: converting would "
                             f"change the values. Pass {self._dtype}.")
        if given.ndim != 1 + len(self._row_shape) or given.shape[1:] != self._row_shape or not len(given):
            raise ValueError(f"model {self.name} takes rows of {list(self._row_shape)}, got {list(given.shape)}")
        return np.ascontiguousarray(given, dtype=self._dtype)

    def _enqueue(self, item: Pending, wake: bool = True) -> None:
        ticket = next(self._tickets)
        self._pending[ticket] = item     # before the engine can answer it
        if not self._submit(self.handle, ticket, item.rows.ctypes.data, len(item.rows), wake):
            del self._pending[ticket]
            raise Closed(f"model {self.name} is shutting down")

    def _batch_done(self, tickets, outputs, statuses, messages) -> None:
        """On an instance thread, once per batch: each Python request its outcome."""
        items = [self._pending.pop(ticket) for ticket in tickets]
        try:
            values = np.from_dlpack(outputs)
            offset, outcomes = 0, []
            for i, (item, status) in enumerate(zip(items, statuses)):
                if status == ANSWERED:
                    outcomes.append(values[offset:offset + len(item.rows)])
                    offset += len(item.rows)
                else:
                    outcomes.append(invalid(messages[i]) if status == REFUSED else RuntimeError(messages[i]))
        except Exception as exc:  # noqa: BLE001 - an instance thread has nobody to raise to but the requests
            log.exception("model %s: handing back a batch failed", self.name)
            outcomes = [exc] * len(items)
        hand_back(items, outcomes)

    def _log(self, message: str) -> None:
        """The engine's rare events: a failed warm-up or batch (each request gets the error too)."""
        log.error("model %s: %s", self.name, message)

    def _statistics(self) -> list[float]:
        return list(self._module.engine_stats(self.handle))
