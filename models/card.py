"""The model card: the one source of truth for what a published ONNX model is and how to feed it."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from cellinspect.datasets.preprocess import PreprocessSpec

CARD_FORMAT = "cellinspect.card/1"
INPUT_NAME = "image"
LOGITS_NAME = "logits"
PROBABILITIES_NAME = "probabilities"
HEATMAP_NAME = "heatmap"  # optional: N x H x W defect map in [0, 1] at the input size


class HeatmapSource(StrEnum):
    """Which class-activation map of the defect log-odds fills the `heatmap` output
    (training/networks.py makes them)."""

    GRAD_CAM = "grad-cam"
    AUX_CAM = "aux-cam"
    AUX_CAM_X_GRAD_CAM = "aux-cam-x-grad-cam"

    @property
    def description(self) -> str:
        return _HEATMAP_DESCRIPTIONS[self]


_HEATMAP_DESCRIPTIONS = {
    HeatmapSource.GRAD_CAM: "closed-form Grad-CAM at the last feature map (input / 32)",
    HeatmapSource.AUX_CAM: "exact CAM of the auxiliary stride-16 head (input / 16)",
    # The finer map sharpened, gated by where the main head looks.
    HeatmapSource.AUX_CAM_X_GRAD_CAM: "auxiliary stride-16 CAM x stride-32 Grad-CAM",
}


class ViewSet(StrEnum):
    """Symmetric views of the input that the exported graph runs and averages (test-time
    augmentation inside the ONNX file, so serving stays one call): the logits are averaged,
    each view's heatmap is turned back and the maps are averaged. Named after the training
    augmentation presets whose symmetries they are (training/views.py makes them)."""

    NONE = "none"  # the image as it is
    FLIPS = "flips"  # identity, both mirror flips, 180 degrees: 4 views, any aspect ratio
    ISOTROPIC = "isotropic"  # all 8 flips and quarter turns: square inputs only

    @property
    def passes(self) -> int:
        """Forward passes per image. Not `count`: that would hide str.count of the enum."""
        return {ViewSet.NONE: 1, ViewSet.FLIPS: 4, ViewSet.ISOTROPIC: 8}[self]


def check_views_fit(views: ViewSet, height: int, width: int) -> None:
    """Quarter turns swap height and width: refused for a non-square input."""
    if views is ViewSet.ISOTROPIC and height != width:
        raise ValueError(
            f"test-time views {views.value!r} turn the image by 90 degrees, which needs a square "
            f"input, not {height}x{width}; use {ViewSet.FLIPS.value!r}"
        )


class Task(StrEnum):
    CLASSIFICATION = "classification"


class Verdict(StrEnum):
    PASS = "pass"
    REVIEW = "review"
    SCRAP = "scrap"


@dataclass(frozen=True)
class OperatingCriteria:
    """What an operating point is chosen for (None: not used); see
    `cellinspect.models.calibration.choose_operating_point` for what each one means.

    The one place where their ranges and combinations are checked, for the training config,
    export and `models set-operating-point` alike. A dataclass, not a pydantic model: its
    errors are plain one-line ValueErrors that the CLI prints as they are.
    """

    cost_ratio: float | None = None  # cost of scrapping a good cell / of an escape
    max_escape: float | None = None  # highest share of defective cells passed
    target_auto_accuracy: float | None = None  # review band: accuracy of automatic decisions
    confidence: float | None = None  # one-sided, for max_escape and target_auto_accuracy

    def __post_init__(self) -> None:
        r, e, a, c = self.cost_ratio, self.max_escape, self.target_auto_accuracy, self.confidence
        if r is not None and not (r > 0 and math.isfinite(r)):
            raise ValueError(f"cost_ratio must be a positive number, got {r}")
        if e is not None and not 0 <= e <= 1:
            raise ValueError(f"max_escape must be within [0, 1], got {e}")
        if a is not None and not 0 < a <= 1:
            raise ValueError(f"target_auto_accuracy must be within (0, 1], got {a}")
        if c is not None:
            if not 0 < c < 1:
                raise ValueError(f"confidence must be within (0, 1), got {c}")
            if e is None and a is None:
                raise ValueError("confidence bounds max_escape or target_auto_accuracy: give one")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> OperatingCriteria:
        """The criteria among `values` (a training config, a card's point); others ignored."""
        return cls(**{f.name: values.get(f.name) for f in fields(cls)})

    def given(self) -> dict[str, float]:
        return {f.name: v for f in fields(self) if (v := getattr(self, f.name)) is not None}

    @property
    def chooses(self) -> bool:
        """Whether they choose thresholds at all (a confidence alone cannot)."""
        return any(
            v is not None for v in (self.cost_ratio, self.max_escape, self.target_auto_accuracy)
        )

    @property
    def method(self) -> str:
        """How a point chosen for them is named on its card: "cost_ratio+max_escape", ..."""
        return "+".join(self.given())

    def or_else(self, fallback: OperatingCriteria) -> OperatingCriteria:
        """Each criterion not given here taken from `fallback`."""
        return OperatingCriteria.from_mapping({**fallback.given(), **self.given()})


class OperatingPoint(BaseModel):
    """Maps the calibrated defect probability p = 1 - P(good class) to a verdict.

    p < review_low -> pass; p >= scrap_threshold -> scrap; in between -> review.
    """

    model_config = ConfigDict(extra="forbid")

    review_low: float = Field(0.5, ge=0.0, le=1.0)
    scrap_threshold: float = Field(0.5, ge=0.0, le=1.0)
    cost_ratio: float | None = Field(
        None, gt=0, description="cost of scrapping a good cell / cost of a defect escaping"
    )
    method: str = "default"  # how the point was chosen: default, cost_ratio, max_escape, ...
    # The other criteria the point was chosen for (None: not used). Flat scalars on purpose:
    # the service reports this model as a dict of numbers and strings.
    max_escape: float | None = Field(
        None, ge=0, le=1, description="highest allowed share of defective cells passed"
    )
    target_auto_accuracy: float | None = Field(
        None, ge=0, le=1, description="accuracy required of the cells decided without review"
    )
    confidence: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="one-sided confidence at which max_escape and target_auto_accuracy hold "
        "(None: on the validation cells themselves)",
    )
    # What the point did on the validation split when it was chosen (None: not measured).
    val_escape_rate: float | None = Field(None, ge=0, le=1)  # defective passed / defective
    val_false_scrap_rate: float | None = Field(None, ge=0, le=1)  # good scrapped / good
    val_review_rate: float | None = Field(None, ge=0, le=1)  # sent to review / all
    val_auto_accuracy: float | None = Field(None, ge=0, le=1)  # correct / decided automatically
    # With a confidence: what the point promises on new cells (escape rate at most, auto
    # accuracy at least), from the same validation counts.
    val_escape_bound: float | None = Field(None, ge=0, le=1)
    val_auto_accuracy_bound: float | None = Field(None, ge=0, le=1)

    @model_validator(mode="after")
    def _ordered(self) -> OperatingPoint:
        if self.review_low > self.scrap_threshold:
            raise ValueError("review_low must not exceed scrap_threshold")
        return self

    @property
    def criteria(self) -> OperatingCriteria:
        """What the point was chosen for (none for the default point)."""
        return OperatingCriteria.from_mapping(vars(self))

    def verdict(self, defect_probability: float) -> Verdict:
        if defect_probability >= self.scrap_threshold:
            return Verdict.SCRAP
        if defect_probability >= self.review_low:
            return Verdict.REVIEW
        return Verdict.PASS


class DatasetRef(BaseModel):
    """Which data an evaluation or training used: the manifest's own hash identifies it."""

    manifest_hash: str
    split: str | None = None
    count: int = 0


class EvalMetrics(BaseModel):
    """Headline figures of one evaluation, computed from ONNX Runtime outputs."""

    data: DatasetRef
    accuracy: float
    macro_f1: float
    per_class_f1: dict[str, float] = Field(default_factory=dict)
    confusion: list[list[int]] = Field(default_factory=list)


class TradeOffPoint(BaseModel):
    """One review band on the validation split: how much review buys how much accuracy."""

    model_config = ConfigDict(extra="forbid")

    review_rate: float = Field(ge=0, le=1)
    auto_accuracy: float = Field(ge=0, le=1)  # of the cells outside the band
    review_low: float = Field(ge=0, le=1)
    scrap_threshold: float = Field(ge=0, le=1)


MAX_TRADE_OFF_POINTS = 101


class CalibrationData(BaseModel):
    """Validation predictions kept in the card, so calibration and the operating point can be
    recomputed without retraining (cards are immutable; a new point is a new version).

    Raw logits rather than probabilities: the defect probability and the truth are derived
    from them with the card's temperature and good class, so nothing is stored twice.
    """

    model_config = ConfigDict(extra="forbid")

    data: DatasetRef  # the split the predictions came from; count = rows stored
    logits: list[list[float]]  # N x classes, rounded to 6 decimals
    labels: list[int]  # true class index per row
    ece_before: float | None = Field(None, ge=0, le=1)  # top-label ECE at temperature 1
    ece_after: float | None = Field(None, ge=0, le=1)  # top-label ECE at the card's temperature
    trade_off: list[TradeOffPoint] = Field(
        default_factory=list, max_length=MAX_TRADE_OFF_POINTS
    )  # review bands around the operating point, by review rate

    @model_validator(mode="after")
    def _consistent(self) -> CalibrationData:
        if len(self.logits) != len(self.labels):
            raise ValueError(f"{len(self.logits)} logit rows but {len(self.labels)} labels")
        if len({len(row) for row in self.logits}) > 1:
            raise ValueError("logit rows differ in length")
        return self


class ModelCard(BaseModel):
    """card.json beside model.onnx in the store."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    format: str = CARD_FORMAT
    name: str
    version: str = "unpublished"
    task: Task = Task.CLASSIFICATION
    arch: str
    class_names: list[str] = Field(min_length=2)
    good_class: str = Field(description="the class that means 'no defect'")
    preprocessing: PreprocessSpec
    input_name: str = INPUT_NAME
    output_names: list[str] = Field(default_factory=lambda: [LOGITS_NAME, PROBABILITIES_NAME])
    opset: int
    temperature: float = Field(1.0, gt=0)
    operating_point: OperatingPoint = Field(default_factory=OperatingPoint)
    metrics: dict[str, EvalMetrics] = Field(default_factory=dict)  # "val", "test", "heldout", ...
    training_data: DatasetRef | None = None
    training_config: dict[str, Any] = Field(default_factory=dict)
    parity: dict[str, float] = Field(default_factory=dict)  # max_abs_diff, samples, tolerance
    code_commit: str | None = None
    created: datetime = Field(default_factory=lambda: datetime.now(UTC))
    onnx_sha256: str = ""
    calibration: CalibrationData | None = None  # validation predictions; None on older cards
    derived_from: str | None = None  # "name@version" this card re-published with a new point
    quantization: str | None = None  # e.g. "int8-qdq-s8s8"; None: the exported float model
    # The map in the heatmap output; None: no such output, or a card from before this field.
    heatmap: HeatmapSource | None = None
    # Test-time views averaged inside the graph; a card from before this field had none.
    test_time_views: ViewSet = ViewSet.NONE

    @model_validator(mode="after")
    def _good_class_known(self) -> ModelCard:
        if self.good_class not in self.class_names:
            raise ValueError(f"good_class {self.good_class!r} is not one of {self.class_names}")
        return self

    @model_validator(mode="after")
    def _calibration_matches_classes(self) -> ModelCard:
        if self.calibration is None or not self.calibration.logits:
            return self
        n = len(self.class_names)
        if len(self.calibration.logits[0]) != n:
            raise ValueError(
                f"calibration logits have {len(self.calibration.logits[0])} columns, "
                f"but the card lists {n} classes"
            )
        if not all(0 <= label < n for label in self.calibration.labels):
            raise ValueError(f"calibration labels must be class indices 0..{n - 1}")
        return self

    @model_validator(mode="after")
    def _heatmap_is_an_output(self) -> ModelCard:
        if self.heatmap is not None and HEATMAP_NAME not in self.output_names:
            raise ValueError(
                f"heatmap {self.heatmap.value!r} named, but no {HEATMAP_NAME!r} output"
            )
        return self

    @model_validator(mode="after")
    def _views_fit_the_input(self) -> ModelCard:
        check_views_fit(self.test_time_views, self.preprocessing.height, self.preprocessing.width)
        return self

    @property
    def good_index(self) -> int:
        return self.class_names.index(self.good_class)

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=False) + "\n"

    @classmethod
    def load(cls, path: str | Path) -> ModelCard:
        return cls.model_validate_json(Path(path).read_text())
