"""What the OpenAPI document promises matches what the routes answer (the points
schemathesis found; tests/serving/test_schemathesis.py checks the rest at length)."""

from __future__ import annotations

from fastapi.testclient import TestClient
from servicekit import auth

IMAGE_ROUTES = [
    ("/v1/inspect", "post"),
    ("/v1/inspect/batch", "post"),
    ("/v1/inspect/frame", "post"),
    ("/v2/models/{name}/infer", "post"),
]


def test_image_routes_document_their_error_bodies(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    for path, method in IMAGE_ROUTES:
        responses = spec["paths"][path][method]["responses"]
        for status in ("400", "413", "415", "503"):
            schema = responses[status]["content"]["application/json"]["schema"]
            assert schema == {"$ref": "#/components/schemas/ErrorBody"}, (path, status)
        either = responses["422"]["content"]["application/json"]["schema"]["anyOf"]
        assert {"$ref": "#/components/schemas/ErrorBody"} in either
        assert {"$ref": "#/components/schemas/HTTPValidationError"} in either


def test_a_truncated_image_answers_the_documented_422_body(client: TestClient) -> None:
    headers = {"Content-Type": "image/png", **auth("station")}
    r = client.post("/v1/inspect", content=b"\x89PNG\r\n\x1a\n", headers=headers)
    assert r.status_code == 422
    assert set(r.json()) == {"detail", "code"} and r.json()["code"] == "truncated"


def test_metrics_are_documented_as_text(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    assert list(spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == ["text/plain"]
    assert client.get("/metrics").headers["content-type"].startswith("text/plain")


def test_infer_and_batch_bodies_are_documented(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    infer = spec["paths"]["/v2/models/{name}/infer"]["post"]["requestBody"]["content"]
    assert infer["application/json"]["schema"]["required"] == ["inputs"]
    batch = spec["paths"]["/v1/inspect/batch"]["post"]["requestBody"]["content"]
    assert batch["multipart/form-data"]["schema"]["properties"]["images"]["type"] == "array"


def test_invalid_alias_is_a_validation_error_before_the_store_is_touched(
    client: TestClient,
) -> None:
    for alias in ("d8\u00ebv", "", "123"):
        r = client.post(
            "/v1/models/tiny/promote",
            json={"version": "2", "alias": alias},
            headers=auth("admin"),
        )
        assert r.status_code == 422, r.text
        assert isinstance(r.json()["detail"], list)  # FastAPI's documented validation error
        assert r.json()["detail"][0]["loc"] == ["body", "alias"]
