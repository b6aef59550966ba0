"""Prometheus metrics named and labelled like Triton's (model, version), so its dashboards fit.
Latencies are cumulative microsecond counters as Triton's are: divide by nv_inference_request_success
(or the exec count) for a mean. The batch-size histogram is tvmzoo's own (Triton has none).

Values are plain numbers read when /metrics is scraped: a request updates them without a lock, since each
is written by one thread at a time (the event loop, or a model's instances under their batcher's lock).
prometheus_client's Counter, Gauge and Histogram take a lock on every update and a Histogram walks its
buckets: ~9 us of the server's time per request at batch 1 (README, Serving)."""
from __future__ import annotations

import threading
from bisect import bisect_left
from collections.abc import Callable
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, disable_created_metrics, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

LABELS = ("model", "version")
VERSION = "1"
FRONTS = {"http_pump": "HTTP pump", "grpc_native": "gRPC front"}   # count_elsewhere: what tvmzoo_<front>_success names


def native_counts(raw) -> list[float]:
    """A native front's counts of one engine as its C++ side keeps them (success, summed request ns, pending,
    last success in unix ms), in the units Metrics.count_elsewhere reads (request us, last success time.time())."""
    success, request_ns, pending, last_ms = raw
    return [success, request_ns / 1e3, pending, last_ms / 1e3]


class Cell:
    """One labelled series' value."""
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount

    def dec(self, amount: float = 1.0) -> None:
        self.value -= amount


class Reading(Cell):
    """A value kept elsewhere (a native engine's statistics), read when it is scraped."""
    __slots__ = ("read",)

    def __init__(self, read: Callable[[], float]) -> None:   # noqa: super().__init__ would set `value`
        self.read = read

    @property
    def value(self) -> float:
        return self.read()


class Plus(Cell):
    """A series counted here and elsewhere (the native HTTP pump's answers): its own count plus `read()`."""
    __slots__ = ("own", "read")

    def __init__(self, read: Callable[[], float]) -> None:   # noqa: super().__init__ would set `value`
        self.own, self.read = 0.0, read

    def inc(self, amount: float = 1.0) -> None:
        self.own += amount

    def dec(self, amount: float = 1.0) -> None:
        self.own -= amount

    @property
    def value(self) -> float:
        return self.own + self.read()


class TritonCounter:
    """A counter (or gauge) exposed under its exact name, as Triton's are: prometheus_client's Counter always
    appends `_total`, and `nv_inference_request_success_total` would match no Triton dashboard."""

    def __init__(self, name: str, doc: str, labelnames: tuple[str, ...] = LABELS, kind: str = "counter") -> None:
        self.name, self.doc, self.labelnames, self.kind = name, doc, labelnames, kind
        self._cells: dict[tuple[str, ...], Cell] = {}
        self._lock = threading.Lock()   # guards the dict, not the values

    def labels(self, *values: str) -> Cell:
        cell = self._cells.get(values)
        if cell is None:
            with self._lock:
                cell = self._cells.setdefault(values, Cell())
        return cell

    def bind(self, values: tuple[str, ...], cell: Cell) -> None:
        """`cell` is the series of `values` from now on."""
        with self._lock:
            self._cells[values] = cell

    def value(self, *values: str) -> float:
        cell = self._cells.get(values)
        return 0.0 if cell is None else cell.value

    def total(self, model: str) -> float:
        """Summed over the labels after the model name (the failure reasons)."""
        with self._lock:
            return sum(cell.value for k, cell in self._cells.items() if k[0] == model)

    def collect(self) -> list[Metric]:
        metric = Metric(self.name, self.doc, self.kind)
        with self._lock:
            for values, cell in sorted(self._cells.items()):
                metric.add_sample(self.name, dict(zip(self.labelnames, values)), cell.value)
        return [metric]


class HistogramCell:
    """One labelled histogram: observations per bucket (not cumulative) and their sum."""
    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds, self.counts, self.sum = bounds, [0] * len(bounds), 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value


class HistogramReading(HistogramCell):
    """A histogram kept elsewhere (a native engine's statistics): `read` gives its counts per bucket and sum."""
    __slots__ = ("read",)

    def __init__(self, read: Callable[[], tuple[list[float], float]]) -> None:   # noqa: no counts of its own
        self.read = read

    @property
    def counts(self) -> list[float]:
        return self.read()[0]

    @property
    def sum(self) -> float:
        return self.read()[1]


class TritonHistogram:
    """A histogram rendered as prometheus_client's Histogram renders it (`_bucket{le}`, `_count`, `_sum`)."""

    def __init__(self, name: str, doc: str, labelnames: tuple[str, ...], buckets: tuple[float, ...]) -> None:
        self.name, self.doc, self.labelnames = name, doc, labelnames
        self.bounds = (*map(float, buckets), float("inf"))
        self._cells: dict[tuple[str, ...], HistogramCell] = {}
        self._lock = threading.Lock()

    def labels(self, *values: str) -> HistogramCell:
        with self._lock:
            return self._cells.setdefault(values, HistogramCell(self.bounds))

    def bind(self, values: tuple[str, ...], cell: HistogramCell) -> None:
        with self._lock:
            self._cells[values] = cell

    def collect(self) -> list[Metric]:
        family = HistogramMetricFamily(self.name, self.doc, labels=self.labelnames)
        with self._lock:
            for values, cell in sorted(self._cells.items()):
                running, buckets = 0, []
                for bound, count in zip(self.bounds, list(cell.counts)):
                    running += count
                    buckets.append((floatToGoString(bound), float(running)))
                family.add_metric(list(values), buckets, cell.sum)
        return [family]


@dataclass(frozen=True)
class ModelSeries:
    """One model's series, bound once: `labels()` on every request costs a lookup each."""
    success: Cell
    inference_count: Cell
    exec_count: Cell
    request_us: Cell
    queue_us: Cell
    input_us: Cell
    infer_us: Cell
    output_us: Cell
    pending: Cell
    batch_size: HistogramCell
    threads: HistogramCell


@dataclass
class Metrics:
    registry: CollectorRegistry
    success: TritonCounter
    failure: TritonCounter
    inference_count: TritonCounter
    exec_count: TritonCounter
    request_us: TritonCounter
    queue_us: TritonCounter
    input_us: TritonCounter
    infer_us: TritonCounter
    output_us: TritonCounter
    pending: TritonCounter
    batch_size: TritonHistogram
    threads: TritonHistogram
    last_inference: dict[str, float] = field(default_factory=dict)   # model -> time.time() of its last success
    _series: dict[str, ModelSeries] = field(default_factory=dict)
    _last_elsewhere: dict[str, Callable[[], float]] = field(default_factory=dict)
    _elsewhere: dict[str, list[Callable[[], list[float]]]] = field(default_factory=dict)
    fronts: dict[str, TritonCounter] = field(default_factory=dict)   # native fronts: the requests each answered

    @classmethod
    def create(cls) -> Metrics:
        disable_created_metrics()  # Triton exposes no *_created series
        reg = CollectorRegistry()
        counters = [
            TritonCounter("nv_inference_request_success", "Number of successful inference requests"),
            TritonCounter("nv_inference_request_failure", "Number of failed inference requests",
                          (*LABELS, "reason")),
            TritonCounter("nv_inference_count", "Number of inferences performed (a batch of n counts n)"),
            TritonCounter("nv_inference_exec_count", "Number of model executions (batches) performed"),
            TritonCounter("nv_inference_request_duration_us", "Cumulative request duration, receipt to response"),
            TritonCounter("nv_inference_queue_duration_us", "Cumulative time requests waited in the queue"),
            TritonCounter("nv_inference_compute_input_duration_us", "Cumulative time gathering batch inputs"),
            TritonCounter("nv_inference_compute_infer_duration_us", "Cumulative model execution time per request"),
            TritonCounter("nv_inference_compute_output_duration_us", "Cumulative time splitting batch outputs"),
        ]
        histograms = [TritonHistogram(name, doc, ("model",), (1, 2, 4, 8, 16, 32, 64)) for name, doc in (
            ("tvmzoo_inference_batch_size", "Rows per model execution"),
            ("tvmzoo_inference_threads", "TVM threads per model execution"))]
        pending = TritonCounter("nv_inference_pending_request_count", "Requests waiting in the queue or running",
                                kind="gauge")
        for metric in (*counters, pending, *histograms):
            reg.register(metric)
        return cls(reg, *counters, pending, *histograms)

    def count_model(self, model: str) -> None:
        """Make a model's series exist (at 0) from the start, as Triton's do."""
        self.series(model)

    def series(self, model: str) -> ModelSeries:
        found = self._series.get(model)
        if found is None:
            labels = (model, VERSION)
            found = self._series[model] = ModelSeries(
                *(metric.labels(*labels) for metric in (
                    self.success, self.inference_count, self.exec_count, self.request_us, self.queue_us,
                    self.input_us, self.infer_us, self.output_us, self.pending)),
                self.batch_size.labels(model), self.threads.labels(model))
        return found

    def read_batches(self, model: str, read: Callable[[], list[float]]) -> None:
        """The batch statistics of `model` (queue, compute input / infer / output us, inference and execution
        counts, the batch-size and threads histograms) are kept by its native engine: `read` gives them, in
        that order, each histogram as its counts per bucket (self.batch_size.bounds) and its sum."""
        buckets = len(self.batch_size.bounds)
        labels = (model, VERSION)
        for i, counter in enumerate((self.queue_us, self.input_us, self.infer_us, self.output_us,
                                     self.inference_count, self.exec_count)):
            counter.bind(labels, Reading(lambda i=i: read()[i]))
        for start, histogram in ((6, self.batch_size), (7 + buckets, self.threads)):
            def counts(start: int = start) -> tuple[list[float], float]:
                values = read()
                return values[start:start + buckets], values[start + buckets]
            histogram.bind((model,), HistogramReading(counts))
        self._series.pop(model, None)
        self.count_model(model)

    def count_elsewhere(self, model: str, read: Callable[[], list[float]], front: str = "http_pump") -> None:
        """Requests of `model` are also answered elsewhere (a native front: "http_pump", "grpc_native"): `read`
        gives their success count, summed request duration (us), requests pending and the time.time() of the
        last success, added to what is counted here when the series are read; `tvmzoo_<front>_success` shows
        that front's share."""
        labels = (model, VERSION)
        readers = self._elsewhere.setdefault(model, [])
        readers.append(read)
        for i, counter in enumerate((self.success, self.request_us, self.pending)):
            counter.bind(labels, Plus(lambda i=i: sum(r()[i] for r in readers)))
        self._last_elsewhere[model] = lambda: max(r()[3] for r in readers)
        if front not in self.fronts:
            doc = f"Successful inference requests the native {FRONTS[front]} answered (counted in " \
                  "nv_inference_request_success too)"
            self.fronts[front] = TritonCounter(f"tvmzoo_{front}_success", doc)
            self.registry.register(self.fronts[front])
        self.fronts[front].bind(labels, Reading(lambda: read()[0]))
        self._series.pop(model, None)
        self.count_model(model)

    def last_success(self, model: str) -> float:
        elsewhere = self._last_elsewhere.get(model)
        return max(self.last_inference.get(model, 0.0), elsewhere() if elsewhere else 0.0)

    def statistics(self, model: str) -> dict:
        """Triton's statistics extension for one model (what perf_analyzer reads for its server-side
        figures): counts and cumulative nanoseconds, from the same counters as /metrics."""
        labels = (model, VERSION)
        success = int(self.success.value(*labels))

        def duration(counter: TritonCounter, count: int) -> dict:
            return {"count": count, "ns": int(counter.value(*labels) * 1e3)}

        return {"name": model, "version": VERSION, "last_inference": int(self.last_success(model) * 1e3),
                "inference_count": int(self.inference_count.value(*labels)),
                "execution_count": int(self.exec_count.value(*labels)),
                "inference_stats": {"success": duration(self.request_us, success),
                                    "fail": {"count": int(self.failure.total(model)), "ns": 0},
                                    "queue": duration(self.queue_us, success),
                                    "compute_input": duration(self.input_us, success),
                                    "compute_infer": duration(self.infer_us, success),
                                    "compute_output": duration(self.output_us, success)},
                "batch_stats": []}

    def exposition(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
