"""Evaluation figures from predicted probabilities (ONNX Runtime outputs), for cards and QA."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cellinspect.models.card import DatasetRef, EvalMetrics


def evaluate_predictions(
    y_true: Sequence[int],
    probs: np.ndarray,
    class_names: Sequence[str],
    data: DatasetRef,
) -> EvalMetrics:
    """Accuracy, macro-F1, per-class F1 and confusion matrix of argmax(probs) against y_true.

    `data.count` is set to the number of samples actually evaluated.
    """
    # scikit-learn is slow to import; only evaluation pays for it, not serving start-up.
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

    n = len(class_names)
    y = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs)
    if y.ndim != 1 or len(y) == 0:
        raise ValueError(
            f"y_true must be a non-empty sequence of class indices, got shape {y.shape}"
        )
    if probs.shape != (len(y), n):
        raise ValueError(f"probs has shape {probs.shape}, expected ({len(y)}, {n}) for {n} classes")
    if y.min() < 0 or y.max() >= n:
        raise ValueError(f"y_true holds labels outside 0..{n - 1} ({', '.join(class_names)})")
    y_pred = probs.argmax(axis=1)
    labels = list(range(n))
    per_class = f1_score(y, y_pred, labels=labels, average=None, zero_division=0)
    return EvalMetrics(
        data=data.model_copy(update={"count": len(y)}),
        accuracy=float(accuracy_score(y, y_pred)),
        macro_f1=float(f1_score(y, y_pred, labels=labels, average="macro", zero_division=0)),
        per_class_f1={name: float(f) for name, f in zip(class_names, per_class, strict=True)},
        confusion=confusion_matrix(y, y_pred, labels=labels).tolist(),
    )
