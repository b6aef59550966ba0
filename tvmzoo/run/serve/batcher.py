"""Dynamic batching for one model: requests (each a few rows) wait in one queue; every model instance
has a thread that takes the oldest request, gathers more until the batch has the rows `Arrivals`
expects or the oldest has waited `max_delay_s` (Triton's max_queue_delay), runs them as one batch and
hands each request its own rows back. One batcher per model, so batches never mix models.

Threads (`Lanes`): with fixed threads (more than one) each instance's TVM pool runs on its own cores,
`instance_cores` as vamp's (TVM would bind every instance's pool to the same first cores). Adaptive (`cores` given,
the server's default): instance 0 runs a batch on all the cores when nothing else runs or waits (a lone
client gets the lowest latency), and every instance runs on its own share of them otherwise, so under load
the instances run side by side, each on its own core, instead of one pool whose threads wait for each other
at every kernel whenever the event loop or a client takes one of its cores.

An asyncio caller (`infer`) gets its answer on its event loop: one `call_soon_threadsafe` per batch settles
the futures of all its requests, instead of a concurrent Future per request chained to the loop (a lock,
callbacks and a wake-up of the loop each)."""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from ..runtime import CompiledModel
from ..threads import instance_cores, pin_this_thread_pool

from .metrics import Metrics

log = logging.getLogger(__name__)


class Closed(RuntimeError):
    """The batcher takes no more requests (the server is draining)."""


@dataclass
class Arrivals:
    """How many rows the next batch waits for. Triton waits for a full batch (up to the delay) even when
    no other request can come: a lone client pays the whole delay and a padded batch on every request.
    Here a batch waits for as many rows as were in flight together (queued or running) since the
    previous batch was taken, at most `max_batch`: the clients seen then are the ones that may come back.
    A lone client runs at once; 8 clients on a batch-8 build get full batches without the delay
    running out. Before the first batch nothing is known, so it waits for a full one, as Triton does."""
    max_batch: int
    expected: int = 0          # rows the next batch waits for (0: set to max_batch)
    _peak: int = 0             # most rows in flight together since the last batch was taken

    def __post_init__(self) -> None:
        self.expected = self.expected or self.max_batch

    def submitted(self, in_flight_rows: int) -> None:
        self._peak = max(self._peak, in_flight_rows)

    def taken(self) -> None:
        self.expected = min(self.max_batch, max(self._peak, 1))
        self._peak = 0


@dataclass(frozen=True)
class Lanes:
    """One instance's cores in adaptive mode: its own share (`narrow`) and all of them, its own first (`wide`)."""
    narrow: list[int]
    wide: list[int]

    @classmethod
    def of(cls, index: int, instances: int, cores: list[int]) -> Lanes:
        narrow = instance_cores(index, max(1, len(cores) // instances), cores)
        return cls(narrow, narrow + [c for c in cores if c not in narrow])


@dataclass
class Pending:
    rows: np.ndarray
    future: Future | asyncio.Future
    loop: asyncio.AbstractEventLoop | None = None    # the asyncio future's loop; None: a concurrent Future
    enqueued: float = field(default_factory=time.perf_counter)


def _settle(future: Future | asyncio.Future, outcome: np.ndarray | BaseException) -> None:
    if future.done():   # an asyncio caller that was cancelled (its client went away)
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


def _settle_all(pairs: list[tuple[Future | asyncio.Future, np.ndarray | BaseException]]) -> None:
    for future, outcome in pairs:
        _settle(future, outcome)


def hand_back(batch: list[Pending], outcomes: list) -> None:
    """Each request its outcome: concurrent futures at once, asyncio ones by one call per loop."""
    by_loop: dict[asyncio.AbstractEventLoop, list] = {}
    for item, outcome in zip(batch, outcomes):
        if item.loop is None:
            _settle(item.future, outcome)
        else:
            by_loop.setdefault(item.loop, []).append((item.future, outcome))
    for loop, pairs in by_loop.items():
        try:
            loop.call_soon_threadsafe(_settle_all, pairs)
        except RuntimeError:   # the loop is closed: nobody waits for these any more
            log.warning("model answers dropped: their event loop is closed")


class DynamicBatcher:
    def __init__(self, name: str, instances: list[CompiledModel], max_batch: int, max_delay_s: float,
                 metrics: Metrics, threads: int = 1, cores: list[int] | None = None,
                 check_rows: Callable[[np.ndarray], None] | None = None) -> None:
        """`threads`: each instance's TVM threads (fixed), or `cores`: adaptive on these cores (`Lanes`).
        `check_rows` raises the error a request gets when its rows, as staged in the batch, are refused:
        checked there, just copied, they are in cache (~4x cheaper than on the event loop, for gRPC requests
        and every batch > 1), and off the loop that reads the next requests."""
        self.name = name
        self.check_rows = check_rows
        self.max_batch = max_batch
        self.max_delay_s = max_delay_s
        self.metrics = metrics
        self._queue: deque[Pending] = deque()
        self._queued_rows = 0
        self._in_flight_rows = 0    # queued or running
        self._arrivals = Arrivals(max_batch)
        self._threads = threads
        self._cores = cores
        self._busy_cores = 0        # adaptive: cores taken by running batches
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)   # waits for a fuller batch or for cores
        # idle instances by index: a new request wakes the first, unless an instance is gathering a batch.
        # Only instance 0 runs wide, so one pool's threads spin after a wide run, not an idle pool's on the
        # cores a busy one uses (Condition.notify wakes the longest waiter: a lone client alternated pools)
        self._idle: dict[int, threading.Condition] = {}
        self._gathering = 0
        self._running: set[int] = set()     # instances running a batch
        warmed = [threading.Event() for _ in instances]
        self._closed = False
        self._flush = False     # draining: run what is queued without waiting for fuller batches
        lanes = [Lanes.of(i, len(instances), cores) if cores else None for i in range(len(instances))]
        self._workers = [threading.Thread(target=self._worker, args=(i, model, warm, lane), name=f"{name}-instance{i}",
                                          daemon=True)
                         for i, (model, warm, lane) in enumerate(zip(instances, warmed, lanes))]
        for thread in self._workers:
            thread.start()
        for event in warmed:
            event.wait()

    def submit(self, rows: np.ndarray) -> Future:
        """Queue `rows` (leading axis = batch); the future gets their outputs, or the run's exception."""
        item = Pending(rows, Future())
        self._enqueue(item)
        return item.future

    async def infer(self, rows: np.ndarray) -> np.ndarray:
        """`submit` for a caller on an event loop: the outputs of `rows`, settled on this loop."""
        loop = asyncio.get_running_loop()
        item = Pending(rows, loop.create_future(), loop)
        self._enqueue(item)
        return await item.future

    def _enqueue(self, item: Pending) -> None:
        rows = item.rows
        with self._cond:
            if self._closed:
                raise Closed(f"model {self.name} is shutting down")
            self._queue.append(item)
            self._queued_rows += len(rows)
            self._in_flight_rows += len(rows)
            self._arrivals.submitted(self._in_flight_rows)
            self._wake_one()
            self._cond.notify_all()

    def flush(self) -> None:
        """From now on run queued requests at once (SIGTERM: no request waits for company that won't come)."""
        with self._cond:
            self._flush = True
            self._wake_all()

    def close(self, timeout: float | None = None) -> None:
        """Stop taking requests; the instances finish everything already queued, then stop."""
        with self._cond:
            self._closed = True
            self._wake_all()
        for thread in self._workers:
            thread.join(timeout)

    def _wake_one(self) -> None:
        """Wake the first idle instance; adaptive, none while instance 0 is between two batches: it takes
        the request in a moment, on all the cores if nothing else comes (another would run it on its one)."""
        if not self._idle or self._gathering:
            return
        if self._cores is not None and 0 not in self._idle and 0 not in self._running:
            return
        self._idle.pop(min(self._idle)).notify()

    def _wake_all(self) -> None:
        for wake in self._idle.values():
            wake.notify()
        self._idle.clear()
        self._cond.notify_all()

    def _worker(self, index: int, model: CompiledModel, warmed: threading.Event, lanes: Lanes | None) -> None:
        """Run batches on one instance. A first run on zeros warms it (memory, this thread's TVM pool),
        so the model is ready when the first client's request comes."""
        cores = None
        if lanes is not None:   # instance 0's pool gets a thread per core (narrowed or widened per batch),
            cores = lanes.wide if index == 0 else lanes.narrow   # the others' only their share: never wide
            pin_this_thread_pool(cores)
        elif self._threads > 1:
            pin_this_thread_pool(instance_cores(index, self._threads))
        try:
            model.run(np.zeros((model.fixed_batch or 1, *model.input_shape[1:]), model.input_dtype))
        except Exception:  # noqa: BLE001 - TVM's own error types; real requests will report it
            log.exception("model %s: warm-up run failed", self.name)
        warmed.set()
        wake = threading.Condition(self._lock)
        while True:
            taken = self._next_batch(index, wake)
            if taken is None:
                return
            batch, width = taken
            if lanes is not None and width != len(cores):
                cores = lanes.wide if width == len(lanes.wide) else lanes.narrow
                pin_this_thread_pool(cores)
            self._run(model, batch, width, index)

    def _next_batch(self, index: int, wake: threading.Condition) -> tuple[list[Pending], int] | None:
        """Instance `index`'s next batch and the TVM threads to run it with (`wake`: its, while idle)."""
        with self._cond:
            while True:
                while not self._queue:
                    if self._closed:
                        return None
                    self._idle[index] = wake
                    wake.wait()
                    self._idle.pop(index, None)
                deadline = self._queue[0].enqueued + self.max_delay_s
                wanted = self._arrivals.expected
                self._gathering += 1
                while self._queue and self._queued_rows < wanted and not (self._closed or self._flush):
                    remaining = deadline - time.perf_counter()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
                self._gathering -= 1
                if self._queue:  # another instance may have taken everything while this one waited
                    batch = self._take()
                    width = self._claim_cores(index)
                    self._running.add(index)
                    if self._queue:   # rows left for the next batch
                        self._wake_one()
                    return batch, width

    def _claim_cores(self, index: int) -> int:
        """Adaptive: all the cores for instance 0 when no other batch runs or waits, else the instance's
        share, once free (a wide run holds them all). Fixed: the instances' threads."""
        if self._cores is None:
            return self._threads
        narrow = max(1, len(self._cores) // len(self._workers))
        while True:
            if index == 0 and self._busy_cores == 0 and not self._queue:
                width = len(self._cores)
            elif self._busy_cores + narrow <= len(self._cores):
                width = narrow
            else:
                self._cond.wait()
                continue
            self._busy_cores += width
            return width

    def _take(self) -> list[Pending]:
        batch = [self._queue.popleft()]
        rows = len(batch[0].rows)
        while self._queue and rows + len(self._queue[0].rows) <= self.max_batch:
            rows += len(self._queue[0].rows)
            batch.append(self._queue.popleft())
        self._queued_rows -= rows
        self._arrivals.taken()
        return batch

    def _run(self, model: CompiledModel, batch: list[Pending], threads: int, index: int) -> None:
        m = self.metrics.series(self.name)
        start = time.perf_counter()
        waited_us = sum(start - item.enqueued for item in batch) * 1e6
        rows = sum(len(item.rows) for item in batch)
        try:
            inputs = model.stage([item.rows for item in batch], self.max_batch)   # copied once, padded
            refusals = self._refusals(batch, inputs)
            started = time.perf_counter()
            outputs = model.run(inputs) if not all(refusals) else None
            ran = time.perf_counter()
        except Exception as exc:  # noqa: BLE001 - TVM raises its own types; each request gets the error
            log.error("model %s failed on a batch of %d requests: %s", self.name, len(batch), exc)
            self._done(rows, threads, index, lambda: m.queue_us.inc(waited_us))
            hand_back(batch, [exc] * len(batch))
            return
        if outputs is None:   # every request refused: nothing ran
            self._done(rows, threads, index, lambda: m.queue_us.inc(waited_us))
            hand_back(batch, refusals)
            return
        offset, results = 0, []
        for item, refusal in zip(batch, refusals):
            results.append(refusal or outputs[offset:offset + len(item.rows)])
            offset += len(item.rows)
        done = time.perf_counter()
        n = len(batch)
        answered = sum(len(item.rows) for item, refusal in zip(batch, refusals) if refusal is None)

        def count() -> None:
            m.queue_us.inc(waited_us)
            m.input_us.inc((started - start) * 1e6 * n)
            m.infer_us.inc((ran - started) * 1e6 * n)
            m.output_us.inc((done - ran) * 1e6 * n)
            m.inference_count.inc(answered)   # Triton's: the inferences answered (a refused request's rows ran, unused)
            m.exec_count.inc()
            m.batch_size.observe(rows)
            m.threads.observe(threads)

        self._done(rows, threads, index, count)   # before the results are handed over: a client that got
        hand_back(batch, results)           # its answer sees it counted

    def _refusals(self, batch: list[Pending], inputs: np.ndarray) -> list[Exception | None]:
        """Per request: the error `check_rows` raised on its rows in `inputs`, or None."""
        refusals, offset = [], 0
        for item in batch:
            try:
                if self.check_rows is not None:
                    self.check_rows(inputs[offset:offset + len(item.rows)])
                refusals.append(None)
            except Exception as exc:  # noqa: BLE001 - the caller's error type, handed to its request
                refusals.append(exc)
            offset += len(item.rows)
        return refusals

    def _done(self, rows: int, threads: int, index: int, count: Callable[[], None]) -> None:
        """A batch's rows are no longer in flight and its cores are free: counted out before the answers
        go, since a client may send its next at once. `count` updates the metrics, under the lock: the
        instances of a model share its series, whose values take no lock of their own (metrics.Cell)."""
        with self._cond:
            count()
            self._in_flight_rows -= rows
            self._running.discard(index)
            if self._cores is not None:
                self._busy_cores -= threads
                self._cond.notify_all()

