"""POST /v1/inspect reads its arguments itself (`InspectRoute`); FastAPI's own solving of
the same endpoint signature must answer every request alike."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from servicekit import KEYS, make_settings, png, publish_tiny

from cellinspect.models.store import ModelStore
from cellinspect.serving.app import create_app
from cellinspect.serving.errors import install_error_handlers
from cellinspect.serving.routers import inspect as inspect_routes

STATION = {"X-API-Key": KEYS["station"], "Content-Type": "image/png"}
# Fields of an answer that differ between two inspections of the same image.
PER_INSPECTION = {"inspection_id", "timings"}


@pytest.fixture
def clients(tmp_path: Path) -> Iterator[tuple[TestClient, TestClient]]:
    """(the service, a FastAPI app serving the same endpoint through a plain APIRoute)."""
    publish_tiny(ModelStore(tmp_path / "store"), tmp_path)
    app = create_app(make_settings(tmp_path))
    with TestClient(app) as service:
        reference = FastAPI()
        install_error_handlers(reference)
        reference.add_api_route("/v1/inspect", inspect_routes.inspect, methods=["POST"])
        reference.state.service = app.state.service
        with TestClient(reference) as ref:
            yield service, ref


def _answer(client: TestClient, query: str, headers: dict[str, str]) -> tuple[int, object]:
    reply = client.post(f"/v1/inspect{query}", content=png(255), headers=headers)
    body = reply.json()
    if reply.status_code == 200:
        body = {k: v for k, v in body.items() if k not in PER_INSPECTION}
    return reply.status_code, (body, reply.headers.get("www-authenticate"))


@pytest.mark.parametrize(
    ("query", "headers"),
    [
        ("", {"Content-Type": "image/png"}),  # no key: 401
        ("?line_id=bad%20id", {"Content-Type": "image/png"}),  # 401 before the bad query
        ("", {**STATION, "X-API-Key": "wrong-key-0123456789"}),
        ("", {"Authorization": f"Bearer {KEYS['station']}", "Content-Type": "image/png"}),
        ("", {"Authorization": f"Basic {KEYS['station']}", "Content-Type": "image/png"}),
        ("", {**STATION, "X-API-Key": KEYS["operator"]}),
        ("?line_id=L1&station_id=S-2&cell_id=C:3.4", STATION),
        ("?line_id=bad%20id", STATION),
        ("?station_id=" + "s" * 129, STATION),
        ("?cell_id=", STATION),
        ("?model=Tiny", STATION),
        ("?model=tiny@1", STATION),
        ("?model=tiny@99", STATION),  # unknown version: 404
        ("?model=ghost", STATION),
        ("?heatmap=grid", STATION),  # the tiny model has none: null
        ("?heatmap=jpeg", STATION),
        ("?line_id=ok&line_id=bad%20id", STATION),  # the last of a repeated parameter counts
        ("?line_id=bad%20id&line_id=ok", STATION),
        ("?colour=blue", STATION),  # unknown parameters are ignored
        ("?line_id=bad%20id&model=BAD", {**STATION, "Idempotency-Key": "k" * 200}),  # all in one
        ("", {**STATION, "Idempotency-Key": "not valid!"}),
    ],
)
def test_the_direct_route_answers_as_fastapi_would(
    clients: tuple[TestClient, TestClient], query: str, headers: dict[str, str]
) -> None:
    service, reference = clients
    assert _answer(service, query, headers) == _answer(reference, query, headers)


def test_idempotency_keys_behave_alike(clients: tuple[TestClient, TestClient]) -> None:
    for client, key in zip(clients, ('"station-1:cell-9:a"', "station-1:cell-9:b"), strict=True):
        headers = {**STATION, "Idempotency-Key": key}
        first = client.post("/v1/inspect?cell_id=cell-9", content=png(255), headers=headers)
        again = client.post("/v1/inspect?cell_id=cell-9", content=png(255), headers=headers)
        assert first.status_code == again.status_code == 200
        assert "Idempotent-Replayed" not in first.headers
        assert again.headers["Idempotent-Replayed"] == "true"
        assert again.json()["inspection_id"] == first.json()["inspection_id"]


def test_the_origin_reaches_the_record(clients: tuple[TestClient, TestClient]) -> None:
    service, _ = clients
    answer = service.post(
        "/v1/inspect?line_id=L7&station_id=S2&cell_id=C9", content=png(0), headers=STATION
    ).json()
    record = service.get(
        f"/v1/inspections/{answer['inspection_id']}", headers={"X-API-Key": KEYS["operator"]}
    ).json()
    assert (record["line_id"], record["station_id"], record["cell_id"]) == ("L7", "S2", "C9")
    assert record["verdict"] == answer["verdict"] == "pass"


def test_the_query_is_documented_parameter_by_parameter(
    clients: tuple[TestClient, TestClient],
) -> None:
    service, _ = clients
    operation = service.get("/openapi.json").json()["paths"]["/v1/inspect"]["post"]
    params = {(p["in"], p["name"]): p["schema"] for p in operation["parameters"]}
    for name in ("line_id", "station_id", "cell_id", "model", "heatmap"):
        assert ("query", name) in params
    line = params[("query", "line_id")]["anyOf"][0]
    assert line["maxLength"] == 128 and line["pattern"] == inspect_routes.ID_PATTERN
    assert ("header", "Idempotency-Key") in params
