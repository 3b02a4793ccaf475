"""Evaluation figures of one model's predictions, vectorised over sample weights.

Every figure is computed from a B x N matrix of per-image weights: a row of ones gives the
figure itself, rows of bootstrap counts give B resampled values at once. The point
estimates and the confidence intervals of `compare` therefore come from the same code.
Conventions follow scikit-learn (zero_division=0, balanced accuracy over the classes
present, ROC-AUC with ties counted half, PR-AUC as average precision); the tests check
them against it. A figure that is undefined (no defective cells, one class only) is NaN.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import numpy as np

from cellinspect.models.calibration import ECE_BINS


class VerdictCode(IntEnum):
    """Verdicts as array codes (the order of `Verdict`'s members)."""

    PASS = 0
    REVIEW = 1
    SCRAP = 2


# Figures where a lower value is better; the rest (except the rates below) are higher-better.
LOWER_IS_BETTER = frozenset({"ece", "escape_rate", "false_scrap_rate"})
# Rates with no better direction on their own: they trade against each other.
NO_DIRECTION = frozenset({"scrap_rate", "review_rate"})


@dataclass(frozen=True)
class ScoredImages:
    """One model's outputs on a held-out set, in the set's canonical image order."""

    labels: np.ndarray  # N true class indices
    probs: np.ndarray  # N x K calibrated probabilities
    good_index: int
    verdicts: np.ndarray  # N VerdictCode values at the model's operating point

    @property
    def predicted(self) -> np.ndarray:
        return self.probs.argmax(axis=1)

    @property
    def correct(self) -> np.ndarray:
        return self.predicted == self.labels

    @property
    def defect_probability(self) -> np.ndarray:
        return 1.0 - self.probs[:, self.good_index]

    @property
    def is_defect(self) -> np.ndarray:
        return self.labels != self.good_index


def _ratio(num: np.ndarray, den: np.ndarray, empty: float) -> np.ndarray:
    """num / den with `empty` where den == 0."""
    out = np.full(np.broadcast(num, den).shape, empty, np.float64)
    np.divide(num, den, out=out, where=den > 0)
    return out


def _counts(codes: np.ndarray, n_codes: int, weights: np.ndarray) -> np.ndarray:
    """B x n_codes weighted counts of integer codes (one matrix product)."""
    onehot = np.zeros((len(codes), n_codes), np.float64)
    onehot[np.arange(len(codes)), codes] = 1.0
    return weights @ onehot


def confusion(labels: np.ndarray, predicted: np.ndarray, k: int, weights: np.ndarray) -> np.ndarray:
    """B x K x K weighted confusion matrices, rows = truth, columns = prediction."""
    return _counts(labels * k + predicted, k * k, weights).reshape(-1, k, k)


def class_figures(cm: np.ndarray) -> dict[str, np.ndarray]:
    """Accuracy, balanced accuracy, macro-F1 (B) and per-class precision/recall/F1 (B x K)."""
    tp = np.diagonal(cm, axis1=1, axis2=2)
    support, predicted = cm.sum(axis=2), cm.sum(axis=1)
    recall = _ratio(tp, support, 0.0)
    f1 = _ratio(2 * tp, support + predicted, 0.0)
    present = support > 0
    balanced = _ratio(np.where(present, recall, 0.0).sum(axis=1), present.sum(axis=1), np.nan)
    return {
        "accuracy": _ratio(tp.sum(axis=1), cm.sum(axis=(1, 2)), np.nan),
        "balanced_accuracy": balanced,
        "macro_f1": f1.mean(axis=1),
        "precision": _ratio(tp, predicted, 0.0),
        "recall": recall,
        "f1": f1,
    }


def ranking_figures(
    scores: np.ndarray, positive: np.ndarray, weights: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(ROC-AUC, average precision) per weight row for one binary scoring; NaN if undefined.

    Images are ranked by descending score with ties grouped: AUC is the Mann-Whitney
    statistic (a tied positive/negative pair counts half), AP = sum over thresholds of
    (recall gained) * precision, as in scikit-learn.
    """
    order = np.argsort(-scores, kind="stable")
    ranked = scores[order]
    starts = np.flatnonzero(np.r_[True, ranked[1:] != ranked[:-1]])
    w = weights[:, order]
    pos = positive[order]
    tp_at = np.add.reduceat(w * pos, starts, axis=1)
    fp_at = np.add.reduceat(w * ~pos, starts, axis=1)
    tp, fp = np.cumsum(tp_at, axis=1), np.cumsum(fp_at, axis=1)
    n_pos, n_neg = tp[:, -1], fp[:, -1]
    above = tp - tp_at  # positives ranked strictly above each group
    auc = _ratio((fp_at * (above + 0.5 * tp_at)).sum(axis=1), n_pos * n_neg, np.nan)
    ap = _ratio((tp_at * _ratio(tp, tp + fp, 0.0)).sum(axis=1), n_pos, np.nan)
    return auc, ap


def calibration_error(
    probs: np.ndarray, labels: np.ndarray, weights: np.ndarray, n_bins: int = ECE_BINS
) -> np.ndarray:
    """Top-label ECE per weight row, binned as `calibration.reliability_bins` bins."""
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    index = np.clip(np.ceil(confidence * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    onehot = np.zeros((len(labels), n_bins), np.float64)
    onehot[np.arange(len(labels)), index] = correct - confidence
    return _ratio(np.abs(weights @ onehot).sum(axis=1), weights.sum(axis=1), np.nan)


def verdict_figures(
    is_defect: np.ndarray, verdicts: np.ndarray, weights: np.ndarray
) -> dict[str, np.ndarray]:
    """Scrap, escape, false-scrap and review rates and auto accuracy per weight row."""
    cells = _counts(is_defect.astype(np.int64) * 3 + verdicts, 6, weights).reshape(-1, 2, 3)
    good, defect = cells[:, 0], cells[:, 1]
    total = cells.sum(axis=(1, 2))
    p, r, s = VerdictCode.PASS, VerdictCode.REVIEW, VerdictCode.SCRAP
    auto = total - cells[:, :, r].sum(axis=1)
    return {
        "scrap_rate": _ratio(cells[:, :, s].sum(axis=1), total, np.nan),
        "escape_rate": _ratio(defect[:, p], defect.sum(axis=1), np.nan),
        "false_scrap_rate": _ratio(good[:, s], good.sum(axis=1), np.nan),
        "review_rate": _ratio(cells[:, :, r].sum(axis=1), total, np.nan),
        "auto_accuracy": _ratio(good[:, p] + defect[:, s], auto, np.nan),
    }


def figure_table(
    scored: ScoredImages, class_names: list[str], weights: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """Every scalar figure, name -> B values (B = 1 without `weights`).

    Per-class figures are named `precision[<class>]`, `recall[<class>]`, `f1[<class>]`.
    `roc_auc`/`pr_auc` are defect-vs-good for two classes and one-vs-rest macro averages
    (over the classes that are present) for more; `defect_roc_auc`/`defect_pr_auc` always
    rank by the defect probability 1 - P(good), the score the operating point thresholds.
    """
    n, k = scored.probs.shape
    w = np.ones((1, n)) if weights is None else np.asarray(weights, np.float64)
    per = class_figures(confusion(scored.labels, scored.predicted, k, w))
    table = {key: per[key] for key in ("accuracy", "balanced_accuracy", "macro_f1")}
    for key in ("precision", "recall", "f1"):
        for j, name in enumerate(class_names):
            table[f"{key}[{name}]"] = per[key][:, j]
    defect_auc, defect_ap = ranking_figures(scored.defect_probability, scored.is_defect, w)
    if k == 2:
        table["roc_auc"], table["pr_auc"] = defect_auc, defect_ap
    else:
        pairs = [ranking_figures(scored.probs[:, j], scored.labels == j, w) for j in range(k)]
        aucs, aps = np.array([a for a, _ in pairs]), np.array([b for _, b in pairs])
        table["roc_auc"] = _nanmean_rows(aucs)
        table["pr_auc"] = _nanmean_rows(aps)
    table["defect_roc_auc"], table["defect_pr_auc"] = defect_auc, defect_ap
    table["ece"] = calibration_error(scored.probs, scored.labels, w)
    table.update(verdict_figures(scored.is_defect, scored.verdicts, w))
    return table


def _nanmean_rows(values: np.ndarray) -> np.ndarray:
    """Mean over axis 0 ignoring NaN; NaN where every value is NaN (without a warning)."""
    defined = ~np.isnan(values)
    return _ratio(np.where(defined, values, 0.0).sum(axis=0), defined.sum(axis=0), np.nan)


def higher_is_better(figure: str) -> bool | None:
    """True/False for a direction, None for rates that only trade against others."""
    base = figure.split("[", 1)[0]
    if base in NO_DIRECTION:
        return None
    return base not in LOWER_IS_BETTER
