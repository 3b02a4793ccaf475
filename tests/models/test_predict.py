"""Batch prediction: preprocessing from the card, calibration, verdicts, load-time checks."""

from __future__ import annotations

import numpy as np
import pytest
from tinymodel import RecordingSession

from cellinspect.datasets.preprocess import preprocess_batch
from cellinspect.models.card import OperatingPoint, Verdict
from cellinspect.models.predict import LoadedModel, softmax
from cellinspect.models.runtime import ModelLoadError
from cellinspect.models.store import IntegrityError


def _images(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    # Mixed sizes: the card's preprocessing, not the caller, brings them to 8x8.
    return [rng.integers(0, 256, (int(rng.integers(8, 40)), 12), dtype=np.uint8) for _ in range(n)]


def _reference_probs(tiny, images, temperature: float = 1.0) -> np.ndarray:
    logits = tiny.reference_logits(preprocess_batch(images, tiny.spec)) / temperature
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_predict_matches_numpy_reference(onnx_model, card, tiny):
    model = LoadedModel.from_files(onnx_model, card)
    images = _images(70)
    probs = model.predict(images, batch_size=16)  # 70 = 4 full chunks + a partial one
    assert probs.shape == (70, 3)
    np.testing.assert_allclose(probs, _reference_probs(tiny, images), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-9)


def test_predict_logits_chunks_give_the_same_answer(onnx_model, card, tiny):
    model = LoadedModel.from_files(onnx_model, card)
    batch = preprocess_batch(_images(33), tiny.spec)
    whole = model.predict_logits(batch, batch_size=64)
    np.testing.assert_allclose(model.predict_logits(batch, batch_size=5), whole, rtol=1e-6)
    np.testing.assert_allclose(whole, tiny.reference_logits(batch), rtol=1e-5, atol=1e-5)
    assert model.predict_logits(batch[:0]).shape == (0, 3)


def test_predict_logits_rejects_wrong_shapes(onnx_model, card):
    model = LoadedModel.from_files(onnx_model, card)
    with pytest.raises(ValueError, match=r"\(N, 1, 8, 8\)"):
        model.predict_logits(np.zeros((2, 1, 16, 16), np.float32))
    with pytest.raises(ValueError, match="batch_size"):
        model.predict_logits(np.zeros((2, 1, 8, 8), np.float32), batch_size=0)


def test_temperature_softens_probabilities(onnx_model, tiny):
    images = _images(20, seed=1)
    cold = LoadedModel.from_files(onnx_model, tiny.make_card()).predict(images)
    warm = LoadedModel.from_files(onnx_model, tiny.make_card(temperature=2.5)).predict(images)
    np.testing.assert_allclose(warm, _reference_probs(tiny, images, 2.5), rtol=1e-5, atol=1e-6)
    # Same ranking, flatter distribution: the top class loses probability, entropy rises.
    assert (warm.argmax(axis=1) == cold.argmax(axis=1)).all()
    assert (warm.max(axis=1) <= cold.max(axis=1) + 1e-12).all()
    entropy = lambda p: -(p * np.log(p)).sum(axis=1)  # noqa: E731
    assert (entropy(warm) >= entropy(cold) - 1e-12).all()


def test_softmax_is_stable_for_huge_logits():
    probs = softmax(np.array([[1000.0, 0.0, -1000.0], [5e4, 5e4, 0.0]]))
    assert np.isfinite(probs).all()
    np.testing.assert_allclose(probs, [[1, 0, 0], [0.5, 0.5, 0]], atol=1e-12)
    with pytest.raises(ValueError, match="temperature"):
        softmax(np.zeros((1, 2)), temperature=0)


def test_predict_empty_input(onnx_model, card):
    assert LoadedModel.from_files(onnx_model, card).predict([]).shape == (0, 3)


def test_verdicts_follow_the_operating_point(onnx_model, tiny):
    card = tiny.make_card(operating_point=OperatingPoint(review_low=0.3, scrap_threshold=0.7))
    model = LoadedModel.from_files(onnx_model, card)
    # Columns: good, crack, scratch; defect probability = 1 - P(good).
    probs = np.array([[0.9, 0.05, 0.05], [0.6, 0.3, 0.1], [0.3, 0.3, 0.4], [0.25, 0.5, 0.25]])
    assert model.verdicts(probs) == [Verdict.PASS, Verdict.REVIEW, Verdict.SCRAP, Verdict.SCRAP]
    strict = OperatingPoint(review_low=0.05, scrap_threshold=0.5)
    assert model.verdicts(probs, strict) == [
        Verdict.REVIEW,
        Verdict.REVIEW,
        Verdict.SCRAP,
        Verdict.SCRAP,
    ]
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        model.verdicts(np.zeros((2, 2)))


def test_good_class_need_not_be_first(onnx_model, tiny):
    card = tiny.make_card(good_class="scratch")
    model = LoadedModel.from_files(onnx_model, card)
    probs = np.array([[0.1, 0.1, 0.8]])
    np.testing.assert_allclose(model.defect_probabilities(probs), [0.2])
    assert model.verdicts(probs) == [Verdict.PASS]


def test_input_shape_mismatch_is_a_model_load_error(tmp_path, tiny):
    path = tiny.build_classifier(tmp_path / "big.onnx", input_shape=("N", 1, 16, 16))
    with pytest.raises(ModelLoadError, match=r"\[N, 1, 8, 8\]"):
        LoadedModel.from_files(path, tiny.make_card())


def test_fixed_batch_axis_is_a_model_load_error(tmp_path, tiny):
    path = tiny.build_classifier(tmp_path / "fixed.onnx", input_shape=(4, 1, 8, 8))
    with pytest.raises(ModelLoadError, match="dynamic batch"):
        LoadedModel.from_files(path, tiny.make_card())


def test_card_names_an_output_the_model_lacks(onnx_model, tiny):
    card = tiny.make_card(output_names=["logits", "heatmap"])
    with pytest.raises(ModelLoadError, match="heatmap"):
        LoadedModel.from_files(onnx_model, card)


def test_card_input_name_mismatch(onnx_model, tiny):
    with pytest.raises(ModelLoadError, match="pixels"):
        LoadedModel.from_files(onnx_model, tiny.make_card(input_name="pixels"))


def test_class_count_mismatch(tmp_path, tiny):
    path = tiny.build_classifier(
        tmp_path / "two.onnx", weights=np.ones((1, 2), np.float32), bias=np.zeros(2, np.float32)
    )
    with pytest.raises(ModelLoadError, match="3 classes"):
        LoadedModel.from_files(path, tiny.make_card())


def test_load_from_store_verifies_and_warms_up(published, tiny):
    store = published(2)
    model = LoadedModel.load(store, "tiny@1", threads=1)
    assert (model.card.name, model.card.version) == ("tiny", "1")
    model.warmup()
    model.warmup(batch_size=4)
    images = _images(3)
    np.testing.assert_allclose(model.predict(images), _reference_probs(tiny, images), rtol=1e-5)


def test_load_from_store_refuses_tampered_model(published):
    store = published(1)
    model_file = store.root / "tiny" / "1" / "model.onnx"
    model_file.write_bytes(model_file.read_bytes().replace(b"tiny", b"tinY"))
    with pytest.raises(IntegrityError, match="sha256"):
        LoadedModel.load(store, "tiny")


def test_predict_files_reads_images(onnx_model, card, tiny, tmp_path):
    decode = pytest.importorskip("cellinspect.datasets.decode")
    import cv2

    images = _images(5, seed=3)
    paths = []
    for i, image in enumerate(images):
        path = tmp_path / f"{i}.png"
        assert cv2.imwrite(str(path), image)
        paths.append(path)
    model = LoadedModel.from_files(onnx_model, card)
    expected = model.predict([decode.read_image(p) for p in paths])
    np.testing.assert_allclose(model.predict_files(paths, batch_size=2), expected, rtol=1e-6)
    np.testing.assert_allclose(expected, _reference_probs(tiny, images), rtol=1e-5, atol=1e-6)


def test_fixed_batch_size_runs_every_batch_at_one_size(onnx_model, card, tiny):
    plain = LoadedModel.from_files(onnx_model, card)
    session = RecordingSession(plain.session)
    fixed = LoadedModel(card, session, fixed_batch_size=4)  # type: ignore[arg-type]
    batch = preprocess_batch(_images(9), tiny.spec)
    for rows, chunk in ((1, 64), (3, 64), (4, 64), (9, 64), (9, 5)):
        np.testing.assert_allclose(
            fixed.predict_logits(batch[:rows], batch_size=chunk),
            plain.predict_logits(batch[:rows], batch_size=chunk),
            rtol=1e-6,
        )
    # 1, 3, 4: one run each; 9: three runs of 4 (4+4+1); 9 in chunks of 5: two runs each.
    assert session.batch_sizes == [4] * 9
    with pytest.raises(ValueError, match="at least 1"):
        LoadedModel(card, plain.session, fixed_batch_size=0)
