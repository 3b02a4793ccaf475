"""A minute of coverage-guided fuzzing of the upload decoder finds no crash (fuzz_decode.py)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("atheris", reason="the fuzz extra is not installed")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

SCRIPT = Path(__file__).with_name("fuzz_decode.py")
SECONDS = 60


def test_a_minute_of_fuzzing_finds_no_crash(tmp_path: Path) -> None:
    crashes = tmp_path / "crashes"
    run = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            f"-max_total_time={SECONDS}",
            f"-artifact_prefix={crashes}/",
            "-print_final_stats=1",
            str(tmp_path / "corpus"),
        ],
        capture_output=True,
        text=True,
        errors="replace",
        timeout=SECONDS + 180,
    )
    log = run.stderr
    stats = dict(re.findall(r"^stat::(\w+):\s+(\d+)", log, re.MULTILINE))
    print(
        f"\natheris: {stats.get('number_of_executed_units')} runs,"
        f" {stats.get('average_exec_per_sec')} exec/s, {stats.get('new_units_added')} new"
        f" inputs, peak RSS {stats.get('peak_rss_mb')} MB"
    )
    found = sorted(p.name for p in crashes.glob("*")) if crashes.exists() else []
    assert run.returncode == 0 and found == [], f"{found}\n{log[-4000:]}"
    assert "seeded with" in log  # it started from the hostile corpus, not from nothing
    assert int(stats["number_of_executed_units"]) > 1_000
