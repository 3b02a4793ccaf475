"""Tiny torch-free ONNX classifiers and cards for the models tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from tinymodel import CLASS_NAMES, SPEC, build_classifier, make_card, reference_logits

from cellinspect.models.card import ModelCard
from cellinspect.models.store import ModelStore


class Tiny:
    """The helpers above, handed to tests as a fixture (importlib mode cannot import conftest)."""

    spec = SPEC
    class_names = CLASS_NAMES
    build_classifier = staticmethod(build_classifier)
    reference_logits = staticmethod(reference_logits)
    make_card = staticmethod(make_card)


@pytest.fixture
def tiny() -> type[Tiny]:
    return Tiny


@pytest.fixture
def onnx_model(tmp_path: Path) -> Path:
    return build_classifier(tmp_path / "tiny.onnx")


@pytest.fixture
def card() -> ModelCard:
    return make_card()


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    return ModelStore(tmp_path / "store")


@pytest.fixture
def published(store: ModelStore, onnx_model: Path, card: ModelCard) -> Callable[[int], ModelStore]:
    """Publish the tiny model `n` times and return the store."""

    def _publish(n: int) -> ModelStore:
        for _ in range(n):
            store.publish(onnx_model, card)
        return store

    return _publish
