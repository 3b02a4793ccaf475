"""MicroBatcher: batch formation, row mapping, back-pressure, deadlines, failures, draining."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

import numpy as np
import pytest

from cellinspect.serving.batcher import (
    BatcherClosed,
    BatchTiming,
    DeadlineExceeded,
    MicroBatcher,
    Overloaded,
)

SHAPE = (1, 2, 2)


def item(value: float) -> np.ndarray:
    return np.full(SHAPE, value, np.float32)


class Recorder:
    """A `run` that sums each item (so every caller's row is checkable) and logs batches."""

    def __init__(self, *, delay_s: float = 0.0, gate: threading.Event | None = None) -> None:
        self.batches: list[list[float]] = []
        self.delay_s = delay_s
        self.gate = gate

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        if self.gate is not None:
            assert self.gate.wait(5), "test gate never opened"
        if self.delay_s:
            time.sleep(self.delay_s)
        sums = batch.reshape(len(batch), -1).sum(axis=1)
        self.batches.append([float(s) / 4 for s in sums])  # back to the submitted values
        if (batch == -1).any():
            raise ValueError("poisoned item")
        return sums[:, None]

    @property
    def values_run(self) -> list[float]:
        return [v for batch in self.batches for v in batch]


def make(run: Callable[[np.ndarray], np.ndarray], **overrides: object) -> MicroBatcher:
    options: dict[str, object] = {"max_batch_size": 8, "max_delay_s": 0.002, "queue_size": 64}
    options.update(overrides)
    return MicroBatcher(run, **options)


def deadline(seconds: float = 5.0) -> float:
    return asyncio.get_running_loop().time() + seconds


async def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "condition never became true"
        await asyncio.sleep(0.001)


def test_concurrent_submits_form_full_batches() -> None:
    async def scenario() -> None:
        run = Recorder(delay_s=0.01)
        batcher = make(run)
        await batcher.start()
        results = await asyncio.gather(
            *(batcher.submit(item(i), deadline=deadline()) for i in range(32))
        )
        await batcher.stop()
        sizes = [len(b) for b in run.batches]
        assert sizes == [8, 8, 8, 8]
        assert {timing.batch_size for _, timing in results} == {8}
        assert (batcher.batches_run, batcher.items_run) == (4, 32)

    asyncio.run(scenario())


def test_each_caller_gets_its_own_row() -> None:
    async def scenario() -> None:
        batcher = make(Recorder(delay_s=0.002), max_batch_size=5)
        await batcher.start()
        values = [float(v) for v in np.random.default_rng(0).permutation(60)]

        async def one(v: float) -> None:
            await asyncio.sleep(0.0005 * (v % 7))  # stagger arrivals across batches
            row, timing = await batcher.submit(item(v), deadline=deadline())
            assert row.shape == (1,)
            assert row[0] == pytest.approx(4 * v)
            assert 1 <= timing.batch_size <= 5
            assert timing.queue_ms >= 0 and timing.infer_ms > 0

        await asyncio.gather(*(one(v) for v in values))
        await batcher.stop()

    asyncio.run(scenario())


def test_lone_request_does_not_wait_for_max_delay_when_idle() -> None:
    async def scenario() -> None:
        batcher = make(Recorder(), max_delay_s=0.5)
        await batcher.start()
        await batcher.submit(item(1), deadline=deadline())  # first run starts the thread
        t0 = time.perf_counter()
        _, timing = await batcher.submit(item(2), deadline=deadline())
        elapsed = time.perf_counter() - t0
        await batcher.stop()
        assert elapsed < 0.1, f"a lone request took {elapsed * 1000:.1f} ms"
        assert timing.batch_size == 1

    asyncio.run(scenario())


def test_lone_request_waits_at_most_max_delay_when_batching_by_delay() -> None:
    async def scenario() -> None:
        batcher = make(Recorder(), max_delay_s=0.03, dispatch_when_idle=False)
        await batcher.start()
        t0 = time.perf_counter()
        _, timing = await batcher.submit(item(1), deadline=deadline())
        elapsed = time.perf_counter() - t0
        await batcher.stop()
        assert 0.025 <= elapsed < 0.03 + 0.1
        assert timing.queue_ms >= 25

    asyncio.run(scenario())


def test_full_queue_raises_overloaded_immediately() -> None:
    async def scenario() -> None:
        gate = threading.Event()
        run = Recorder(gate=gate)
        batcher = make(run, max_batch_size=1, queue_size=2)
        await batcher.start()
        in_flight = asyncio.create_task(batcher.submit(item(0), deadline=deadline()))
        await wait_until(lambda: batcher.queue_depth == 0 and not in_flight.done())
        await asyncio.sleep(0.01)  # let the collector hand item 0 to the worker
        queued = [asyncio.create_task(batcher.submit(item(v), deadline=deadline())) for v in (1, 2)]
        await wait_until(lambda: batcher.queue_depth == 2)
        t0 = time.perf_counter()
        with pytest.raises(Overloaded) as info:
            await batcher.submit(item(3), deadline=deadline())
        assert time.perf_counter() - t0 < 0.05
        assert info.value.retry_after_s > 0
        assert batcher.items_rejected == 1
        gate.set()
        await asyncio.gather(in_flight, *queued)
        await batcher.stop()
        assert run.values_run == [0, 1, 2]

    asyncio.run(scenario())


def test_expired_items_get_deadline_exceeded_and_are_not_run() -> None:
    async def scenario() -> None:
        gate = threading.Event()
        run = Recorder(gate=gate)
        batcher = make(run, max_batch_size=1)
        await batcher.start()
        blocker = asyncio.create_task(batcher.submit(item(0), deadline=deadline()))
        await asyncio.sleep(0.01)
        with pytest.raises(DeadlineExceeded) as info:
            await batcher.submit(item(7), deadline=deadline(0.05))
        assert info.value.retry_after_s > 0
        gate.set()
        await blocker
        assert (await batcher.submit(item(8), deadline=deadline()))[0][0] == 32
        await batcher.stop()
        assert 7 not in run.values_run
        assert run.values_run == [0, 8]

    asyncio.run(scenario())


def test_deadline_already_passed_is_refused_at_submit() -> None:
    async def scenario() -> None:
        run = Recorder()
        batcher = make(run)
        await batcher.start()
        with pytest.raises(DeadlineExceeded):
            await batcher.submit(item(1), deadline=deadline(-0.001))
        await batcher.stop()
        assert run.values_run == []

    asyncio.run(scenario())


def test_exception_in_run_fails_only_that_batch() -> None:
    async def scenario() -> None:
        gate = threading.Event()
        run = Recorder(gate=gate)
        batcher = make(run, max_batch_size=2)
        await batcher.start()
        first = asyncio.create_task(batcher.submit(item(1), deadline=deadline()))
        await asyncio.sleep(0.01)  # item 1 runs alone, blocked on the gate
        # These two queue up behind it and form the next batch, which is poisoned.
        poisoned = [
            asyncio.create_task(batcher.submit(item(v), deadline=deadline())) for v in (-1, 5)
        ]
        await wait_until(lambda: batcher.queue_depth == 2)
        gate.set()
        assert (await first)[0][0] == 4
        for task in poisoned:
            with pytest.raises(ValueError, match="poisoned"):
                await task
        row, _ = await batcher.submit(item(3), deadline=deadline())
        assert row[0] == 12
        await batcher.stop()

    asyncio.run(scenario())


def test_stop_drains_every_accepted_item() -> None:
    async def scenario() -> None:
        gate = threading.Event()
        run = Recorder(gate=gate)
        batcher = make(run, max_batch_size=2)
        await batcher.start()
        tasks = [
            asyncio.create_task(batcher.submit(item(v), deadline=deadline())) for v in range(7)
        ]
        await asyncio.sleep(0.01)
        stopping = asyncio.create_task(batcher.stop())
        await asyncio.sleep(0.01)
        with pytest.raises(BatcherClosed):
            await batcher.submit(item(99), deadline=deadline())
        gate.set()
        await stopping
        rows = [row[0] for row, _ in await asyncio.gather(*tasks)]
        assert rows == [4 * v for v in range(7)]
        assert batcher.items_run == 7

    asyncio.run(scenario())


def test_cancelled_caller_does_not_break_its_batch() -> None:
    async def scenario() -> None:
        gate = threading.Event()
        run = Recorder(gate=gate)
        batcher = make(run, max_batch_size=4)
        await batcher.start()
        blocker = asyncio.create_task(batcher.submit(item(0), deadline=deadline()))
        await asyncio.sleep(0.01)
        gone = asyncio.create_task(batcher.submit(item(1), deadline=deadline()))
        kept = asyncio.create_task(batcher.submit(item(2), deadline=deadline()))
        await wait_until(lambda: batcher.queue_depth == 2)
        gone.cancel()
        gate.set()
        await blocker
        assert (await kept)[0][0] == 8
        assert gone.cancelled()
        await batcher.stop()
        assert 1 not in run.values_run

    asyncio.run(scenario())


def test_run_alone_prepares_and_runs_in_one_worker_hop_when_idle() -> None:
    async def scenario() -> None:
        run = Recorder()
        batcher = make(run)
        await batcher.start()
        threads: list[str] = []

        def prepare() -> tuple[np.ndarray, str]:
            threads.append(threading.current_thread().name)
            return item(3), "extra"

        def then(row: np.ndarray, timing: BatchTiming, extra: str) -> tuple[float, str, str]:
            threads.append(threading.current_thread().name)
            return float(row[0]), extra, f"{timing.batch_size}"

        row, timing, extra, done = await batcher.run_alone(prepare, deadline=deadline())
        assert float(row[0]) == 12.0 and extra == "extra" and done is None
        assert (timing.queue_ms, timing.batch_size) == (0.0, 1) and timing.infer_ms >= 0
        # The follow-up step sees the row, and runs in the same hop, after the run.
        *_, done = await batcher.run_alone(prepare, deadline=deadline(), then=then)
        await batcher.stop()
        assert done == (12.0, "extra", "1")
        # Preparation and follow-up ran on the batcher's own worker, not on the loop.
        assert len(threads) == 3 and all(t.startswith("batcher-") for t in threads)
        assert run.batches == [[3.0], [3.0]]
        assert (batcher.batches_run, batcher.items_run) == (2, 2)

    asyncio.run(scenario())


def test_run_alone_declines_while_a_batch_runs_and_the_next_batch_waits_for_it() -> None:
    async def scenario() -> None:
        gate = threading.Event()
        run = Recorder(gate=gate)
        batcher = make(run)
        await batcher.start()
        first = asyncio.ensure_future(batcher.submit(item(1), deadline=deadline()))
        await wait_until(lambda: batcher.batches_in_flight == 1)
        prepared: list[int] = []
        declined = await batcher.run_alone(
            lambda: (prepared.append(1), (item(2), None))[1], deadline=deadline()
        )
        assert declined is None and prepared == []  # nothing done: the caller submits instead
        gate.set()
        await first
        await wait_until(lambda: batcher.batches_in_flight == 0)

        # A lone run holds the worker: a submit arriving meanwhile waits and runs after it.
        gate.clear()
        followed: list[int] = []
        alone = asyncio.ensure_future(
            batcher.run_alone(
                lambda: (item(4), 0), deadline=deadline(), then=lambda *_: followed.append(1)
            )
        )
        await wait_until(lambda: batcher.batches_in_flight == 1)
        queued = asyncio.ensure_future(batcher.submit(item(5), deadline=deadline()))
        await asyncio.sleep(0.02)
        assert not queued.done() and batcher.queue_depth == 1
        gate.set()
        (row, _, _, done), _ = await asyncio.gather(alone, queued)
        await batcher.stop()
        assert run.batches == [[1.0], [4.0], [5.0]]
        # The queued item needed the worker: the follow-up step was left to the caller.
        assert float(row[0]) == 16.0 and done is None and followed == []

    asyncio.run(scenario())


def test_run_alone_propagates_preparation_errors_and_frees_the_worker() -> None:
    async def scenario() -> None:
        run = Recorder()
        batcher = make(run)
        await batcher.start()

        def bad() -> tuple[np.ndarray, None]:
            raise ValueError("not an image")

        with pytest.raises(ValueError, match="not an image"):
            await batcher.run_alone(bad, deadline=deadline())
        assert batcher.batches_run == 0  # nothing ran

        def fails_after_the_run(*_: object) -> None:
            raise RuntimeError("record store down")

        with pytest.raises(RuntimeError, match="record store down"):
            await batcher.run_alone(
                lambda: (item(3), None), deadline=deadline(), then=fails_after_the_run
            )
        assert (batcher.batches_run, batcher.items_run) == (1, 1)  # the run itself counts
        row, _ = await batcher.submit(item(2), deadline=deadline())
        assert float(row[0]) == 8.0
        await wait_until(lambda: batcher.batches_in_flight == 0)
        with pytest.raises(DeadlineExceeded):
            await batcher.run_alone(lambda: (item(1), None), deadline=deadline(-1))
        await batcher.stop()
        assert run.batches == [[3.0], [2.0]]

    asyncio.run(scenario())


def test_a_lone_runs_follow_up_is_skipped_past_the_deadline_but_never_cut_short() -> None:
    """The follow-up step (committing the record an answer must match) either never starts,
    when the caller has given up, or is waited for past the deadline once it has started."""

    async def scenario() -> None:
        gate = threading.Event()
        batcher = make(Recorder(gate=gate))
        await batcher.start()
        followed: list[float] = []

        def then(row: np.ndarray, *_: object) -> float:
            followed.append(float(row[0]))
            time.sleep(0.15)  # still going when the deadline passes
            return float(row[0])

        # Deadline passes while the model runs: DeadlineExceeded, and `then` never starts.
        late = asyncio.ensure_future(
            batcher.run_alone(lambda: (item(1), None), deadline=deadline(0.05), then=then)
        )
        with pytest.raises(DeadlineExceeded):
            await late
        gate.set()
        await wait_until(lambda: batcher.batches_in_flight == 0)
        assert followed == [] and batcher.items_run == 1

        # Deadline passes while `then` runs: the caller gets its outcome, not a 503.
        row, _, _, done = await batcher.run_alone(
            lambda: (item(2), None), deadline=deadline(0.05), then=then
        )
        assert float(row[0]) == 8.0 and done == 8.0 and followed == [8.0]
        await batcher.stop()

    asyncio.run(scenario())


def test_stop_waits_for_a_lone_run_whose_caller_gave_up() -> None:
    async def scenario() -> None:
        gate = threading.Event()
        run = Recorder(gate=gate)
        batcher = make(run)
        await batcher.start()
        alone = asyncio.ensure_future(
            batcher.run_alone(lambda: (item(1), None), deadline=deadline())
        )
        await wait_until(lambda: batcher.batches_in_flight == 1)
        alone.cancel()
        await asyncio.sleep(0.01)
        assert batcher.batches_in_flight == 1  # the worker is still busy: not released early
        stopping = asyncio.ensure_future(batcher.stop())
        await asyncio.sleep(0.02)
        assert not stopping.done()
        gate.set()
        await stopping
        assert run.batches == [[1.0]] and batcher.batches_in_flight == 0

    asyncio.run(scenario())
