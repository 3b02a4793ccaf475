"""ModelEngine, ModelRegistry (lookup, reload safety) and DecodePool on tiny torch-free ONNX models."""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from tinymodel import SPEC, WEIGHTS, RecordingSession, build_classifier, make_card

from cellinspect.datasets.decode import encode_png
from cellinspect.datasets.errors import ImageDecodeError, TruncatedImageError
from cellinspect.datasets.preprocess import preprocess
from cellinspect.models.predict import LoadedModel
from cellinspect.models.store import MODEL_FILE, ModelNotFoundError, ModelStore
from cellinspect.serving.engine import DecodedImage, DecodePool, ModelRegistry, ModelReloadError
from cellinspect.serving.settings import Settings


def publish(store: ModelStore, tmp: Path, name: str = "tiny", **build: object) -> str:
    """Publish a tiny model built with `build` options; return its version."""
    onnx_path = build_classifier(tmp / f"{name}-{len(store.versions(name))}.onnx", **build)  # type: ignore[arg-type]
    return store.publish(onnx_path, make_card(name)).version


def settings_for(store: ModelStore, models: list[str]) -> Settings:
    return Settings(
        models=models,
        store=store.root,
        intra_op_threads=1,
        max_batch_size=4,
        max_delay_ms=1,
        queue_size=32,
        deadline_ms=5000,
    )


def tensor(value: float) -> np.ndarray:
    return np.full(SPEC.input_shape, value, np.float32)


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    store = ModelStore(tmp_path / "store")
    publish(store, tmp_path)  # tiny@1
    publish(store, tmp_path, weights=WEIGHTS * 2)  # tiny@2, different outputs
    store.promote("tiny", 1)
    publish(store, tmp_path, name="other")
    return store


def deadline(seconds: float = 5.0) -> float:
    return asyncio.get_running_loop().time() + seconds


def test_infer_matches_loaded_model_predict(store: ModelStore, tmp_path: Path) -> None:
    image = (np.arange(64, dtype=np.uint8).reshape(8, 8) * 3).astype(np.uint8)
    reference = LoadedModel.load(store, "tiny@1", threads=1).predict([image])[0]

    async def scenario() -> None:
        registry = ModelRegistry(store, settings_for(store, ["tiny"]))
        await registry.load_all()
        engine = registry.get(None)
        probs, timing = await engine.infer(preprocess(image, SPEC), deadline())
        np.testing.assert_allclose(probs, reference, rtol=1e-6, atol=1e-7)
        assert probs.sum() == pytest.approx(1.0)
        assert timing.batch_size == 1
        with pytest.raises(ValueError, match="expects a float32 tensor"):
            await engine.infer(np.zeros((1, 4, 4), np.float32), deadline())
        await registry.close()

    asyncio.run(scenario())


def test_registry_lookup(store: ModelStore) -> None:
    async def scenario() -> None:
        registry = ModelRegistry(store, settings_for(store, ["tiny", "other@1"]))
        assert not registry.ready
        await registry.load_all()
        assert registry.ready
        default = registry.get(None)
        assert (default.name, default.version, default.ref) == ("tiny", "1", "tiny@1")
        assert registry.get("tiny") is default
        assert registry.get("tiny@1") is default
        assert registry.get("tiny@production") is default
        assert registry.get("other").ref == "other@1"
        assert [e.ref for e in registry.list()] == ["tiny@1", "other@1"]
        with pytest.raises(ModelNotFoundError, match=r"served at version 1"):
            registry.get("tiny@2")
        with pytest.raises(ModelNotFoundError, match=r"served: tiny, other"):
            registry.get("nope")
        with pytest.raises(ModelNotFoundError, match="alias"):
            registry.get("tiny@staging")
        with pytest.raises(ModelNotFoundError, match="invalid model name"):
            registry.get("Bad Name")
        await registry.close()
        assert not registry.ready

    asyncio.run(scenario())


def test_reload_swaps_to_new_version(store: ModelStore) -> None:
    async def scenario() -> None:
        registry = ModelRegistry(store, settings_for(store, ["tiny"]))
        await registry.load_all()
        old = registry.get("tiny")
        before, _ = await old.infer(tensor(0.9), deadline())
        assert await registry.reload("tiny", "2") == ("1", "2")
        new = registry.get("tiny")
        assert new.version == "2" and new is not old
        assert registry.get("tiny@2") is new
        after, _ = await new.infer(tensor(0.9), deadline())
        assert not np.allclose(before, after)
        # A reload without a selector re-resolves the configured ref: production -> 1.
        assert await registry.reload("tiny") == ("2", "1")
        with pytest.raises(ModelNotFoundError, match="no version 9"):
            await registry.reload("tiny", "9")
        with pytest.raises(ModelNotFoundError, match="not served"):
            await registry.reload("other")
        await registry.close()

    asyncio.run(scenario())


def _tamper(store: ModelStore, tmp: Path) -> str:
    path = store.root / "tiny" / "2" / MODEL_FILE
    path.write_bytes(path.read_bytes() + b"\0")
    return "2"


def _garbage(store: ModelStore, tmp: Path) -> str:
    bad = tmp / "garbage.onnx"
    bad.write_bytes(b"this is not an onnx model")
    return store.publish(bad, make_card()).version


@pytest.mark.parametrize(
    ("make_bad", "reason"),
    [
        (_tamper, "sha256"),
        (_garbage, "onnxruntime cannot load"),
        (lambda store, tmp: publish(store, tmp, input_shape=("N", 1, 16, 16)), "shape"),
        (lambda store, tmp: publish(store, tmp, weights=WEIGHTS * np.nan), "non-finite"),
    ],
    ids=["tampered", "corrupt", "wrong-shape", "nan"],
)
def test_failed_reload_keeps_old_version_serving(
    store: ModelStore, tmp_path: Path, make_bad: object, reason: str
) -> None:
    version = make_bad(store, tmp_path)  # type: ignore[operator]

    async def scenario() -> None:
        registry = ModelRegistry(store, settings_for(store, ["tiny"]))
        await registry.load_all()
        old = registry.get(None)
        expected, _ = await old.infer(tensor(0.3), deadline())
        with pytest.raises(ModelReloadError, match=reason) as info:
            await registry.reload("tiny", version)
        assert "still serving tiny@1" in str(info.value)
        assert registry.get(None) is old and registry.ready
        probs, _ = await old.infer(tensor(0.3), deadline())
        np.testing.assert_array_equal(probs, expected)
        await registry.close()

    asyncio.run(scenario())


def test_in_flight_requests_complete_during_reload(store: ModelStore) -> None:
    async def scenario() -> None:
        registry = ModelRegistry(store, settings_for(store, ["tiny"]))
        await registry.load_all()
        v1 = registry.get(None)
        expected, _ = await v1.infer(tensor(0.7), deadline())

        async def request() -> tuple[str, np.ndarray]:
            with registry.lease("tiny") as engine:
                await asyncio.sleep(0.01)  # "decoding" while the reload swaps engines
                probs, _ = await engine.infer(tensor(0.7), deadline())
                return engine.version, probs

        requests = [asyncio.create_task(request()) for _ in range(24)]
        await asyncio.sleep(0)  # every request has leased v1
        assert await registry.reload("tiny", "2") == ("1", "2")
        results = await asyncio.gather(*requests)
        assert {version for version, _ in results} == {"1"}
        for _, probs in results:
            np.testing.assert_allclose(probs, expected)
        late, _ = await registry.get(None).infer(tensor(0.7), deadline())
        assert not np.allclose(late, expected)
        await registry.close()
        assert not v1.batcher.running

    asyncio.run(scenario())


@pytest.mark.parametrize("gpu", [False, True])
def test_on_a_gpu_every_batch_runs_at_the_largest_size(
    store: ModelStore, monkeypatch: pytest.MonkeyPatch, gpu: bool
) -> None:
    """ORT's CUDA provider re-plans on every new input shape: the engine must never change it."""
    import cellinspect.serving.engine as engine_module

    sessions: list[RecordingSession] = []
    real = engine_module.create_session
    claimed = ["CUDAExecutionProvider", "CPUExecutionProvider"] if gpu else None

    def create(*args: object, **kwargs: object) -> RecordingSession:
        sessions.append(RecordingSession(real(*args, **kwargs), claimed))
        return sessions[-1]

    monkeypatch.setattr(engine_module, "create_session", create)
    reference = LoadedModel.load(store, "tiny@1", threads=1)
    values = [0.1, 0.4, 0.7]
    expected = [reference.predict_logits(tensor(v)[None]) for v in values]

    async def scenario() -> None:
        registry = ModelRegistry(store, settings_for(store, ["tiny"]))  # max_batch_size 4
        await registry.load_all()
        engine = registry.get(None)
        assert engine.loaded.fixed_batch_size == (4 if gpu else None)
        sessions[0].batch_sizes.clear()  # the warm-up's
        alone, _ = await engine.infer(tensor(values[0]), deadline())
        together = await asyncio.gather(*(engine.infer(tensor(v), deadline()) for v in values))
        answers = [alone, *(p for p, _ in together)]
        for probs, logits in zip(answers, expected[:1] + expected, strict=True):
            np.testing.assert_allclose(probs, reference.probabilities(logits)[0], rtol=1e-6)
        await registry.close()

    asyncio.run(scenario())
    sizes = sessions[0].batch_sizes
    assert sizes and (set(sizes) == {4} if gpu else 4 not in sizes)


def test_decode_and_infer_alone_or_concurrent_gives_the_same_answer(
    store: ModelStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = (np.arange(64, dtype=np.uint8).reshape(8, 8) * 3).astype(np.uint8)
    data = encode_png(image)
    reference = LoadedModel.load(store, "tiny@1", threads=1).predict([image])[0]

    async def scenario() -> None:
        registry = ModelRegistry(store, settings_for(store, ["tiny"]))
        await registry.load_all()
        engine = registry.get(None)
        pool = DecodePool(2)
        pooled: list[object] = []
        decode = pool.decode

        async def spy(*args: object, **kwargs: object) -> object:
            pooled.append(args[0])
            return await decode(*args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(pool, "decode", spy)
        options = {"max_pixels": 10_000, "keep_image": False}
        seen: list[tuple[str, np.ndarray]] = []

        def then(decoded: DecodedImage, probs: np.ndarray, heat: object, timing: object) -> str:
            seen.append((threading.current_thread().name, probs))
            return decoded.sha256

        # Alone: decoded on the batcher's worker, the decode pool is not used, and the
        # follow-up step runs there too, on the same probabilities.
        decoded, probs, heatmap, timing, done = await engine.decode_and_infer(
            pool, data, deadline=deadline(), then=then, **options
        )
        assert pooled == [] and decoded.image is None and heatmap is None
        assert done == decoded.sha256 and seen[0][0].startswith("batcher-")
        np.testing.assert_array_equal(seen[0][1], probs)
        assert timing.queue_ms == 0.0 and timing.batch_size == 1
        np.testing.assert_allclose(probs, reference, rtol=1e-6, atol=1e-7)
        assert decoded.sha256 == hashlib.sha256(data).hexdigest()
        # Together: all but the first go through the pool and the batcher, same answers.
        seen.clear()
        many = await asyncio.gather(
            *(
                engine.decode_and_infer(pool, data, deadline=deadline(), then=then, **options)
                for _ in range(8)
            )
        )
        assert len(pooled) >= 7
        # Batched requests come back without the follow-up step: their callers do it.
        assert sum(done is not None for *_, done in many) == len(seen) <= 1
        for _, p, _, _, _ in many:
            np.testing.assert_allclose(p, reference, rtol=1e-6, atol=1e-7)
        with pytest.raises(TruncatedImageError):  # decode errors come back unchanged
            await engine.decode_and_infer(pool, data[:40], deadline=deadline(), **options)
        pool.close()
        await registry.close()

    asyncio.run(scenario())


def test_decode_pool_decodes_and_preprocesses() -> None:
    image = np.random.default_rng(1).integers(0, 255, (20, 30), dtype=np.uint8)
    data = encode_png(image)

    async def scenario() -> None:
        pool = DecodePool(2)
        decoded = await pool.decode(data, SPEC, max_pixels=10_000)
        np.testing.assert_array_equal(decoded.image.squeeze(), image)
        np.testing.assert_array_equal(decoded.tensor, preprocess(decoded.image, SPEC))
        assert decoded.decode_ms >= 0
        with pytest.raises(TruncatedImageError):
            await pool.decode(data[: len(data) // 2], SPEC, max_pixels=10_000)
        with pytest.raises(ImageDecodeError):
            await pool.decode(data, SPEC, max_pixels=100)
        many = await asyncio.gather(
            *(pool.decode(data, SPEC, max_pixels=10_000) for _ in range(30))
        )
        assert all(np.array_equal(d.tensor, decoded.tensor) for d in many)
        pool.close()

    asyncio.run(scenario())


def test_decode_pool_refuses_at_once_beyond_its_waiting_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from cellinspect.serving import engine as engine_module
    from cellinspect.serving.batcher import Overloaded

    real = engine_module._decode_and_preprocess

    def slow(*args: object) -> object:
        time.sleep(0.2)
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(engine_module, "_decode_and_preprocess", slow)
    data = encode_png(np.zeros((8, 8), np.uint8))

    async def scenario() -> None:
        pool = DecodePool(1, max_waiting=2)  # 4 in the pool + 2 waiting are admitted
        started = time.perf_counter()
        tasks = [asyncio.create_task(pool.decode(data, SPEC, max_pixels=100)) for _ in range(10)]
        done, _ = await asyncio.wait(tasks, timeout=0.1)
        refused = [t for t in done if isinstance(t.exception(), Overloaded)]
        assert len(refused) == 4 and time.perf_counter() - started < 0.15  # not queued
        assert refused[0].exception().retry_after_s >= 0.05  # type: ignore[union-attr]
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert sum(isinstance(r, Overloaded) for r in results) == 4
        assert pool.rejected == 4
        await pool.decode(data, SPEC, max_pixels=100)  # the bound frees up again
        pool.close()

    asyncio.run(scenario())


def test_an_inline_decode_pool_decodes_on_the_loop_and_frames_on_a_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`DecodePool(0)`: images are decoded on the event loop's thread with the same result
    as on a worker; `run` (frames) still goes to a thread, seconds of work must not stop
    the loop."""
    from cellinspect.serving import engine as engine_module

    real = engine_module._decode_and_preprocess
    threads: list[int] = []

    def spy(*args: object) -> object:
        threads.append(threading.get_ident())
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(engine_module, "_decode_and_preprocess", spy)
    image = np.random.default_rng(2).integers(0, 255, (20, 30), dtype=np.uint8)
    data = encode_png(image)

    async def scenario() -> None:
        inline, pooled = DecodePool(0), DecodePool(1)
        assert inline.inline and not pooled.inline
        here = threading.get_ident()
        decoded = await inline.decode(data, SPEC, max_pixels=10_000)
        reference = await pooled.decode(data, SPEC, max_pixels=10_000)
        assert threads[0] == here and threads[1] != here
        np.testing.assert_array_equal(decoded.tensor, reference.tensor)
        assert decoded.sha256 == reference.sha256 and decoded.decode_ms >= 0
        with pytest.raises(TruncatedImageError):
            await inline.decode(data[: len(data) // 2], SPEC, max_pixels=10_000)
        assert inline.idle  # nothing stays counted after a failure
        assert await inline.run(threading.get_ident) != here
        inline.close()
        pooled.close()

    asyncio.run(scenario())


def test_decode_pool_refuses_negative_workers() -> None:
    with pytest.raises(ValueError, match="at least 0"):
        DecodePool(-1)


@pytest.mark.parametrize(
    ("cores", "setting", "expected"), [(1, None, 1), (2, None, 1), (8, None, 4), (2, 3, 3)]
)
def test_ort_threads_default_to_half_the_cores(
    monkeypatch: pytest.MonkeyPatch, cores: int, setting: int | None, expected: int
) -> None:
    """The other half decodes, answers HTTP and writes records; an explicit setting wins."""
    monkeypatch.setattr("os.sched_getaffinity", lambda _pid: set(range(cores)))
    assert Settings(intra_op_threads=setting).ort_threads == expected


# ---- following the store ------------------------------------------------------------------


async def _until(condition: object, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


def test_a_promotion_made_elsewhere_reaches_the_served_model(store: ModelStore) -> None:
    """`cellinspect models promote` (or another worker) moves the alias in the store only;
    the follower reloads within its interval, and reverts nothing while the alias stays."""

    async def scenario() -> None:
        registry = ModelRegistry(store, settings_for(store, ["tiny"]))  # follows production
        await registry.load_all()
        reloads: list[str] = []
        follower = asyncio.create_task(
            registry.follow_store(0.02, on_reload=lambda: reloads.append(registry.get().version))
        )
        assert registry.get().version == "1"
        store.promote("tiny", 2)  # what the CLI does
        await _until(lambda: registry.get().version == "2")
        assert reloads == ["2"]
        # A version reloaded by hand stays while the alias does not move.
        await registry.reload("tiny", "1")
        await asyncio.sleep(0.2)
        assert registry.get().version == "1" and reloads == ["2"]
        follower.cancel()
        await registry.close()

    asyncio.run(scenario())


def test_a_bad_version_promoted_elsewhere_is_refused_once(
    store: ModelStore, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bad = publish(store, tmp_path, weights=WEIGHTS * np.nan)  # outputs NaN: refused at load

    async def scenario() -> None:
        registry = ModelRegistry(store, settings_for(store, ["tiny"]))
        await registry.load_all()
        attempts: list[object] = []
        load = registry._load_blocking
        registry._load_blocking = lambda ref, **kw: attempts.append(ref) or load(ref, **kw)  # type: ignore[method-assign]
        follower = asyncio.create_task(registry.follow_store(0.02))
        store.promote("tiny", bad)
        await _until(lambda: attempts)
        await asyncio.sleep(0.2)  # ten more looks at the store
        assert len(attempts) == 1, "a refused version must not be retried until the alias moves"
        assert registry.get().version == "1" and registry.ready
        store.promote("tiny", 2)  # the alias moves on: followed again
        await _until(lambda: registry.get().version == "2")
        follower.cancel()
        await registry.close()

    with caplog.at_level("ERROR"):
        asyncio.run(scenario())
    assert f"not following the store to version {bad}" in caplog.text


def test_pinned_versions_and_bare_names_without_production_follow_nothing(
    store: ModelStore, tmp_path: Path
) -> None:
    async def scenario() -> None:
        registry = ModelRegistry(store, settings_for(store, ["tiny@1", "other"]))
        await registry.load_all()
        follower = asyncio.create_task(registry.follow_store(0.02))
        store.promote("tiny", 2)
        # "other" has no production alias: a new export (the latest version) or another
        # alias must not reach the line.
        newer = publish(store, tmp_path, name="other")
        store.promote("other", newer, alias="staging")
        await asyncio.sleep(0.2)
        assert registry.get("tiny").version == "1"
        assert registry.get("other").version == "1"
        follower.cancel()
        await registry.close()

    asyncio.run(scenario())
