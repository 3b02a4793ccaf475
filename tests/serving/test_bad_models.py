"""Bad model versions cannot take the line down: refused at start, reload and promotion,
each with the problem named, while the served version keeps answering and readiness says so.

The checks themselves are tested lower down (tests/models/test_store.py, test_predict.py,
tests/serving/test_engine.py); here the service as the line sees it, over HTTP.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from fastapi.testclient import TestClient
from onnx import helper, numpy_helper
from servicekit import KEYS, auth, make_settings, png
from tinymodel import WEIGHTS, build_classifier, make_card

from cellinspect.models.runtime import ModelLoadError
from cellinspect.models.store import MODEL_FILE, IntegrityError, ModelStore
from cellinspect.serving.app import create_app


def _publish(store: ModelStore, onnx_path: Path) -> str:
    return store.publish(onnx_path, make_card("tiny")).version


def _corrupt(store: ModelStore, tmp: Path) -> str:
    # Published as is, so its sha256 matches the card: only ONNX Runtime can refuse it.
    path = tmp / "corrupt.onnx"
    path.write_bytes(b"\x08\x07\x12\x04not an onnx graph" + bytes(range(256)))
    return _publish(store, path)


def _wrong_input_shape(store: ModelStore, tmp: Path) -> str:
    # A valid model for 16x16 images; the card (and so the line's preprocessing) says 8x8.
    return _publish(store, build_classifier(tmp / "wide.onnx", input_shape=("N", 1, 16, 16)))


def _tampered(store: ModelStore, tmp: Path) -> str:
    # Replaced after publishing by another *valid* model of the right shape, so the sha256
    # check against the card is the only thing that can notice.
    version = _publish(store, build_classifier(tmp / "honest.onnx", weights=WEIGHTS * 3))
    swapped = build_classifier(tmp / "swapped.onnx", weights=-WEIGHTS)
    (store.root / "tiny" / version / MODEL_FILE).write_bytes(swapped.read_bytes())
    return version


def _nan_output(store: ModelStore, tmp: Path) -> str:
    nan_bias = np.full(3, np.nan, np.float32)
    return _publish(store, build_classifier(tmp / "nan.onnx", bias=nan_bias))


def _nan_where_mean_pixel_between(tmp: Path, low: float, high: float) -> Path:
    """The tiny model, but NaN for images whose normalised mean pixel lies in (low, high):
    logits = Gemm(mean) + sqrt((mean - low) * (mean - high)), finite everywhere else."""
    path = build_classifier(tmp / f"nan-between-{low}-{high}.onnx")
    model = onnx.load(path)
    graph = model.graph
    gemm = next(n for n in graph.node if n.op_type == "Gemm")
    gemm.output[0] = "linear"
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.array([low], np.float32), "LOW"),
            numpy_helper.from_array(np.array([high], np.float32), "HIGH"),
        ]
    )
    at = list(graph.node).index(gemm) + 1
    nodes = [
        helper.make_node("Sub", ["flat", "LOW"], ["above"]),
        helper.make_node("Sub", ["flat", "HIGH"], ["below"]),
        helper.make_node("Mul", ["above", "below"], ["band"]),
        helper.make_node("Sqrt", ["band"], ["root"]),
        helper.make_node("Add", ["linear", "root"], ["logits"]),
    ]
    for offset, node in enumerate(nodes):
        graph.node.insert(at + offset, node)
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def _nan_on_bright_images(store: ModelStore, tmp: Path) -> str:
    # Finite on the all-zero input (the mean image) and on dark images: a warm-up on zeros
    # alone passes it. Normalised pixels reach 2 at white.
    return _publish(store, _nan_where_mean_pixel_between(tmp, 0.0, 3.0))


@dataclass(frozen=True)
class BadKind:
    make: Callable[[ModelStore, Path], str]
    problem: str  # what the refusal must say, as a regex


BAD_KINDS = {
    "corrupt": BadKind(_corrupt, r"onnxruntime cannot load"),
    "wrong-input-shape": BadKind(
        _wrong_input_shape, r"has shape \[.*16, 16\].*makes \[N, 1, 8, 8\]"
    ),
    "tampered": BadKind(_tampered, r"fails its sha256 check"),
    "nan-output": BadKind(_nan_output, r"non-finite logits"),
    "nan-on-bright-images": BadKind(_nan_on_bright_images, r"non-finite logits"),
}


@dataclass(frozen=True)
class BadVersion:
    version: str
    problem: str


@pytest.fixture(params=list(BAD_KINDS))
def bad(request: pytest.FixtureRequest, home: Path) -> BadVersion:
    """A bad tiny@3 in the store beside the good tiny@1 (production) and tiny@2."""
    kind = BAD_KINDS[request.param]
    version = kind.make(ModelStore(home / "store"), home)
    assert version == "3"
    return BadVersion(version, kind.problem)


def _names_model_and_problem(message: str, bad: BadVersion) -> None:
    # The file path when ONNX Runtime itself refuses, the ref otherwise: either names it.
    assert f"tiny@{bad.version}" in message or f"tiny/{bad.version}/{MODEL_FILE}" in message
    assert re.search(bad.problem, message), message


def inspect_bright(client: TestClient) -> dict:
    r = client.post(
        "/v1/inspect", content=png(255), headers={"Content-Type": "image/png", **auth("station")}
    )
    assert r.status_code == 200, r.text
    return r.json()


def assert_serving_v1(client: TestClient) -> None:
    """tiny@1 answers, and every readiness view says it is ready and serving version 1."""
    body = inspect_bright(client)
    assert body["model"] == {"name": "tiny", "version": "1"}
    assert (body["verdict"], body["label"]) == ("scrap", "scratch")
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["models"] == {"tiny": "1"}
    assert client.get("/v2/health/ready").json() == {"ready": True}
    model_ready = client.get("/v2/models/tiny/ready", headers=auth("station"))
    assert model_ready.status_code == 200 and model_ready.json() == {"name": "tiny", "ready": True}
    served = client.get("/v1/models", headers=auth("station")).json()
    assert [(m["name"], m["version"]) for m in served] == [("tiny", "1")]


def test_service_refuses_to_start_on_a_bad_version(home: Path, bad: BadVersion) -> None:
    app = create_app(make_settings(home, models=[f"tiny@{bad.version}"]))
    with pytest.raises((ModelLoadError, IntegrityError)) as info, TestClient(app):
        pass
    _names_model_and_problem(str(info.value), bad)


def test_refused_reload_keeps_the_old_version_answering(
    client: TestClient, bad: BadVersion
) -> None:
    r = client.post("/v1/models/tiny/reload", json={"version": bad.version}, headers=auth("admin"))
    assert r.status_code == 409, r.text
    detail = r.json()["detail"]
    _names_model_and_problem(detail, bad)
    assert "still serving tiny@1" in detail
    assert_serving_v1(client)


@pytest.mark.parametrize("reload", [True, False], ids=["and-reload", "alias-only"])
def test_refused_promotion_moves_no_alias_and_keeps_serving(
    client: TestClient, home: Path, bad: BadVersion, reload: bool
) -> None:
    r = client.post(
        "/v1/models/tiny/promote",
        json={"version": bad.version, "reload": reload},
        headers=auth("admin"),
    )
    assert r.status_code == 409, r.text
    detail = r.json()["detail"]
    _names_model_and_problem(detail, bad)
    assert "production" in detail and "not moved" in detail
    store = ModelStore(home / "store")
    assert store.aliases("tiny") == {"production": "1"}
    assert all(move.to_version == "1" for move in store.alias_history("tiny"))
    assert_serving_v1(client)


def test_a_restart_after_refused_promotions_comes_up_on_the_good_version(
    client: TestClient, home: Path, bad: BadVersion
) -> None:
    for reload in (True, False):
        client.post(
            "/v1/models/tiny/promote",
            json={"version": bad.version, "reload": reload},
            headers=auth("admin"),
        )
    # What a restarted instance (or the next replica) loads: whatever production points at.
    with TestClient(create_app(make_settings(home, models=["tiny"]))) as restarted:
        assert_serving_v1(restarted)


def test_a_good_promotion_after_a_refused_one_still_works(client: TestClient, home: Path) -> None:
    store = ModelStore(home / "store")
    bad = _nan_output(store, home)
    refused = client.post("/v1/models/tiny/promote", json={"version": bad}, headers=auth("admin"))
    assert refused.status_code == 409
    r = client.post("/v1/models/tiny/promote", json={"version": "2"}, headers=auth("admin"))
    assert r.status_code == 200 and r.json() == {
        "name": "tiny",
        "previous_version": "1",
        "version": "2",
    }
    assert store.aliases("tiny") == {"production": "2"}
    assert inspect_bright(client)["model"]["version"] == "2"
    assert client.get("/readyz").json()["models"] == {"tiny": "2"}


def test_a_bad_shadow_candidate_leaves_the_line_running(
    home: Path, bad: BadVersion, caplog: pytest.LogCaptureFixture
) -> None:
    settings = make_settings(home, shadow_models={"tiny": f"tiny@{bad.version}"})
    with TestClient(create_app(settings)) as client:
        assert_serving_v1(client)
        assert client.app.state.service.registry.candidate("tiny") is None  # type: ignore[attr-defined]
    refusals = [r.getMessage() for r in caplog.records if "shadow candidate" in r.getMessage()]
    assert refusals, "the refused candidate was not logged"
    _names_model_and_problem(refusals[0], bad)


@pytest.mark.parametrize("kind", ["nan-output"])
def test_cellinspect_serve_exits_naming_the_problem(home: Path, kind: str) -> None:
    """The real process: a bad model makes `cellinspect serve` exit non-zero, never hang."""
    version = BAD_KINDS[kind].make(ModelStore(home / "store"), home)
    env = {
        **os.environ,
        "CELLINSPECT_HOME": str(home),
        "CELLINSPECT_API_KEYS": ",".join(f"{r}:{k}" for r, k in KEYS.items()),
        "CELLINSPECT_INTRA_OP_THREADS": "1",
    }
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    argv = [sys.executable, "-m", "cellinspect.cli", "serve", "--model", f"tiny@{version}"]
    done = subprocess.run(
        [*argv, "--port", port], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode != 0
    log = done.stdout + done.stderr
    assert f"tiny@{version}" in log and "non-finite" in log, log[-2000:]
    assert "Application startup failed" in log


def test_nan_on_an_image_the_warm_up_missed_gives_a_clear_500_never_a_verdict(
    home: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """No warm-up sees every image: a NaN that slips through must fail that one image loudly
    (a NaN defect probability compares False with every threshold, so it would pass)."""
    store = ModelStore(home / "store")
    # NaN only for mean pixels around 0.75 (normalised 0.9 to 1.1): no probe image is there.
    version = _publish(store, _nan_where_mean_pixel_between(home, 0.9, 1.1))
    with TestClient(create_app(make_settings(home, models=[f"tiny@{version}"]))) as client:
        headers = {"Content-Type": "image/png", **auth("station")}
        r = client.post("/v1/inspect", content=png(190), headers=headers)
        assert r.status_code == 500, r.text
        assert r.json()["code"] == "model_output_invalid"
        assert f"tiny@{version}" in r.json()["detail"] and "non-finite" in r.json()["detail"]
        assert "verdict" not in r.json() or r.json().get("verdict") is None
        ok = client.post("/v1/inspect", content=png(255), headers=headers)
        assert ok.status_code == 200 and ok.json()["verdict"] == "scrap"
        page = client.get("/v1/inspections", headers=auth("operator")).json()
        assert page["total"] == 1, "the image without a verdict must not be recorded as one"
        assert client.get("/readyz").status_code == 200
    assert any(
        r.levelname == "ERROR" and f"tiny@{version}" in r.getMessage() for r in caplog.records
    )
