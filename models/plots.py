"""Evaluation plots and image thumbnails as base64 PNG, for self-contained HTML reports.

matplotlib (the `qa` or `train` extra) is imported inside the functions, and used through
Figure + the Agg canvas, never pyplot: no process-wide backend state is touched.
"""

from __future__ import annotations

import base64
import io
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np

from cellinspect.datasets.decode import encode_png, read_image
from cellinspect.datasets.errors import DataError
from cellinspect.models.calibration import reliability_diagram
from cellinspect.models.card import OperatingPoint
from cellinspect.models.figures import ScoredImages

if TYPE_CHECKING:
    from matplotlib.figure import Figure

THUMBNAIL_SIZE = 112  # longest side, pixels
DPI = 100


class MissingPlotSupportError(ImportError):
    """matplotlib is not installed."""


def _figure(width: float, height: float) -> Figure:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise MissingPlotSupportError(
            "HTML reports need matplotlib: pip install 'cellinspect[qa]'"
        ) from exc
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def png_base64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _encode(fig: Figure) -> str:
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=DPI)
    return png_base64(buffer.getvalue())


def confusion_png(cm: Sequence[Sequence[int]], class_names: Sequence[str]) -> str:
    """Counts, shaded by the share of each true class's row."""
    counts = np.asarray(cm, dtype=np.float64)
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    k = len(class_names)
    fig = _figure(1.6 + 0.9 * k, 1.2 + 0.8 * k)
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            colour = "white" if shares[i, j] > 0.5 else "black"
            ax.text(j, i, f"{int(counts[i, j])}", ha="center", va="center", color=colour)
    ax.set_xticks(range(k), class_names, rotation=30, ha="right")
    ax.set_yticks(range(k), class_names)
    ax.set(xlabel="predicted", ylabel="true", title="confusion matrix")
    return _encode(fig)


def roc_pr_png(curves: Sequence[tuple[str, ScoredImages]]) -> str:
    """ROC and precision-recall curves of the defect probability, one line per model."""
    from sklearn.metrics import auc, precision_recall_curve, roc_curve

    fig = _figure(9.0, 4.2)
    roc, pr = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for label, scored in curves:
        truth, score = scored.is_defect, scored.defect_probability
        if truth.all() or not truth.any():
            continue  # one class only: neither curve is defined
        fpr, tpr, _ = roc_curve(truth, score)
        roc.plot(fpr, tpr, label=f"{label} (AUC {auc(fpr, tpr):.3f})")
        precision, recall, _ = precision_recall_curve(truth, score)
        pr.step(recall, precision, where="post", label=label)
    roc.plot([0, 1], [0, 1], "k--", linewidth=1)
    roc.set(xlabel="false positive rate (good flagged)", ylabel="true positive rate (defects)")
    roc.set_title("ROC: defect vs good")
    pr.set(xlabel="recall (defects found)", ylabel="precision", ylim=(0, 1.02))
    pr.set_title("precision-recall: defect vs good")
    for ax in (roc, pr):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="lower right" if ax is roc else "lower left", fontsize=8)
    return _encode(fig)


def reliability_png(scored: ScoredImages, title: str) -> str:
    """calibration.reliability_diagram of the calibrated probabilities."""
    _figure(1, 1)  # the clear error when matplotlib is missing
    with tempfile.TemporaryDirectory(prefix="cellinspect-plot-") as tmp:
        path = reliability_diagram(
            scored.probs, scored.labels, Path(tmp) / "reliability.png", title
        )
        return png_base64(path.read_bytes())


def score_histograms_png(
    scored: ScoredImages, class_names: Sequence[str], point: OperatingPoint
) -> str:
    """Histogram of the defect probability per true class, with the operating point."""
    fig = _figure(7.0, 3.8)
    ax = fig.add_subplot(1, 1, 1)
    bins = np.linspace(0, 1, 41).tolist()
    p = scored.defect_probability
    for j, name in enumerate(class_names):
        values = p[scored.labels == j]
        if len(values):
            ax.hist(values, bins=bins, alpha=0.5, label=f"{name} ({len(values)})")
    ax.axvline(point.scrap_threshold, color="tab:red", linestyle="--", label="scrap threshold")
    if point.review_low < point.scrap_threshold:
        ax.axvline(point.review_low, color="tab:orange", linestyle="--", label="review from")
    ax.set_yscale("log")  # production sets are imbalanced: keep the rare class visible
    ax.set_ylim(bottom=0.5)
    ax.set(xlabel="defect probability 1 - P(good)", ylabel="images", xlim=(0, 1))
    ax.set_title("scores by true class")
    ax.legend(fontsize=8)
    return _encode(fig)


def thumbnail(path: str | Path, size: int = THUMBNAIL_SIZE) -> str | None:
    """An image file as a small 8-bit PNG (base64); None if it cannot be read any more."""
    try:
        image = read_image(path)
    except DataError:
        return None
    if image.dtype == np.uint16:
        image = (image >> 8).astype(np.uint8)
    h, w = image.shape[:2]
    scale = size / max(h, w)
    if scale < 1:
        dims = (max(1, round(w * scale)), max(1, round(h * scale)))
        image = cv2.resize(image, dims, interpolation=cv2.INTER_AREA)
    elif scale > 2:  # tiny test tiles: enlarge so they can be seen at all
        dims = (round(w * scale), round(h * scale))
        image = cv2.resize(image, dims, interpolation=cv2.INTER_NEAREST)
    return png_base64(encode_png(image))
