"""`cellinspect data freeze`, `models eval|compare` and the promotion gate, as users run them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from clikit import cli
from qakit import STRONG, WEAK, brightness_set, flat_png, publish_binary, write_set

from cellinspect.models.store import ModelStore


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A home with held-out set 'held' frozen and tiny v1 (strong), v2 (weak), v3 (= v1)."""
    root = tmp_path_factory.mktemp("qa")
    manifest_path, _ = write_set(root / "data", brightness_set())
    result = cli("data", "freeze", str(manifest_path), "--name", "held", home=root)
    assert result.returncode == 0, result.stderr
    assert "froze held-out set 'held'" in result.stdout and "60 images" in result.stdout
    store = ModelStore(root / "store")
    for weights in (STRONG, WEAK, STRONG):
        publish_binary(store, root, weights)
    return root


def test_eval_writes_reports_and_reuses_cached_predictions(home: Path) -> None:
    first = cli("models", "eval", "tiny@1", "--data", "held", "--allow-overlap", home=home)
    assert first.returncode == 0, first.stderr
    assert "evaluated now" in first.stdout and "images/s" in first.stdout
    out = home / "evals" / "tiny@1__held"
    for name in ("eval.json", "summary.md", "predictions.csv", "report.html"):
        assert (out / name).is_file(), name
    report = json.loads((out / "eval.json").read_text())
    assert report["leakage"]["status"] == "unverified" and not report["cached"]
    again = cli("models", "eval", "tiny@1", "--data", "held", "--allow-overlap", home=home)
    assert again.returncode == 0, again.stderr
    assert "cached predictions" in again.stdout
    assert json.loads((out / "eval.json").read_text())["cached"] is True


def test_eval_without_known_training_data_needs_allow_overlap(home: Path) -> None:
    result = cli("models", "eval", "tiny@1", "--data", "held", home=home)
    assert result.returncode == 2
    assert "cannot rule out leakage" in result.stderr and "--allow-overlap" in result.stderr
    assert "Traceback" not in result.stderr


def test_compare_gate_fails_for_a_weaker_version_naming_the_metric(home: Path) -> None:
    args = ("--data", "held", "--allow-overlap", "--gate", "accuracy", "--margin", "0.0")
    result = cli("models", "compare", "tiny@1", "tiny@2", *args, home=home)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "gate FAIL tiny@2 vs tiny@1" in result.stdout
    assert "worse beyond the margin: accuracy" in result.stdout
    out = home / "evals" / "compare" / "tiny@1__vs__tiny@2__held"
    assert (out / "compare.html").is_file() and (out / "compare.json").is_file()


def test_compare_gate_passes_for_equal_versions(home: Path) -> None:
    args = ("--data", "held", "--allow-overlap", "--gate", "accuracy", "--margin", "0.0")
    result = cli("models", "compare", "tiny@1", "tiny@3", *args, home=home)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "gate PASS tiny@3 vs tiny@1" in result.stdout


def test_unknown_gate_metric_lists_the_valid_ones(home: Path) -> None:
    result = cli(
        "models", "compare", "tiny@1", "tiny@2", "--data", "held", "--gate", "f2", home=home
    )
    assert result.returncode == 2
    assert "accuracy" in result.stderr and "false_scrap_rate" in result.stderr


def test_promote_with_a_gate_keeps_the_alias_on_a_worse_version(home: Path) -> None:
    assert cli("models", "promote", "tiny", "1", home=home).returncode == 0
    gate = ("--gate-on", "held", "--gate", "accuracy", "--allow-overlap")
    worse = cli("models", "promote", "tiny", "2", *gate, home=home)
    assert worse.returncode == 1, worse.stdout + worse.stderr
    assert "gate FAIL" in worse.stdout and "production not moved" in worse.stdout
    assert ModelStore(home / "store").aliases("tiny")["production"] == "1"
    equal = cli("models", "promote", "tiny", "3", *gate, home=home)
    assert equal.returncode == 0, equal.stdout + equal.stderr
    assert ModelStore(home / "store").aliases("tiny")["production"] == "3"


def test_freeze_refuses_other_data_under_a_frozen_name(home: Path, tmp_path: Path) -> None:
    other, _ = write_set(tmp_path / "other", [(5, "good"), (250, "defect")])
    result = cli("data", "freeze", str(other), "--name", "held", home=home)
    assert result.returncode == 2
    assert "already frozen with manifest hash" in result.stderr


def test_eval_refuses_a_changed_heldout_file(tmp_path: Path) -> None:
    manifest_path, manifest = write_set(tmp_path / "data", [(5, "good"), (250, "defect")])
    assert cli("data", "freeze", str(manifest_path), "--name", "h", home=tmp_path).returncode == 0
    publish_binary(ModelStore(tmp_path / "store"), tmp_path)
    victim = Path(manifest.samples[0].path)
    flat_png(victim, 77, size=20)
    result = cli("models", "eval", "tiny", "--data", "h", "--allow-overlap", home=tmp_path)
    assert result.returncode == 2
    assert victim.name in result.stderr and "contents changed" in result.stderr
