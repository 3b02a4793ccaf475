"""Shadow mode: a candidate version runs beside a served model on live images, never the answer.

After an inspection has been answered and recorded, `ShadowRunner.offer` samples it
(`shadow_share`) and schedules a background run of the model's candidate on the same
preprocessed tensor (re-preprocessed from the decoded image when the candidate's spec
differs). The candidate's label and verdict go into the shadow metrics and, through the
records writer, into that inspection's record. Live traffic always comes first:

- a shadow run starts only while the served models hold at most `shadow_max_primary_queue`
  live images waiting plus batches running (0, the default: only while they are idle), and
  while the candidate's own small backlog has room; otherwise it is dropped and counted
  (`cellinspect_shadow_dropped_total{reason}`), never queued;
- the candidate runs in its own micro-batcher whose worker thread is niced to the lowest
  priority, on `shadow_intra_op_threads` ORT threads (1: all its work stays in that thread),
  so the kernel gives the cores to live batches first; re-preprocessing, when needed, runs
  in a niced thread of its own too;
- its result is handed to the records writer without waiting, and refused when the writer
  is behind.

Nothing here raises into a request: every failure is counted and logged (at most every
`LOG_EVERY_S` per model and reason, with the number dropped meanwhile).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from enum import StrEnum

import numpy as np

from cellinspect.datasets.preprocess import PreprocessSpec, preprocess
from cellinspect.serving.batcher import DeadlineExceeded, Overloaded
from cellinspect.serving.engine import (
    DecodedImage,
    ModelEngine,
    ModelRegistry,
    lower_thread_priority,
)
from cellinspect.serving.metrics import ServiceMetrics
from cellinspect.serving.policy import Decision, decide
from cellinspect.serving.records import InspectionRecord, RecordStore, ShadowResult
from cellinspect.serving.settings import Settings

logger = logging.getLogger(__name__)

LOG_EVERY_S = 10.0  # drops are logged at most this often per model and reason


class DropReason(StrEnum):
    """Why a sampled inspection got no shadow result."""

    PRIMARY_BUSY = "primary_busy"  # live images were waiting for the served models
    CANDIDATE_BUSY = "candidate_busy"  # the candidate's backlog was full (or it was stopping)
    EXPIRED = "expired"  # the candidate did not answer within the deadline
    FAILED = "failed"  # the candidate raised, or gave unusable probabilities
    RECORDS_BUSY = "records_busy"  # the records writer was behind (or closed): not stored


class ShadowRunner:
    """Schedules, bounds and records the shadow runs of one service."""

    def __init__(
        self,
        settings: Settings,
        registry: ModelRegistry,
        records: RecordStore,
        metrics: ServiceMetrics,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self.share = settings.shadow_share
        self.max_primary_queue = settings.shadow_max_primary_queue
        self.deadline_s = settings.deadline_ms / 1000
        self.line_points = settings.line_operating_points
        self.registry = registry
        self.records = records
        self.metrics = metrics
        self._rng = rng or random.Random()
        self._tasks: set[asyncio.Task[None]] = set()
        self._backlog: Counter[str] = Counter()  # shadow runs in progress per served model
        self._last_logged: dict[tuple[str, DropReason], float] = {}
        self._unlogged: Counter[tuple[str, DropReason]] = Counter()
        self._preprocessor: ThreadPoolExecutor | None = None  # created when first needed

    @property
    def pending(self) -> int:
        """Shadow runs scheduled and not finished."""
        return len(self._tasks)

    def needs_image(self, primary: ModelEngine) -> bool:
        """Whether `primary`'s candidate preprocesses differently, so a shadow run needs the
        decoded image and not only the live tensor (the decoder drops the image otherwise)."""
        candidate = self.registry.candidate(primary.name)
        return candidate is not None and candidate.card.preprocessing != primary.card.preprocessing

    def offer(self, primary: ModelEngine, decoded: DecodedImage, record: InspectionRecord) -> None:
        """Schedule a shadow run for an answered, recorded inspection, if sampled and there is
        room; returns at once and never raises."""
        try:
            candidate = self.registry.candidate(primary.name)
            if candidate is None or self._rng.random() >= self.share:
                return
            # A batch in flight counts as busy too: on a small box a shadow run started beside
            # it takes CPU time (or a hyperthread sibling) that the live batch needs.
            live = sum(
                e.batcher.queue_depth + e.batcher.batches_in_flight for e in self.registry.list()
            )
            if live > self.max_primary_queue:
                self._drop(primary.name, DropReason.PRIMARY_BUSY)
                return
            # Waiting in its queue plus one batch running: more would only queue stale work.
            if (
                self._backlog[primary.name]
                >= candidate.batcher.queue_size + candidate.max_batch_size
            ):
                self._drop(primary.name, DropReason.CANDIDATE_BUSY)
                return
            # Only the tensor is kept when it fits the candidate: not the decoded frame.
            same_input = candidate.card.preprocessing == primary.card.preprocessing
            source = decoded.tensor if same_input else decoded.image
            if source is None:  # the candidate was swapped for one that preprocesses differently
                self._drop(primary.name, DropReason.FAILED, "the decoded image was not kept")
                return
            task = asyncio.get_running_loop().create_task(
                self._run(primary.name, record, source, preprocessed=same_input),
                name=f"shadow-{primary.name}",
            )
            self._backlog[primary.name] += 1
        except Exception:  # a bug here must not fail an inspection that is already recorded
            logger.exception("shadow: cannot schedule a run for %s", primary.name)
            return
        self._tasks.add(task)
        task.add_done_callback(functools.partial(self._finished, primary.name))

    def _finished(self, name: str, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._backlog[name] -= 1

    async def _run(
        self, name: str, record: InspectionRecord, source: np.ndarray, *, preprocessed: bool
    ) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.deadline_s
        try:
            # A lease, like a live request's: the candidate is not closed under this run.
            with self.registry.candidate_lease(name) as candidate:
                spec = candidate.card.preprocessing
                x = source if preprocessed else await self._preprocess(source, spec)
                probs, _ = await candidate.infer(x, deadline)
                decision = decide(
                    probs, candidate.card, line_id=record.line_id, line_points=self.line_points
                )
        except Overloaded:  # its queue filled meanwhile, or it is stopping (BatcherClosed)
            self._drop(name, DropReason.CANDIDATE_BUSY)
            return
        except DeadlineExceeded:
            self._drop(name, DropReason.EXPIRED)
            return
        except Exception as exc:
            self._drop(name, DropReason.FAILED, f"{type(exc).__name__}: {exc}")
            return
        self._record(name, candidate, record, decision)

    async def _preprocess(self, image: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
        """The candidate's own input from the decoded image, at the lowest CPU priority."""
        if self._preprocessor is None:
            self._preprocessor = ThreadPoolExecutor(
                1, thread_name_prefix="shadow-preprocess", initializer=lower_thread_priority
            )
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._preprocessor, preprocess, image, spec)

    def _record(
        self, name: str, candidate: ModelEngine, record: InspectionRecord, decision: Decision
    ) -> None:
        m, ref = self.metrics, candidate.ref
        m.shadow_runs.labels(name, ref).inc()
        if decision.label == record.label:
            m.shadow_label_agreements.labels(name, ref).inc()
        if decision.verdict == record.verdict:
            m.shadow_verdict_agreements.labels(name, ref).inc()
        else:
            m.shadow_verdict_changes.labels(
                name, ref, record.verdict.value, decision.verdict.value
            ).inc()
        result = ShadowResult(record.id, candidate.version, decision.label, decision.verdict)
        if not self.records.add_shadow_result(result):
            self._drop(name, DropReason.RECORDS_BUSY)

    def _drop(self, name: str, reason: DropReason, detail: str = "") -> None:
        self.metrics.shadow_dropped.labels(name, reason.value).inc()
        key = (name, reason)
        self._unlogged[key] += 1
        now = time.monotonic()
        if now - self._last_logged.get(key, -LOG_EVERY_S) >= LOG_EVERY_S:
            self._last_logged[key] = now
            count = self._unlogged.pop(key)
            logger.warning(
                "shadow: %d run(s) of %s's candidate dropped (%s)%s",
                count,
                name,
                reason.value,
                f": {detail}" if detail else "",
            )

    async def close(self) -> None:
        """Cancel the shadow runs still in progress: nobody waits for them."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._preprocessor is not None:
            self._preprocessor.shutdown(wait=False, cancel_futures=True)
            self._preprocessor = None
