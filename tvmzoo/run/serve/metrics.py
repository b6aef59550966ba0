"""Prometheus metrics named and labelled like Triton's (model, version), so its dashboards fit.
Latencies are cumulative microsecond counters as Triton's are: divide by nv_inference_request_success
(or the exec count) for a mean. The batch-size histogram is tvmzoo's own (Triton has none)."""
from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LABELS = ("model", "version")
VERSION = "1"


@dataclass
class Metrics:
    registry: CollectorRegistry
    success: Counter
    failure: Counter
    inference_count: Counter
    exec_count: Counter
    pending: Gauge
    request_us: Counter
    queue_us: Counter
    input_us: Counter
    infer_us: Counter
    output_us: Counter
    batch_size: Histogram

    @classmethod
    def create(cls) -> Metrics:
        reg = CollectorRegistry()

        def counter(name: str, doc: str, labels=LABELS) -> Counter:
            return Counter(name, doc, labels, registry=reg)

        return cls(
            reg,
            counter("nv_inference_request_success", "Number of successful inference requests"),
            counter("nv_inference_request_failure", "Number of failed inference requests", (*LABELS, "reason")),
            counter("nv_inference_count", "Number of inferences performed (a batch of n counts n)"),
            counter("nv_inference_exec_count", "Number of model executions (batches) performed"),
            Gauge("nv_inference_pending_request_count", "Requests waiting in the queue or running", LABELS,
                  registry=reg),
            counter("nv_inference_request_duration_us", "Cumulative request duration, receipt to response"),
            counter("nv_inference_queue_duration_us", "Cumulative time requests waited in the queue"),
            counter("nv_inference_compute_input_duration_us", "Cumulative time gathering batch inputs"),
            counter("nv_inference_compute_infer_duration_us", "Cumulative model execution time per request"),
            counter("nv_inference_compute_output_duration_us", "Cumulative time splitting batch outputs"),
            Histogram("tvmzoo_inference_batch_size", "Rows per model execution", ("model",),
                      buckets=(1, 2, 4, 8, 16, 32, 64), registry=reg),
        )

    def count_model(self, model: str) -> None:
        """Make a model's series exist (at 0) from the start, as Triton's do."""
        for metric in (self.success, self.inference_count, self.exec_count, self.request_us, self.queue_us,
                       self.infer_us, self.input_us, self.output_us):
            metric.labels(model, VERSION)
        self.pending.labels(model, VERSION)

    def exposition(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
