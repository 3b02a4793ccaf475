"""Helpers for the evaluation/comparison tests: flat-image held-out sets and binary tiny models.

The binary model scores mean brightness: logits = m * W + B with m = (pixel/255 - 0.5) / 0.25,
so with `STRONG` an image reads 'defect' above pixel value 127.5 and with `WEAK` already
above ~96 (it calls the good images between 96 and 127 defective).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tinymodel import build_classifier, make_card

from cellinspect.datasets.decode import encode_png
from cellinspect.datasets.manifest import Manifest, build_manifest, load_manifest, write_manifest
from cellinspect.datasets.samples import Sample, Split
from cellinspect.models.card import DatasetRef, ModelCard
from cellinspect.models.store import ModelStore

BINARY = ["good", "defect"]
STRONG = (np.array([[-4.0, 4.0]], np.float32), np.array([0.0, 0.0], np.float32))
WEAK = (np.array([[-4.0, 4.0]], np.float32), np.array([-2.0, 2.0], np.float32))


def flat_png(path: Path, value: int, size: int = 12) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_png(np.full((size, size), value, np.uint8)))
    return path


def brightness_set(n: int = 60) -> list[tuple[int, str]]:
    """(pixel value, label): defect from 128 up, with some confidently 'wrong' labels at the
    dark and bright ends (the strong and the weak model both get those wrong)."""
    values = np.linspace(0, 255, n).round().astype(int)
    items = []
    for i, v in enumerate(values):
        label = "defect" if v >= 128 else "good"
        if i % 6 == 0 and (v < 60 or v > 200):
            label = "good" if label == "defect" else "defect"
        items.append((int(v), label))
    return items


def write_set(
    folder: Path,
    items: list[tuple[int, str]],
    *,
    split: Split | None = None,
    name: str = "manifest.json",
) -> tuple[Path, Manifest]:
    """PNG files per item (distinct sizes make equal values distinct files) and a manifest."""
    samples = []
    for i, (value, label) in enumerate(items):
        path = flat_png(folder / label / f"{i:03d}-{value}.png", value, size=12 + i % 7)
        samples.append(Sample(path=str(path), label=label, split=split))
    return manifest_of(samples, folder / name)


def manifest_of(samples: list[Sample], out: Path) -> tuple[Path, Manifest]:
    """Write a manifest of `samples` (splits kept; unsplit ones go to train); load it back,
    so sample paths are absolute."""
    write_manifest(build_manifest(samples, out=out, val=0.0, test=0.0), out)
    return out, load_manifest(out)


def publish_binary(
    store: ModelStore,
    tmp: Path,
    weights: tuple[np.ndarray, np.ndarray] = STRONG,
    **card_fields: object,
) -> ModelCard:
    w, b = weights
    path = build_classifier(tmp / f"binary-{len(store.versions('tiny'))}.onnx", weights=w, bias=b)
    return store.publish(path, make_card("tiny", class_names=BINARY, **card_fields))


def trained_on(manifest_path: Path, manifest: Manifest) -> dict[str, object]:
    """Card fields naming a training manifest, as export writes them."""
    return {
        "training_data": DatasetRef(manifest_hash=manifest.hash, split="train", count=1),
        "training_config": {"data": str(manifest_path), "out": str(manifest_path.parent)},
    }
