"""Asyncio micro-batcher: many concurrent single-image requests -> few batched model runs.

One collector task per model takes queued items into a batch and hands it to ONE
dedicated worker thread. Only one batch is ever in flight because ONNX Runtime already
spreads a run over every intra-op thread; a second concurrent run would only fight it
for the same cores. Batches therefore form naturally while a run is in progress: the
requests that arrive meanwhile make up the next batch.

A batch closes when it holds `max_batch_size` items or `max_delay_s` after its first
item was queued. With `dispatch_when_idle` (the default) an idle worker does not wait
out `max_delay_s`: a lone request runs at once, which is what keeps the latency at
concurrency 1 at that of a plain `session.run`. `run_alone` goes one step further for a
lone request: its preparation (decoding), its run and a follow-up step (the service commits
the request's record there) share one hand-off to the worker.
See `MicroBatcher` for the contract.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import numpy as np

logger = logging.getLogger(__name__)

# Weight of the newest batch in the running mean of batch run time (for Retry-After).
_EMA_WEIGHT = 0.2
# Retry-After is never advertised shorter than this: clients must not spin.
_MIN_RETRY_AFTER_S = 0.05

RowT = TypeVar("RowT")  # what `run` gives per item: an array row, or a tuple of them
ExtraT = TypeVar("ExtraT")  # what `run_alone`'s preparation hands back beside the tensor
DoneT = TypeVar("DoneT")  # what `run_alone`'s follow-up step (`then`) hands back


class Overloaded(Exception):
    """The queue is full (or the batcher is closed); try again after `retry_after_s`."""

    def __init__(self, message: str, *, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class BatcherClosed(Overloaded):
    """The batcher is stopping or stopped (e.g. its model was just replaced by a reload)."""


class DeadlineExceeded(Exception):
    """The request's deadline passed before its result was ready; it was not (or no longer) run."""

    def __init__(self, message: str, *, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class BatchTiming:
    """Where one item's time went: waiting for its batch, and its batch's model run."""

    queue_ms: float  # from submit to the batch being handed to the worker
    infer_ms: float  # the batch's run in the worker (stacking included), shared by its items
    batch_size: int  # items in that batch


@dataclass(eq=False)
class _LoneRun:
    """Who a lone run's follow-up step (`then`) belongs to, decided once under a lock: the
    caller gives up only before the step starts, and the step starts only if it has not."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    abandoned: bool = False
    following: bool = False
    busy_s: float | None = None  # set by the worker once the model has run

    def start_following(self) -> bool:
        """Worker: True (and then the caller waits for the step) unless the caller left."""
        with self.lock:
            self.following = not self.abandoned
            return self.following

    def abandon(self) -> bool:
        """Caller: True (and the step never starts) unless it has already started."""
        with self.lock:
            self.abandoned = not self.following
            return self.abandoned


@dataclass(eq=False)
class _Item(Generic[RowT]):
    x: np.ndarray
    deadline: float  # absolute loop.time()
    enqueued: float  # loop.time() at submit
    future: asyncio.Future[tuple[RowT, BatchTiming]]


class MicroBatcher(Generic[RowT]):
    """Batches single CxHxW tensors for `run` (NxCxHxW -> N rows), one batch at a time.

    `submit` returns the caller's own output row and its timing, or raises `Overloaded`
    (queue full, immediately), `DeadlineExceeded` (deadline passed while queued or while
    waiting; expired items are never run) or whatever `run` raised for that batch.
    `stop` drains: every accepted item is answered or failed before it returns.
    """

    def __init__(
        self,
        run: Callable[[np.ndarray], Sequence[RowT]],
        *,
        max_batch_size: int,
        max_delay_s: float,
        queue_size: int,
        name: str = "",
        dispatch_when_idle: bool = True,
        max_in_flight: int = 1,
        worker_init: Callable[[], None] | None = None,
    ) -> None:
        if max_batch_size < 1 or queue_size < 1 or max_delay_s < 0 or max_in_flight < 1:
            raise ValueError(
                f"need max_batch_size >= 1, queue_size >= 1, max_delay_s >= 0, max_in_flight >= 1 "
                f"(got {max_batch_size}, {queue_size}, {max_delay_s}, {max_in_flight})"
            )
        self._run = run
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self.queue_size = queue_size
        self.name = name
        self.dispatch_when_idle = dispatch_when_idle
        # 1 is the design point (ORT already uses every core); >1 exists to measure that.
        self.max_in_flight = max_in_flight
        # Runs once in each worker thread as it starts (e.g. to lower its CPU priority).
        self.worker_init = worker_init
        self._slots = asyncio.Semaphore(max_in_flight)
        self._in_flight: set[asyncio.Task[object]] = set()
        self._queue: deque[_Item[RowT]] = deque()
        self._wakeup: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._closing = False
        self._batch_s = 0.0  # running mean of one batch's run time
        # Counters for metrics (monotonic over the batcher's life).
        self.batches_run = 0
        self.items_run = 0
        self.items_expired = 0
        self.items_rejected = 0

    def __repr__(self) -> str:
        return (
            f"MicroBatcher({self.name!r}, max_batch_size={self.max_batch_size}, "
            f"max_delay_s={self.max_delay_s}, queue_size={self.queue_size})"
        )

    # ---- life cycle ---------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._task is not None and not self._closing

    @property
    def queue_depth(self) -> int:
        """Items waiting for a batch (including ones whose callers already gave up)."""
        return len(self._queue)

    @property
    def batches_in_flight(self) -> int:
        """Batches handed to the worker thread(s) and not finished."""
        return len(self._in_flight)

    async def start(self) -> None:
        """Start the collector task and the worker thread (idempotent)."""
        if self._task is not None:
            return
        self._closing = False
        self._executor = ThreadPoolExecutor(
            max_workers=self.max_in_flight,
            thread_name_prefix=f"batcher-{self.name or id(self)}",
            initializer=self.worker_init,
        )
        self._task = asyncio.get_running_loop().create_task(
            self._collect(), name=f"batcher-{self.name}"
        )

    async def stop(self) -> None:
        """Refuse new items, run (or expire) every queued one, then stop the worker."""
        if self._task is None:
            return
        self._closing = True
        self._wake()
        try:
            await self._task
        finally:
            self._task = None
            if self._executor is not None:
                # The collector has finished, so no work is pending: nothing to wait for.
                self._executor.shutdown(wait=False)
                self._executor = None

    # ---- requests -----------------------------------------------------------------------

    def retry_after_s(self) -> float:
        """A guess at how long the current queue takes to clear."""
        batches_ahead = len(self._queue) / self.max_batch_size + 1
        return max(_MIN_RETRY_AFTER_S, batches_ahead * self._batch_s)

    def _expired(self, message: str) -> DeadlineExceeded:
        """Count one expired item; the error its caller gets."""
        self.items_expired += 1
        return DeadlineExceeded(message, retry_after_s=self.retry_after_s())

    async def submit(self, x: np.ndarray, *, deadline: float) -> tuple[RowT, BatchTiming]:
        """Queue one preprocessed tensor; return its output row once its batch has run."""
        if self._task is None or self._closing:
            raise BatcherClosed(
                f"batcher {self.name!r} is not running", retry_after_s=_MIN_RETRY_AFTER_S
            )
        loop = asyncio.get_running_loop()
        now = loop.time()
        if deadline <= now:
            raise self._expired("deadline already passed at submit")
        if len(self._queue) >= self.queue_size:
            self.items_rejected += 1
            raise Overloaded(
                f"batcher {self.name!r} queue is full ({self.queue_size} items waiting)",
                retry_after_s=self.retry_after_s(),
            )
        item: _Item[RowT] = _Item(x, deadline, now, loop.create_future())
        self._queue.append(item)
        self._wake()
        try:
            # On timeout the task's cancellation cancels `item.future`, so the collector
            # skips the item if it is still queued and drops its row if it is running.
            async with asyncio.timeout_at(deadline):
                return await item.future
        except TimeoutError:
            raise self._expired(
                f"no result within the deadline (waited {1000 * (loop.time() - now):.0f} ms)"
            ) from None

    async def run_alone(
        self,
        prepare: Callable[[], tuple[np.ndarray, ExtraT]],
        *,
        deadline: float,
        then: Callable[[RowT, BatchTiming, ExtraT], DoneT] | None = None,
    ) -> tuple[RowT, BatchTiming, ExtraT, DoneT | None] | None:
        """`prepare()` and then the run of its tensor, in ONE worker-thread hop, if no batch
        is running or queued; None (nothing done) otherwise, and the caller submits as usual.

        A thread hand-off costs 0.2-0.4 ms on a small VM (a futex wake-up, a context switch,
        the loop's self-pipe): a lone request that decodes on one pool and runs on another
        pays two round trips where this pays one. While it runs it holds the worker like a
        batch does, so requests arriving meanwhile queue and form the next batch. Whatever
        `prepare` raises propagates unchanged; an expired deadline raises DeadlineExceeded.

        `then(row, timing, extra)`, when given, runs in the same hop right after the run if
        nothing is queued by then (queued items need the worker) and the caller still waits;
        its result comes back as the fourth element, None where it did not run. What it
        raises propagates. Once it has started it is not abandoned: past the deadline the
        caller waits for it (it may be committing the record its answer must match), so
        `then` must bound its own time.
        """
        if self._task is None or self._closing or self._queue or self._slots.locked():
            return None
        loop = asyncio.get_running_loop()
        if deadline <= loop.time():
            raise self._expired("deadline already passed at submit")
        await self._slots.acquire()  # free (checked above), so this does not suspend
        lone = _LoneRun()
        task = loop.create_task(self._execute_alone(prepare, then, lone))
        self._in_flight.add(task)
        task.add_done_callback(self._batch_done)
        try:
            # Shielded: a caller that gives up must not release the worker mid-run.
            async with asyncio.timeout_at(deadline):
                return await asyncio.shield(task)
        except TimeoutError:
            if lone.abandon():
                raise self._expired("no result within the deadline") from None
            return await asyncio.shield(task)  # `then` has started: its outcome is the answer
        except asyncio.CancelledError:
            if not lone.abandon():  # `then` goes on without a caller: say if it fails
                task.add_done_callback(self._log_unawaited_failure)
            raise

    def _prepare_and_run(
        self,
        prepare: Callable[[], tuple[np.ndarray, ExtraT]],
        then: Callable[[RowT, BatchTiming, ExtraT], DoneT] | None,
        lone: _LoneRun,
    ) -> tuple[RowT, BatchTiming, ExtraT, DoneT | None]:
        x, extra = prepare()
        t0 = time.perf_counter()
        row = self._run_batch([x])[0]
        timing = BatchTiming(0.0, 1000 * (time.perf_counter() - t0), 1)
        done = None
        try:
            # The queue is read across threads: a stale answer only leaves `then` to the caller.
            if then is not None and not self._queue and lone.start_following():
                done = then(row, timing, extra)
        finally:
            lone.busy_s = time.perf_counter() - t0  # the worker's time, `then` included
        return row, timing, extra, done

    async def _execute_alone(
        self,
        prepare: Callable[[], tuple[np.ndarray, ExtraT]],
        then: Callable[[RowT, BatchTiming, ExtraT], DoneT] | None,
        lone: _LoneRun,
    ) -> tuple[RowT, BatchTiming, ExtraT, DoneT | None]:
        try:
            return await asyncio.get_running_loop().run_in_executor(
                self._executor, self._prepare_and_run, prepare, then, lone
            )
        finally:
            if lone.busy_s is not None:  # the run happened, even if `then` failed after it
                self._record_batch(lone.busy_s, 1)

    def _log_unawaited_failure(self, task: asyncio.Task[object]) -> None:
        if not task.cancelled() and (exc := task.exception()) is not None:
            logger.error(
                "batcher %r: a lone run's follow-up failed after its caller left: %s",
                self.name,
                exc,
            )

    def _record_batch(self, elapsed: float, size: int) -> None:
        self._batch_s = (
            elapsed
            if self.batches_run == 0
            else (1 - _EMA_WEIGHT) * self._batch_s + _EMA_WEIGHT * elapsed
        )
        self.batches_run += 1
        self.items_run += size

    # ---- collector ----------------------------------------------------------------------

    def _wake(self) -> None:
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    async def _sleep_until_woken(self, until: float | None) -> None:
        """Wait for a submit or stop (or until loop time `until`)."""
        loop = asyncio.get_running_loop()
        self._wakeup = loop.create_future()
        timer = None if until is None else loop.call_at(until, self._wake)
        try:
            await self._wakeup
        finally:
            self._wakeup = None
            if timer is not None:
                timer.cancel()

    def _drop_dead_head(self) -> None:
        while self._queue and self._queue[0].future.done():
            self._queue.popleft()

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                # Waiting here for the running batch to finish is what lets the next one fill.
                await self._slots.acquire()
                self._drop_dead_head()
                if not self._queue:
                    self._slots.release()
                    if self._closing:
                        # A lone run's failure belongs to its caller, not to the stop.
                        await asyncio.gather(*self._in_flight, return_exceptions=True)
                        return
                    await self._sleep_until_woken(None)
                    continue
                if self.dispatch_when_idle:
                    # A worker is idle, so waiting would only add latency; one pass of the
                    # loop lets submits that are already scheduled join this batch for free.
                    await asyncio.sleep(0)
                else:
                    close_at = self._queue[0].enqueued + self.max_delay_s
                    while (
                        len(self._queue) < self.max_batch_size
                        and not self._closing
                        and loop.time() < close_at
                    ):
                        await self._sleep_until_woken(close_at)
                batch = self._take_batch(loop.time())
                if not batch:
                    self._slots.release()
                    continue
                task = loop.create_task(self._execute(batch))
                self._in_flight.add(task)
                task.add_done_callback(self._batch_done)
        finally:
            # Only reached with items left if the task was cancelled: fail them, never hang.
            while self._queue:
                item = self._queue.popleft()
                if not item.future.done():
                    item.future.set_exception(
                        BatcherClosed(
                            f"batcher {self.name!r} stopped", retry_after_s=_MIN_RETRY_AFTER_S
                        )
                    )

    def _batch_done(self, task: asyncio.Task[object]) -> None:
        self._in_flight.discard(task)
        self._slots.release()
        if not task.cancelled():
            task.exception()  # retrieved: a lone run's caller may have stopped waiting

    def _take_batch(self, now: float) -> list[_Item[RowT]]:
        """Pop up to max_batch_size live items; expire those whose deadline has passed."""
        batch: list[_Item[RowT]] = []
        while self._queue and len(batch) < self.max_batch_size:
            item = self._queue.popleft()
            if item.future.done():  # its caller timed out or was cancelled
                continue
            if item.deadline <= now:
                item.future.set_exception(
                    self._expired(
                        f"deadline passed after {1000 * (now - item.enqueued):.0f} ms in the queue"
                    )
                )
                continue
            batch.append(item)
        return batch

    def _run_batch(self, xs: list[np.ndarray]) -> Sequence[RowT]:
        """Worker thread: stack and run, so the copy stays off the event loop."""
        # A lone item needs no copy: a view with a batch axis is what `run` expects.
        batch = xs[0][None] if len(xs) == 1 else np.stack(xs)
        out = self._run(batch)
        try:
            rows = len(out)
        except TypeError:  # a 0-d array or a scalar: no rows at all
            rows = -1
        if rows != len(xs):
            raise RuntimeError(
                f"batcher {self.name!r}: run returned {rows} rows for a batch of {len(xs)}"
            )
        return out

    async def _execute(self, batch: list[_Item[RowT]]) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        t0 = time.perf_counter()
        try:
            out = await loop.run_in_executor(self._executor, self._run_batch, [i.x for i in batch])
        except BaseException as exc:
            if isinstance(exc, Exception):
                logger.warning("batcher %r: batch of %d failed: %s", self.name, len(batch), exc)
                failure: BaseException = exc
            else:  # the collector itself is being cancelled: its batch must not hang
                failure = BatcherClosed(
                    f"batcher {self.name!r} stopped", retry_after_s=_MIN_RETRY_AFTER_S
                )
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(failure)
            if failure is not exc:
                raise
            return
        finally:
            elapsed = time.perf_counter() - t0
            self._record_batch(elapsed, len(batch))
        infer_ms = 1000 * elapsed
        for row, item in zip(out, batch, strict=True):
            if not item.future.done():
                timing = BatchTiming(1000 * (started - item.enqueued), infer_ms, len(batch))
                item.future.set_result((row, timing))
