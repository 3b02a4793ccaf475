"""A service on a tiny ONNX model, with one API key per role, for the API tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from servicekit import make_settings, publish_tiny
from tinymodel import WEIGHTS

from cellinspect.models.store import ModelStore
from cellinspect.serving.app import create_app
from cellinspect.serving.records import RecordStore


@pytest.fixture
def home(tmp_path: Path) -> Path:
    store = ModelStore(tmp_path / "store")
    publish_tiny(store, tmp_path)  # tiny@1
    publish_tiny(store, tmp_path, weights=WEIGHTS * 2)  # tiny@2: same classes, sharper
    store.promote("tiny", "1")
    return tmp_path


@pytest.fixture
def client(home: Path) -> Iterator[TestClient]:
    with TestClient(create_app(make_settings(home))) as c:
        yield c


# Record stores for test_records.py (SQLite) and test_records_postgres.py: each module
# supplies its own `url` fixture. (test_engine.py's `store` is a ModelStore of its own.)
@pytest.fixture
def commits() -> list[int]:
    """Group sizes of the commits made so far."""
    return []


@pytest.fixture
def store(url: str, commits: list[int]) -> Iterator[RecordStore]:
    with RecordStore(url, on_commit=lambda n, _s, _path: commits.append(n)) as s:
        yield s
