"""Compare model versions on the same held-out images: paired statistics and the gate.

The first model is the baseline A; each other model B is compared with it image by image:

- every figure side by side, and B - A with a 95% paired-bootstrap interval (the same
  resampled images for both models, `BOOTSTRAP_RESAMPLES` resamples, fixed seed);
- an exact McNemar test on the images exactly one of the two gets right;
- the flips (fixed by B, broken by B), and verdict changes per 10,000 cells, each model at
  its own operating point;
- the gate: B fails on METRIC with margin X when the whole 95% interval of B's improvement
  lies below -X (see `gate_decision`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from enum import StrEnum
from typing import Literal

import numpy as np
from pydantic import BaseModel, Field

from cellinspect.models.evaluate import EvalReport, Evaluation, HeldoutInfo
from cellinspect.models.figures import VerdictCode, figure_table, higher_is_better

COMPARE_FORMAT: Literal["cellinspect.compare/1"] = "cellinspect.compare/1"
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0
CONFIDENCE = 0.95
MCNEMAR_ALPHA = 0.05
PER_CELLS = 10_000  # verdict changes are reported per this many inspected cells
_WEIGHT_BUDGET = 4_000_000  # bootstrap weights held at once (resamples x images)


class GateMetric(StrEnum):
    """Figures a promotion can be gated on."""

    ACCURACY = "accuracy"
    MACRO_F1 = "macro_f1"
    BALANCED_ACCURACY = "balanced_accuracy"
    ROC_AUC = "roc_auc"
    ESCAPE_RATE = "escape_rate"  # lower is better
    FALSE_SCRAP_RATE = "false_scrap_rate"  # lower is better

    @property
    def higher_is_better(self) -> bool:
        return self not in (GateMetric.ESCAPE_RATE, GateMetric.FALSE_SCRAP_RATE)


GATE_HELP = (
    "B fails (exit code 1) when it is worse than A on METRIC by more than MARGIN with "
    "statistical support: with d = B - A (A - B for escape_rate and false_scrap_rate, where "
    "lower is better), the upper end of d's 95% paired-bootstrap interval is below -MARGIN; "
    "for accuracy, the exact McNemar test must also give p < 0.05 with more images broken "
    "than fixed by B. MARGIN is in the metric's units (0.01 = one percentage point)."
)


class Difference(BaseModel):
    """One figure of A and B, and B - A with its bootstrap interval (None: undefined)."""

    figure: str
    baseline: float | None
    challenger: float | None
    diff: float | None
    ci_low: float | None
    ci_high: float | None
    higher_is_better: bool | None  # None: a rate that only trades against others


class McNemar(BaseModel):
    """Exact McNemar test: binomial test of `fixed` among the discordant images at p = 1/2."""

    fixed: int  # A wrong, B right
    broken: int  # A right, B wrong
    p_value: float  # two-sided; 1.0 without discordant images


FlipKind = Literal["fixed", "broken"]


class Flip(BaseModel):
    kind: FlipKind
    path: str
    sha256: str
    truth: str
    baseline_predicted: str
    challenger_predicted: str
    baseline_confidence: float  # probability of the class each model predicted
    challenger_confidence: float


class VerdictChanges(BaseModel):
    """Cells per `PER_CELLS` inspected, each model at its own operating point."""

    baseline: dict[str, float]
    challenger: dict[str, float]
    change: dict[str, float]  # challenger - baseline


class GateResult(BaseModel):
    metric: GateMetric
    margin: float
    passed: bool
    reason: str
    improvement: float  # B - A, or A - B where lower is better
    ci_low: float
    ci_high: float
    p_value: float | None = None  # McNemar, for accuracy


class PairComparison(BaseModel):
    baseline: str
    challenger: str
    differences: list[Difference]
    mcnemar: McNemar
    flips: list[Flip]
    verdicts: VerdictChanges
    gate: GateResult | None = None


class CompareReport(BaseModel):
    """compare.json."""

    format: Literal["cellinspect.compare/1"] = COMPARE_FORMAT
    heldout: HeldoutInfo
    models: list[str]
    evals: list[EvalReport]
    resamples: int
    seed: int
    confidence: float = CONFIDENCE
    pairs: list[PairComparison]
    created: datetime = Field(default_factory=lambda: datetime.now(UTC))

    @property
    def gate_passed(self) -> bool:
        return all(p.gate is None or p.gate.passed for p in self.pairs)


def bootstrap_weights(n: int, resamples: int, seed: int) -> Iterator[np.ndarray]:
    """Chunks of rows of per-image counts, each row one resample of n images with replacement."""
    rng = np.random.default_rng(seed)
    chunk = max(1, min(resamples, _WEIGHT_BUDGET // max(n, 1)))
    for start in range(0, resamples, chunk):
        rows = min(chunk, resamples - start)
        picks = rng.integers(0, n, size=(rows, n)) + n * np.arange(rows)[:, None]
        yield np.bincount(picks.ravel(), minlength=rows * n).reshape(rows, n).astype(np.float64)


def paired_bootstrap(
    evaluations: Sequence[Evaluation], *, resamples: int, seed: int
) -> list[dict[str, np.ndarray]]:
    """Per model, figure -> `resamples` values, every model scored on the same resamples."""
    n = len(evaluations[0].samples)
    tables: list[dict[str, list[np.ndarray]]] = [{} for _ in evaluations]
    for weights in bootstrap_weights(n, resamples, seed):
        for table, ev in zip(tables, evaluations, strict=True):
            for key, values in figure_table(ev.scored, ev.card.class_names, weights).items():
                table.setdefault(key, []).append(values)
    return [{k: np.concatenate(v) for k, v in t.items()} for t in tables]


def mcnemar_exact(baseline_correct: np.ndarray, challenger_correct: np.ndarray) -> McNemar:
    """Two-sided exact McNemar test (scipy's binomial test on the discordant pairs)."""
    from scipy.stats import binomtest

    fixed = int((~baseline_correct & challenger_correct).sum())
    broken = int((baseline_correct & ~challenger_correct).sum())
    p = 1.0 if fixed + broken == 0 else float(binomtest(fixed, fixed + broken, 0.5).pvalue)
    return McNemar(fixed=fixed, broken=broken, p_value=min(1.0, p))


def _interval(values: np.ndarray) -> tuple[float | None, float | None]:
    defined = values[~np.isnan(values)]
    if len(defined) == 0:
        return None, None
    tail = 100 * (1 - CONFIDENCE) / 2
    low, high = np.percentile(defined, [tail, 100 - tail])
    return float(low), float(high)


def _sub(b: float | None, a: float | None) -> float | None:
    return None if a is None or b is None else b - a


def differences(
    a: Evaluation, b: Evaluation, boot_a: dict[str, np.ndarray], boot_b: dict[str, np.ndarray]
) -> list[Difference]:
    flat_a, flat_b = a.report.figures.flat(), b.report.figures.flat()
    rows = []
    for figure, value_a in flat_a.items():
        value_b = flat_b.get(figure)
        low, high = _interval(boot_b[figure] - boot_a[figure])
        rows.append(
            Difference(
                figure=figure,
                baseline=value_a,
                challenger=value_b,
                diff=_sub(value_b, value_a),
                ci_low=low,
                ci_high=high,
                higher_is_better=higher_is_better(figure),
            )
        )
    return rows


def flips(a: Evaluation, b: Evaluation) -> list[Flip]:
    """Images one model gets right and the other wrong, fixed first, most confident first."""
    names = a.card.class_names
    ca, cb = a.scored.correct, b.scored.correct
    pa, pb = a.scored.predicted, b.scored.predicted
    conf_a, conf_b = a.scored.probs.max(axis=1), b.scored.probs.max(axis=1)
    groups: tuple[tuple[FlipKind, np.ndarray, np.ndarray], ...] = (
        ("fixed", ~ca & cb, conf_a),
        ("broken", ca & ~cb, conf_b),
    )
    out = []
    for kind, mask, confidence in groups:
        for i in sorted(np.flatnonzero(mask), key=lambda i: -confidence[i]):
            s = a.samples[i]
            out.append(
                Flip(
                    kind=kind,
                    path=s.path,
                    sha256=s.sha256 or "",
                    truth=s.label,
                    baseline_predicted=names[pa[i]],
                    challenger_predicted=names[pb[i]],
                    baseline_confidence=round(float(conf_a[i]), 6),
                    challenger_confidence=round(float(conf_b[i]), 6),
                )
            )
    return out


def verdict_rates(ev: Evaluation) -> dict[str, float]:
    """Scrapped, escaped, falsely scrapped, reviewed and passed cells per PER_CELLS."""
    v, defect = ev.scored.verdicts, ev.scored.is_defect
    counts = {
        "scrapped": v == VerdictCode.SCRAP,
        "escaped": (v == VerdictCode.PASS) & defect,
        "false_scrapped": (v == VerdictCode.SCRAP) & ~defect,
        "reviewed": v == VerdictCode.REVIEW,
        "passed": v == VerdictCode.PASS,
    }
    return {k: round(PER_CELLS * float(m.mean()), 2) for k, m in counts.items()}


def gate_decision(
    metric: GateMetric, margin: float, rows: list[Difference], mcnemar: McNemar
) -> GateResult:
    """Apply the rule in `GATE_HELP`; ValueError when the metric is undefined on this set."""
    if margin < 0 or not math.isfinite(margin):
        raise ValueError(f"the gate margin must be a number >= 0, got {margin}")
    row = next(r for r in rows if r.figure == metric.value)
    if row.diff is None or row.ci_low is None or row.ci_high is None:
        raise ValueError(
            f"cannot gate on {metric.value}: it is undefined on this held-out set "
            "(e.g. no defective or no good images)"
        )
    sign = 1.0 if metric.higher_is_better else -1.0
    low, high = sorted((sign * row.ci_low, sign * row.ci_high))
    improvement = sign * row.diff
    worse = high < -margin
    p_value = mcnemar.p_value if metric is GateMetric.ACCURACY else None
    if worse and p_value is not None:
        worse = p_value < MCNEMAR_ALPHA and mcnemar.broken > mcnemar.fixed
    direction = "" if metric.higher_is_better else " (lower is better)"
    summary = (
        f"{metric.value}{direction}: B - A = {row.diff:+.4f}, improvement 95% CI "
        f"[{low:+.4f}, {high:+.4f}], margin {margin:g}"
    )
    if p_value is not None:
        summary += f", McNemar p = {p_value:.3g} ({mcnemar.fixed} fixed, {mcnemar.broken} broken)"
    verdict = "worse beyond the margin" if worse else "not shown worse beyond the margin"
    return GateResult(
        metric=metric,
        margin=margin,
        passed=not worse,
        reason=f"{verdict}: {summary}",
        improvement=improvement,
        ci_low=low,
        ci_high=high,
        p_value=p_value,
    )


def compare_evaluations(
    evaluations: Sequence[Evaluation],
    *,
    gate: tuple[GateMetric, float] | None = None,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> CompareReport:
    """Compare evaluations[1:] each with evaluations[0] on the same held-out set."""
    if len(evaluations) < 2:
        raise ValueError("compare needs at least two models")
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, got {resamples}")
    first = evaluations[0]
    for ev in evaluations[1:]:
        if ev.report.heldout.manifest_hash != first.report.heldout.manifest_hash:
            raise ValueError(f"{ev.label} was evaluated on other data than {first.label}")
        if ev.card.class_names != first.card.class_names:
            raise ValueError(
                f"{ev.label} has classes {ev.card.class_names}, {first.label} has "
                f"{first.card.class_names}: per-image comparison needs the same classes"
            )
    boot = paired_bootstrap(evaluations, resamples=resamples, seed=seed)
    pairs = []
    for ev, ev_boot in zip(evaluations[1:], boot[1:], strict=True):
        rows = differences(first, ev, boot[0], ev_boot)
        test = mcnemar_exact(first.scored.correct, ev.scored.correct)
        base_rates, rates = verdict_rates(first), verdict_rates(ev)
        pairs.append(
            PairComparison(
                baseline=first.label,
                challenger=ev.label,
                differences=rows,
                mcnemar=test,
                flips=flips(first, ev),
                verdicts=VerdictChanges(
                    baseline=base_rates,
                    challenger=rates,
                    change={k: round(rates[k] - base_rates[k], 2) for k in rates},
                ),
                gate=None if gate is None else gate_decision(gate[0], gate[1], rows, test),
            )
        )
    return CompareReport(
        heldout=first.report.heldout,
        models=[ev.label for ev in evaluations],
        evals=[ev.report for ev in evaluations],
        resamples=resamples,
        seed=seed,
        pairs=pairs,
    )
