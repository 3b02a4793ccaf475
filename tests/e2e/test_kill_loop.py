"""No acknowledged verdict is lost (RELIABILITY promise 1), cut short for the test suite.

benchmarks/kill_loop.py with a few kills instead of its default 20, and a couple of
PostgreSQL restarts; the full run is the script's documented default command.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from sqlalchemy import text

from cellinspect.models.card import Verdict
from cellinspect.serving.records import InspectionRecord, RecordStore

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
SCRIPT = BENCHMARKS / "kill_loop.py"
URL_ENV = "CELLINSPECT_TEST_POSTGRES_URL"
POSTGRES_URL = os.environ.get(URL_ENV)
needs_postgres = pytest.mark.skipif(
    not POSTGRES_URL, reason=f"{URL_ENV} is not set; start one with .ci/postgres.sh"
)
TIME_LIMIT_S = 80  # the script stops itself by then; model export comes on top


def kill_loop(tmp_path: Path, *args: str) -> dict[str, Any]:
    """Run the script; its report, after asserting it passed and lost nothing."""
    pytest.importorskip("torch", reason="the script exports its model with the train extra")
    out = tmp_path / "report.json"
    done = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            *args,
            "--json",
            str(out),
            "--time-limit-s",
            str(TIME_LIMIT_S),
        ],
        capture_output=True,
        text=True,
        timeout=TIME_LIMIT_S + 60,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    report = json.loads(out.read_text())
    final = report["final"]
    assert report["acknowledged"] > 0 and final["acknowledged"] == report["acknowledged"]
    doubled = (final["duplicate_cells"], final["duplicate_keys"])
    assert (final["lost"], final["mismatched"], *doubled) == (0, 0, 0, 0), final
    assert final["integrity"] == "ok", final
    assert all(c["lost"] == 0 and c["integrity"] == "ok" for c in report["checks_after_restart"])
    assert report["seconds"] <= TIME_LIMIT_S + 10
    # Pass and review come from line operating points: the verdict check has teeth.
    assert {"pass", "review"} <= set(report["verdicts"]), report["verdicts"]
    return report


def load_killkit(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """benchmarks/killkit.py, which is no package (dataclasses look their module up by name)."""
    spec = importlib.util.spec_from_file_location("killkit", BENCHMARKS / "killkit.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "killkit", module)
    spec.loader.exec_module(module)
    return module


def stored(
    record_id: str, line_id: str, cell_id: str, verdict: Verdict, key: str | None = None
) -> InspectionRecord:
    return InspectionRecord(
        id=record_id,
        line_id=line_id,
        cell_id=cell_id,
        idempotency_key=key,
        model_name="bench",
        model_version="1",
        label="ok",
        confidence=0.9,
        probabilities={"ok": 0.9},
        verdict=verdict,
        image_sha256="0" * 64,
    )


def test_checker_reports_lost_changed_and_doubled_records(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The check must be able to fail: a pass proves nothing otherwise.
    killkit = load_killkit(monkeypatch)
    url = f"sqlite:///{tmp_path / 'records.sqlite3'}"
    with RecordStore(url) as store:
        store.add_many_sync(
            [
                stored("kept", "run-1-pass", "c0-0", Verdict.PASS),
                stored("changed", "run-1-review", "c1-0", Verdict.REVIEW),
                stored("doubled", "run-1-review", "c1-0", Verdict.REVIEW),
                stored("orphan", "run-1-card", "c2-0", Verdict.SCRAP),
                stored("other-run", "run-2-pass", "c0-0", Verdict.PASS),
            ]
        )
        # What the unique index forbids, forced in: one key recorded for two cells.
        with store.engine.begin() as conn:
            conn.execute(text("DROP INDEX ix_inspections_idempotency_key"))
        store.add_many_sync(
            [
                stored("keyed-a", "run-1-card", "c3-0", Verdict.SCRAP, key="client-3:c3-0:x"),
                stored("keyed-b", "run-1-card", "c3-1", Verdict.SCRAP, key="client-3:c3-0:x"),
            ]
        )
    acks = [
        killkit.Ack("kept", "pass", "ok", "c0-0", 0.0, 0.0),
        killkit.Ack("changed", "scrap", "ok", "c1-0", 0.0, 0.0),
        killkit.Ack("lost", "pass", "ok", "c0-1", 0.0, 0.0),
    ]
    answers = {"c1-0": "2xx", "c2-0": "503 records_unavailable"}
    check = killkit.check_database(url, "run-1", acks, answers)
    counts = (check.records, check.lost, check.mismatched, check.duplicate_cells)
    assert counts == (6, 1, 1, 1) and check.duplicate_keys == 1
    assert check.lost_ids == ["lost"] and check.mismatches[0]["stored"] == "review/ok"
    assert check.unacknowledged_answers == {"2xx": 1, "503 records_unavailable": 1, "none": 2}
    assert check.integrity == "ok" and not check.ok


@pytest.mark.slow
@pytest.mark.timeout(TIME_LIMIT_S + 90)
def test_sigkill_under_load_loses_no_acknowledged_verdict_sqlite(tmp_path: Path) -> None:
    report = kill_loop(tmp_path, "--kills", "5", "--clients", "4")
    assert report["kills"] == 5 and report["restarts"] == 5
    assert report["final"]["integrity_method"] == "PRAGMA integrity_check"
    assert "timeout" not in report["outcomes"]


@pytest.mark.slow
@pytest.mark.postgres
@needs_postgres
@pytest.mark.timeout(TIME_LIMIT_S + 90)
def test_sigkill_under_load_loses_no_acknowledged_verdict_postgres(tmp_path: Path) -> None:
    assert POSTGRES_URL
    report = kill_loop(tmp_path, "--kills", "3", "--clients", "4", "--database-url", POSTGRES_URL)
    assert report["kills"] == 3 and report["backend"] == "postgresql"


@pytest.mark.slow
@pytest.mark.postgres
@needs_postgres
@pytest.mark.timeout(TIME_LIMIT_S + 90)
def test_postgres_restart_answers_503_then_records_again(tmp_path: Path) -> None:
    if shutil.which("pg_ctl") is None and not list(Path("/usr/lib/postgresql").glob("*/bin")):
        pytest.skip("PostgreSQL server binaries not installed (the script runs its own cluster)")
    report = kill_loop(
        tmp_path, "--restart-postgres", "--pg-restarts", "2", "--pg-down-s", "2", "--clients", "4"
    )
    assert report["restarts"] == 2
    for event in report["events"]:
        # While the server is gone: only clear 503s, each with Retry-After, none slow.
        assert set(event["answers_while_down"]) == {"503 records_unavailable"}, event
        assert event["503s_without_retry_after"] == 0
        assert event["max_latency_s"] < 5
        # The same server process records again once PostgreSQL is back.
        assert event["recovery_s"] is not None and event["recovery_s"] < 10, event
    # A clear answer: a detail saying what failed, and when to come back.
    example = report["examples"]["503 records_unavailable"]
    assert example.startswith("Retry-After: 2;") and "recorded" in example, example
