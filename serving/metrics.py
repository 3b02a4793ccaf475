"""Prometheus metrics of one app instance (own registry, so tests can run several apps)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass(frozen=True)
class BatcherStats:
    queue_depth: int
    items_run: int
    batches_run: int


class _BatcherCollector(Collector):
    """Reads the batchers' own counters when scraped: nothing to update per request, and the
    inference count / execution count ratio is the mean batch size (as Triton reports it)."""

    def __init__(self, stats: Callable[[], dict[str, BatcherStats]]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        depth = GaugeMetricFamily(
            "cellinspect_queue_depth", "Images waiting for a micro-batch", labels=["model"]
        )
        items = CounterMetricFamily(
            "cellinspect_inferences", "Images inferred (inference count)", labels=["model"]
        )
        batches = CounterMetricFamily(
            "cellinspect_executions", "Batches executed (execution count)", labels=["model"]
        )
        for model, s in self._stats().items():
            depth.add_metric([model], s.queue_depth)
            items.add_metric([model], s.items_run)
            batches.add_metric([model], s.batches_run)
        yield from (depth, items, batches)


class ServiceMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "cellinspect_requests",
            "HTTP requests by route and outcome",
            ["route", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "cellinspect_latency_seconds",
            "Per-image latency by stage (decode, queue, infer, total)",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.verdicts = Counter(
            "cellinspect_verdicts",
            "Verdicts by line, station, label and verdict",
            ["line", "station", "label", "verdict"],
            registry=r,
        )
        self.model_info = Gauge(
            "cellinspect_model_info",
            "Served model versions (value 1)",
            ["model", "version"],
            registry=r,
        )
        self.rejected = Counter(
            "cellinspect_rejected",
            "Requests refused before inference, by reason",
            ["reason"],
            registry=r,
        )
        self.record_group = Histogram(
            "cellinspect_record_commit_size",
            "Records per group commit",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        # Shadow mode: the candidate's answers beside the served model's (model = served name).
        self.shadow_runs = Counter(
            "cellinspect_shadow_runs",
            "Inspections the shadow candidate answered",
            ["model", "candidate"],
            registry=r,
        )
        self.shadow_dropped = Counter(
            "cellinspect_shadow_dropped",
            "Sampled inspections left without a recorded shadow result, by reason",
            ["model", "reason"],
            registry=r,
        )
        self.shadow_label_agreements = Counter(
            "cellinspect_shadow_label_agreements",
            "Shadow runs whose label equals the served model's",
            ["model", "candidate"],
            registry=r,
        )
        self.shadow_verdict_agreements = Counter(
            "cellinspect_shadow_verdict_agreements",
            "Shadow runs whose verdict equals the served model's",
            ["model", "candidate"],
            registry=r,
        )
        self.shadow_verdict_changes = Counter(
            "cellinspect_shadow_verdict_changes",
            "Shadow runs whose verdict differs, from the served verdict to the candidate's",
            ["model", "candidate", "from_verdict", "to_verdict"],
            registry=r,
        )

    def watch_batchers(self, stats: Callable[[], dict[str, BatcherStats]]) -> None:
        self.registry.register(_BatcherCollector(stats))

    def observe_timings(
        self, decode_ms: float, queue_ms: float, infer_ms: float, total_ms: float
    ) -> None:
        for stage, ms in (
            ("decode", decode_ms),
            ("queue", queue_ms),
            ("infer", infer_ms),
            ("total", total_ms),
        ):
            self.latency.labels(stage).observe(ms / 1000.0)

    def set_served(self, served: dict[str, str]) -> None:
        """Model name -> version now served; replaces what was there (reloads)."""
        self.model_info.clear()
        for name, version in served.items():
            self.model_info.labels(name, version).set(1)
