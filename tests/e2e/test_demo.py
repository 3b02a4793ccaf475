"""The README's main job, end to end, with its quality bar (slow: ~4 minutes on 2 cores)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cellinspect.models.store import ModelStore


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_demo_publishes_model_meeting_heldout_macro_f1(tmp_path: Path) -> None:
    env = {**os.environ, "CELLINSPECT_HOME": str(tmp_path), "COLUMNS": "200"}
    result = subprocess.run(
        [sys.executable, "-m", "cellinspect.cli", "demo", "--no-serve"],
        capture_output=True,
        text=True,
        env=env,
        timeout=1100,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    store = ModelStore(tmp_path / "store")
    card, _ = store.load_verified("electrode-defects@staging")
    assert card.metrics["heldout"].data.count == 800
    assert card.metrics["heldout"].macro_f1 >= 0.97, card.metrics["heldout"]
    assert card.parity["max_abs_diff"] <= 1e-4
    shown = subprocess.run(
        [sys.executable, "-m", "cellinspect.cli", "models", "show", "electrode-defects"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert shown.returncode == 0 and "heldout" in shown.stdout
    # The recipe trains the auxiliary CAM head: the card names the gated map it exports.
    assert card.heatmap == "aux-cam-x-grad-cam"
    assert "heatmap    aux-cam-x-grad-cam" in shown.stdout
