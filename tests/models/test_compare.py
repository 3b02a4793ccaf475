"""Comparing versions: paired bootstrap, exact McNemar, flips, verdict changes and the gate."""

from __future__ import annotations

import re
from math import comb
from pathlib import Path

import numpy as np
import pytest
from qakit import STRONG, WEAK, brightness_set, publish_binary, write_set

from cellinspect.datasets.heldout import freeze_heldout
from cellinspect.models.compare import (
    GateMetric,
    bootstrap_weights,
    compare_evaluations,
    mcnemar_exact,
)
from cellinspect.models.evaluate import Evaluation, evaluate_model
from cellinspect.models.report import FLIP_GALLERY_SIZE, write_compare_outputs
from cellinspect.models.store import ModelStore

# Calls 'defect' only from pixel value ~160: defects between 128 and 159 escape.
LATE = (np.array([[-4.0, 4.0]], np.float32), np.array([2.0, -2.0], np.float32))


@pytest.fixture
def evaluations(tmp_path: Path) -> dict[str, Evaluation]:
    """The strong model (v1), its weaker variant (v2), a late one (v3) and a copy of v1 (v4)."""
    manifest_path, _ = write_set(tmp_path / "held", brightness_set())
    freeze_heldout(manifest_path, "held", root=tmp_path / "heldout")
    store = ModelStore(tmp_path / "store")
    for weights in (STRONG, WEAK, LATE, STRONG):
        publish_binary(store, tmp_path, weights)
    return {
        name: evaluate_model(
            store,
            f"tiny@{version}",
            "held",
            heldout_root=tmp_path / "heldout",
            evals_root=tmp_path / "evals",
            allow_overlap=True,
        )
        for name, version in (("strong", 1), ("weak", 2), ("late", 3), ("copy", 4))
    }


def test_mcnemar_p_value_matches_a_hand_computation() -> None:
    # 8 images fixed, 2 broken, 5 right by both, 3 wrong by both.
    a = np.array([0] * 8 + [1] * 2 + [1] * 5 + [0] * 3, bool)
    b = np.array([1] * 8 + [0] * 2 + [1] * 5 + [0] * 3, bool)
    result = mcnemar_exact(a, b)
    assert (result.fixed, result.broken) == (8, 2)
    # Two-sided exact binomial test at 1/2: 2 * P(X <= 2), X ~ Bin(10, 1/2) = 112 / 1024.
    expected = 2 * sum(comb(10, k) for k in range(3)) / 2**10
    assert result.p_value == pytest.approx(expected) == pytest.approx(0.109375)
    assert mcnemar_exact(a, a).p_value == 1.0  # no discordant image


def test_bootstrap_weights_resample_every_row_to_n_images() -> None:
    chunks = list(bootstrap_weights(50, 300, seed=7))
    weights = np.vstack(chunks)
    assert weights.shape == (300, 50) and (weights.sum(axis=1) == 50).all()
    np.testing.assert_array_equal(weights, np.vstack(list(bootstrap_weights(50, 300, seed=7))))


def test_weaker_version_fails_the_accuracy_gate(evaluations: dict[str, Evaluation]) -> None:
    report = compare_evaluations(
        [evaluations["strong"], evaluations["weak"]], gate=(GateMetric.ACCURACY, 0.0)
    )
    pair = report.pairs[0]
    assert pair.gate is not None and not pair.gate.passed and not report.gate_passed
    assert pair.gate.reason.startswith("worse beyond the margin: accuracy")
    assert pair.gate.ci_high < 0 and pair.gate.p_value is not None and pair.gate.p_value < 0.05
    # The weak model calls the good images between ~96 and 127 defective, and nothing else.
    assert pair.mcnemar.fixed == 0 and pair.mcnemar.broken > 0
    broken = [f for f in pair.flips if f.kind == "broken"]
    assert len(broken) == pair.mcnemar.broken
    assert all(f.truth == "good" and f.challenger_predicted == "defect" for f in broken)
    values = [int(re.search(r"-(\d+)\.png$", f.path).group(1)) for f in broken]  # type: ignore[union-attr]
    assert all(96 <= v < 128 for v in values)
    # Each broken image is a good cell scrapped: per 10,000 cells, that many more scraps.
    change = pair.verdicts.change
    assert change["false_scrapped"] == pytest.approx(10_000 * len(broken) / 60, abs=0.01)
    assert change["escaped"] == 0


def test_a_loose_margin_lets_the_weaker_version_pass(evaluations: dict[str, Evaluation]) -> None:
    report = compare_evaluations(
        [evaluations["strong"], evaluations["weak"]], gate=(GateMetric.ACCURACY, 0.5)
    )
    assert report.gate_passed


def test_equal_versions_pass_every_gate_with_zero_intervals(
    evaluations: dict[str, Evaluation],
) -> None:
    for metric in GateMetric:
        report = compare_evaluations(
            [evaluations["strong"], evaluations["copy"]], gate=(metric, 0.0), resamples=200
        )
        assert report.gate_passed, metric
        pair = report.pairs[0]
        assert pair.flips == [] and pair.mcnemar.p_value == 1.0
        for row in pair.differences:
            assert row.diff in (0.0, None) and row.ci_low in (0.0, None), row


def test_lower_is_better_gates_look_the_right_way(evaluations: dict[str, Evaluation]) -> None:
    pair = [evaluations["strong"], evaluations["late"]]
    escape = compare_evaluations(pair, gate=(GateMetric.ESCAPE_RATE, 0.0)).pairs[0]
    assert escape.gate is not None and not escape.gate.passed
    assert "escape_rate (lower is better)" in escape.gate.reason
    row = next(r for r in escape.differences if r.figure == "escape_rate")
    assert row.diff is not None and row.diff > 0 and row.ci_low is not None and row.ci_low > 0
    # The late model scraps fewer good cells: its false-scrap gate passes.
    scrap = compare_evaluations(pair, gate=(GateMetric.FALSE_SCRAP_RATE, 0.0)).pairs[0]
    assert scrap.gate is not None and scrap.gate.passed


def test_bootstrap_is_reproducible_with_its_seed(evaluations: dict[str, Evaluation]) -> None:
    pair = [evaluations["strong"], evaluations["weak"]]
    first = compare_evaluations(pair, resamples=300, seed=3).pairs[0].differences
    again = compare_evaluations(pair, resamples=300, seed=3).pairs[0].differences
    other = compare_evaluations(pair, resamples=300, seed=4).pairs[0].differences
    assert first == again and first != other


def test_three_models_compare_each_with_the_first(evaluations: dict[str, Evaluation]) -> None:
    report = compare_evaluations(
        [evaluations["strong"], evaluations["weak"], evaluations["copy"]],
        gate=(GateMetric.MACRO_F1, 0.0),
        resamples=200,
    )
    assert [(p.baseline, p.challenger) for p in report.pairs] == [
        ("tiny@1", "tiny@2"),
        ("tiny@1", "tiny@4"),
    ]
    assert [p.gate.passed for p in report.pairs if p.gate] == [False, True]


def test_compare_html_shows_the_flips_as_embedded_thumbnails(
    evaluations: dict[str, Evaluation], tmp_path: Path
) -> None:
    evs = [evaluations["strong"], evaluations["weak"]]
    report = compare_evaluations(evs, resamples=200)
    written = write_compare_outputs(report, evs, tmp_path / "cmp")
    assert {p.name for p in written} == {"compare.json", "summary.md", "compare.html"}
    page = (tmp_path / "cmp" / "compare.html").read_text()
    flips = min(len(report.pairs[0].flips), FLIP_GALLERY_SIZE)
    assert page.count('<img src="data:image/png;base64,') == 1 + flips  # ROC/PR + thumbnails
    assert re.findall(r'(?:src|href)="(?!data:)', page) == []


def test_models_with_other_classes_are_not_compared(evaluations: dict[str, Evaluation]) -> None:
    strong = evaluations["strong"]
    renamed = strong.card.model_copy(update={"class_names": ["ok", "bad"], "good_class": "ok"})
    other = Evaluation(strong.report, strong.scored, strong.samples, renamed)
    with pytest.raises(ValueError, match="same classes"):
        compare_evaluations([strong, other])
