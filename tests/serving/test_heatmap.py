"""Heatmaps in answers: ?heatmap=png|grid on a model that has one, null on one that has not."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
from fastapi.testclient import TestClient
from servicekit import auth, make_settings, publish_tiny

from cellinspect.datasets.decode import encode_png
from cellinspect.models.store import ModelStore
from cellinspect.serving.app import create_app

# An 8 x 8 image at the model's input size: the tiny heatmap is its brightness / 255.
GRADIENT = (np.arange(64, dtype=np.uint8).reshape(8, 8) * 4).astype(np.uint8)


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    store = ModelStore(tmp_path / "store")
    publish_tiny(store, tmp_path, name="heat", heatmap=True)
    publish_tiny(store, tmp_path)  # "tiny": an older artifact without a heatmap output
    with TestClient(create_app(make_settings(tmp_path, models=["heat", "tiny"]))) as c:
        yield c


def inspect(client: TestClient, image: np.ndarray, **params: str):
    return client.post(
        "/v1/inspect",
        content=encode_png(image),
        headers={"Content-Type": "image/png", **auth("station")},
        params=params,
    )


def test_png_heatmap_is_the_models_map_as_8_bit_gray_at_input_size(client: TestClient) -> None:
    r = inspect(client, GRADIENT, heatmap="png")
    assert r.status_code == 200, r.text
    heatmap = r.json()["heatmap"]
    assert (heatmap["format"], heatmap["width"], heatmap["height"]) == ("png", 8, 8)
    decoded = cv2.imdecode(np.frombuffer(base64.b64decode(heatmap["data"]), np.uint8), -1)
    np.testing.assert_array_equal(decoded, GRADIENT)


def test_grid_heatmap_gives_cell_means_row_major(client: TestClient) -> None:
    heatmap = inspect(client, GRADIENT, heatmap="grid").json()["heatmap"]
    assert (heatmap["format"], heatmap["rows"], heatmap["cols"]) == ("grid", 8, 8)
    expected = (GRADIENT / 255.0).round(3).ravel()
    np.testing.assert_allclose(heatmap["values"], expected, atol=1e-6)


def test_heatmap_is_null_unless_asked_for(client: TestClient) -> None:
    r = inspect(client, GRADIENT)
    assert r.status_code == 200 and r.json()["heatmap"] is None


def test_model_without_heatmap_still_answers_with_null_heatmap(client: TestClient) -> None:
    r = inspect(client, GRADIENT, heatmap="png", model="tiny")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["heatmap"] is None and body["verdict"] in {"pass", "review", "scrap"}
    served = client.get("/v1/models", headers=auth("station")).json()
    assert {m["name"]: m["heatmap"] for m in served} == {"heat": True, "tiny": False}


def test_unknown_heatmap_format_is_422_naming_the_valid_ones(client: TestClient) -> None:
    r = inspect(client, GRADIENT, heatmap="jpeg")
    assert r.status_code == 422
    assert "png" in r.text and "grid" in r.text


def test_batch_items_get_their_own_heatmaps(client: TestClient) -> None:
    images = [GRADIENT, 255 - GRADIENT, np.full((8, 8), 128, np.uint8)]
    files = [("image", (f"{i}.png", encode_png(im), "image/png")) for i, im in enumerate(images)]
    r = client.post(
        "/v1/inspect/batch", files=files, headers=auth("station"), params={"heatmap": "grid"}
    )
    assert r.status_code == 200, r.text
    for item, image in zip(r.json()["results"], images, strict=True):
        values = np.array(item["result"]["heatmap"]["values"]).reshape(8, 8)
        np.testing.assert_allclose(values, (image / 255.0).round(3), atol=1e-6)
