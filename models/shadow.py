"""Served model vs shadow candidate on live inspections: agreement and verdict changes.

Live images carry no truth labels, so this does not say which model is right. It says how
often the candidate would have answered differently, in which direction (per `PER_CELLS`
inspections), and whether it scraps more or fewer cells than the served model: an exact
sign test (McNemar on the scrap decision) over the inspections where exactly one of the
two says scrap.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from pydantic import BaseModel

from cellinspect.models.card import Verdict
from cellinspect.models.compare import MCNEMAR_ALPHA, PER_CELLS


@dataclass(frozen=True)
class ShadowTally:
    """Inspections that share a version pair, both labels and both verdicts."""

    version: str  # served version that answered
    candidate_version: str
    label: str
    candidate_label: str
    verdict: Verdict
    candidate_verdict: Verdict
    count: int


class ScrapSignTest(BaseModel):
    """Exact two-sided binomial test of `more` among the discordant scrap decisions at p = 1/2."""

    more: int  # the candidate scraps, the served model does not
    fewer: int  # the served model scraps, the candidate does not
    p_value: float  # 1.0 without discordant decisions
    conclusion: str  # "scraps more", "scraps fewer" or "no significant difference"


class LiveComparison(BaseModel):
    """One served version vs one candidate version over the same live inspections."""

    model: str
    version: str
    candidate_version: str
    n: int
    label_agreement: float  # share of inspections with the same label
    verdict_agreement: float  # share with the same verdict
    # verdict_matrix[served][candidate]: inspections, every verdict present in both keys
    verdict_matrix: dict[str, dict[str, int]]
    # Per PER_CELLS inspections: verdict rates of both models, and each change "from->to"
    rates: dict[str, dict[str, float]]
    changes: dict[str, float]
    scrap_test: ScrapSignTest


def _per_cells(count: int, n: int) -> float:
    return round(PER_CELLS * count / n, 2)


def scrap_sign_test(more: int, fewer: int, *, alpha: float = MCNEMAR_ALPHA) -> ScrapSignTest:
    """Does the candidate scrap more or fewer cells? Exact binomial test on the discordant pairs."""
    from scipy.stats import binomtest  # scipy comes with scikit-learn; not loaded by the service

    total = more + fewer
    p = 1.0 if total == 0 else min(1.0, float(binomtest(more, total, 0.5).pvalue))
    if p >= alpha or more == fewer:
        conclusion = "no significant difference"
    else:
        conclusion = "scraps more" if more > fewer else "scraps fewer"
    return ScrapSignTest(more=more, fewer=fewer, p_value=p, conclusion=conclusion)


def compare_live(model: str, tallies: Iterable[ShadowTally]) -> list[LiveComparison]:
    """One comparison per (served version, candidate version) pair, oldest versions first."""
    groups: dict[tuple[str, str], list[ShadowTally]] = {}
    for t in tallies:
        groups.setdefault((t.version, t.candidate_version), []).append(t)
    return [
        _compare_pair(model, version, candidate, groups[(version, candidate)])
        for version, candidate in sorted(
            groups, key=lambda k: (_version_key(k[0]), _version_key(k[1]))
        )
    ]


def _version_key(version: str) -> tuple[int, str]:
    return (int(version), "") if version.isdigit() else (0, version)


def _compare_pair(
    model: str, version: str, candidate: str, tallies: list[ShadowTally]
) -> LiveComparison:
    verdicts = [v.value for v in Verdict]
    matrix = {a: dict.fromkeys(verdicts, 0) for a in verdicts}
    n = same_label = 0
    for t in tallies:
        n += t.count
        same_label += t.count if t.label == t.candidate_label else 0
        matrix[t.verdict.value][t.candidate_verdict.value] += t.count
    same_verdict = sum(matrix[v][v] for v in verdicts)
    served_counts = {v: sum(matrix[v].values()) for v in verdicts}
    candidate_counts = {v: sum(row[v] for row in matrix.values()) for v in verdicts}
    scrap = Verdict.SCRAP.value
    more = sum(matrix[v][scrap] for v in verdicts if v != scrap)
    fewer = sum(matrix[scrap][v] for v in verdicts if v != scrap)
    return LiveComparison(
        model=model,
        version=version,
        candidate_version=candidate,
        n=n,
        label_agreement=same_label / n,
        verdict_agreement=same_verdict / n,
        verdict_matrix=matrix,
        rates={
            "served": {v: _per_cells(c, n) for v, c in served_counts.items()},
            "candidate": {v: _per_cells(c, n) for v, c in candidate_counts.items()},
        },
        changes={
            f"{a}->{b}": _per_cells(matrix[a][b], n) for a in verdicts for b in verdicts if a != b
        },
        scrap_test=scrap_sign_test(more, fewer),
    )
