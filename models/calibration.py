"""Calibration and operating points from validation predictions (numpy only, never torch).

Temperature scaling (Guo et al., 2017) makes softmax(logits / T) mean what it says. The
operating point then maps the calibrated defect probability p = 1 - P(good class) to pass /
review / scrap, chosen for a cost ratio, an escape budget or an accuracy target for the cells
decided without review. The validation predictions travel in the card (`CalibrationData`), so
a new point is a new published version, never a retrain.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from cellinspect.models.card import (
    MAX_TRADE_OFF_POINTS,
    CalibrationData,
    DatasetRef,
    ModelCard,
    OperatingCriteria,
    OperatingPoint,
    TradeOffPoint,
)
from cellinspect.models.predict import softmax
from cellinspect.models.store import ModelRef, ModelStore

logger = logging.getLogger(__name__)

TradeOffCurve = list[TradeOffPoint]

TEMPERATURE_BOUNDS = (0.05, 20.0)  # beyond these the validation split is telling us nothing useful
ECE_BINS = 15
MAX_STORED_PREDICTIONS = 10_000  # rows of validation logits kept in a card (~20 bytes per value)
# The review-band search scores every pair of thresholds: O(g^2) for g candidate gaps between
# sorted unique scores. Up to this many gaps the search is exact; above, gaps are taken at
# evenly spaced ranks (1/1000 of the ranking), which keeps it to ~0.5M pairs.
MAX_BAND_GAPS = 1000


def escape_upper_bounds(n_defect: int, confidence: float) -> np.ndarray:
    """One-sided Clopper-Pearson upper bounds on the escape rate after k = 0..n_defect of
    `n_defect` defective cells passed: the true rate is below bound[k] with probability
    `confidence`. Rising in k; 1 at k = n_defect."""
    from scipy.special import betaincinv  # scipy comes with scikit-learn; imported on use

    k = np.arange(n_defect + 1, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        bound = betaincinv(k + 1, np.maximum(n_defect - k, 1), confidence)
    return np.where(k >= n_defect, 1.0, bound)


def accuracy_lower_bound(correct: np.ndarray, decided: np.ndarray, confidence: float) -> np.ndarray:
    """One-sided Clopper-Pearson lower bounds on accuracy, `correct` of `decided` cells each
    (1 where nothing is decided: no automatic decision can be wrong)."""
    from scipy.special import betaincinv

    correct, decided = np.asarray(correct, np.float64), np.asarray(decided, np.float64)
    wrong = decided - correct
    with np.errstate(invalid="ignore", divide="ignore"):
        bound = betaincinv(np.maximum(correct, 1), wrong + 1, 1.0 - confidence)
    return np.where(decided == 0, 1.0, np.where(correct == 0, 0.0, bound))


class NoCalibrationDataError(ValueError):
    """A card published without validation predictions (before calibration was recorded)."""


# ---- temperature scaling ----------------------------------------------------------------


def _check_logits(logits: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    if z.ndim != 2 or z.shape[1] < 2 or len(z) == 0:
        raise ValueError(f"logits must be a non-empty N x classes array, got shape {z.shape}")
    if y.shape != (len(z),):
        raise ValueError(f"labels must have shape ({len(z)},), got {y.shape}")
    if y.min() < 0 or y.max() >= z.shape[1]:
        raise ValueError(f"labels must be class indices 0..{z.shape[1] - 1}")
    if not np.isfinite(z).all():
        raise ValueError("logits contain NaN or infinite values")
    return z, y


def negative_log_likelihood(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    """Mean cross-entropy of softmax(logits / temperature) against integer labels."""
    z, y = _check_logits(logits, labels)
    z = z / temperature
    z = z - z.max(axis=1, keepdims=True)
    return float(np.mean(np.log(np.exp(z).sum(axis=1)) - z[np.arange(len(y)), y]))


def fit_temperature(
    logits: np.ndarray,
    labels: np.ndarray,
    *,
    bounds: tuple[float, float] = TEMPERATURE_BOUNDS,
) -> float:
    """The T > 0 minimising the NLL of softmax(logits / T) on validation data (4 digits).

    NLL is convex in 1/T; we search log T with bounded Brent. When every sample's true class
    already has the top logit, the NLL keeps falling as T -> 0 and has no minimum: we then
    return 1.0 (leave the model as trained) instead of an arbitrarily sharp T at the bound.
    """
    z, y = _check_logits(logits, labels)
    true_logit = z[np.arange(len(y)), y]
    if np.all(true_logit >= z.max(axis=1)):
        logger.warning(
            "every validation sample is classified correctly: temperature is not identifiable "
            "from %d samples, keeping T = 1",
            len(y),
        )
        return 1.0
    # scipy is a scikit-learn dependency; imported here so serving never pays for it.
    from scipy.optimize import minimize_scalar

    low, high = math.log(bounds[0]), math.log(bounds[1])
    result = minimize_scalar(
        lambda log_t: negative_log_likelihood(z, y, math.exp(log_t)),
        bounds=(low, high),
        method="bounded",
        options={"xatol": 1e-5},
    )
    temperature = float(f"{math.exp(float(result.x)):.4g}")
    if min(result.x - low, high - result.x) < 1e-3:
        logger.warning("fitted temperature %.4g sits at the search bound %s", temperature, bounds)
    return temperature


# ---- calibration error -------------------------------------------------------------------


@dataclass(frozen=True)
class ReliabilityBins:
    """Top-label confidence histogram: per equal-width bin, count, mean confidence, accuracy."""

    edges: np.ndarray  # n_bins + 1
    counts: np.ndarray
    confidence: np.ndarray  # mean top-label probability (0 where empty)
    accuracy: np.ndarray  # share of rows whose top label is right (0 where empty)

    @property
    def ece(self) -> float:
        n = self.counts.sum()
        return float(np.sum(self.counts * np.abs(self.accuracy - self.confidence)) / n)


def reliability_bins(
    probs: np.ndarray, labels: np.ndarray, n_bins: int = ECE_BINS
) -> ReliabilityBins:
    """Bin rows by top-label confidence into ((m-1)/M, m/M] bins, as in Guo et al."""
    # sklearn's calibration_curve is binary (one positive class's probability) and returns bin
    # means without bin sizes, so it cannot give the count-weighted top-label ECE: done here.
    if n_bins < 1:
        raise ValueError(f"n_bins must be at least 1, got {n_bins}")
    p, y = _check_logits(probs, labels)
    confidence = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    index = np.clip(np.ceil(confidence * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    counts = np.bincount(index, minlength=n_bins)
    safe = np.maximum(counts, 1)
    return ReliabilityBins(
        edges=np.linspace(0.0, 1.0, n_bins + 1),
        counts=counts,
        confidence=np.bincount(index, weights=confidence, minlength=n_bins) / safe,
        accuracy=np.bincount(index, weights=correct, minlength=n_bins) / safe,
    )


def expected_calibration_error(
    probs: np.ndarray, labels: np.ndarray, n_bins: int = ECE_BINS
) -> float:
    """Top-label ECE: sum over bins of |bin|/N * |accuracy(bin) - mean confidence(bin)|."""
    return reliability_bins(probs, labels, n_bins).ece


def reliability_diagram(
    probs: np.ndarray,
    labels: np.ndarray,
    path: str | Path,
    title: str = "Reliability",
    *,
    calibrated: np.ndarray | None = None,
    n_bins: int = ECE_BINS,
) -> Path:
    """Write a reliability diagram PNG of `probs` and, if given, `calibrated` side by side."""
    # Figure + Agg canvas directly: no pyplot, so no process-wide backend state is touched.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # One panel (no `calibrated`) is titled by `title` alone: its probabilities may be either.
    panels = [("", probs)] if calibrated is None else [("before", probs), ("after", calibrated)]
    fig = Figure(figsize=(4.5 * len(panels), 4.5))
    FigureCanvasAgg(fig)
    for i, (name, p) in enumerate(panels, start=1):
        bins = reliability_bins(p, labels, n_bins)
        ax = fig.add_subplot(1, len(panels), i)
        width = 1.0 / n_bins
        centres = bins.edges[:-1] + width / 2
        filled = bins.counts > 0
        accuracy, gap = bins.accuracy[filled], bins.confidence[filled] - bins.accuracy[filled]
        ax.bar(centres[filled], accuracy, width=width, edgecolor="black", label="accuracy")
        ax.bar(
            centres[filled],
            gap,
            bottom=accuracy,
            width=width,
            color="tab:red",
            alpha=0.3,
            label="confidence - accuracy",
        )
        ax.plot([0, 1], [0, 1], "k--", linewidth=1)
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (top-label probability)")
        ax.set_ylabel("accuracy")
        ax.set_title(f"{title}{': ' + name if name else ''} (ECE {bins.ece:.3f})")
        ax.legend(loc="upper left")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    return path


# ---- validation predictions in the card --------------------------------------------------


def calibration_data(
    logits: np.ndarray,
    labels: np.ndarray,
    data: DatasetRef,
    *,
    temperature: float,
    max_rows: int = MAX_STORED_PREDICTIONS,
) -> CalibrationData:
    """The card's record of validation predictions: logits rounded to 6 decimals, ECE at T=1
    and at `temperature`. Above `max_rows` a fixed-seed random subset is kept."""
    z, y = _check_logits(logits, labels)
    keep = np.arange(len(y))
    if len(y) > max_rows:
        keep = np.sort(np.random.default_rng(0).choice(len(y), max_rows, replace=False))
        logger.info("keeping %d of %d validation predictions in the card", max_rows, len(y))
    return CalibrationData(
        data=data.model_copy(update={"count": len(keep)}),
        logits=np.round(z[keep], 6).tolist(),
        labels=y[keep].tolist(),
        ece_before=round(expected_calibration_error(softmax(z), y), 6),
        ece_after=round(expected_calibration_error(softmax(z, temperature), y), 6),
    )


def validation_scores(card: ModelCard) -> tuple[np.ndarray, np.ndarray]:
    """(p, is_defect) from the card's stored validation predictions at the card's temperature."""
    if card.calibration is None or not card.calibration.labels:
        raise NoCalibrationDataError(
            f"{card.name}@{card.version} has no stored validation predictions; re-export it "
            f"with `cellinspect export RUN_DIR --name {card.name}` to record them"
        )
    probs = softmax(np.asarray(card.calibration.logits, dtype=np.float64), card.temperature)
    p = np.clip(1.0 - probs[:, card.good_index], 0.0, 1.0)
    return p, np.asarray(card.calibration.labels) != card.good_index


# ---- operating points --------------------------------------------------------------------


@dataclass(frozen=True)
class OperatingFigures:
    """What an operating point does to a set of scored cells: the counts, and the rates and
    confidence bounds that follow from them."""

    cells: int
    defects: int
    escapes: int  # defective cells passed
    false_scraps: int  # good cells scrapped
    decided: int  # passed or scrapped, i.e. not sent to review
    correct: int  # of the decided cells

    @property
    def escape_rate(self) -> float:  # 0 without defective cells
        return self.escapes / self.defects if self.defects else 0.0

    @property
    def false_scrap_rate(self) -> float:  # 0 without good cells
        goods = self.cells - self.defects
        return self.false_scraps / goods if goods else 0.0

    @property
    def review_rate(self) -> float:
        return 1.0 - self.decided / self.cells

    @property
    def auto_accuracy(self) -> float:  # 1 when everything is reviewed
        return self.correct / self.decided if self.decided else 1.0

    def as_point_fields(self, confidence: float | None = None) -> dict[str, float]:
        """The card's validation figures; with a confidence, also what they promise on new
        cells (the escape rate's upper bound, the auto accuracy's lower bound)."""
        fields = {
            "val_escape_rate": round(self.escape_rate, 6),
            "val_false_scrap_rate": round(self.false_scrap_rate, 6),
            "val_review_rate": round(self.review_rate, 6),
            "val_auto_accuracy": round(self.auto_accuracy, 6),
        }
        if confidence is not None:
            escape = (
                escape_upper_bounds(self.defects, confidence)[self.escapes] if self.defects else 1.0
            )
            accuracy = accuracy_lower_bound(
                np.array([self.correct]), np.array([self.decided]), confidence
            )[0]
            fields["val_escape_bound"] = round(float(escape), 6)
            fields["val_auto_accuracy_bound"] = round(float(accuracy), 6)
        return fields


def _check_scores(p: np.ndarray, is_defect: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(p, dtype=np.float64)
    truth = np.asarray(is_defect, dtype=bool)
    if scores.ndim != 1 or len(scores) == 0 or truth.shape != scores.shape:
        raise ValueError(
            f"need equal-length 1-D scores and truth, got {scores.shape} and {truth.shape}"
        )
    if not np.isfinite(scores).all() or scores.min() < 0 or scores.max() > 1:
        raise ValueError("defect probabilities must be finite and within [0, 1]")
    return scores, truth


def measure_figures(
    p: np.ndarray, is_defect: np.ndarray, review_low: float, scrap_threshold: float
) -> OperatingFigures:
    """Escape, false-scrap and review counts and auto accuracy of the thresholds on (p, truth)."""
    p, d = _check_scores(p, is_defect)
    passed, scrapped = p < review_low, p >= scrap_threshold
    return OperatingFigures(
        cells=len(p),
        defects=int(d.sum()),
        escapes=int((passed & d).sum()),
        false_scraps=int((scrapped & ~d).sum()),
        decided=int(passed.sum() + scrapped.sum()),
        correct=int((passed & ~d).sum() + (scrapped & d).sum()),
    )


class _Ranking:
    """Validation cells sorted by score. A threshold t lies in gap g when exactly the g lowest
    unique scores are below it (u[g-1] < t <= u[g]); every threshold in a gap makes the same
    decisions on these cells, so searches run over gaps and place the threshold afterwards."""

    def __init__(self, p: np.ndarray, is_defect: np.ndarray) -> None:
        self.scores, inverse = np.unique(p, return_inverse=True)
        defects_at = np.bincount(inverse, weights=is_defect, minlength=len(self.scores))
        cells_at = np.bincount(inverse, minlength=len(self.scores))
        self.defects_below = np.concatenate([[0], np.cumsum(defects_at)]).astype(np.int64)
        self.cells_below = np.concatenate([[0], np.cumsum(cells_at)]).astype(np.int64)
        self.goods_below = self.cells_below - self.defects_below
        self.n = len(p)
        self.n_defect = int(self.defects_below[-1])
        self.n_good = self.n - self.n_defect
        # Gap m (above every score) needs a threshold > max score: none exists if p = 1 occurs.
        m = len(self.scores)
        self.last_gap = m if self.scores[-1] < 1.0 else m - 1

    def gap_of(self, threshold: float) -> int:
        return int(np.searchsorted(self.scores, threshold, side="left"))

    def midpoint(self, gap: int) -> float:
        left = self.scores[gap - 1] if gap > 0 else 0.0
        right = self.scores[gap] if gap < len(self.scores) else 1.0
        return float((left + right) / 2)

    def highest_gap_within_escape(self, max_escape: float, confidence: float | None) -> int:
        """Highest gap whose escapes (defective cells passed) stay within max_escape: on
        these cells, or with `confidence` for cells like them (Clopper-Pearson bound)."""
        if confidence is None:
            allowed = math.floor(max_escape * self.n_defect + 1e-9)
        else:
            bounds = escape_upper_bounds(self.n_defect, confidence)
            allowed = int(np.count_nonzero(bounds <= max_escape + 1e-12)) - 1
            if allowed < 0:
                # No escape at all bounds the rate at 1 - (1 - c)^(1/n): n must be this large.
                needed = (
                    f"at least {math.ceil(math.log(1 - confidence) / math.log(1 - max_escape))}"
                    if max_escape > 0
                    else "infinitely many"
                )
                raise ValueError(
                    f"{self.n_defect} defective validation cells cannot show an escape rate "
                    f"of at most {max_escape:g} at confidence {confidence:g}, even with no "
                    f"escape: that needs {needed} defective cells (or a lower confidence, "
                    "or a higher max_escape)"
                )
        gap = int(np.searchsorted(self.defects_below, allowed, side="right")) - 1
        return min(gap, self.last_gap)

    def cost_optimal(self, cost_ratio: float, max_gap: int) -> tuple[int, float]:
        """(gap, threshold) minimising R * false scraps + escapes over gaps 0..max_gap.

        The empirical cost picks the gap; the Bayes threshold R / (1 + R), optimal for
        calibrated p, picks the point inside it (or, outside every optimal gap, the optimal
        gap whose midpoint is nearest to it). With only one class in the data the empirical
        cost says nothing about the other, so the Bayes threshold is used as it stands.
        """
        bayes = cost_ratio / (1.0 + cost_ratio)
        bayes_gap = self.gap_of(bayes)
        if self.n_good == 0 or self.n_defect == 0:
            logger.warning("validation data has one class only: using the Bayes threshold")
            if bayes_gap <= max_gap:
                return bayes_gap, bayes
            return max_gap, self.midpoint(max_gap)
        gaps = np.arange(max_gap + 1)
        cost = cost_ratio * (self.n_good - self.goods_below[gaps]) + self.defects_below[gaps]
        optimal = gaps[cost <= cost.min() + 1e-9 * max(1.0, float(cost.min()))]
        if bayes_gap in optimal:
            return bayes_gap, bayes
        mids = np.array([self.midpoint(int(g)) for g in optimal])
        gap = int(optimal[int(np.argmin(np.abs(mids - bayes)))])
        return gap, float(mids[int(np.argmin(np.abs(mids - bayes)))])


@dataclass(frozen=True)
class _Bands:
    """Every candidate review band [low gap, high gap] with its review count and accuracy."""

    low: np.ndarray
    high: np.ndarray
    review: np.ndarray  # cells inside the band
    accuracy: np.ndarray  # of the cells outside it
    # What a target accuracy is held to: `accuracy`, or its lower confidence bound.
    assured: np.ndarray

    @classmethod
    def search(
        cls,
        r: _Ranking,
        *,
        centre_gap: int | None,
        max_low_gap: int,
        confidence: float | None = None,
    ) -> _Bands:
        gaps = np.arange(r.last_gap + 1)
        if len(gaps) > MAX_BAND_GAPS:
            extra = [g for g in (centre_gap, max_low_gap) if g is not None]
            spaced = np.linspace(0, r.last_gap, MAX_BAND_GAPS).round().astype(np.int64)
            gaps = np.unique(np.concatenate([spaced, extra]))
        top_low = max_low_gap if centre_gap is None else min(max_low_gap, centre_gap)
        lows = gaps[gaps <= top_low]
        highs = gaps[gaps >= (centre_gap or 0)]
        low, high = (a.ravel() for a in np.meshgrid(lows, highs, indexing="ij"))
        keep = low <= high
        low, high = low[keep], high[keep]
        review = r.cells_below[high] - r.cells_below[low]
        correct = r.goods_below[low] + (r.n_defect - r.defects_below[high])
        auto = r.n - review
        accuracy = np.where(auto > 0, correct / np.maximum(auto, 1), 1.0)
        assured = (
            accuracy if confidence is None else accuracy_lower_bound(correct, auto, confidence)
        )
        return cls(low=low, high=high, review=review, accuracy=accuracy, assured=assured)

    def smallest_review(self, target: float, confidence: float | None = None) -> int:
        """Index of the band with the fewest reviews reaching `target` (then most accurate)."""
        ok = np.flatnonzero(self.assured >= target - 1e-12)
        if len(ok) == 0:
            what = "" if confidence is None else f" at confidence {confidence:g}"
            raise ValueError(
                f"no review band reaches an auto accuracy of {target:.4f}{what} on the "
                f"validation split (best reachable: {self.assured.max():.4f})"
            )
        return int(ok[np.lexsort((-self.accuracy[ok], self.review[ok]))[0]])

    def frontier(self, n: int, points: int = MAX_TRADE_OFF_POINTS) -> list[int]:
        """Band indices: the most accurate band reviewing at most k% of cells, k = 0..100."""
        order = np.argsort(self.review, kind="stable")
        review, accuracy = self.review[order], self.accuracy[order]
        # best_at[i]: position of the most accurate band among the first i+1 (earliest on ties,
        # i.e. the one reviewing least).
        running = np.maximum.accumulate(accuracy)
        improves = np.concatenate([[True], accuracy[1:] > running[:-1]])
        best_at = np.maximum.accumulate(np.where(improves, np.arange(len(order)), 0))
        chosen: list[int] = []
        for k in range(points):
            pos = int(np.searchsorted(review, k * n // (points - 1), side="right")) - 1
            band = int(order[best_at[pos]]) if pos >= 0 else -1
            if band >= 0 and (not chosen or chosen[-1] != band):
                chosen.append(band)
        return chosen


def _threshold(r: _Ranking, gap: int, centre: tuple[int, float] | None) -> float:
    """Where a threshold goes inside its gap: the chosen centre there, else the midpoint."""
    if centre is not None and gap == centre[0]:
        return centre[1]
    return r.midpoint(gap)


def _trade_off(r: _Ranking, bands: _Bands, centre: tuple[int, float] | None) -> TradeOffCurve:
    return [
        TradeOffPoint(
            review_rate=round(float(bands.review[i]) / r.n, 6),
            auto_accuracy=round(float(bands.accuracy[i]), 6),
            review_low=_threshold(r, int(bands.low[i]), centre),
            scrap_threshold=_threshold(r, int(bands.high[i]), centre),
        )
        for i in bands.frontier(r.n)
    ]


def choose_operating_point(
    p: np.ndarray,
    is_defect: np.ndarray,
    criteria: OperatingCriteria,
) -> tuple[OperatingPoint, TradeOffCurve]:
    """Thresholds for calibrated defect probabilities `p` from validation cells with known truth.

    - cost_ratio R (cost of scrapping a good cell / cost of an escape): one threshold minimising
      R * false scraps + escapes on the data (Bayes threshold R/(1+R) inside the optimal gap).
    - max_escape E: the highest threshold passing at most E of the defective cells; with R
      too, the cost-optimal threshold among those.
    - target_auto_accuracy A: a review band with the smallest review rate whose auto-decided
      cells reach accuracy A; it straddles the R/E threshold if one was given, and its low end
      respects E. Without A there is no band (review_low == scrap_threshold).
    - confidence c: E and A must hold at one-sided confidence c (Clopper-Pearson bounds on
      the escape rate and the auto accuracy), not just on these cells. Counted on a few
      hundred cells, both move by several points on new cells (ELPV: 1.6-3.3% escapes
      counted on validation, 5-9% on the test quarter); a bound keeps the promise.

    Returns the point (with its validation figures) and the trade-off curve: the most accurate
    band for each review budget of 0..100% under the same constraints.
    """
    if not criteria.chooses:
        raise ValueError("give at least one of cost_ratio, max_escape, target_auto_accuracy")
    cost_ratio, max_escape = criteria.cost_ratio, criteria.max_escape
    target_auto_accuracy, confidence = criteria.target_auto_accuracy, criteria.confidence
    p, d = _check_scores(p, is_defect)
    r = _Ranking(p, d)
    max_low = r.last_gap
    if max_escape is not None:
        if r.n_defect == 0:
            raise ValueError(
                "the validation data has no defective cells: escapes cannot be measured"
            )
        max_low = r.highest_gap_within_escape(max_escape, confidence)
    centre: tuple[int, float] | None = None
    if cost_ratio is not None:
        centre = r.cost_optimal(cost_ratio, max_low)
    elif target_auto_accuracy is None:
        centre = (max_low, r.midpoint(max_low))
    bands = _Bands.search(
        r,
        centre_gap=None if centre is None else centre[0],
        max_low_gap=max_low,
        confidence=confidence,
    )
    if target_auto_accuracy is None:
        assert centre is not None
        low = high = centre[1]
    else:
        best = bands.smallest_review(target_auto_accuracy, confidence)
        if bands.review[best] == r.n:
            logger.warning(
                "only reviewing every cell reaches an auto accuracy of %g%s on %d validation "
                "cells: the point sends everything to review",
                target_auto_accuracy,
                "" if confidence is None else f" at confidence {confidence:g}",
                r.n,
            )
        low = _threshold(r, int(bands.low[best]), centre)
        high = _threshold(r, int(bands.high[best]), centre)
    point = OperatingPoint(
        review_low=low,
        scrap_threshold=high,
        method=criteria.method,
        **criteria.given(),
        **measure_figures(p, d, low, high).as_point_fields(confidence),
    )
    return point, _trade_off(r, bands, centre)


def measure_operating_point(
    p: np.ndarray, is_defect: np.ndarray, point: OperatingPoint
) -> tuple[OperatingPoint, TradeOffCurve]:
    """`point` with its validation figures filled in, and the trade-off curve around it."""
    p, d = _check_scores(p, is_defect)
    r = _Ranking(p, d)
    middle = (point.review_low + point.scrap_threshold) / 2
    centre = (min(r.gap_of(middle), r.last_gap), middle)
    bands = _Bands.search(r, centre_gap=centre[0], max_low_gap=r.last_gap)
    figures = measure_figures(p, d, point.review_low, point.scrap_threshold)
    return point.model_copy(update=figures.as_point_fields()), _trade_off(r, bands, centre)


def publish_operating_point(
    store: ModelStore,
    ref: str | ModelRef,
    criteria: OperatingCriteria,
) -> ModelCard:
    """Re-choose the point of a stored version from its validation predictions; publish the
    same ONNX file with the new card as the next version (aliases are not moved)."""
    card, onnx_path = store.load_verified(ref)
    p, is_defect = validation_scores(card)
    point, curve = choose_operating_point(p, is_defect, criteria)
    assert card.calibration is not None  # validation_scores checked
    new = ModelCard.model_validate(
        {
            **card.model_dump(),
            "operating_point": point,
            "calibration": card.calibration.model_copy(update={"trade_off": curve}),
            "derived_from": f"{card.name}@{card.version}",
            "created": datetime.now(UTC),
        }
    )
    return store.publish(onnx_path, new)
