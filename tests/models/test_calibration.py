"""Temperature scaling, calibration error, operating points and `models set-operating-point`."""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from cellinspect.cli import app
from cellinspect.models.calibration import (
    NoCalibrationDataError,
    accuracy_lower_bound,
    calibration_data,
    choose_operating_point,
    escape_upper_bounds,
    expected_calibration_error,
    fit_temperature,
    measure_figures,
    measure_operating_point,
    reliability_diagram,
    validation_scores,
)
from cellinspect.models.card import DatasetRef, ModelCard, OperatingCriteria, OperatingPoint
from cellinspect.models.predict import softmax

# Hand-checkable validation cells: scores and truth (1 = defective).
P = np.array([0.1, 0.2, 0.3, 0.6, 0.7, 0.9])
DEFECT = np.array([0, 0, 1, 0, 1, 1], bool)


def calibrated_logits(n: int, classes: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits whose softmax is calibrated by construction: labels are drawn from it."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 2.0, (n, classes))
    cumulative = softmax(logits).cumsum(axis=1)
    labels = (rng.random(n)[:, None] > cumulative).sum(axis=1)
    return logits, labels


def random_cells(seed: int, n: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """Overlapping scores with ties (rounded to 2 decimals), defective cells scoring higher."""
    rng = np.random.default_rng(seed)
    defect = rng.random(n) < 0.4
    p = np.clip(rng.normal(np.where(defect, 0.65, 0.35), 0.2), 0, 1).round(2)
    return p, defect


def candidate_thresholds(p: np.ndarray) -> np.ndarray:
    """Every distinct decision on `p`: each unique score, the midpoints, both ends."""
    u = np.unique(p)
    return np.unique(np.concatenate([[0.0, 1.0], u, (u[:-1] + u[1:]) / 2, [(u[-1] + 1) / 2]]))


def cost(p: np.ndarray, defect: np.ndarray, t: float, ratio: float) -> float:
    return ratio * np.sum(~defect & (p >= t)) + np.sum(defect & (p < t))


# ---- temperature and calibration error ---------------------------------------------------


def test_temperature_scaling_undoes_overconfident_logits() -> None:
    logits, labels = calibrated_logits(20_000)
    overconfident = 3.0 * logits
    temperature = fit_temperature(overconfident, labels)
    assert temperature == pytest.approx(3.0, rel=0.10)
    before = expected_calibration_error(softmax(overconfident), labels)
    after = expected_calibration_error(softmax(overconfident, temperature), labels)
    assert after < before and after < 0.03


def test_temperature_of_separable_data_stays_finite_and_neutral() -> None:
    logits = np.array([[3.0, -1.0], [-2.0, 4.0], [5.0, 0.0]])
    assert fit_temperature(logits, np.array([0, 1, 0])) == 1.0


def test_temperature_rejects_labels_outside_the_classes() -> None:
    with pytest.raises(ValueError, match="class indices"):
        fit_temperature(np.zeros((2, 2)), np.array([0, 2]))


def test_ece_is_the_count_weighted_gap_per_confidence_bin() -> None:
    probs = np.array([[0.95, 0.05], [0.85, 0.15], [0.65, 0.35], [0.25, 0.75]])
    labels = np.array([0, 1, 0, 1])
    # bins of 0.2: (0.8, 1] holds 0.95 (right) and 0.85 (wrong): |0.5 - 0.9| * 2/4 = 0.2;
    # (0.6, 0.8] holds 0.65 and 0.75, both right: |1 - 0.7| * 2/4 = 0.15.
    assert expected_calibration_error(probs, labels, n_bins=5) == pytest.approx(0.35)


def test_reliability_diagram_writes_a_png(tmp_path) -> None:
    logits, labels = calibrated_logits(500)
    path = reliability_diagram(
        softmax(3 * logits), labels, tmp_path / "r.png", "t", calibrated=softmax(logits)
    )
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---- operating points ----------------------------------------------------------------------


def test_cost_ratio_uses_bayes_threshold_inside_the_cheapest_gap() -> None:
    # R = 0.3: passing 0.1 and 0.2 and scrapping the rest costs 0.3 (the good cell at 0.6),
    # the minimum; the Bayes threshold 0.3 / 1.3 = 0.2308 falls in that gap (0.2, 0.3].
    point, _ = choose_operating_point(P, DEFECT, OperatingCriteria(cost_ratio=0.3))
    assert point.scrap_threshold == point.review_low == pytest.approx(0.3 / 1.3)
    assert point.method == "cost_ratio" and point.cost_ratio == 0.3


def test_cost_ratio_ties_go_to_the_gap_nearest_the_bayes_threshold() -> None:
    # R = 1: passing <= 0.2 and passing <= 0.6 both cost one error; the Bayes threshold 0.5
    # lies between them (in a dearer gap), nearer the midpoint 0.65 than 0.25.
    point, _ = choose_operating_point(P, DEFECT, OperatingCriteria(cost_ratio=1.0))
    assert point.scrap_threshold == pytest.approx(0.65)
    assert point.val_escape_rate == pytest.approx(1 / 3) and point.val_false_scrap_rate == 0


@pytest.mark.parametrize(("seed", "ratio"), list(itertools.product(range(5), [0.1, 0.5, 1.0, 4.0])))
def test_cost_ratio_threshold_matches_brute_force(seed: int, ratio: float) -> None:
    p, defect = random_cells(seed)
    point, _ = choose_operating_point(p, defect, OperatingCriteria(cost_ratio=ratio))
    best = min(cost(p, defect, t, ratio) for t in np.linspace(0, 1, 2001))
    best = min(best, *(cost(p, defect, t, ratio) for t in candidate_thresholds(p)))
    assert cost(p, defect, point.scrap_threshold, ratio) == pytest.approx(best)


@pytest.mark.parametrize(("max_escape", "threshold"), [(0.34, 0.65), (0.3, 0.25), (0.0, 0.25)])
def test_max_escape_picks_the_highest_threshold_within_budget(max_escape, threshold) -> None:
    point, _ = choose_operating_point(P, DEFECT, OperatingCriteria(max_escape=max_escape))
    assert point.scrap_threshold == pytest.approx(threshold)
    assert point.val_escape_rate is not None and point.val_escape_rate <= max_escape


@pytest.mark.parametrize(
    ("seed", "max_escape"), list(itertools.product(range(5), [0.0, 0.05, 0.2]))
)
def test_max_escape_matches_brute_force(seed: int, max_escape: float) -> None:
    p, defect = random_cells(seed)
    point, _ = choose_operating_point(p, defect, OperatingCriteria(max_escape=max_escape))
    figures = measure_figures(p, defect, point.review_low, point.scrap_threshold)
    assert figures.escape_rate <= max_escape
    within = [
        t
        for t in candidate_thresholds(p)
        if measure_figures(p, defect, t, t).escape_rate <= max_escape
    ]
    most_passed = max(np.sum(p < t) for t in within)
    assert np.sum(p < point.scrap_threshold) == most_passed


def test_target_auto_accuracy_reviews_only_the_mixed_middle() -> None:
    # 0.3 (defective) scores below 0.6 (good): one of them must be reviewed or wrong.
    point, curve = choose_operating_point(P, DEFECT, OperatingCriteria(target_auto_accuracy=1.0))
    assert (point.review_low, point.scrap_threshold) == pytest.approx((0.25, 0.65))
    assert point.val_review_rate == pytest.approx(2 / 6) and point.val_auto_accuracy == 1.0
    assert curve[0].review_rate == 0 and curve[-1].auto_accuracy == 1.0


@pytest.mark.parametrize(("seed", "target"), list(itertools.product(range(5), [0.8, 0.9, 0.97])))
def test_target_auto_accuracy_has_minimal_review_rate(seed: int, target: float) -> None:
    p, defect = random_cells(seed)
    point, _ = choose_operating_point(p, defect, OperatingCriteria(target_auto_accuracy=target))
    assert point.val_auto_accuracy is not None and point.val_auto_accuracy >= target
    thresholds = candidate_thresholds(p)
    reachable = [
        f.review_rate
        for low, high in itertools.combinations_with_replacement(thresholds, 2)
        if (f := measure_figures(p, defect, low, high)).auto_accuracy >= target
    ]
    assert point.val_review_rate == pytest.approx(min(reachable))


def test_combined_criteria_band_straddles_the_cost_threshold_and_keeps_escapes() -> None:
    p, defect = random_cells(3, n=300)
    alone, _ = choose_operating_point(p, defect, OperatingCriteria(cost_ratio=0.5, max_escape=0.1))
    point, curve = choose_operating_point(
        p, defect, OperatingCriteria(cost_ratio=0.5, max_escape=0.1, target_auto_accuracy=0.95)
    )
    assert point.review_low <= alone.scrap_threshold <= point.scrap_threshold
    assert point.val_escape_rate is not None and point.val_escape_rate <= 0.1
    assert point.val_auto_accuracy is not None and point.val_auto_accuracy >= 0.95
    assert point.method == "cost_ratio+max_escape+target_auto_accuracy"
    assert 1 < len(curve) <= 101
    rates = [c.review_rate for c in curve]
    assert rates == sorted(rates) and [c.auto_accuracy for c in curve] == sorted(
        c.auto_accuracy for c in curve
    )
    assert all(c.review_low <= alone.scrap_threshold <= c.scrap_threshold for c in curve)


# ---- criteria held at a confidence -------------------------------------------------------


def test_confidence_bounds_are_clopper_pearson_and_cover_the_true_rate() -> None:
    stats = pytest.importorskip("scipy.stats")
    bounds = escape_upper_bounds(40, 0.95)
    assert bounds[0] == pytest.approx(1 - 0.05 ** (1 / 40))  # no escape in 40
    assert bounds[5] == pytest.approx(stats.beta.ppf(0.95, 6, 35)) and bounds[40] == 1.0
    assert np.all(np.diff(bounds) > 0)
    lower = accuracy_lower_bound(np.array([50, 45, 0]), np.array([50, 50, 0]), 0.9)
    assert lower[:2] == pytest.approx([0.1 ** (1 / 50), stats.beta.ppf(0.1, 45, 6)])
    assert lower[2] == 1.0  # nothing decided, nothing wrong
    # Coverage: over many validation sets of 60 defective cells escaping at 5%, the bound
    # lies above the true rate at least 95% of the time (Clopper-Pearson is conservative).
    escapes = np.random.default_rng(0).binomial(60, 0.05, 4000)
    assert np.mean(escape_upper_bounds(60, 0.95)[escapes] >= 0.05) >= 0.95


def test_max_escape_at_a_confidence_allows_only_escapes_the_bound_covers() -> None:
    p, defect = random_cells(1, n=400)
    plain, _ = choose_operating_point(p, defect, OperatingCriteria(max_escape=0.1))
    held, _ = choose_operating_point(p, defect, OperatingCriteria(max_escape=0.1, confidence=0.95))
    n_defect = int(defect.sum())
    escapes = int(np.sum(defect & (p < held.scrap_threshold)))
    bounds = escape_upper_bounds(n_defect, 0.95)
    assert bounds[escapes] <= 0.1
    # The highest such threshold: passing the next score up lets escapes out that the bound
    # no longer covers (ties can move several defects at once).
    next_up = np.unique(p[p >= held.scrap_threshold])[0]
    assert bounds[np.sum(defect & (p <= next_up))] > 0.1
    assert held.scrap_threshold < plain.scrap_threshold
    assert held.confidence == 0.95 and held.method == "max_escape+confidence"
    # The card keeps the promise it was chosen for; a counted point promises nothing.
    assert held.val_escape_bound == pytest.approx(bounds[escapes], abs=1e-6)
    assert plain.val_escape_bound is None and plain.val_auto_accuracy_bound is None


def test_target_accuracy_at_a_confidence_has_minimal_review_among_bands_it_covers() -> None:
    p, defect = random_cells(2, n=300)
    point, _ = choose_operating_point(
        p, defect, OperatingCriteria(target_auto_accuracy=0.9, confidence=0.9)
    )
    plain, _ = choose_operating_point(p, defect, OperatingCriteria(target_auto_accuracy=0.9))
    thresholds = candidate_thresholds(p)

    def bound(low: float, high: float) -> tuple[float, float]:
        decided = (p < low) | (p >= high)
        correct = np.sum(decided & (defect == (p >= high)))
        review = 1 - decided.mean()
        return float(accuracy_lower_bound(correct, decided.sum(), 0.9)), review

    assert bound(point.review_low, point.scrap_threshold)[0] >= 0.9
    assert point.val_auto_accuracy_bound == pytest.approx(
        bound(point.review_low, point.scrap_threshold)[0], abs=1e-6
    )
    reachable = [
        b[1]
        for low, high in itertools.combinations_with_replacement(thresholds, 2)
        if (b := bound(low, high))[0] >= 0.9
    ]
    assert point.val_review_rate == pytest.approx(min(reachable))
    assert point.val_review_rate is not None and plain.val_review_rate is not None
    assert point.val_review_rate > plain.val_review_rate


def test_confidence_needs_enough_defects_and_a_criterion_to_hold() -> None:
    # 3 defective cells cannot show <= 5% escapes at 95%: even 0 of 59 would be needed.
    with pytest.raises(ValueError, match="3 defective validation cells .* at least 59"):
        choose_operating_point(P, DEFECT, OperatingCriteria(max_escape=0.05, confidence=0.95))
    with pytest.raises(ValueError, match="confidence bounds max_escape"):
        choose_operating_point(P, DEFECT, OperatingCriteria(cost_ratio=1.0, confidence=0.95))
    with pytest.raises(ValueError, match="within \\(0, 1\\)"):
        choose_operating_point(P, DEFECT, OperatingCriteria(max_escape=0.5, confidence=1.0))


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"cost_ratio": 0.0}, "cost_ratio must be a positive number"),
        ({"cost_ratio": math.inf}, "cost_ratio must be a positive number"),
        ({"max_escape": 1.5}, r"max_escape must be within \[0, 1\]"),
        ({"max_escape": math.nan}, r"max_escape must be within \[0, 1\]"),
        ({"target_auto_accuracy": 0.0}, r"target_auto_accuracy must be within \(0, 1\]"),
        ({"max_escape": 0.1, "confidence": 0.0}, r"confidence must be within \(0, 1\)"),
        ({"confidence": 0.9}, "confidence bounds max_escape or target_auto_accuracy"),
    ],
)
def test_criteria_refuse_bad_ranges_and_a_lone_confidence(given, message) -> None:
    with pytest.raises(ValueError, match=message):
        OperatingCriteria(**given)


def test_criteria_name_their_method_and_fill_gaps_from_a_fallback() -> None:
    config = {"cost_ratio": 1.0, "target_auto_accuracy": 0.98, "lr": 0.002}
    from_config = OperatingCriteria.from_mapping(config)  # other keys are not criteria
    assert from_config == OperatingCriteria(cost_ratio=1.0, target_auto_accuracy=0.98)
    assert from_config.method == "cost_ratio+target_auto_accuracy" and from_config.chooses
    given = OperatingCriteria(cost_ratio=0.5, max_escape=0.05, confidence=0.9)
    merged = given.or_else(from_config)
    assert merged == OperatingCriteria(0.5, 0.05, 0.98, 0.9)  # each criterion on its own
    assert OperatingCriteria().or_else(from_config) == from_config
    assert not OperatingCriteria().chooses and OperatingCriteria().method == ""
    chosen = OperatingCriteria(cost_ratio=0.5).or_else(from_config)
    point, _ = choose_operating_point(P, DEFECT, chosen)
    assert point.criteria == chosen and point.method == "cost_ratio+target_auto_accuracy"


def test_operating_point_needs_a_criterion_and_defects_for_escapes() -> None:
    with pytest.raises(ValueError, match="at least one"):
        choose_operating_point(P, DEFECT, OperatingCriteria())
    with pytest.raises(ValueError, match="no defective cells"):
        choose_operating_point(P, np.zeros(6, bool), OperatingCriteria(max_escape=0.1))


def test_measured_default_point_keeps_its_thresholds() -> None:
    point, curve = measure_operating_point(P, DEFECT, OperatingPoint())
    assert (point.review_low, point.scrap_threshold, point.method) == (0.5, 0.5, "default")
    assert point.val_escape_rate == pytest.approx(1 / 3)
    assert point.val_false_scrap_rate == pytest.approx(1 / 3)
    assert curve[0].review_low == curve[0].scrap_threshold == 0.5


# ---- the card --------------------------------------------------------------------------------


def calibrated_card(tiny, n: int = 400) -> ModelCard:
    logits, labels = calibrated_logits(n)
    logits = 2.0 * logits
    card = tiny.make_card(temperature=fit_temperature(logits, labels))
    card.calibration = calibration_data(
        logits,
        labels,
        DatasetRef(manifest_hash="abc123", split="val", count=n),
        temperature=card.temperature,
    )
    p, defect = validation_scores(card)
    card.operating_point, card.calibration.trade_off = measure_operating_point(
        p, defect, card.operating_point
    )
    return ModelCard.model_validate_json(card.to_json())


def test_card_without_calibration_fields_still_loads(tiny) -> None:
    old = json.loads(tiny.make_card().to_json())
    for key in ("calibration", "derived_from"):
        del old[key]
    old["operating_point"] = {
        "review_low": 0.3,
        "scrap_threshold": 0.7,
        "cost_ratio": None,
        "method": "default",
    }
    card = ModelCard.model_validate_json(json.dumps(old))
    assert card.calibration is None and card.operating_point.val_review_rate is None
    with pytest.raises(NoCalibrationDataError, match="re-export"):
        validation_scores(card)


def test_card_round_trips_calibration_data(tiny) -> None:
    card = calibrated_card(tiny)
    assert card.calibration is not None
    assert card.calibration.data.count == len(card.calibration.labels) == 400
    assert card.calibration.ece_after is not None and card.calibration.ece_before is not None
    assert card.calibration.ece_after < card.calibration.ece_before
    assert 1 <= len(card.calibration.trade_off) <= 101


def test_card_refuses_calibration_logits_of_the_wrong_width(tiny) -> None:
    data = json.loads(calibrated_card(tiny).to_json())
    data["calibration"]["logits"] = [[0.0, 1.0]] * len(data["calibration"]["labels"])
    with pytest.raises(ValueError, match="columns"):
        ModelCard.model_validate(data)


# ---- command line ----------------------------------------------------------------------------


def test_set_operating_point_publishes_a_new_version_that_show_prints(
    tiny, store, onnx_model
) -> None:
    first = store.publish(onnx_model, calibrated_card(tiny))
    runner = CliRunner()
    args = ["models", "set-operating-point", "tiny@1", "--store", str(store.root)]
    result = runner.invoke(app, [*args, "--cost-ratio", "0.5", "--target-auto-accuracy", "0.9"])
    assert result.exit_code == 0, result.output
    assert "published tiny@2 from tiny@1" in result.output
    assert store.versions("tiny") == ["1", "2"]
    card, _ = store.load_verified("tiny@2")
    point = card.operating_point
    assert card.derived_from == "tiny@1" and card.onnx_sha256 == first.onnx_sha256
    assert point.method == "cost_ratio+target_auto_accuracy" and point.cost_ratio == 0.5
    assert point.val_auto_accuracy is not None and point.val_auto_accuracy >= 0.9
    assert card.temperature == first.temperature and card.calibration is not None
    assert store.card("tiny@1").operating_point == first.operating_point  # 1 is untouched

    shown = runner.invoke(app, ["models", "show", "tiny@2", "--store", str(store.root)])
    assert shown.exit_code == 0, shown.output
    for text in (
        f"temperature {card.temperature:.4g}",
        f"{point.review_low:.4f}",
        f"{point.scrap_threshold:.4f}",
        "cost ratio 0.5",
        "trade-off on validation",
        "derived    from tiny@1",
    ):
        assert text in shown.output

    held = runner.invoke(app, [*args, "--target-auto-accuracy", "0.9", "--confidence", "0.8"])
    assert held.exit_code == 0, held.output
    assert "(held at 0.8 confidence)" in held.output
    assert "promised   at 0.8 confidence: escape at most" in held.output
    assert store.card("tiny@3").operating_point.confidence == 0.8


def test_set_operating_point_on_a_card_without_predictions_says_how_to_fix(
    tmp_path, store, onnx_model, card
) -> None:
    store.publish(onnx_model, card)
    env = {**os.environ, "CELLINSPECT_HOME": str(tmp_path), "COLUMNS": "200"}
    cmd = [sys.executable, "-m", "cellinspect.cli", "models", "set-operating-point", "tiny@1"]
    result = subprocess.run(
        [*cmd, "--max-escape", "0.01", "--store", str(store.root)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 2
    assert "error:" in result.stderr and "tiny@1 has no stored validation predictions" in (
        result.stderr
    )
    assert "cellinspect export" in result.stderr and "Traceback" not in result.stderr
    assert store.versions("tiny") == ["1"]
