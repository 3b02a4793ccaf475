"""Request and response schemas of the HTTP API (separate from storage models)."""

from __future__ import annotations

from enum import StrEnum
from http import HTTPStatus
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, PrivateAttr, StringConstraints, field_validator

from cellinspect.models.card import Verdict, ViewSet

# Identifiers that come from line equipment: printable, no path separators, bounded.
Identifier = Annotated[
    str, StringConstraints(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:\-]*$")
]
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:\-]*$"
MODEL_REF_PATTERN = r"^[a-z0-9][a-z0-9._\-]{0,63}(@[A-Za-z0-9][A-Za-z0-9._\-]{0,63})?$"


class ModelInfo(BaseModel):
    name: str
    version: str


class Timings(BaseModel):
    """Where one request's time went, in milliseconds (answers and stored records alike)."""

    decode_ms: float = Field(0.0, description="decode + preprocess, in the worker pool")
    queue_ms: float = Field(0.0, description="waiting for a micro-batch to run")
    infer_ms: float = Field(0.0, description="ONNX Runtime time of the batch this image ran in")
    total_ms: float = Field(
        0.0, description="request arrival to answer (in a record: to the start of recording)"
    )


class HeatmapFormat(StrEnum):
    """How an answer carries the defect heatmap (asked for with `?heatmap=`)."""

    PNG = "png"  # 8-bit gray PNG at the model input size, base64
    GRID = "grid"  # coarse grid of cell means, as numbers


class PngHeatmap(BaseModel):
    format: Literal["png"] = "png"
    width: int
    height: int
    data: str = Field(
        description="base64 PNG, 8-bit gray, 255 = strongest defect evidence in this image; "
        "covers the model input, i.e. the image after the card's resize mode"
    )


class GridHeatmap(BaseModel):
    format: Literal["grid"] = "grid"
    rows: int
    cols: int
    values: list[float] = Field(description="cell means in [0, 1], row-major (rows x cols)")


class InspectResponse(BaseModel):
    inspection_id: str
    verdict: Verdict
    label: str = Field(description="most probable class")
    confidence: float = Field(description="probability of `label`")
    defect_probability: float = Field(description="1 - P(good class), what the thresholds act on")
    probabilities: dict[str, float]
    model: ModelInfo
    timings: Timings
    line_id: str | None = None
    station_id: str | None = None
    cell_id: str | None = None
    heatmap: Annotated[PngHeatmap | GridHeatmap, Field(discriminator="format")] | None = Field(
        None,
        description="where the model sees defect evidence, scaled to a peak of 1 per image; "
        "null unless asked for, or when the model has no heatmap output",
    )
    # Not in the body: an answer replayed for a repeated Idempotency-Key says so in a header.
    _replayed: bool = PrivateAttr(default=False)

    @property
    def replayed(self) -> bool:
        """Whether this is the answer recorded earlier under the request's idempotency key."""
        return self._replayed

    def mark_replayed(self) -> InspectResponse:
        self._replayed = True
        return self


class ErrorBody(BaseModel):
    detail: str
    code: str = Field(description="stable machine-readable reason, e.g. truncated, too_large")


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` of a route that answers errors as ErrorBody ({detail, code}).

    Its 422 is either an ErrorBody (an image that cannot be decoded) or FastAPI's own
    validation error (bad query or path parameters), so it is documented as either.
    """
    responses: dict[int | str, dict[str, Any]] = {
        status: {"model": ErrorBody, "description": HTTPStatus(status).phrase}
        for status in statuses
    }
    either = [
        {"$ref": "#/components/schemas/ErrorBody"},
        {"$ref": "#/components/schemas/HTTPValidationError"},
    ]
    responses[422] = {
        "description": "undecodable image (ErrorBody) or invalid parameters",
        "content": {"application/json": {"schema": {"anyOf": either}}},
    }
    return responses


# What the image routes refuse with an ErrorBody, besides 422.
IMAGE_ERRORS = error_responses(400, 413, 415, 503)


class BatchItem(BaseModel):
    index: int
    filename: str | None = None
    result: InspectResponse | None = None
    error: ErrorBody | None = None


class BatchResponse(BaseModel):
    results: list[BatchItem]


class ServedModel(BaseModel):
    name: str
    version: str
    ref: str
    default: bool
    classes: list[str]
    input_shape: list[int]
    heatmap: bool = Field(description="whether the model can answer ?heatmap=")
    operating_point: dict[str, float | str | None]
    test_time_views: ViewSet = Field(
        description="views of each image averaged inside the model's graph (none, flips: 4, "
        "isotropic: 8); each costs one more forward pass"
    )
    providers: list[str] = Field(
        description="ONNX Runtime execution providers this version runs on, preferred first; "
        "CPUExecutionProvider last runs what the others cannot (a GPU box that lists only it "
        "has fallen back to the CPU)"
    )


class ReloadRequest(BaseModel):
    version: str | None = Field(None, description="version or alias; default: production/latest")


class ReloadResponse(BaseModel):
    name: str
    previous_version: str
    version: str


class PromoteRequest(BaseModel):
    # A version number, not an alias: the alias is what moves.
    version: str = Field(pattern=r"^[0-9]{1,9}$", description="version number to promote")
    alias: str = Field(
        "production",
        pattern=r"^[a-z0-9][a-z0-9._\-]{0,63}$",
        description="alias to move; model-name characters, not all digits (those are versions)",
    )
    reload: bool = Field(True, description="serve the promoted version at once")

    @field_validator("alias")
    @classmethod
    def _alias_is_not_a_version(cls, alias: str) -> str:
        if alias.isdigit():
            raise ValueError("an all-digit alias would read as a version number")
        return alias
