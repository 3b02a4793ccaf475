"""Shadow mode: a candidate runs beside the served model, is recorded and counted, never answers."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError
from servicekit import auth, make_settings, png
from tinymodel import SPEC, build_classifier, make_card
from typer.testing import CliRunner

from cellinspect.cli import app as cli_app
from cellinspect.models.card import Verdict
from cellinspect.models.store import ModelStore
from cellinspect.serving import records as records_module
from cellinspect.serving.app import create_app
from cellinspect.serving.batcher import MicroBatcher
from cellinspect.serving.engine import SHADOW_NICENESS, lower_thread_priority
from cellinspect.serving.records import InspectionRecord, RecordStore, ShadowResult
from cellinspect.serving.settings import Settings

# On line L-S both models scrap from a defect probability of 0.15. A mid-gray image (120)
# reads 0.20 to tiny@1 (scrap) and 0.10 to the sharper tiny@2 (pass); dark (0) passes and
# bright (255) scraps for both; every label is the same.
LINE = "L-S"
LINE_POINTS = {LINE: {"review_low": 0.15, "scrap_threshold": 0.15}}
DARK, GRAY, BRIGHT = 0, 120, 255
POLL_S = 5.0


@pytest.fixture(autouse=True)
def quick_shadow_flush(monkeypatch: pytest.MonkeyPatch) -> None:
    """Shadow results wait for the next records commit 1 s in service; the tests poll less."""
    monkeypatch.setattr(records_module, "SHADOW_FLUSH_S", 0.02)


def shadow_settings(home: Path, **overrides: object) -> Settings:
    fields: dict[str, object] = {
        "shadow_models": {"tiny": "tiny@2"},
        "shadow_share": 1.0,
        "line_operating_points": LINE_POINTS,
    }
    return make_settings(home, **{**fields, **overrides})


def inspect(client: TestClient, value: int) -> dict[str, Any]:
    r = client.post(
        "/v1/inspect",
        content=png(value),
        headers={"Content-Type": "image/png", **auth("station")},
        params={"line_id": LINE},
    )
    assert r.status_code == 200, r.text
    return r.json()


def record(client: TestClient, inspection_id: str) -> dict[str, Any]:
    r = client.get(f"/v1/inspections/{inspection_id}", headers=auth("operator"))
    assert r.status_code == 200, r.text
    return r.json()


def shadowed_record(client: TestClient, inspection_id: str) -> dict[str, Any]:
    """The record once its shadow result is there (or as it is after POLL_S)."""
    deadline = time.monotonic() + POLL_S
    while True:
        found = record(client, inspection_id)
        if found["shadow_verdict"] is not None or time.monotonic() > deadline:
            return found
        time.sleep(0.01)


def metric(client: TestClient, name: str, **labels: str) -> float:
    """A sample's value from /metrics (0 when absent)."""
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def answer(body: dict[str, Any]) -> dict[str, Any]:
    """What the line acts on: everything but the id and the timings."""
    return {k: v for k, v in body.items() if k not in ("inspection_id", "timings")}


@dataclass
class ShadowedRun:
    settings: Settings
    bodies: dict[int, dict[str, Any]]  # pixel value -> answer
    records: dict[int, dict[str, Any]]  # pixel value -> record with its shadow result
    metrics: dict[str, float]


@pytest.fixture
def shadowed(home: Path) -> ShadowedRun:
    """Dark, gray and bright inspected with tiny@2 shadowing tiny@1 on every request."""
    settings = shadow_settings(home)
    with TestClient(create_app(settings)) as client:
        bodies = {v: inspect(client, v) for v in (DARK, GRAY, BRIGHT)}
        records = {v: shadowed_record(client, b["inspection_id"]) for v, b in bodies.items()}
        pair = {"model": "tiny", "candidate": "tiny@2"}
        metrics = {
            "runs": metric(client, "cellinspect_shadow_runs_total", **pair),
            "label_agree": metric(client, "cellinspect_shadow_label_agreements_total", **pair),
            "verdict_agree": metric(client, "cellinspect_shadow_verdict_agreements_total", **pair),
            "scrap_to_pass": metric(
                client,
                "cellinspect_shadow_verdict_changes_total",
                from_verdict="scrap",
                to_verdict="pass",
                **pair,
            ),
            "dropped": metric(client, "cellinspect_shadow_dropped_total", model="tiny"),
        }
    return ShadowedRun(settings, bodies, records, metrics)


# ---- the service -------------------------------------------------------------------------


def test_every_sampled_inspection_gets_the_candidates_result_recorded(
    shadowed: ShadowedRun,
) -> None:
    shadow = {
        v: (r["shadow_model_version"], r["shadow_label"], r["shadow_verdict"])
        for v, r in shadowed.records.items()
    }
    assert shadow == {
        DARK: ("2", "good", "pass"),
        GRAY: ("2", "good", "pass"),
        BRIGHT: ("2", "scratch", "scrap"),
    }
    # The record keeps the served model's own answer.
    gray = shadowed.records[GRAY]
    assert (gray["model_version"], gray["label"], gray["verdict"]) == ("1", "good", "scrap")
    assert shadowed.bodies[GRAY]["verdict"] == "scrap"


def test_metrics_count_runs_agreement_and_the_direction_of_verdict_changes(
    shadowed: ShadowedRun,
) -> None:
    assert shadowed.metrics == {
        "runs": 3,
        "label_agree": 3,
        "verdict_agree": 2,
        "scrap_to_pass": 1,
        "dropped": 0,
    }


def test_a_candidate_with_another_input_size_gets_its_own_preprocessing(
    home: Path, tmp_path: Path
) -> None:
    store = ModelStore(home / "store")
    spec = SPEC.model_copy(update={"height": 16, "width": 16})
    onnx = build_classifier(tmp_path / "tiny-16.onnx", input_shape=("N", 1, 16, 16))
    version = store.publish(onnx, make_card("tiny", preprocessing=spec)).version
    with TestClient(create_app(shadow_settings(home, shadow_models={"tiny": "tiny@3"}))) as client:
        body = inspect(client, BRIGHT)
        found = shadowed_record(client, body["inspection_id"])
    assert version == "3"
    assert (found["shadow_model_version"], found["shadow_label"]) == ("3", "scratch")


def test_share_zero_runs_no_candidate(home: Path) -> None:
    with TestClient(create_app(shadow_settings(home, shadow_share=0.0))) as client:
        service = client.app.state.service  # type: ignore[attr-defined]
        assert service.registry.candidate("tiny") is not None  # loaded, but never sampled
        bodies = [inspect(client, v) for v in (DARK, GRAY)]
        assert service.shadow.pending == 0  # sampling is decided before any task exists
        assert all(record(client, b["inspection_id"])["shadow_verdict"] is None for b in bodies)
        assert metric(client, "cellinspect_shadow_runs_total") == 0


def test_the_answer_is_identical_with_and_without_shadow_mode(home: Path) -> None:
    answers = []
    for settings in (make_settings(home, line_operating_points=LINE_POINTS), shadow_settings(home)):
        with TestClient(create_app(settings)) as client:
            answers.append([answer(inspect(client, v)) for v in (DARK, GRAY, BRIGHT)])
    assert answers[0] == answers[1]
    assert [a["verdict"] for a in answers[1]] == ["pass", "scrap", "scrap"]


def test_a_failing_candidate_leaves_the_answer_alone_and_is_counted(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("candidate exploded")

    with TestClient(create_app(shadow_settings(home))) as client:
        service = client.app.state.service  # type: ignore[attr-defined]
        monkeypatch.setattr(service.registry.candidate("tiny"), "infer", broken)
        body = inspect(client, GRAY)
        assert (body["verdict"], body["label"], body["model"]["version"]) == ("scrap", "good", "1")
        deadline = time.monotonic() + POLL_S
        while service.shadow.pending and time.monotonic() < deadline:
            time.sleep(0.01)
        failed = metric(client, "cellinspect_shadow_dropped_total", model="tiny", reason="failed")
        assert failed == 1
        assert metric(client, "cellinspect_shadow_runs_total") == 0
        assert record(client, body["inspection_id"])["shadow_verdict"] is None


@pytest.mark.parametrize("busy_with", ["queue_depth", "batches_in_flight"])
def test_no_shadow_run_while_live_images_wait_or_run(
    home: Path, monkeypatch: pytest.MonkeyPatch, busy_with: str
) -> None:
    with TestClient(create_app(shadow_settings(home))) as client:
        service = client.app.state.service  # type: ignore[attr-defined]
        # Every batcher reports one image waiting, or one batch running, when the inspection
        # is offered: more than shadow_max_primary_queue (0).
        monkeypatch.setattr(MicroBatcher, busy_with, property(lambda _self: 1))
        body = inspect(client, DARK)
        assert service.shadow.pending == 0
        busy = metric(
            client, "cellinspect_shadow_dropped_total", model="tiny", reason="primary_busy"
        )
        assert busy == 1
        assert record(client, body["inspection_id"])["shadow_verdict"] is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice is Linux's")
def test_the_candidates_worker_thread_alone_runs_at_the_lowest_priority(home: Path) -> None:
    def niceness() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    main_before, seen = niceness(), []

    def worker() -> None:
        lower_thread_priority()
        seen.append(niceness())

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen == [SHADOW_NICENESS] and niceness() == main_before
    with TestClient(create_app(shadow_settings(home))) as client:
        registry = client.app.state.service.registry  # type: ignore[attr-defined]
        assert registry.candidate("tiny").batcher.worker_init is lower_thread_priority
        assert registry.get("tiny").batcher.worker_init is None


# ---- settings ----------------------------------------------------------------------------


def test_shadow_models_come_from_json_in_the_environment(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CELLINSPECT_SHADOW_MODELS", '{"tiny": "tiny@2"}')
    monkeypatch.setenv("CELLINSPECT_SHADOW_SHARE", "0.25")
    settings = make_settings(home)
    assert (settings.shadow_models, settings.shadow_share) == ({"tiny": "tiny@2"}, 0.25)


@pytest.mark.parametrize(
    ("shadow_models", "share", "message"),
    [
        ({"tiny": "other@2"}, 1.0, "must be a version of it"),
        ({"other": "other@2"}, 1.0, "not served"),
        ({"tiny": "tiny@"}, 1.0, "alias"),
        ({"tiny": "tiny@2"}, 1.5, "less than or equal to 1"),
    ],
    ids=["other-model", "unserved", "bad-ref", "share-above-1"],
)
def test_settings_refuse_bad_shadow_candidates(
    home: Path, shadow_models: dict[str, str], share: float, message: str
) -> None:
    with pytest.raises(ValidationError, match=message):
        make_settings(home, shadow_models=shadow_models, shadow_share=share)


# ---- the records update path -------------------------------------------------------------


def _record() -> InspectionRecord:
    return InspectionRecord(
        model_name="tiny",
        model_version="1",
        label="good",
        confidence=0.9,
        probabilities={"good": 0.9, "crack": 0.05, "scratch": 0.05},
        verdict=Verdict.PASS,
        image_sha256="0" * 64,
    )


def test_shadow_results_are_committed_by_the_writer_and_refused_when_it_is_behind(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'records.sqlite3'}"
    store = RecordStore(url, max_group=2)
    records = [_record() for _ in range(3)]
    store.add_many_sync(records)
    results = [ShadowResult(r.id, "2", "crack", Verdict.SCRAP) for r in records]
    # The writer is not started yet: once a full commit group waits, the next is refused.
    assert [store.add_shadow_result(r) for r in results] == [True, True, False]
    store.start_sync()
    store.close_sync()  # drains: what was accepted is committed
    assert not store.add_shadow_result(results[2])  # closed: refused, never raises
    with RecordStore(url) as reread:
        stored = [reread.get(r.id) for r in records]
    assert [(s.shadow_model_version, s.shadow_verdict) for s in stored if s] == [
        ("2", Verdict.SCRAP),
        ("2", Verdict.SCRAP),
        (None, None),
    ]


def test_shadow_results_ride_along_with_the_next_commit_of_records(tmp_path: Path) -> None:
    store = RecordStore(f"sqlite:///{tmp_path / 'records.sqlite3'}")
    store.shadow_flush_s = 60.0  # never alone within this test
    first, second = _record(), _record()
    store.add_many_sync([first])
    store.start_sync()
    try:
        assert store.add_shadow_result(ShadowResult(first.id, "2", "good", Verdict.PASS))
        time.sleep(0.1)
        held = store.get(first.id)
        assert held is not None and held.shadow_verdict is None  # no commit of its own
        asyncio.run(store.add(second))
        rode = store.get(first.id)
        assert rode is not None and rode.shadow_verdict is Verdict.PASS
    finally:
        store.close_sync()


# ---- compare-live ------------------------------------------------------------------------


def test_compare_live_reports_agreement_and_verdict_changes(
    shadowed: ShadowedRun, tmp_path: Path
) -> None:
    since = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
    args = ["models", "compare-live", "tiny", "--since", since, "--db", shadowed.settings.database]
    out = tmp_path / "live.json"
    result = CliRunner().invoke(cli_app, [*args, "--json", str(out)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for text in (
        "tiny@1 (served) vs @2 (shadow candidate): 3 inspections",
        "label agreement 100.00%",
        "verdict agreement 66.67%",
        "scrap->pass 3333.33",
        "candidate scraps 0",
        "spares 1",
        "no significant difference",
    ):
        assert text in result.output, text
    (saved,) = json.loads(out.read_text())
    assert saved["n"] == 3 and saved["verdict_matrix"]["scrap"]["pass"] == 1


def test_compare_live_without_shadow_results_says_so_and_exits_1(shadowed: ShadowedRun) -> None:
    since = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    until = (datetime.now(UTC) + timedelta(hours=2)).isoformat()
    args = ["models", "compare-live", "tiny", "--since", since, "--until", until]
    result = CliRunner().invoke(
        cli_app, [*args, "--db", shadowed.settings.database], env={"COLUMNS": "200"}
    )
    assert result.exit_code == 1, result.output
    assert "no inspections of tiny with a shadow result" in result.output
