"""The model card: the one source of truth for what a published ONNX model is and how to feed it."""

from __future__ import annotations

import json
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


class Task(StrEnum):
    CLASSIFICATION = "classification"


class Verdict(StrEnum):
    PASS = "pass"
    REVIEW = "review"
    SCRAP = "scrap"


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

    @model_validator(mode="after")
    def _ordered(self) -> OperatingPoint:
        if self.review_low > self.scrap_threshold:
            raise ValueError("review_low must not exceed scrap_threshold")
        return self

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

    @model_validator(mode="after")
    def _good_class_known(self) -> ModelCard:
        if self.good_class not in self.class_names:
            raise ValueError(f"good_class {self.good_class!r} is not one of {self.class_names}")
        return self

    @property
    def good_index(self) -> int:
        return self.class_names.index(self.good_class)

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=False) + "\n"

    @classmethod
    def load(cls, path: str | Path) -> ModelCard:
        return cls.model_validate_json(Path(path).read_text())
