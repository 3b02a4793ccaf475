"""Evaluation on frozen held-out sets: figures, the cache, the leakage guard and the report."""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from qakit import (
    BINARY,
    STRONG,
    brightness_set,
    flat_png,
    manifest_of,
    publish_binary,
    trained_on,
    write_set,
)
from sklearn import metrics as skm
from sklearn.preprocessing import label_binarize

from cellinspect.datasets.heldout import HeldoutChangedError, freeze_heldout
from cellinspect.datasets.manifest import Manifest
from cellinspect.datasets.samples import Sample, Split
from cellinspect.models import evaluate as evaluate_module
from cellinspect.models.calibration import expected_calibration_error
from cellinspect.models.card import OperatingPoint
from cellinspect.models.evaluate import EvalReport, Evaluation, evaluate_model
from cellinspect.models.figures import ScoredImages, figure_table
from cellinspect.models.leakage import (
    TRAINING_HASHES_FILE,
    LeakageError,
    LeakageStatus,
    training_hashes_text,
)
from cellinspect.models.predict import LoadedModel
from cellinspect.models.report import GALLERY_SIZE, write_eval_outputs
from cellinspect.models.store import ModelStore

POINT = OperatingPoint(review_low=0.3, scrap_threshold=0.7)  # with a review band


@dataclass
class Setup:
    tmp: Path
    store: ModelStore
    manifest_path: Path
    manifest: Manifest

    def evaluate(self, ref: str, **kwargs: object) -> Evaluation:
        return evaluate_model(
            self.store,
            ref,
            "held",
            heldout_root=self.tmp / "heldout",
            evals_root=self.tmp / "evals",
            **kwargs,  # type: ignore[arg-type]
        )


@pytest.fixture
def setup(tmp_path: Path) -> Setup:
    manifest_path, manifest = write_set(tmp_path / "held", brightness_set())
    freeze_heldout(manifest_path, "held", root=tmp_path / "heldout")
    return Setup(tmp_path, ModelStore(tmp_path / "store"), manifest_path, manifest)


def test_figures_agree_with_sklearn_on_the_same_predictions(setup: Setup) -> None:
    card = publish_binary(setup.store, setup.tmp, operating_point=POINT, temperature=2.0)
    ev = setup.evaluate(f"tiny@{card.version}", allow_overlap=True)
    # The probabilities are the service's: LoadedModel on the files, in the set's order.
    served = LoadedModel.load(setup.store, "tiny@1").predict_files([s.path for s in ev.samples])
    np.testing.assert_allclose(ev.scored.probs, served, rtol=1e-6)
    y = np.array([BINARY.index(s.label) for s in ev.samples])
    pred, defect_p = served.argmax(axis=1), 1.0 - served[:, 0]
    f = ev.report.figures
    assert f.accuracy == pytest.approx(skm.accuracy_score(y, pred))
    assert f.balanced_accuracy == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert f.macro_f1 == pytest.approx(skm.f1_score(y, pred, average="macro"))
    precision, recall, f1, support = skm.precision_recall_fscore_support(y, pred)
    for j, name in enumerate(BINARY):
        got = f.per_class[name]
        assert (got.precision, got.recall, got.f1) == pytest.approx(
            (precision[j], recall[j], f1[j])
        )
        assert got.support == support[j]
    assert f.roc_auc == pytest.approx(skm.roc_auc_score(y != 0, defect_p))
    assert f.pr_auc == pytest.approx(skm.average_precision_score(y != 0, defect_p))
    assert f.confusion == skm.confusion_matrix(y, pred).tolist()
    assert f.ece == pytest.approx(expected_calibration_error(served, y))
    verdicts = np.array([POINT.verdict(float(p)).value for p in defect_p])
    defect = y != 0
    assert f.verdicts.scrap_rate == pytest.approx(np.mean(verdicts == "scrap"))
    assert f.verdicts.review_rate == pytest.approx(np.mean(verdicts == "review"))
    assert f.verdicts.escape_rate == pytest.approx(np.mean(verdicts[defect] == "pass"))
    assert f.verdicts.false_scrap_rate == pytest.approx(np.mean(verdicts[~defect] == "scrap"))
    assert 0 < f.verdicts.review_rate < 1  # the band is exercised
    t = ev.report.throughput
    assert t.images_per_second > 0 and t.batch_size == 8 and t.threads >= 1


@pytest.mark.parametrize("k", [3, 4])
def test_multiclass_and_weighted_figures_agree_with_sklearn(k: int) -> None:
    rng = np.random.default_rng(k)
    n = 400
    y = rng.integers(0, k, n)
    logits = np.round(rng.normal(size=(n, k)) + 1.5 * np.eye(k)[y], 1)  # rounded: ties
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    scored = ScoredImages(labels=y, probs=probs, good_index=0, verdicts=rng.integers(0, 3, n))
    w = rng.integers(0, 4, n).astype(float)
    table = figure_table(scored, [f"c{j}" for j in range(k)], np.vstack([np.ones(n), w]))
    pred = probs.argmax(axis=1)
    for row, weight in enumerate([None, w]):
        assert table["accuracy"][row] == pytest.approx(
            skm.accuracy_score(y, pred, sample_weight=weight)
        )
        assert table["macro_f1"][row] == pytest.approx(
            skm.f1_score(y, pred, average="macro", sample_weight=weight)
        )
        assert table["balanced_accuracy"][row] == pytest.approx(
            skm.balanced_accuracy_score(y, pred, sample_weight=weight)
        )
        assert table["defect_roc_auc"][row] == pytest.approx(
            skm.roc_auc_score(y != 0, 1 - probs[:, 0], sample_weight=weight)
        )
        assert table["defect_pr_auc"][row] == pytest.approx(
            skm.average_precision_score(y != 0, 1 - probs[:, 0], sample_weight=weight)
        )
    onehot = label_binarize(y, classes=range(k))
    assert table["roc_auc"][0] == pytest.approx(skm.roc_auc_score(y, probs, multi_class="ovr"))
    assert table["pr_auc"][0] == pytest.approx(skm.average_precision_score(onehot, probs))
    assert table["ece"][0] == pytest.approx(expected_calibration_error(probs, y))


def test_second_evaluation_is_served_from_the_cache(
    setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    real = evaluate_module.run_inference

    def counting(*args: object, **kwargs: object) -> np.ndarray:
        calls.append(1)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(evaluate_module, "run_inference", counting)
    card = publish_binary(setup.store, setup.tmp)
    first = setup.evaluate("tiny@1", allow_overlap=True)
    second = setup.evaluate("tiny@1", allow_overlap=True)
    assert len(calls) == 1 and not first.report.cached and second.report.cached
    assert second.report.figures == first.report.figures
    assert second.report.throughput == first.report.throughput
    # The same ONNX file re-published with another operating point: cached logits, new verdicts.
    onnx_path = setup.store.path("tiny@1") / "model.onnx"
    setup.store.publish(onnx_path, card.model_copy(update={"operating_point": POINT}))
    third = setup.evaluate("tiny@2", allow_overlap=True)
    assert len(calls) == 1 and third.report.cached
    assert third.report.figures.verdicts != first.report.figures.verdicts
    assert setup.evaluate("tiny@1", allow_overlap=True, use_cache=False).report.cached is False
    assert len(calls) == 2


def test_changed_heldout_file_is_refused(setup: Setup) -> None:
    publish_binary(setup.store, setup.tmp)
    victim = Path(setup.manifest.samples[3].path)
    victim.write_bytes(victim.read_bytes() + b"\0")
    with pytest.raises(HeldoutChangedError, match=re.escape(victim.name)):
        setup.evaluate("tiny@1", allow_overlap=True)


def test_overlap_with_training_data_is_refused_without_allow_overlap(setup: Setup) -> None:
    # The training set holds byte-identical copies of four held-out images, plus two others.
    train_dir = setup.tmp / "train"
    samples = [
        Sample(path=str(flat_png(train_dir / "x" / f"{v}.png", v)), label=label)
        for v, label in [(1, "good"), (255, "defect")]
    ]
    for s in setup.manifest.samples[:4]:
        copy = train_dir / s.label / Path(s.path).name
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(s.path, copy)
        samples.append(Sample(path=str(copy), label=s.label, split=Split.TRAIN))
    train_path, train = manifest_of(samples, train_dir / "manifest.json")
    publish_binary(setup.store, setup.tmp, **trained_on(train_path, train))
    with pytest.raises(LeakageError, match="4 of 60 held-out images were used to train"):
        setup.evaluate("tiny@1")
    ev = setup.evaluate("tiny@1", allow_overlap=True)
    assert ev.report.leakage.status is LeakageStatus.OVERLAP_ALLOWED
    assert ev.report.leakage.shared == 4


def test_disjoint_training_data_passes_and_test_split_overlap_is_only_reported(
    setup: Setup,
) -> None:
    train_dir = setup.tmp / "train"
    samples = [
        Sample(path=str(flat_png(train_dir / label / f"{v}.png", v)), label=label, split=split)
        for v, label, split in [(3, "good", Split.TRAIN), (250, "defect", Split.VAL)]
    ]
    # One held-out image is in the training manifest's test split: reported, not refused.
    held = setup.manifest.samples[0]
    samples.append(held.model_copy(update={"split": Split.TEST}))
    train_path, train = manifest_of(samples, train_dir / "manifest.json")
    publish_binary(setup.store, setup.tmp, **trained_on(train_path, train))
    leakage = setup.evaluate("tiny@1").report.leakage
    assert leakage.status is LeakageStatus.CLEAN
    assert (leakage.shared, leakage.shared_test) == (0, 1)
    assert leakage.source == str(train_path)


def test_unrecorded_or_lost_training_data_is_refused_unless_allowed(setup: Setup) -> None:
    publish_binary(setup.store, setup.tmp)  # a card without training data
    with pytest.raises(LeakageError, match="does not record its training data.*--allow-overlap"):
        setup.evaluate("tiny@1")
    train_path, train = write_set(setup.tmp / "train", [(3, "good"), (250, "defect")])
    publish_binary(setup.store, setup.tmp, **trained_on(train_path, train))
    train_path.unlink()  # the training manifest is gone
    with pytest.raises(LeakageError, match="cannot be found"):
        setup.evaluate("tiny@2")
    report = setup.evaluate("tiny@2", allow_overlap=True).report
    assert report.leakage.status is LeakageStatus.UNVERIFIED
    assert "NOT CHECKED" in report.leakage.message


def test_training_hashes_file_in_the_store_is_used_when_it_matches_the_card(
    setup: Setup,
) -> None:
    train_path, train = write_set(setup.tmp / "train", [(3, "good"), (250, "defect")])
    fields = trained_on(train_path, train) | {"training_config": {}}  # nothing to look up
    publish_binary(setup.store, setup.tmp, **fields)
    hashes = setup.store.path("tiny@1") / TRAINING_HASHES_FILE
    hashes.write_text(training_hashes_text(train))
    assert setup.evaluate("tiny@1").report.leakage.status is LeakageStatus.CLEAN
    hashes.write_text(training_hashes_text(setup.manifest))  # other data than the card names
    with pytest.raises(LeakageError, match="lists data with hash"):
        setup.evaluate("tiny@1")


def test_report_html_is_self_contained_and_embeds_every_image(setup: Setup) -> None:
    publish_binary(setup.store, setup.tmp, weights=STRONG)
    ev = setup.evaluate("tiny@1", allow_overlap=True)
    written = write_eval_outputs(ev, setup.tmp / "out")
    assert {p.name for p in written} == {
        "eval.json",
        "summary.md",
        "predictions.csv",
        "report.html",
    }
    page = (setup.tmp / "out" / "report.html").read_text()
    wrong = int((~ev.scored.correct).sum())
    plots = 4  # confusion, ROC + PR, reliability, score histograms
    assert 0 < wrong <= GALLERY_SIZE
    assert page.count('<img src="data:image/png;base64,') == plots + wrong
    assert re.findall(r'(?:src|href)="(?!data:)', page) == []
    assert "<script" not in page and "<link" not in page and "url(" not in page
    report = EvalReport.model_validate_json((setup.tmp / "out" / "eval.json").read_text())
    assert report.figures == ev.report.figures
    rows = (setup.tmp / "out" / "predictions.csv").read_text().splitlines()
    assert len(rows) == 1 + len(ev.samples)
