"""ELPV figures for RESULTS.md: a published model on the paper's held-out test quarter.

    python benchmarks/eval_elpv.py NAME[@VERSION] --data HOME/datasets/elpv-binary/manifest.json

Runs the ONNX model through `models.predict` (exactly what the service runs) on the
manifest's test split, and prints accuracy, ROC-AUC, F1 of the defective class, the same
for mono and poly cells separately, the verdict-level figures at the card's operating
point (automatic-decision accuracy, review rate, escape rate, false-scrap rate), and the
ROC-AUC between pairs of expert grades (0 vs 1: the unambiguous cells alone). Binary
tasks only (defective = not the card's good class). Next to the published anchors of
Deitsch et al. (Solar Energy 2019): CNN 88.42%, SVM 82.44% binary accuracy.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

from cellinspect.datasets.decode import read_image
from cellinspect.datasets.manifest import load_manifest
from cellinspect.home import Home
from cellinspect.models.card import Verdict
from cellinspect.models.predict import LoadedModel
from cellinspect.models.store import ModelStore

ANCHORS = {"Deitsch 2019 CNN (VGG-19, ImageNet-pretrained)": 0.8842, "Deitsch 2019 SVM": 0.8244}


def figures(defect_p: np.ndarray, truth: np.ndarray, verdicts: list[Verdict]) -> dict[str, float]:
    """Threshold-free and p >= 0.5 figures (as the anchors), then the card's verdicts."""
    plain = defect_p >= 0.5  # the argmax of a binary model, temperature or not
    scrap = np.array([v is Verdict.SCRAP for v in verdicts], bool)
    review = np.array([v is Verdict.REVIEW for v in verdicts], bool)
    auto = ~review
    return {
        "n": len(truth),
        "accuracy": float(accuracy_score(truth, plain)),
        "roc_auc": float(roc_auc_score(truth, defect_p)) if len(set(truth)) == 2 else float("nan"),
        "f1_defective": float(f1_score(truth, plain, zero_division=0)),
        "review_rate": float(review.mean()),
        "auto_accuracy": float((scrap[auto] == truth[auto]).mean()) if auto.any() else 1.0,
        "escape_rate": float((truth & auto & ~scrap).sum() / max(truth.sum(), 1)),
        "false_scrap_rate": float((~truth & scrap).sum() / max((~truth).sum(), 1)),
    }


GRADE_PAIRS = ((0.0, 1.0), (0.0, 2 / 3), (1 / 3, 1.0), (1 / 3, 2 / 3))


def grade_aucs(defect_p: np.ndarray, grades: np.ndarray) -> dict[str, float]:
    """ROC-AUC between pairs of ELPV expert grades (defect probabilities 0, 1/3, 2/3, 1).

    0 vs 1 leaves out every ambiguous cell: a low figure there is the model's failing, not
    the labels' noise."""
    out = {}
    for low, high in GRADE_PAIRS:
        keep = np.isclose(grades, low) | np.isclose(grades, high)
        truth = np.isclose(grades[keep], high)
        name = f"{low:.2f} vs {high:.2f}"
        out[name] = (
            float(roc_auc_score(truth, defect_p[keep]))
            if 0 < truth.sum() < keep.sum()
            else float("nan")
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", help="NAME, NAME@VERSION or NAME@ALIAS in the store")
    parser.add_argument("--data", type=Path, required=True, help="ELPV manifest.json")
    parser.add_argument("--store", type=Path, default=None, help="model store [HOME/store]")
    parser.add_argument("--split", default="test")
    args = parser.parse_args()
    store = ModelStore(args.store or Home.resolve().store)
    model = LoadedModel.load(store, args.model)
    card = model.card
    samples = [s for s in load_manifest(args.data).samples if s.split == args.split]
    start = time.perf_counter()
    probs = model.predict([read_image(s.path) for s in samples])
    seconds = time.perf_counter() - start
    defect_p = 1.0 - probs[:, card.good_index]
    truth = np.array([s.label != card.good_class for s in samples])
    verdicts = [card.operating_point.verdict(float(p)) for p in defect_p]
    point = card.operating_point
    print(
        f"{card.name}@{card.version} ({card.arch}, {card.preprocessing.height}²) on the "
        f"{args.split} split of {args.data}: {len(samples)} images in {seconds:.1f} s; "
        f"operating point review_low {point.review_low:.3f}, scrap {point.scrap_threshold:.3f}"
        f" ({point.method}), temperature {card.temperature:.3f}\n"
    )
    cells = {"all": np.ones(len(samples), bool)}
    for kind in ("mono", "poly"):
        cells[kind] = np.array([s.metadata.get("type") == kind for s in samples])
    print(
        "| cells | n | accuracy (p >= 0.5) | ROC-AUC | F1 (defective) | auto-decided accuracy | "
        "review rate | escape rate | false-scrap rate |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for kind, chosen in cells.items():
        verdict_list = [v for v, c in zip(verdicts, chosen, strict=True) if c]
        f = figures(defect_p[chosen], truth[chosen], verdict_list)
        print(
            f"| {kind} | {f['n']} | {f['accuracy']:.4f} | {f['roc_auc']:.4f} | "
            f"{f['f1_defective']:.4f} | {f['auto_accuracy']:.4f} | {f['review_rate']:.3f} | "
            f"{f['escape_rate']:.3f} | {f['false_scrap_rate']:.3f} |"
        )
    grades = np.array([float(s.metadata.get("probability", "nan")) for s in samples])
    if not np.isnan(grades).any():
        pairs = ", ".join(f"{k}: {v:.4f}" for k, v in grade_aucs(defect_p, grades).items())
        print(f"\nROC-AUC between expert grades: {pairs}")
    accuracy = float(accuracy_score(truth, defect_p >= 0.5))
    print(f"\nbinary accuracy (p >= 0.5, as the anchors): {accuracy:.4f}")
    for name, value in ANCHORS.items():
        print(f"  {name}: {value:.4f} ({accuracy - value:+.4f})")
    # The card's own no-review threshold: the trade-off curve's first point, chosen on the
    # validation split for the fewest errors there (cost ratio 1), never on this split.
    if card.calibration is not None and card.calibration.trade_off:
        threshold = card.calibration.trade_off[0].scrap_threshold
        tuned = float(accuracy_score(truth, defect_p >= threshold))
        print(f"binary accuracy at the validation-chosen threshold {threshold:.4f}: {tuned:.4f}")


if __name__ == "__main__":
    main()
