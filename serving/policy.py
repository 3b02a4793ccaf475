"""Decision policy: calibrated class probabilities -> label, defect probability and verdict.

The thresholds come from the model card's operating point; a line listed in the
service settings (`line_operating_points`) uses its own point instead, for that line only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from cellinspect.models.card import ModelCard, OperatingPoint, Verdict


class NonFiniteProbabilities(ValueError):
    """A model gave NaN or infinity for an image: there is no verdict to give."""


@dataclass(frozen=True)
class Decision:
    """What the service answers for one image."""

    label: str  # most probable class
    confidence: float  # its probability
    defect_probability: float  # 1 - P(good class): the score the operating point thresholds
    verdict: Verdict
    operating_point: OperatingPoint  # the point actually applied
    line_override: bool  # True when the point came from the line's settings, not the card


def operating_point_for(
    card: ModelCard, line_id: str | None, line_points: Mapping[str, OperatingPoint]
) -> tuple[OperatingPoint, bool]:
    """(point, overridden): the line's own point if configured, else the card's."""
    if line_id is not None and line_id in line_points:
        return line_points[line_id], True
    return card.operating_point, False


def decide(
    probs: np.ndarray,
    card: ModelCard,
    *,
    line_id: str | None,
    line_points: Mapping[str, OperatingPoint],
) -> Decision:
    """Turn one row of calibrated probabilities (in card.class_names order) into a Decision."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.shape != (len(card.class_names),):
        raise ValueError(
            f"expected {len(card.class_names)} probabilities ({', '.join(card.class_names)}), "
            f"got shape {probs.shape}"
        )
    if not np.isfinite(probs).all():
        # A NaN defect probability compares False with every threshold and would pass.
        raise NonFiniteProbabilities(
            f"non-finite probabilities from {card.name}@{card.version} for this image: {probs}"
            "; no verdict given"
        )
    point, overridden = operating_point_for(card, line_id, line_points)
    best = int(np.argmax(probs))
    # Clipped: float rounding can put 1 - p(good) a hair below 0.
    defect = float(min(1.0, max(0.0, 1.0 - probs[card.good_index])))
    return Decision(
        label=card.class_names[best],
        confidence=float(probs[best]),
        defect_probability=defect,
        verdict=point.verdict(defect),
        operating_point=point,
        line_override=overridden,
    )
