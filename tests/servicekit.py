"""Helpers for the service tests: API keys per role, flat test images, tiny published models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tinymodel import WEIGHTS, build_classifier, make_card

from cellinspect.datasets.decode import encode_png
from cellinspect.models.store import ModelStore
from cellinspect.serving.settings import Settings

KEYS = {
    "station": "station-key-0123456789",
    "operator": "operator-key-0123456789",
    "admin": "admin-key-0123456789abc",
}


def png(value: int, size: int = 16, channels: int = 1, dtype: type = np.uint8) -> bytes:
    """A flat image: dark (value 0) reads 'good', bright (255) reads 'scratch' to the tiny model."""
    shape = (size, size) if channels == 1 else (size, size, channels)
    scale = 257 if dtype is np.uint16 else 1
    return encode_png(np.full(shape, value * scale, dtype))


def publish_tiny(
    store: ModelStore,
    tmp: Path,
    weights: np.ndarray = WEIGHTS,
    *,
    name: str = "tiny",
    heatmap: bool = False,
) -> str:
    """Publish the tiny model as a new version of `name` (with a heatmap output if asked)."""
    path = build_classifier(
        tmp / f"{name}-{len(store.versions(name))}.onnx", weights=weights, heatmap=heatmap
    )
    outputs = ["logits", "probabilities", *(["heatmap"] if heatmap else [])]
    return store.publish(path, make_card(name, output_names=outputs)).version


def make_settings(home: Path, **overrides: object) -> Settings:
    fields: dict[str, object] = {
        "home": home,
        "models": ["tiny"],
        "api_keys": ",".join(f"{role}:{key}" for role, key in KEYS.items()),
        "intra_op_threads": 1,
        "max_delay_ms": 1,
        "archive_pass_sample_rate": 0.0,
        "max_body_bytes": 200_000,
        "max_pixels": 1_000_000,
    }
    fields.update(overrides)
    return Settings(**fields)  # type: ignore[arg-type]


def auth(role: str) -> dict[str, str]:
    return {"X-API-Key": KEYS[role]}
