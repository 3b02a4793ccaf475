"""Live comparison of a served model and its shadow candidate: agreement, changes, sign test."""

from __future__ import annotations

import pytest

from cellinspect.models.card import Verdict
from cellinspect.models.shadow import ShadowTally, compare_live, scrap_sign_test

P, R, S = Verdict.PASS, Verdict.REVIEW, Verdict.SCRAP


def tally(verdict: Verdict, candidate: Verdict, count: int, *, label: str = "good", **kw: str):
    return ShadowTally(
        version=kw.get("version", "4"),
        candidate_version=kw.get("candidate_version", "5"),
        label=label,
        candidate_label=kw.get("candidate_label", label),
        verdict=verdict,
        candidate_verdict=candidate,
        count=count,
    )


def test_agreement_matrix_and_changes_per_10000() -> None:
    (c,) = compare_live(
        "cells",
        [
            tally(P, P, 9_000),
            tally(S, S, 900, label="crack"),
            tally(P, S, 60, candidate_label="crack"),
            tally(S, P, 20, label="crack"),
            tally(R, S, 20, label="crack"),
        ],
    )
    assert (c.version, c.candidate_version, c.n) == ("4", "5", 10_000)
    assert c.verdict_agreement == pytest.approx(0.99)
    assert c.label_agreement == pytest.approx(0.994)  # only pass->scrap changed label
    assert c.verdict_matrix["pass"] == {"pass": 9_000, "review": 0, "scrap": 60}
    assert c.changes["pass->scrap"] == 60 and c.changes["scrap->pass"] == 20
    assert c.rates["candidate"]["scrap"] - c.rates["served"]["scrap"] == 60
    test = c.scrap_test
    assert (test.more, test.fewer) == (80, 20)  # pass->scrap + review->scrap vs scrap->pass
    assert test.p_value < 1e-8 and test.conclusion == "scraps more"


def test_one_comparison_per_version_pair() -> None:
    found = compare_live(
        "cells", [tally(P, P, 3, version="10"), tally(P, P, 2, version="9"), tally(S, P, 1)]
    )
    assert [(c.version, c.n) for c in found] == [("4", 1), ("9", 2), ("10", 3)]
    assert compare_live("cells", []) == []


@pytest.mark.parametrize(
    ("more", "fewer", "conclusion"),
    [
        (0, 0, "no significant difference"),
        (6, 4, "no significant difference"),
        (2, 30, "scraps fewer"),
    ],
)
def test_scrap_sign_test(more: int, fewer: int, conclusion: str) -> None:
    test = scrap_sign_test(more, fewer)
    assert test.conclusion == conclusion
    assert 0 <= test.p_value <= 1
