"""evaluate_predictions against scikit-learn called directly."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

from cellinspect.models.card import DatasetRef, EvalMetrics
from cellinspect.models.metrics import evaluate_predictions

NAMES = ["good", "crack", "scratch", "dent"]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_evaluate_predictions_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, 200)
    probs = rng.dirichlet(np.ones(4), 200)
    probs[:120][np.arange(120), y[:120]] += 1.0  # mostly right, some wrong
    got = evaluate_predictions(
        y.tolist(), probs, NAMES, DatasetRef(manifest_hash="abc", split="test")
    )
    pred = probs.argmax(axis=1)
    assert isinstance(got, EvalMetrics)
    assert got.accuracy == pytest.approx(accuracy_score(y, pred))
    assert got.macro_f1 == pytest.approx(f1_score(y, pred, average="macro"))
    expected_f1 = f1_score(y, pred, average=None, labels=range(4), zero_division=0)
    assert got.per_class_f1 == pytest.approx(dict(zip(NAMES, expected_f1, strict=True)))
    assert got.confusion == confusion_matrix(y, pred, labels=range(4)).tolist()
    assert got.data == DatasetRef(manifest_hash="abc", split="test", count=200)


def test_absent_class_gets_zero_f1_and_a_full_confusion_matrix():
    y = [0, 0, 1, 1]
    probs = np.array([[0.9, 0.1, 0, 0], [0.2, 0.8, 0, 0], [0.1, 0.9, 0, 0], [0.6, 0.4, 0, 0]])
    got = evaluate_predictions(y, probs, NAMES, DatasetRef(manifest_hash="h"))
    assert got.per_class_f1["scratch"] == 0.0 and got.per_class_f1["dent"] == 0.0
    assert got.confusion == [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    assert got.accuracy == 0.5
    EvalMetrics.model_validate_json(got.model_dump_json())  # round-trips into a card


@pytest.mark.parametrize(
    ("y", "probs", "match"),
    [
        ([], np.zeros((0, 4)), "non-empty"),
        ([0, 1], np.zeros((3, 4)), "shape"),
        ([0, 1], np.zeros((2, 3)), "shape"),
        ([0, 4], np.zeros((2, 4)), "outside 0..3"),
        ([-1, 0], np.zeros((2, 4)), "outside 0..3"),
    ],
)
def test_bad_inputs_are_refused(y, probs, match):
    with pytest.raises(ValueError, match=match):
        evaluate_predictions(y, probs, NAMES, DatasetRef(manifest_hash="h"))
