"""Prometheus metrics named and labelled like Triton's (model, version), so its dashboards fit.
Latencies are cumulative microsecond counters as Triton's are: divide by nv_inference_request_success
(or the exec count) for a mean. The batch-size histogram is tvmzoo's own (Triton has none)."""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import Metric

LABELS = ("model", "version")
VERSION = "1"


class TritonCounter:
    """A counter exposed under its exact name, as Triton's are: prometheus_client's Counter always
    appends `_total`, and `nv_inference_request_success_total` would match no Triton dashboard."""

    def __init__(self, name: str, doc: str, labelnames: tuple[str, ...] = LABELS) -> None:
        self.name, self.doc, self.labelnames = name, doc, labelnames
        self._values: dict[tuple[str, ...], float] = {}
        self._lock = threading.Lock()

    def labels(self, *values: str) -> _Bound:
        with self._lock:
            self._values.setdefault(values, 0.0)
        return _Bound(self, values)

    def value(self, *values: str) -> float:
        with self._lock:
            return self._values.get(values, 0.0)

    def total(self, model: str) -> float:
        """Summed over the labels after the model name (the failure reasons)."""
        with self._lock:
            return sum(v for k, v in self._values.items() if k[0] == model)

    def add(self, values: tuple[str, ...], amount: float) -> None:
        with self._lock:
            self._values[values] = self._values.get(values, 0.0) + amount

    def collect(self) -> list[Metric]:
        metric = Metric(self.name, self.doc, "counter")
        with self._lock:
            for values, value in sorted(self._values.items()):
                metric.add_sample(self.name, dict(zip(self.labelnames, values)), value)
        return [metric]


@dataclass(frozen=True)
class _Bound:
    counter: TritonCounter
    values: tuple[str, ...]

    def inc(self, amount: float = 1.0) -> None:
        self.counter.add(self.values, amount)


@dataclass(frozen=True)
class ModelSeries:
    """One model's series, bound once: `labels()` on every request costs a lock and a lookup each."""
    success: _Bound
    inference_count: _Bound
    exec_count: _Bound
    request_us: _Bound
    queue_us: _Bound
    input_us: _Bound
    infer_us: _Bound
    output_us: _Bound
    pending: object         # prometheus_client's bound Gauge
    batch_size: object      # and Histograms
    threads: object


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
    pending: Gauge
    batch_size: Histogram
    threads: Histogram
    last_inference: dict[str, float] = field(default_factory=dict)   # model -> time.time() of its last success
    _series: dict[str, ModelSeries] = field(default_factory=dict)

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
        for counter in counters:
            reg.register(counter)
        return cls(reg, *counters,
                   Gauge("nv_inference_pending_request_count", "Requests waiting in the queue or running", LABELS,
                         registry=reg),
                   Histogram("tvmzoo_inference_batch_size", "Rows per model execution", ("model",),
                             buckets=(1, 2, 4, 8, 16, 32, 64), registry=reg),
                   Histogram("tvmzoo_inference_threads", "TVM threads per model execution", ("model",),
                             buckets=(1, 2, 4, 8, 16, 32, 64), registry=reg))

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

    def statistics(self, model: str) -> dict:
        """Triton's statistics extension for one model (what perf_analyzer reads for its server-side
        figures): counts and cumulative nanoseconds, from the same counters as /metrics."""
        labels = (model, VERSION)
        success = int(self.success.value(*labels))

        def duration(counter: TritonCounter, count: int) -> dict:
            return {"count": count, "ns": int(counter.value(*labels) * 1e3)}

        return {"name": model, "version": VERSION, "last_inference": int(self.last_inference.get(model, 0) * 1e3),
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
