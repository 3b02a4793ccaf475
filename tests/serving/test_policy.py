"""Decision policy: labels, defect probability, verdicts, per-line operating points."""

from __future__ import annotations

import numpy as np
import pytest

from cellinspect.datasets.preprocess import PreprocessSpec
from cellinspect.models.card import ModelCard, OperatingPoint, Verdict
from cellinspect.serving.policy import decide

CARD = ModelCard(
    name="tiny",
    version="3",
    arch="tiny-gemm",
    class_names=["crack", "good", "scratch"],  # good deliberately not first
    good_class="good",
    preprocessing=PreprocessSpec(height=8, width=8),
    opset=17,
    operating_point=OperatingPoint(review_low=0.3, scrap_threshold=0.7),
)
STRICT = OperatingPoint(review_low=0.05, scrap_threshold=0.2, method="line-3 audit")


def test_decision_uses_the_cards_operating_point() -> None:
    decision = decide(np.array([0.1, 0.8, 0.1]), CARD, line_id=None, line_points={})
    assert decision.label == "good"
    assert decision.confidence == pytest.approx(0.8)
    assert decision.defect_probability == pytest.approx(0.2)
    assert decision.verdict is Verdict.PASS
    assert decision.operating_point == CARD.operating_point
    assert not decision.line_override


@pytest.mark.parametrize(
    ("good", "verdict"),
    [(0.71, Verdict.PASS), (0.7, Verdict.REVIEW), (0.5, Verdict.REVIEW), (0.3, Verdict.SCRAP)],
)
def test_verdict_bands(good: float, verdict: Verdict) -> None:
    rest = (1 - good) / 2
    decision = decide(np.array([rest, good, rest]), CARD, line_id="line-1", line_points={})
    assert decision.verdict is verdict


def test_line_override_applies_to_that_line_only() -> None:
    probs = np.array([0.1, 0.85, 0.05])  # defect probability 0.15
    points = {"line-3": STRICT}
    on_line_3 = decide(probs, CARD, line_id="line-3", line_points=points)
    assert on_line_3.verdict is Verdict.REVIEW
    assert on_line_3.operating_point == STRICT and on_line_3.line_override
    elsewhere = decide(probs, CARD, line_id="line-4", line_points=points)
    assert elsewhere.verdict is Verdict.PASS
    assert elsewhere.operating_point == CARD.operating_point and not elsewhere.line_override
    assert decide(probs, CARD, line_id=None, line_points=points).verdict is Verdict.PASS


def test_label_is_the_most_probable_class() -> None:
    decision = decide(np.array([0.6, 0.3, 0.1]), CARD, line_id=None, line_points={})
    assert (decision.label, decision.verdict) == ("crack", Verdict.SCRAP)
    assert decision.defect_probability == pytest.approx(0.7)


@pytest.mark.parametrize("probs", [np.array([0.5, 0.5]), np.array([np.nan, 0.5, 0.5])])
def test_malformed_probabilities_are_refused(probs: np.ndarray) -> None:
    with pytest.raises(ValueError):
        decide(probs, CARD, line_id=None, line_points={})
