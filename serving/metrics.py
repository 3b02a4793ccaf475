"""Prometheus metrics of one app instance (own registry, so tests can run several apps).

With several server processes (`cellinspect serve --workers N`) the CLI points
PROMETHEUS_MULTIPROC_DIR at a fresh directory before the workers start: prometheus-client
then keeps every counter, histogram and gauge in files there, and a scrape, whichever worker
answers it, reads them all (`MultiProcessCollector`). Gauges say how to combine the
processes (`multiprocess_mode`); values read from the batchers are copied into real
metrics (`sync`), at each scrape of this process and every second in the background.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import multiprocess as prometheus_multiprocess

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"


@dataclass(frozen=True)
class BatcherStats:
    queue_depth: int
    items_run: int  # monotonic over the batcher's life
    batches_run: int
    batcher: int  # identity of the batcher (a reload makes a new one, counting from 0)


class ServiceMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.multiprocess = bool(os.environ.get(MULTIPROCESS_ENV))
        self._batcher_stats: Callable[[], dict[str, BatcherStats]] = dict
        self._synced: dict[int, tuple[int, int]] = {}  # batcher -> (items, batches) synced
        self._served: dict[str, str] = {}
        r = self.registry
        self.queue_depth = Gauge(
            "cellinspect_queue_depth",
            "Images waiting for a micro-batch",
            ["model"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.inferences = Counter(
            "cellinspect_inferences", "Images inferred (inference count)", ["model"], registry=r
        )
        self.executions = Counter(
            "cellinspect_executions", "Batches executed (execution count)", ["model"], registry=r
        )
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
            multiprocess_mode="livemax",  # 1 while any live worker serves that version
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
        self.record_commits = Counter(
            "cellinspect_record_commits",
            "Commits of inspection records, by the thread that made them: the inference "
            "worker of a lone request (path=worker) or the records writer (path=writer). "
            "None by the worker while requests are alone: the database has been slow or "
            "failing in the last 30 s",
            ["path"],
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
        """Where `sync` reads the batchers' own counters (nothing is updated per request)."""
        self._batcher_stats = stats

    def sync(self) -> None:
        """Copy the batchers' counters into the metrics: queue depth, and the increments of
        inference count and execution count since the last sync (their ratio is the mean
        batch size, as Triton reports it)."""
        for model, s in self._batcher_stats().items():
            items, batches = self._synced.get(s.batcher, (0, 0))
            if s.items_run < items or s.batches_run < batches:  # a new batcher at a reused id
                items, batches = 0, 0
            self.inferences.labels(model).inc(s.items_run - items)
            self.executions.labels(model).inc(s.batches_run - batches)
            self._synced[s.batcher] = (s.items_run, s.batches_run)
            self.queue_depth.labels(model).set(s.queue_depth)

    def exposition(self) -> bytes:
        """The text a scrape gets: this process's metrics, or every worker's with several."""
        self.sync()
        if not self.multiprocess:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        prometheus_multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)

    def process_exiting(self) -> None:
        """Drop this worker's live gauges from the shared directory (several workers only)."""
        if self.multiprocess:
            prometheus_multiprocess.mark_process_dead(os.getpid())

    def observe_commit(self, size: int, _seconds: float, path: str) -> None:
        """RecordStore's on_commit: one commit of `size` records made on `path`."""
        self.record_group.observe(size)
        self.record_commits.labels(path).inc()

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
        if self.multiprocess:
            # clear() would forget the series here but leave their value in the shared
            # files: set the versions no longer served to 0 first.
            for model, version in self._served.items():
                if served.get(model) != version:
                    self.model_info.labels(model, version).set(0)
        self.model_info.clear()
        for name, version in served.items():
            self.model_info.labels(name, version).set(1)
        self._served = dict(served)
