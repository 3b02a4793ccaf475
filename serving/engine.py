"""Models being served: one micro-batched ONNX Runtime session per model, hot-reloadable.

`ModelRegistry` loads the configured models (verified, warmed) before it reports ready,
resolves request refs (`name`, `name@3`, `name@production`) to the engine that serves
them, and swaps in a new version only after it has loaded, passed its checks and warmed
up; until then, and whenever a reload fails, the old version keeps answering. Shadow
candidates (`shadow_models`) are loaded the same way into engines of their own that run
at the lowest CPU priority; they are never looked up by a request.
`DecodePool` keeps image decoding and preprocessing off the event loop, bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from cellinspect.datasets.decode import decode_image
from cellinspect.datasets.preprocess import PreprocessSpec, preprocess
from cellinspect.models.card import HEATMAP_NAME, LOGITS_NAME, ModelCard
from cellinspect.models.predict import LoadedModel
from cellinspect.models.runtime import ModelLoadError, create_session, runs_on_gpu
from cellinspect.models.store import (
    PRODUCTION,
    ModelNotFoundError,
    ModelRef,
    ModelStore,
    is_version_number,
    parse_model_ref,
)
from cellinspect.serving.batcher import BatchTiming, MicroBatcher, Overloaded
from cellinspect.serving.settings import Settings

logger = logging.getLogger(__name__)

# How long a request-time alias lookup ("name@production") is trusted before the store
# is read again: alias moves show up within this, and requests do not each hit the disk.
ALIAS_CACHE_S = 1.0


# Niceness of a shadow candidate's worker thread: the kernel gives live work the cores first.
SHADOW_NICENESS = 19


# One item's model output: its logits row and, for models that have one, its heatmap.
InferenceRow = tuple[np.ndarray, np.ndarray | None]


class ModelReloadError(Exception):
    """A new version could not be loaded, verified or warmed; the old one still serves."""


def lower_thread_priority() -> None:
    """Give the calling thread the lowest CPU priority (Linux only; never raises).

    On Linux a thread id names one thread for setpriority, so only this worker is niced;
    elsewhere the call would nice the whole process, so it is skipped.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), SHADOW_NICENESS)
    except OSError as exc:  # a sandbox may forbid it: the candidate still runs, at normal priority
        logger.warning("cannot lower the shadow worker's priority: %s", exc)


class ModelEngine:
    """One loaded model version and the micro-batcher feeding its session."""

    def __init__(
        self,
        loaded: LoadedModel,
        *,
        max_batch_size: int,
        max_delay_s: float,
        queue_size: int,
        background: bool = False,
    ) -> None:
        self.loaded = loaded
        self.card: ModelCard = loaded.card
        self.name = loaded.card.name
        self.version = loaded.card.version
        self.ref = f"{self.name}@{self.version}"
        self.input_shape = loaded.card.preprocessing.input_shape
        self.max_batch_size = max_batch_size
        self.has_heatmap = loaded.has_heatmap
        # The batcher calls back through a weak reference: engine -> batcher -> engine would be
        # a cycle, and a retired engine in a cycle keeps its session (and on a GPU its device
        # memory, 25-45 MiB a reload measured) until the cyclic collector happens to run.
        run = weakref.WeakMethod(self._run)
        self.batcher: MicroBatcher[InferenceRow] = MicroBatcher(
            lambda batch: run()(batch),  # type: ignore[misc]  # close() stops it first
            max_batch_size=max_batch_size,
            max_delay_s=max_delay_s,
            queue_size=queue_size,
            name=f"{self.ref} (shadow)" if background else self.ref,
            worker_init=lower_thread_priority if background else None,
        )
        self._users = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def __repr__(self) -> str:
        return f"ModelEngine({self.ref}, {self.batcher!r})"

    def _run(self, batch: np.ndarray) -> list[InferenceRow]:
        # The batcher never exceeds max_batch_size, so this is one session.run per batch.
        # The heatmap is fetched for every item whether or not its request wants it: ONNX
        # Runtime runs the whole graph whichever outputs are asked for, so skipping the
        # fetch saves nothing; the map's own cost is small (benchmarks/RESULTS.md).
        if self.has_heatmap:
            logits, heatmaps = self.loaded.run_with_heatmaps(batch)
            return list(zip(logits, heatmaps, strict=True))
        logits = self.loaded.predict_logits(batch, batch_size=self.max_batch_size)
        return [(row, None) for row in logits]

    async def start(self) -> None:
        await self.batcher.start()

    async def infer(self, x: np.ndarray, deadline: float) -> tuple[np.ndarray, BatchTiming]:
        """One preprocessed CxHxW float32 tensor -> (calibrated class probabilities, timing)."""
        probs, _, timing = await self.infer_with_heatmap(x, deadline)
        return probs, timing

    def _check_tensor(self, x: np.ndarray) -> None:
        # Checked before batching because one malformed tensor would fail its neighbours too.
        if x.shape != self.input_shape or x.dtype != np.float32:
            raise ValueError(
                f"{self.ref} expects a float32 tensor of shape {self.input_shape}, "
                f"got {x.dtype} {x.shape}"
            )

    async def infer_with_heatmap(
        self, x: np.ndarray, deadline: float
    ) -> tuple[np.ndarray, np.ndarray | None, BatchTiming]:
        """Like `infer`, plus the H x W defect heatmap in [0, 1] (None: the model has none)."""
        self._check_tensor(x)
        (logits, heatmap), timing = await self.batcher.submit(x, deadline=deadline)
        return self.loaded.probabilities(logits[None])[0], heatmap, timing

    async def decode_and_infer(
        self,
        decoder: DecodePool,
        data: bytes,
        *,
        max_pixels: int,
        keep_image: bool,
        deadline: float,
        then: Callable[[DecodedImage, np.ndarray, np.ndarray | None, BatchTiming], _T]
        | None = None,
    ) -> tuple[DecodedImage, np.ndarray, np.ndarray | None, BatchTiming, _T | None]:
        """Encoded image -> (decoded image, probabilities, heatmap or None, timing, then's).

        Decoded on `decoder` and then batched; but when the decode pool and this engine's
        worker are both idle (a lone request), decoded and run in one worker hop instead,
        and `then(decoded, probabilities, heatmap, timing)` runs in that hop too, unless
        other requests queued meanwhile. Its result is the last element; None where it did
        not run, and then the caller does that step itself.
        """
        spec = self.card.preprocessing
        if decoder.idle:

            def prepare() -> tuple[np.ndarray, DecodedImage]:
                decoded = _decode_and_preprocess(data, spec, max_pixels, keep_image)
                self._check_tensor(decoded.tensor)
                return decoded.tensor, decoded

            def follow(
                row: InferenceRow, timing: BatchTiming, decoded: DecodedImage
            ) -> tuple[np.ndarray, _T]:
                assert then is not None
                probs = self.loaded.probabilities(row[0][None])[0]
                return probs, then(decoded, probs, row[1], timing)

            alone = await self.batcher.run_alone(
                prepare, deadline=deadline, then=None if then is None else follow
            )
            if alone is not None:
                (logits, heatmap), timing, decoded, followed = alone
                probs, done = followed or (self.loaded.probabilities(logits[None])[0], None)
                return decoded, probs, heatmap, timing, done
        decoded = await decoder.decode(data, spec, max_pixels=max_pixels, keep_image=keep_image)
        probs, heatmap, timing = await self.infer_with_heatmap(decoded.tensor, deadline)
        return decoded, probs, heatmap, timing, None

    @contextlib.contextmanager
    def in_use(self) -> Iterator[ModelEngine]:
        """Mark a request as using this engine, so a reload does not close it underneath."""
        self._users += 1
        self._idle.clear()
        try:
            yield self
        finally:
            self._users -= 1
            if self._users == 0:
                self._idle.set()

    async def close(self, *, drain_timeout_s: float | None = None) -> None:
        """Wait (bounded) for requests holding the engine, then drain and stop its batcher."""
        if drain_timeout_s is not None and not self._idle.is_set():
            try:
                await asyncio.wait_for(self._idle.wait(), drain_timeout_s)
            except TimeoutError:
                logger.warning(
                    "%s: %d request(s) still hold the engine after %.1f s; closing anyway",
                    self.ref,
                    self._users,
                    drain_timeout_s,
                )
        await self.batcher.stop()
        logger.info("closed %s (%d batches, %d items)", self.ref, *self._counts())

    def _counts(self) -> tuple[int, int]:
        return self.batcher.batches_run, self.batcher.items_run


# The fewest warm-up inputs: black, white and mid-gray images, then noise (see probe_inputs).
PROBE_IMAGES = 4
_FLAT_PROBES = {"black": 0, "white": 255, "mid-gray": 128}


def probe_inputs(spec: PreprocessSpec, count: int) -> np.ndarray:
    """`count` >= PROBE_IMAGES model inputs made from images as the line's are (through the
    card's preprocessing): black, white, mid-gray, then seeded uniform noise."""
    shape = (spec.height, spec.width, spec.channels)
    images = [np.full(shape, value, np.uint8) for value in _FLAT_PROBES.values()]
    rng = np.random.default_rng(0)
    images += [rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(count - len(images))]
    return np.stack([preprocess(image, spec) for image in images])


def _failed_probes(output: np.ndarray, first: int) -> str:
    """Which probe images (rows of `output`, the first being probe `first`) gave NaN/inf."""
    names = list(_FLAT_PROBES)
    rows = np.flatnonzero(~np.isfinite(output.reshape(len(output), -1)).all(axis=1)) + first
    kinds = dict.fromkeys(names[i] if i < len(names) else "noise" for i in rows)
    return f"the {', '.join(kinds)} probe image(s)"


def _check_outputs(loaded: LoadedModel, batch: np.ndarray, *, first: int) -> None:
    """Run a warm-up batch; ModelLoadError unless every output has its shape and is finite."""
    card = loaded.card
    n = len(batch)
    expected: dict[str, tuple[int, ...]] = {LOGITS_NAME: (n, len(card.class_names))}
    if loaded.has_heatmap:
        expected[HEATMAP_NAME] = (n, card.preprocessing.height, card.preprocessing.width)
        outputs = dict(zip(expected, loaded.run_with_heatmaps(batch), strict=True))
    else:
        outputs = {LOGITS_NAME: loaded.predict_logits(batch, batch_size=n)}
    for name, shape in expected.items():
        if outputs[name].shape != shape:
            raise ModelLoadError(
                f"{loaded.source}: warm-up batch gave {name} of shape "
                f"{outputs[name].shape}, expected {shape}"
            )
        if not np.isfinite(outputs[name]).all():
            raise ModelLoadError(
                f"{loaded.source}: warm-up batch gave non-finite {name} (NaN/inf) on "
                f"{_failed_probes(outputs[name], first)}; refusing to serve it"
            )


class ModelRegistry:
    """The served models by name; the first configured one is the default."""

    def __init__(self, store: ModelStore, settings: Settings) -> None:
        self.store = store
        self.settings = settings
        # Parsed up front so a typo in CELLINSPECT_MODELS fails at start, not per request.
        self._configured: dict[str, ModelRef] = {}
        for text in settings.models:
            ref = parse_model_ref(text)
            if ref.name in self._configured:
                raise ValueError(f"model {ref.name!r} is configured twice in {settings.models}")
            self._configured[ref.name] = ref
        self.default_name = next(iter(self._configured))
        self._shadow_configured: dict[str, ModelRef] = {}
        for name, text in settings.shadow_models.items():
            ref = parse_model_ref(text)
            if name not in self._configured or ref.name != name:
                raise ValueError(f"shadow candidate {text!r} is not a version of a served model")
            self._shadow_configured[name] = ref
        self._engines: dict[str, ModelEngine] = {}
        self._candidates: dict[str, ModelEngine] = {}
        self._reload_locks = {name: asyncio.Lock() for name in self._configured}
        self._retiring: set[asyncio.Task[None]] = set()
        self._alias_cache: dict[tuple[str, str], tuple[str, float]] = {}
        # Per served name, the version its followed alias pointed at when last looked at.
        self._alias_seen: dict[str, str | None] = {}
        self._closed = False

    # ---- loading ------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """True once every configured model is loaded and warmed (and until close)."""
        return not self._closed and len(self._engines) == len(self._configured)

    def _load_blocking(self, ref: ModelRef, *, intra_op_threads: int | None = None) -> LoadedModel:
        """Verify, open, check and warm one version (runs in a thread: it takes seconds)."""
        card, onnx_path = self.store.load_verified(ref)
        session = create_session(
            onnx_path,
            providers=self.settings.providers,
            intra_op_threads=intra_op_threads or self.settings.ort_threads,
            spin=self.settings.ort_spin,
        )
        # LoadedModel checks input/output names and shapes against the card. On a GPU every
        # batch runs at the largest size (padded), the one shape the warm-up below prepares.
        loaded = LoadedModel(
            card,
            session,
            source=f"{card.name}@{card.version} ({onnx_path})",
            fixed_batch_size=self.settings.max_batch_size if runs_on_gpu(session) else None,
        )
        loaded.warmup(1)
        # Batches of the largest size the batcher sends, through the outputs it fetches:
        # allocates their buffers now, not on a request. The inputs are images of the kinds a
        # line sends (black, white, noise), not zeros alone: a model can be finite on the
        # mean image and NaN on a bright one, and a NaN verdict must never reach the line.
        size = self.settings.max_batch_size
        probes = probe_inputs(card.preprocessing, max(size, PROBE_IMAGES))
        for start in range(0, len(probes), size):
            _check_outputs(loaded, probes[start : start + size], first=start)
        return loaded

    def _engine(self, loaded: LoadedModel, *, background: bool = False) -> ModelEngine:
        return ModelEngine(
            loaded,
            max_batch_size=self.settings.max_batch_size,
            max_delay_s=self.settings.max_delay_ms / 1000,
            # A candidate holds one batch in waiting at most: shadow work is dropped, not queued.
            queue_size=self.settings.max_batch_size if background else self.settings.queue_size,
            background=background,
        )

    async def load_all(self) -> None:
        """Load every configured model; each becomes available only after its warm-up."""
        for name, ref in self._configured.items():
            if name in self._engines:
                continue
            loaded = await asyncio.to_thread(self._load_blocking, ref)
            engine = self._engine(loaded)
            await engine.start()
            self._engines[name] = engine
            self._alias_seen[name] = self._followed_version(name)
            logger.info("serving %s (configured as %s)", engine.ref, ref)
        for name, ref in self._shadow_configured.items():
            if name not in self._candidates:
                await self._load_candidate(name, ref)

    async def _load_candidate(self, name: str, ref: ModelRef) -> None:
        """Load a shadow candidate like a served model; a failure only turns its shadow off."""
        try:
            loaded = await asyncio.to_thread(
                self._load_blocking, ref, intra_op_threads=self.settings.shadow_intra_op_threads
            )
        except Exception as exc:  # the live answer must not depend on the candidate
            logger.error(
                "shadow candidate %s not loaded, no shadow runs for %s: %s", ref, name, exc
            )
            return
        engine = self._engine(loaded, background=True)
        await engine.start()
        self._candidates[name] = engine
        if engine.version == self._engines[name].version:
            logger.warning("shadow candidate %s is the served version itself", engine.ref)
        logger.info("shadowing %s with %s (configured as %s)", name, engine.ref, ref)

    # ---- lookup -------------------------------------------------------------------------

    def _served_names(self) -> str:
        return ", ".join(self._engines) or "none loaded yet"

    def _resolve_alias(self, name: str, alias: str) -> str:
        now = time.monotonic()
        cached = self._alias_cache.get((name, alias))
        if cached is not None and cached[1] > now:
            return cached[0]
        _, version = self.store.resolve(ModelRef(name, alias))
        self._alias_cache[(name, alias)] = (version, now + ALIAS_CACHE_S)
        return version

    def get(self, ref: str | None = None) -> ModelEngine:
        """The engine serving `ref` ("name", "name@version", "name@alias"; None: default).

        Raises ModelNotFoundError for an unknown name, or for a version that is not the one
        being served (models are never loaded on the fly for a request).
        """
        if ref is None:
            engine = self._engines.get(self.default_name)
            if engine is None:
                raise ModelNotFoundError(f"default model {self.default_name!r} is not loaded yet")
            return engine
        try:
            parsed = parse_model_ref(ref)
        except ValueError as exc:
            raise ModelNotFoundError(str(exc)) from None
        engine = self._engines.get(parsed.name)
        if engine is None:
            raise ModelNotFoundError(
                f"model {parsed.name!r} is not served (served: {self._served_names()})"
            )
        if parsed.selector is None:
            return engine
        if parsed.selector.isdigit():
            version = parsed.selector
        else:
            version = self._resolve_alias(parsed.name, parsed.selector)
        if version != engine.version:
            raise ModelNotFoundError(
                f"{ref} is version {version}, but {parsed.name} is served at version "
                f"{engine.version} (ask for {parsed.name} or {engine.ref}, or reload the model)"
            )
        return engine

    @contextlib.contextmanager
    def lease(self, ref: str | None = None) -> Iterator[ModelEngine]:
        """`get(ref)`, held for the duration of a request so a reload waits for it to finish."""
        with self.get(ref).in_use() as engine:
            yield engine

    def list(self) -> list[ModelEngine]:
        """Served engines, default first."""
        return list(self._engines.values())

    def candidate(self, name: str) -> ModelEngine | None:
        """The shadow candidate loaded for served model `name`, if any."""
        return self._candidates.get(name)

    @contextlib.contextmanager
    def candidate_lease(self, name: str) -> Iterator[ModelEngine]:
        """The candidate of `name`, held for a shadow run (ModelNotFoundError: none loaded)."""
        engine = self._candidates.get(name)
        if engine is None:
            raise ModelNotFoundError(f"no shadow candidate is loaded for {name!r}")
        with engine.in_use():
            yield engine

    # ---- reload -------------------------------------------------------------------------

    async def check_servable(self, ref: str) -> None:
        """Load, verify and warm `ref` as a reload would, then let it go; nothing served changes.

        Raises ModelNotFoundError for what the store does not hold and ModelReloadError for a
        version that cannot be served.
        """
        try:
            parsed = parse_model_ref(ref)
        except ValueError as exc:
            raise ModelNotFoundError(str(exc)) from None
        try:
            await asyncio.to_thread(self._load_blocking, parsed)
        except ModelNotFoundError:
            raise
        except Exception as exc:  # integrity, ORT, shape or NaN: all mean "cannot serve it"
            raise ModelReloadError(f"cannot serve {parsed}: {exc}") from exc

    async def reload(
        self,
        name: str,
        selector: str | None = None,
        *,
        before_swap: Callable[[], object] | None = None,
    ) -> tuple[str, str]:
        """Load `name@selector` (None: the configured ref, re-resolved), warm it, swap it in.

        `before_swap`, if given, runs in a thread once the new version has loaded and warmed,
        just before it serves (a promotion moves its alias there); if it raises, the new
        version is dropped and the exception propagates.

        Returns (old version, new version). Raises ModelNotFoundError for a name that is not
        served or a selector the store does not hold, and ModelReloadError for a version that
        cannot be served; in every failure the old version keeps serving untouched.
        """
        if name not in self._engines:
            raise ModelNotFoundError(
                f"model {name!r} is not served (served: {self._served_names()})"
            )
        try:
            ref = (
                self._configured[name]
                if selector is None
                else parse_model_ref(f"{name}@{selector}")
            )
        except ValueError as exc:
            raise ModelNotFoundError(str(exc)) from None
        async with self._reload_locks[name]:
            old = self._engines[name]
            try:
                loaded = await asyncio.to_thread(self._load_blocking, ref)
            except ModelNotFoundError:
                raise
            except Exception as exc:  # integrity, ORT, shape or NaN: all mean "cannot serve it"
                raise ModelReloadError(
                    f"cannot reload {ref}: {exc}; still serving {old.ref}"
                ) from exc
            if before_swap is not None:
                await asyncio.to_thread(before_swap)
            new = self._engine(loaded)
            await new.start()
            # One assignment on the event loop: every later get() sees the new engine, while
            # requests that already hold the old one finish on it.
            self._engines[name] = new
            self._alias_cache = {k: v for k, v in self._alias_cache.items() if k[0] != name}
        logger.info("reloaded %s: %s -> %s", name, old.version, new.version)
        task = asyncio.get_running_loop().create_task(
            old.close(drain_timeout_s=self.settings.deadline_ms / 1000)
        )
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)
        return old.version, new.version

    # ---- following the store -----------------------------------------------------------

    def _followed_version(self, name: str) -> str | None:
        """The version of the alias that `name` follows, None when it follows none.

        A model configured as NAME@ALIAS follows ALIAS; one configured as NAME follows
        `production` when that alias exists (never "the latest version": an export must not
        reach the line without a promotion); one pinned to NAME@VERSION follows nothing.
        """
        selector = self._configured[name].selector
        if selector is not None and is_version_number(selector):
            return None
        try:
            return self.store.resolve(ModelRef(name, selector or PRODUCTION))[1]
        except ModelNotFoundError:  # no such alias (yet), or the model was removed
            return None

    async def follow_store(
        self, interval_s: float, on_reload: Callable[[], object] | None = None
    ) -> None:
        """Forever: every `interval_s`, reload a served model whose followed alias moved.

        A promotion made elsewhere (`cellinspect models promote`, or the API of another
        worker process on the same store) then reaches this process within `interval_s`.
        Only a move is acted on: a version reloaded by hand is not reverted while the
        alias stays put, and a version that cannot be served is refused once (logged), the
        old one keeps serving, and it is not retried until the alias moves again.
        """
        while True:
            await asyncio.sleep(interval_s)
            for name in list(self._engines):
                if await self._follow(name) and on_reload is not None:
                    on_reload()

    async def _follow(self, name: str) -> bool:
        """One look at `name`'s followed alias; True when a new version now serves."""
        try:
            version = await asyncio.to_thread(self._followed_version, name)
        except Exception as exc:  # an unreadable store must not end the follower
            logger.warning("cannot read the store for %s: %s", name, exc)
            return False
        if version is None or version == self._alias_seen.get(name):
            return False
        self._alias_seen[name] = version
        engine = self._engines.get(name)
        if engine is None or version == engine.version:  # closed meanwhile, or already there
            return False
        logger.info("%s: the store's alias now points at version %s; reloading", name, version)
        try:
            await self.reload(name, version)
        except (ModelNotFoundError, ModelReloadError) as exc:
            logger.error("%s: not following the store to version %s: %s", name, version, exc)
            return False
        return True

    async def close(self) -> None:
        """Drain and stop every engine, including ones retired by a reload."""
        self._closed = True
        engines, self._engines = list(self._engines.values()), {}
        engines += self._candidates.values()
        self._candidates = {}
        await asyncio.gather(*(e.close() for e in engines), *list(self._retiring))


@dataclass(frozen=True)
class DecodedImage:
    """One request image: decoded pixels, the model input made from them, and the time taken."""

    # None unless asked for: up to max_pixels x 8 bytes, held while the request waits
    # for its batch (a 16-bit RGBA bomb of 40 MP is 320 MB), where the tensor is 0.2 MB.
    image: np.ndarray | None
    tensor: np.ndarray
    decode_ms: float  # decode + preprocess, in the worker (queueing excluded)
    sha256: str  # of the encoded bytes, for the record and the archive


def _decode_and_preprocess(
    data: bytes, spec: PreprocessSpec, max_pixels: int, keep_image: bool = True
) -> DecodedImage:
    t0 = time.perf_counter()
    image = decode_image(data, max_pixels=max_pixels)
    tensor = preprocess(image, spec)
    decode_ms = 1000 * (time.perf_counter() - t0)
    # Hashed here, not on the event loop: hashlib drops the GIL, and getting it back on a
    # busy loop costs far more than the hash itself.
    sha256 = hashlib.sha256(data).hexdigest()
    return DecodedImage(image if keep_image else None, tensor, decode_ms, sha256)


_T = TypeVar("_T")
FRAME_RETRY_AFTER_S = 1.0  # a frame takes seconds: asking back sooner only adds refusals


class DecodePool:
    """Decoding and preprocessing in a bounded thread pool, off the event loop, or on the
    loop's own thread (`workers=0`).

    At most `workers * 4` images are handed to the pool at once; further callers wait on
    the semaphore (holding only their request bytes) instead of piling up decoded frames.
    At most `max_waiting` callers wait: the next one gets `Overloaded` (503) at once. This
    is the service's admission bound: without it, a load above capacity queues here until
    the deadline and the few requests that are served wait almost all of it.

    With `workers=0` an image is decoded where its request runs, with no hand-off to a
    thread and back. That pays where a process owns one core (`serve --workers N` on N
    cores): the hand-offs cost more CPU than the decode gains from a thread of its own
    (benchmarks/RESULTS.md). Nothing then waits inside the pool, so the admission bound
    counts image requests in progress instead (`admitted`, kept by the request gate): at
    most `max_waiting`. Frames (`run`) still decode on a thread, the frame's own: seconds
    of work must not stop the loop.
    """

    def __init__(self, workers: int, *, max_waiting: int = 64, max_frames: int = 2) -> None:
        if workers < 0 or max_waiting < 1 or max_frames < 1:
            raise ValueError(
                "decode workers must be at least 0, max_waiting and max_frames at least 1, "
                f"got {workers}, {max_waiting}, {max_frames}"
            )
        self.workers = workers
        self.inline = workers == 0
        self.max_waiting = max_waiting
        self.max_frames = max_frames
        self._frames = 0
        self._executor = ThreadPoolExecutor(
            max_workers=max(1, workers), thread_name_prefix="decode"
        )
        self._slots = asyncio.Semaphore(max(1, workers) * 4)
        self._waiting = 0
        self._busy = 0  # callers inside `run`: waiting for a slot or decoding
        self._decode_s = 0.002  # running mean of one decode, for Retry-After
        self.admitted = 0  # image requests in progress (counted by the gate)
        self.rejected = 0

    async def decode(
        self, data: bytes, spec: PreprocessSpec, *, max_pixels: int, keep_image: bool = True
    ) -> DecodedImage:
        """Bytes -> DecodedImage; cellinspect.datasets.errors exceptions propagate unchanged.

        With `keep_image=False` only the tensor outlives the worker, not the decoded pixels.
        """
        if self.inline:
            decoded = _decode_and_preprocess(data, spec, max_pixels, keep_image)
        else:
            decoded = await self.run(_decode_and_preprocess, data, spec, max_pixels, keep_image)
        self._decode_s = 0.9 * self._decode_s + 0.1 * decoded.decode_ms / 1000
        return decoded

    @property
    def idle(self) -> bool:
        """No image is being decoded or waiting to be."""
        return self._busy == 0

    @property
    def full(self) -> bool:
        """Every worker slot taken and `max_waiting` callers waiting (inline: `max_waiting`
        image requests in progress): the next one is refused."""
        if self.inline:
            return self.admitted >= self.max_waiting
        return self._slots.locked() and self._waiting >= self.max_waiting

    def retry_after_s(self) -> float:
        """A guess at how long the images waiting now take to decode."""
        if self.inline:
            return max(0.05, self.admitted * self._decode_s)
        return max(0.05, self._waiting * self._decode_s / self.workers)

    async def run(self, fn: Callable[..., _T], *args: object) -> _T:
        """`fn(*args)` on a decode worker, admitted as a decode is (Overloaded when full)."""
        if self.full:
            self.rejected += 1
            raise Overloaded(
                f"decode queue is full ({self._waiting} images waiting)",
                retry_after_s=self.retry_after_s(),
            )
        self._waiting += 1
        self._busy += 1
        try:
            try:
                await self._slots.acquire()
            finally:
                self._waiting -= 1
            try:
                return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
            finally:
                self._slots.release()
        finally:
            self._busy -= 1

    @contextlib.contextmanager
    def frame_slot(self) -> Iterator[None]:
        """One of `max_frames` places for a frame from its decode to its answer, or
        Overloaded at once: a decoded frame is held while its tiles are inferred."""
        if self._frames >= self.max_frames:
            self.rejected += 1
            raise Overloaded(
                f"{self._frames} frames in progress", retry_after_s=FRAME_RETRY_AFTER_S
            )
        self._frames += 1
        try:
            yield
        finally:
            self._frames -= 1

    def close(self) -> None:
        """Stop the workers; decodes still queued are cancelled."""
        self._executor.shutdown(wait=False, cancel_futures=True)
