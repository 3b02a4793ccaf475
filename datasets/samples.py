"""The one sample list every adapter produces and every consumer reads."""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


class Split(StrEnum):
    TRAIN = "train"
    VAL = "val"
    TEST = "test"


class Sample(BaseModel):
    """One labelled image. `path` is absolute, or relative to the manifest that lists it."""

    model_config = ConfigDict(extra="forbid")

    path: str
    label: str
    split: Split | None = None
    sha256: str | None = None
    # Adapter-specific facts: defect mask path, ELPV probability and cell type, camera id...
    metadata: dict[str, Any] = Field(default_factory=dict)
