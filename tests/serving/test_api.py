"""The HTTP API on a tiny model: verdicts recorded, precise 4xx for bad input.

Who may call which route: tests/serving/test_authz_matrix.py.
"""

from __future__ import annotations

import base64
import gc
import json
import struct
import time
import weakref
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from servicekit import auth, make_settings, png, publish_tiny

from cellinspect.datasets.decode import encode_png
from cellinspect.models.store import ModelStore
from cellinspect.serving import app as app_module
from cellinspect.serving.app import create_app


def inspect(
    client: TestClient, body: bytes, ctype: str = "image/png", role: str = "station", **params
):
    return client.post(
        "/v1/inspect", content=body, headers={"Content-Type": ctype, **auth(role)}, params=params
    )


def test_dark_image_passes_and_is_recorded(client: TestClient) -> None:
    r = inspect(client, png(0), line_id="L1", station_id="S1", cell_id="C-0001")
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["verdict"], body["label"]) == ("pass", "good")
    assert body["model"] == {"name": "tiny", "version": "1"}
    assert abs(sum(body["probabilities"].values()) - 1) < 1e-5
    assert r.headers["X-Model-Version"] == "tiny@1" and r.headers["X-Processing-Time"].endswith(
        "ms"
    )
    assert set(body["timings"]) == {"decode_ms", "queue_ms", "infer_ms", "total_ms"}
    stored = client.get(f"/v1/inspections/{body['inspection_id']}", headers=auth("operator")).json()
    assert (stored["verdict"], stored["line_id"], stored["cell_id"]) == ("pass", "L1", "C-0001")
    assert len(stored["image_sha256"]) == 64


def test_bright_image_is_scrapped_and_archived(client: TestClient) -> None:
    body = inspect(client, png(255)).json()
    assert (body["verdict"], body["label"]) == ("scrap", "scratch")
    image = client.get(f"/v1/inspections/{body['inspection_id']}/image", headers=auth("operator"))
    assert image.status_code == 200 and image.content == png(255)
    assert image.headers["content-type"] == "image/png"
    assert image.headers["x-content-type-options"] == "nosniff"  # uploaded bytes: never sniffed


def test_an_image_archived_already_is_not_written_again(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A repeated scrap image (a camera's retry) points at the stored file, found on the
    loop: no thread hand-off and no second write."""
    from cellinspect.serving.archive import ImageArchive

    saves: list[str] = []
    real = ImageArchive.save

    def spy(self: ImageArchive, data: bytes, **kwargs: object) -> str | None:
        saves.append(str(kwargs["sha256"]))
        return real(self, data, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(ImageArchive, "save", spy)
    first, again = (inspect(client, png(255), cell_id=f"C-{i}").json() for i in range(2))
    assert first["verdict"] == again["verdict"] == "scrap" and len(saves) == 1
    paths = [
        client.get(f"/v1/inspections/{b['inspection_id']}", headers=auth("operator")).json()[
            "archive_path"
        ]
        for b in (first, again)
    ]
    assert paths[0] is not None and paths[0] == paths[1]


def test_a_lone_request_is_archived_and_recorded_on_the_worker_that_ran_it(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With nothing else in flight, the batcher's worker decodes, runs, archives and commits
    in one hop: no round trip through the record writer's thread."""
    import threading

    from cellinspect.serving.archive import ImageArchive
    from cellinspect.serving.records import RecordStore

    calls: list[tuple[str, str, object]] = []
    real_save, real_commit = ImageArchive.save, RecordStore.try_commit

    def save(self: ImageArchive, data: bytes, **kwargs: object) -> str | None:
        calls.append(("save", threading.current_thread().name, None))
        return real_save(self, data, **kwargs)  # type: ignore[arg-type]

    def try_commit(self: RecordStore, record: object) -> object:
        outcome = real_commit(self, record)  # type: ignore[arg-type]
        calls.append(("commit", threading.current_thread().name, outcome))
        return outcome

    monkeypatch.setattr(ImageArchive, "save", save)
    monkeypatch.setattr(RecordStore, "try_commit", try_commit)
    body = inspect(client, png(255), cell_id="C-lone").json()
    assert body["verdict"] == "scrap"
    assert [(what, thread.split("_")[0], outcome) for what, thread, outcome in calls] == [
        ("save", "batcher-tiny@1", None),
        ("commit", "batcher-tiny@1", (True, None)),
    ]
    stored = client.get(f"/v1/inspections/{body['inspection_id']}", headers=auth("operator"))
    assert stored.json()["cell_id"] == "C-lone" and stored.json()["archive_path"]
    metrics = client.get("/metrics").text
    assert 'cellinspect_record_commits_total{path="worker"} 1.0' in metrics
    assert 'cellinspect_record_commits_total{path="writer"}' not in metrics


def test_a_lone_request_falls_back_to_the_writer_and_survives_a_failed_worker_commit(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cellinspect.serving.records import RecordStore, RecordStoreUnavailable

    # The writer is busy (try_commit declines): the record goes through add, as before.
    monkeypatch.setattr(RecordStore, "try_commit", lambda _self, _record: (False, None))
    body = inspect(client, png(0), cell_id="C-declined").json()
    stored = client.get(f"/v1/inspections/{body['inspection_id']}", headers=auth("operator"))
    assert stored.status_code == 200 and stored.json()["cell_id"] == "C-declined"
    assert 'cellinspect_record_commits_total{path="writer"} 1.0' in client.get("/metrics").text

    # The database refuses the worker's commit: a 503 that says so, nothing recorded, and
    # the next request is served (the worker and the batcher are free again).
    def refuse(_self: RecordStore, _record: object) -> None:
        raise RecordStoreUnavailable("inspection records database unavailable (disk I/O error)")

    monkeypatch.setattr(RecordStore, "try_commit", refuse)
    failed = inspect(client, png(0), cell_id="C-refused")
    assert failed.status_code == 503 and failed.json()["code"] == "records_unavailable"
    assert "Retry-After" in failed.headers
    monkeypatch.undo()
    assert inspect(client, png(0), cell_id="C-after").status_code == 200
    listed = client.get("/v1/inspections", headers=auth("operator")).json()["items"]
    assert sorted(r["cell_id"] for r in listed) == ["C-after", "C-declined"]


def test_pass_image_is_not_archived_when_sampling_is_off(client: TestClient) -> None:
    body = inspect(client, png(0)).json()
    r = client.get(f"/v1/inspections/{body['inspection_id']}/image", headers=auth("operator"))
    assert r.status_code == 404 and "no archived image" in r.json()["detail"]


@pytest.mark.parametrize(
    "image",
    [
        encode_png(np.full((16, 16), 0, np.uint16)),  # 16-bit gray
        encode_png(np.zeros((16, 16, 3), np.uint8)),  # RGB
        encode_png(np.zeros((16, 16, 4), np.uint8)),  # RGBA
    ],
    ids=["16bit", "rgb", "rgba"],
)
def test_depths_and_channel_layouts_are_accepted(client: TestClient, image: bytes) -> None:
    r = inspect(client, image)
    assert r.status_code == 200 and r.json()["label"] == "good"


def test_multipart_upload(client: TestClient) -> None:
    r = client.post(
        "/v1/inspect", files={"image": ("a.png", png(255), "image/png")}, headers=auth("station")
    )
    assert r.status_code == 200 and r.json()["verdict"] == "scrap"


def test_batch_keeps_order_and_reports_bad_items(client: TestClient) -> None:
    files = [
        ("images", ("dark.png", png(0), "image/png")),
        ("images", ("broken.png", png(0)[:30], "image/png")),
        ("images", ("bright.png", png(255), "image/png")),
    ]
    r = client.post("/v1/inspect/batch", files=files, headers=auth("station"))
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["filename"] for x in results] == ["dark.png", "broken.png", "bright.png"]
    assert results[0]["result"]["verdict"] == "pass" and results[2]["result"]["verdict"] == "scrap"
    assert results[1]["error"]["code"] == "truncated" and results[1]["result"] is None


def _bomb_png(width: int, height: int) -> bytes:
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize(
    ("body", "ctype", "status", "code"),
    [
        (b"", "image/png", 400, "empty"),
        (b"this is not an image at all", "image/png", 415, "unsupported"),
        (png(0)[:40], "image/png", 422, "truncated"),
        (_bomb_png(50_000, 50_000), "image/png", 422, "too_large"),
        (b"GIF89a" + b"\0" * 32, "image/gif", 415, "unsupported_media_type"),
        (png(0), "text/plain", 415, "unsupported_media_type"),
        (b"--x\r\nbroken", "multipart/form-data; boundary=x", 400, "no_image"),
        (b"--x\r\nbroken", "multipart/form-data", 400, "malformed_multipart"),
    ],
    ids=[
        "empty",
        "not-image",
        "truncated",
        "bomb",
        "gif-type",
        "wrong-type",
        "no-file-part",
        "no-boundary",
    ],
)
def test_bad_input_gets_precise_4xx(
    client: TestClient, body: bytes, ctype: str, status: int, code: str
) -> None:
    r = inspect(client, body, ctype)
    assert r.status_code == status, r.text
    assert r.json()["code"] == code and r.json()["detail"]
    assert inspect(client, png(0)).status_code == 200  # still serving


def test_oversized_body_is_refused_with_413(client: TestClient) -> None:
    r = inspect(client, b"\x89PNG" + b"\0" * 300_000)
    assert r.status_code == 413 and r.json()["code"] == "body_too_large"


def test_unknown_and_malformed_model_names(client: TestClient) -> None:
    r = inspect(client, png(0), model="nosuch")
    assert r.status_code == 404 and "tiny" in r.json()["detail"]
    assert inspect(client, png(0), model="../../etc").status_code == 422
    assert inspect(client, png(0), model="x" * 300).status_code == 422


def test_inspections_filter_and_paginate(client: TestClient) -> None:
    for i in range(3):
        inspect(client, png(0), line_id="A", cell_id=f"c{i}")
    inspect(client, png(255), line_id="B")
    page = client.get(
        "/v1/inspections", params={"line_id": "A", "limit": 2}, headers=auth("operator")
    ).json()
    assert page["total"] == 3 and len(page["items"]) == 2
    scrap = client.get(
        "/v1/inspections", params={"verdict": "scrap"}, headers=auth("operator")
    ).json()
    assert scrap["total"] == 1 and scrap["items"][0]["line_id"] == "B"
    assert client.get("/v1/inspections/" + "0" * 32, headers=auth("operator")).status_code == 404


def test_reload_promote_and_refused_reload(client: TestClient, home) -> None:
    r = client.post("/v1/models/tiny/reload", json={"version": "2"}, headers=auth("admin"))
    assert r.status_code == 200 and r.json() == {
        "name": "tiny",
        "previous_version": "1",
        "version": "2",
    }
    assert inspect(client, png(0)).json()["model"]["version"] == "2"
    (home / "store" / "tiny" / "1" / "model.onnx").write_bytes(b"tampered")
    r = client.post("/v1/models/tiny/reload", json={"version": "1"}, headers=auth("admin"))
    assert r.status_code == 409 and "still serving" in r.json()["detail"]
    assert inspect(client, png(0)).json()["model"]["version"] == "2"
    r = client.post("/v1/models/tiny/promote", json={"version": "2"}, headers=auth("admin"))
    assert r.status_code == 200
    models = client.get("/v1/models", headers=auth("station")).json()
    assert models[0]["version"] == "2" and models[0]["classes"] == ["good", "crack", "scratch"]
    assert models[0]["providers"] == ["CPUExecutionProvider"]
    assert models[0]["test_time_views"] == "none"


def test_model_list_shows_the_test_time_views_a_version_averages(client: TestClient, home) -> None:
    version = publish_tiny(ModelStore(home / "store"), home, test_time_views="flips")
    r = client.post("/v1/models/tiny/reload", json={"version": version}, headers=auth("admin"))
    assert r.status_code == 200, r.text
    models = client.get("/v1/models", headers=auth("station")).json()
    assert (models[0]["version"], models[0]["test_time_views"]) == (version, "flips")


def test_a_replaced_version_is_freed_without_the_cyclic_collector(client: TestClient) -> None:
    """A reload's old engine must go with its last reference. Kept alive by a reference cycle
    it holds its ONNX Runtime session (on a GPU, 25-45 MiB of device memory per reload) until
    the cyclic collector happens to run: measured on an H100, 1.2 -> 4.1 GiB over 80 reloads."""
    registry = client.app.state.service.registry  # type: ignore[attr-defined]
    engines = []
    gc.disable()
    try:
        for version in ("2", "1", "2", "1"):
            inspect(client, png(0))  # each version serves a request before it is replaced
            engines.append(weakref.ref(registry.get(None)))
            r = client.post(
                "/v1/models/tiny/reload", json={"version": version}, headers=auth("admin")
            )
            assert r.status_code == 200, r.text
        deadline = time.monotonic() + 5  # the replaced engines close in the background
        while any(e() is not None for e in engines) and time.monotonic() < deadline:
            time.sleep(0.01)
        alive = [e() for e in engines if e() is not None]
    finally:
        gc.enable()
    assert alive == [], f"still alive after their reloads: {alive}"


def test_health_ready_and_metrics(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "live"}
    assert client.get("/readyz").json()["ready"] is True
    inspect(client, png(0), line_id="L9")
    text = client.get("/metrics").text
    assert 'cellinspect_inferences_total{model="tiny"}' in text
    assert 'cellinspect_executions_total{model="tiny"}' in text
    assert (
        'cellinspect_verdicts_total{label="good",line="L9",station="",verdict="pass"} 1.0' in text
    )
    assert 'cellinspect_model_info{model="tiny",version="1"} 1.0' in text
    assert "cellinspect_latency_seconds_bucket" in text and "cellinspect_queue_depth" in text


def test_v2_protocol_fp32_bytes_and_binary(client: TestClient) -> None:
    assert client.get("/v2/health/ready").json() == {"ready": True}
    meta = client.get("/v2/models/tiny", headers=auth("station")).json()
    assert meta["inputs"][0] == {"name": "image", "datatype": "FP32", "shape": [-1, 1, 8, 8]}
    dark = np.full((2, 1, 8, 8), -2.0, np.float32)
    req = {
        "inputs": [
            {
                "name": "image",
                "datatype": "FP32",
                "shape": [2, 1, 8, 8],
                "data": dark.ravel().tolist(),
            }
        ]
    }
    out = client.post("/v2/models/tiny/infer", json=req, headers=auth("station")).json()
    probs = np.array(out["outputs"][0]["data"]).reshape(out["outputs"][0]["shape"])
    assert probs.shape == (2, 3) and (probs.argmax(1) == 0).all()
    images = [base64.b64encode(png(255)).decode()]
    req = {"inputs": [{"name": "raw", "datatype": "BYTES", "shape": [1], "data": images}]}
    out = client.post("/v2/models/tiny/infer", json=req, headers=auth("station")).json()
    assert {o["name"]: o.get("data") for o in out["outputs"]}["verdict"] == ["scrap"]
    # Triton's binary tensor extension, as tritonclient sends it by default.
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "image",
                    "datatype": "FP32",
                    "shape": [2, 1, 8, 8],
                    "parameters": {"binary_data_size": dark.nbytes},
                }
            ],
            "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}],
        }
    ).encode()
    r = client.post(
        "/v2/models/tiny/infer",
        content=header + dark.tobytes(),
        headers={"Inference-Header-Content-Length": str(len(header)), **auth("station")},
    )
    n = int(r.headers["Inference-Header-Content-Length"])
    head = json.loads(r.content[:n])
    assert head["outputs"][0]["parameters"]["binary_data_size"] == 2 * 3 * 4
    assert np.allclose(np.frombuffer(r.content[n:], "<f4").reshape(2, 3), probs, atol=1e-6)
    bad = {
        "inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 1, 4, 4], "data": [0.0] * 16}]
    }
    assert (
        client.post("/v2/models/tiny/infer", json=bad, headers=auth("station")).status_code == 400
    )


def test_frame_regions_found_where_the_defect_is(client: TestClient) -> None:
    frame = np.zeros((64, 96), np.uint8)
    frame[24:32, 40:48] = 255  # one bright 8x8 patch: 'scratch' to the tiny model
    r = client.post(
        "/v1/inspect/frame",
        content=encode_png(frame),
        headers={"Content-Type": "image/png", **auth("station")},
        params={"overlap": 0.5, "pixel_pitch_mm": 0.1, "line_id": "L1"},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["verdict"] in ("review", "scrap") and body["tiles"] == 15 * 23
    (region,) = body["regions"]
    assert region["x"] <= 40 and region["x"] + region["w"] >= 48
    assert region["y"] <= 24 and region["y"] + region["h"] >= 32
    assert region["label"] == "scratch" and abs(region["x_mm"] - region["x"] * 0.1) < 1e-9
    stored = client.get(f"/v1/inspections/{body['inspection_id']}", headers=auth("operator")).json()
    assert stored["frame_regions"][0]["label"] == "scratch"


def test_clean_frame_passes(client: TestClient) -> None:
    r = client.post(
        "/v1/inspect/frame",
        content=encode_png(np.zeros((32, 48), np.uint8)),
        headers={"Content-Type": "image/png", **auth("station")},
    )
    assert r.status_code == 200 and r.json()["verdict"] == "pass" and r.json()["regions"] == []


def test_ready_reports_an_unreachable_records_database(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = client.app.state.service  # type: ignore[attr-defined]
    monkeypatch.setattr(service.records, "ping", lambda: False)
    reply = client.get("/readyz")
    assert reply.status_code == 503
    assert reply.json()["records"] == "unavailable" and reply.json()["ready"] is False
    assert client.get("/v2/health/ready").status_code == 503
    assert client.get("/healthz").status_code == 200  # still live: do not restart it for this
    monkeypatch.undo()
    assert client.get("/readyz").json() == {
        "ready": True,
        "models": {"tiny": "1"},
        "records": "ok",
    }


def test_archive_retention_runs_at_start_up(home: Path) -> None:
    old_day = home / "archive" / "2020-01-01" / "scrap" / "ab"
    old_day.mkdir(parents=True)
    (old_day / ("ab" + "0" * 62 + ".png")).write_bytes(png(0))
    with TestClient(create_app(make_settings(home, archive_retention_days=30))) as c:
        deadline = time.monotonic() + 5
        while (home / "archive" / "2020-01-01").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not (home / "archive" / "2020-01-01").exists()
        assert c.get("/readyz").status_code == 200


def test_start_up_objects_are_frozen_once_per_process(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Full collections must not walk what lives as long as the process (40-100 ms pauses
    # under load, benchmarks/RESULTS.md), but a process building many apps freezes once.
    monkeypatch.setattr(app_module, "_frozen", False)
    freezes: list[bool] = []
    monkeypatch.setattr(gc, "freeze", lambda: freezes.append(True))
    with TestClient(create_app(make_settings(home))) as c:
        assert freezes == [True]  # before the first request: start-up ends with it
        assert c.get("/readyz").status_code == 200
    with TestClient(create_app(make_settings(home))) as c:
        assert c.get("/readyz").status_code == 200
    assert freezes == [True]
