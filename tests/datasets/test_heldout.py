"""Frozen held-out sets: registered by hash, re-verified before every use."""

from __future__ import annotations

from pathlib import Path

import pytest
from qakit import flat_png, write_set

from cellinspect.datasets.errors import DataError
from cellinspect.datasets.heldout import (
    HeldoutChangedError,
    freeze_heldout,
    list_heldout,
    load_heldout,
    read_heldout,
)

ITEMS = [(10, "good"), (40, "good"), (200, "defect"), (230, "defect")]


@pytest.fixture
def manifest_path(tmp_path: Path) -> Path:
    return write_set(tmp_path / "held", ITEMS)[0]


def test_freeze_records_the_manifest_hash_and_counts(manifest_path: Path, tmp_path: Path) -> None:
    root = tmp_path / "heldout"
    entry, created = freeze_heldout(manifest_path, "line-a", root=root)
    assert created and (root / "line-a.json").is_file()
    assert entry.count == 4 and entry.class_counts == {"defect": 2, "good": 2}
    assert read_heldout(root, "line-a") == entry
    assert [e.name for e in list_heldout(root)] == ["line-a"]
    loaded, manifest = load_heldout(root, "line-a")
    assert loaded.manifest_hash == manifest.hash == entry.manifest_hash


def test_freezing_the_same_data_again_is_a_no_op(manifest_path: Path, tmp_path: Path) -> None:
    root = tmp_path / "heldout"
    first, _ = freeze_heldout(manifest_path, "line-a", root=root)
    again, created = freeze_heldout(manifest_path, "line-a", root=root)
    assert not created and again == first


def test_a_name_cannot_be_refrozen_with_other_data(manifest_path: Path, tmp_path: Path) -> None:
    root = tmp_path / "heldout"
    freeze_heldout(manifest_path, "line-a", root=root)
    other, _ = write_set(tmp_path / "other", [*ITEMS, (250, "defect")])
    with pytest.raises(ValueError, match="already frozen with manifest hash"):
        freeze_heldout(other, "line-a", root=root)
    assert read_heldout(root, "line-a").count == 4


def test_changed_file_is_refused_naming_the_file(manifest_path: Path, tmp_path: Path) -> None:
    root = tmp_path / "heldout"
    freeze_heldout(manifest_path, "line-a", root=root)
    changed = next((manifest_path.parent / "defect").glob("*.png"))
    flat_png(changed, 99, size=12)
    with pytest.raises(HeldoutChangedError, match=f"{changed.name}: contents changed"):
        load_heldout(root, "line-a")


def test_missing_file_is_refused_naming_the_file(manifest_path: Path, tmp_path: Path) -> None:
    root = tmp_path / "heldout"
    freeze_heldout(manifest_path, "line-a", root=root)
    gone = next((manifest_path.parent / "good").glob("*.png"))
    gone.unlink()
    with pytest.raises(HeldoutChangedError, match=f"{gone.name}: file not found"):
        load_heldout(root, "line-a")


def test_a_changed_set_cannot_be_frozen(manifest_path: Path, tmp_path: Path) -> None:
    next((manifest_path.parent / "good").glob("*.png")).unlink()
    with pytest.raises(HeldoutChangedError, match="cannot be frozen"):
        freeze_heldout(manifest_path, "line-a", root=tmp_path / "heldout")


def test_unknown_name_lists_the_frozen_ones(manifest_path: Path, tmp_path: Path) -> None:
    root = tmp_path / "heldout"
    freeze_heldout(manifest_path, "line-a", root=root)
    with pytest.raises(LookupError, match="no held-out set named 'line-b'.*frozen: line-a"):
        load_heldout(root, "line-b")


def test_manifest_that_moved_away_is_reported(manifest_path: Path, tmp_path: Path) -> None:
    root = tmp_path / "heldout"
    freeze_heldout(manifest_path, "line-a", root=root)
    manifest_path.rename(manifest_path.with_name("elsewhere.json"))
    with pytest.raises(DataError, match="held-out set 'line-a': manifest not found"):
        load_heldout(root, "line-a")


@pytest.mark.parametrize("name", ["", "Line", "../x", "a/b", ".hidden"])
def test_invalid_names_are_refused(manifest_path: Path, tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError, match="invalid held-out set name"):
        freeze_heldout(manifest_path, name, root=tmp_path / "heldout")
