"""Idempotency-Key on POST /v1/inspect: a retry gets the recorded answer, never a second record."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from fastapi.testclient import TestClient
from servicekit import auth, png

from cellinspect.serving.records import RecordStore

KEY = "st-1:cell-0001:6f1c2a9e4b7d4e0f"


def inspect(
    client: TestClient, body: bytes, key: str | None = KEY, **params: str
) -> httpx.Response:
    headers = {"Content-Type": "image/png", **auth("station")}
    if key is not None:
        headers["Idempotency-Key"] = key
    params = {"line_id": "L1", "station_id": "st-1", "cell_id": "cell-0001", **params}
    return client.post("/v1/inspect", content=body, headers=headers, params=params)


def records_of(client: TestClient, cell_id: str = "cell-0001") -> list[dict]:
    r = client.get("/v1/inspections", params={"cell_id": cell_id}, headers=auth("operator"))
    assert r.status_code == 200, r.text
    return r.json()["items"]


def test_repeated_key_replays_the_recorded_answer(client: TestClient) -> None:
    first = inspect(client, png(255))
    assert first.status_code == 200, first.text
    assert "Idempotent-Replayed" not in first.headers
    again = inspect(client, png(255))
    assert again.status_code == 200, again.text
    assert again.headers["Idempotent-Replayed"] == "true"
    a, b = first.json(), again.json()
    assert b["inspection_id"] == a["inspection_id"]
    for field in ("verdict", "label", "confidence", "defect_probability", "probabilities"):
        assert b[field] == a[field], field
    assert b["model"] == a["model"] and b["cell_id"] == "cell-0001"
    [stored] = records_of(client)
    assert stored["id"] == a["inspection_id"] and stored["idempotency_key"] == KEY
    assert b["timings"] == stored["timings"]  # as recorded
    shown = client.get(f"/v1/inspections/{a['inspection_id']}", headers=auth("operator")).json()
    assert shown["idempotency_key"] == KEY
    assert shown["defect_probability"] == a["defect_probability"]


def test_quoted_key_is_the_same_key(client: TestClient) -> None:
    # The draft sends the key as a structured-field string: "...".
    first = inspect(client, png(0), key=f'"{KEY}"')
    again = inspect(client, png(0), key=KEY)
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.json()["inspection_id"] == first.json()["inspection_id"]
    assert records_of(client)[0]["idempotency_key"] == KEY


def test_requests_without_a_key_are_recorded_each_time(client: TestClient) -> None:
    for _ in range(2):
        r = inspect(client, png(0), key=None)
        assert r.status_code == 200 and "Idempotent-Replayed" not in r.headers
    assert len(records_of(client)) == 2


@pytest.mark.parametrize(
    ("body", "params"),
    [(png(0), {}), (png(255), {"cell_id": "cell-0002"})],
    ids=["other-image", "other-cell"],
)
def test_key_reused_for_another_request_is_422(
    client: TestClient, body: bytes, params: dict[str, str]
) -> None:
    first = inspect(client, png(255))
    assert first.status_code == 200
    r = inspect(client, body, **params)
    assert r.status_code == 422, r.text
    assert r.json()["code"] == "idempotency_key_reused"
    assert KEY in r.json()["detail"] and first.json()["inspection_id"] in r.json()["detail"]
    assert len(records_of(client)) + len(records_of(client, "cell-0002")) == 1


@pytest.mark.parametrize(
    "key",
    ["", "a" * 129, "has space", "../etc/passwd", '"unbalanced', "-leading-dash", "k\u00e9y"],
    ids=["empty", "129-chars", "space", "path", "unbalanced-quote", "leading-dash", "non-ascii"],
)
def test_malformed_key_is_refused_before_inspecting(client: TestClient, key: str) -> None:
    headers = [
        (b"content-type", b"image/png"),
        *((k.encode(), v.encode()) for k, v in auth("station").items()),
        (b"idempotency-key", key.encode()),
    ]
    r = client.post("/v1/inspect", content=png(0), headers=headers)
    assert r.status_code == 422, r.text
    [problem] = r.json()["detail"]
    assert problem["loc"] == ["header", "Idempotency-Key"]
    assert client.get("/v1/inspections", headers=auth("operator")).json()["total"] == 0


def test_longest_key_is_accepted(client: TestClient) -> None:
    key = "k" * 128
    assert inspect(client, png(0), key=key).status_code == 200
    assert records_of(client)[0]["idempotency_key"] == key


def assert_concurrent_requests_record_once(client: TestClient, n: int) -> None:
    """`n` concurrent requests with one key: one record, one id, all but one replayed."""
    with ThreadPoolExecutor(n) as pool:
        answers = list(pool.map(lambda _: inspect(client, png(255)), range(n)))
    assert [a.status_code for a in answers] == [200] * n, [a.text for a in answers]
    assert len({a.json()["inspection_id"] for a in answers}) == 1
    assert sum("Idempotent-Replayed" in a.headers for a in answers) == n - 1
    assert len(records_of(client)) == 1


def test_concurrent_requests_with_one_key_record_once_and_agree(client: TestClient) -> None:
    assert_concurrent_requests_record_once(client, 8)


def test_requests_racing_past_the_lookup_still_record_once(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every request misses the lookup (none committed yet): the writer decides.
    monkeypatch.setattr(RecordStore, "get_by_idempotency_key", lambda _self, _key: None)
    assert_concurrent_requests_record_once(client, 6)


def test_a_lone_retry_past_the_lookup_replays_from_the_workers_commit(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sequential requests take the worker's commit (try_commit): a key the lookup missed
    is still caught there, and the stored answer comes back."""
    first = inspect(client, png(255))
    monkeypatch.setattr(RecordStore, "get_by_idempotency_key", lambda _self, _key: None)
    committed: list[object] = []
    real = RecordStore.try_commit

    def spy(self: RecordStore, record: object) -> object:
        committed.append(outcome := real(self, record))  # type: ignore[arg-type]
        return outcome

    monkeypatch.setattr(RecordStore, "try_commit", spy)
    again = inspect(client, png(255))
    assert again.status_code == 200 and again.headers["Idempotent-Replayed"] == "true"
    assert again.json()["inspection_id"] == first.json()["inspection_id"]
    assert len(committed) == 1 and committed[0][0] is True  # type: ignore[index]
    assert len(records_of(client)) == 1


def test_openapi_documents_the_key_and_the_replay_header(client: TestClient) -> None:
    route = client.get("/openapi.json").json()["paths"]["/v1/inspect"]["post"]
    [header] = [p for p in route["parameters"] if p["name"] == "Idempotency-Key"]
    assert header["in"] == "header" and not header["required"]
    assert header["schema"]["anyOf"][0]["maxLength"] == 130
    ok = route["responses"]["200"]
    assert "Idempotent-Replayed" in ok["headers"]
    assert ok["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/InspectResponse"
    }


def test_routes_that_do_not_honour_keys_refuse_them(client: TestClient) -> None:
    """A station must never retry a batch, frame or v2 request believing it is protected."""
    headers = {**auth("station"), "Idempotency-Key": "st-1:cell-9:a1"}
    for path in ("/v1/inspect/batch", "/v1/inspect/frame", "/v2/models/tiny/infer"):
        reply = client.post(path, content=png(0), headers={**headers, "Content-Type": "image/png"})
        assert reply.status_code == 400, path
        assert reply.json()["code"] == "idempotency_key_unsupported"
        assert "/v1/inspect" in reply.json()["detail"]
