"""The preprocessing contract: one declarative spec and its one numpy implementation.

Training (evaluation transform and, split in two, the augmented transform), export,
serving and QA all call these functions with the spec read from the model card, so a
model never sees pixels prepared differently from how it was trained.

    decoded image --prepare()--> float32 HxWxC in [0, 1] at input size --normalize()--> CxHxW
"""

from __future__ import annotations

import json
from enum import StrEnum
from typing import Annotated, Literal

import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator


class ResizeMode(StrEnum):
    """How an image of any size is brought to the model's input size."""

    STRETCH = "stretch"  # resize both axes independently (tiles already at input aspect)
    LETTERBOX = "letterbox"  # keep aspect, pad the short side with `pad_value`
    CENTER_CROP = "center_crop"  # keep aspect, scale the short side, crop the centre


class PreprocessSpec(BaseModel):
    """Everything needed to turn a decoded image into the model's input tensor."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    height: Annotated[int, Field(ge=8, le=4096)] = 128
    width: Annotated[int, Field(ge=8, le=4096)] = 128
    channels: Literal[1, 3] = 1
    resize: ResizeMode = ResizeMode.STRETCH
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.25,)
    pad_value: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0
    dtype: Literal["float32"] = "float32"
    layout: Literal["NCHW"] = "NCHW"

    @model_validator(mode="after")
    def _check_stats(self) -> PreprocessSpec:
        for field in ("mean", "std"):
            if len(getattr(self, field)) != self.channels:
                raise ValueError(f"{field} needs {self.channels} value(s), one per channel")
        if any(s <= 0 for s in self.std):
            raise ValueError("std values must be positive")
        return self

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one preprocessed image."""
        return (self.channels, self.height, self.width)

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> PreprocessSpec:
        return cls.model_validate_json(text)


def to_channels(image: np.ndarray, channels: int) -> np.ndarray:
    """Gray HxW, RGB HxWx3 or RGBA HxWx4 (any integer depth) -> HxWxC with C = channels.

    Alpha is dropped: inspection cameras do not produce meaningful transparency.
    """
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
        raise ValueError(f"expected a gray, RGB or RGBA image, got shape {image.shape}")
    if image.shape[2] == 4:
        image = image[:, :, :3]
    have = image.shape[2]
    if have == channels:
        return image
    if channels == 1:
        return cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2GRAY)[:, :, None]
    return np.repeat(image, 3, axis=2)


def _scale(image: np.ndarray) -> np.ndarray:
    """Integer or float pixels -> float32 in [0, 1] by the dtype's full range."""
    if image.dtype == np.uint8:
        return image.astype(np.float32) * np.float32(1.0 / 255.0)
    if image.dtype == np.uint16:
        return image.astype(np.float32) * np.float32(1.0 / 65535.0)
    if image.dtype == np.float32:
        return np.clip(image, 0.0, 1.0)
    raise ValueError(f"unsupported pixel type {image.dtype}; expected uint8, uint16 or float32")


def _resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    h, w = image.shape[:2]
    if (h, w) == (height, width):
        return image
    # INTER_AREA when shrinking keeps thin defects (scratches, pinholes) visible.
    interp = cv2.INTER_AREA if h >= height and w >= width else cv2.INTER_LINEAR
    out = cv2.resize(image, (width, height), interpolation=interp)
    return out if out.ndim == 3 else out[:, :, None]


def prepare(image: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """Decoded image -> float32 HxWxC in [0, 1] at the spec's input size (no normalisation).

    This is the half that augmentation works on during training.
    """
    return _fit(_scale(to_channels(image, spec.channels)), spec)


def _fit(image: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """float32 HxWxC -> float32 spec.height x spec.width x C by the spec's resize mode."""
    h, w, channels = image.shape
    if spec.resize is ResizeMode.STRETCH:
        return _resize(image, spec.height, spec.width)
    if spec.resize is ResizeMode.LETTERBOX:
        scale = min(spec.height / h, spec.width / w)
        nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
        inner = _resize(image, nh, nw)
        out = np.full((spec.height, spec.width, channels), spec.pad_value, np.float32)
        top, left = (spec.height - nh) // 2, (spec.width - nw) // 2
        out[top : top + nh, left : left + nw] = inner
        return out
    scale = max(spec.height / h, spec.width / w)
    nh, nw = max(spec.height, round(h * scale)), max(spec.width, round(w * scale))
    inner = _resize(image, nh, nw)
    top, left = (nh - spec.height) // 2, (nw - spec.width) // 2
    return np.ascontiguousarray(inner[top : top + spec.height, left : left + spec.width])


def normalize(prepared: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """float32 HxWxC in [0, 1] -> float32 CxHxW, (x - mean) / std per channel."""
    prepared = prepared.astype(np.float32, copy=False)
    return _normalize_planes([prepared[:, :, c] for c in range(prepared.shape[2])], spec)


def _normalize_planes(planes: list[np.ndarray], spec: PreprocessSpec) -> np.ndarray:
    """One float32 HxW plane per channel (the same array may stand for several) -> CxHxW,
    written channel by channel: no HxWxC temporary, no transpose copy."""
    out = np.empty((len(planes), *planes[0].shape), np.float32)
    for c, (plane, mean, std) in enumerate(zip(planes, spec.mean, spec.std, strict=True)):
        np.subtract(plane, np.float32(mean), out=out[c])
        out[c] *= np.float32(1.0) / np.float32(std)
    return out


def preprocess(image: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """The full contract: decoded image -> float32 CxHxW model input."""
    if spec.channels == 3 and (image.ndim == 2 or image.shape[2] == 1):
        # A gray image fills the three channels alike, and scaling and resizing treat
        # channels independently: do both on one plane and normalise it into each channel.
        # The same numbers as normalize(prepare(...)) for a third of the resizing
        # (tests/datasets/test_preprocess.py checks they are equal).
        plane = _fit(_scale(image.reshape(*image.shape[:2], 1)), spec)[:, :, 0]
        return _normalize_planes([plane] * 3, spec)
    return normalize(prepare(image, spec), spec)


def preprocess_batch(images: list[np.ndarray], spec: PreprocessSpec) -> np.ndarray:
    """Several decoded images -> float32 NxCxHxW."""
    batch = np.empty((len(images), *spec.input_shape), np.float32)
    for i, image in enumerate(images):
        batch[i] = preprocess(image, spec)
    return batch
