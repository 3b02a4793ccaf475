"""Manifests: deterministic stratified splits, location-free hashes, tamper and change checks."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from cellinspect.datasets.decode import encode_png
from cellinspect.datasets.errors import DataError
from cellinspect.datasets.manifest import (
    MANIFEST_FORMAT,
    build_manifest,
    dataset_hash,
    load_manifest,
    stratified_split,
    verify_files,
    write_manifest,
)
from cellinspect.datasets.samples import Sample, Split


def fake_samples(counts: dict[str, int], prefix: str = "/data") -> list[Sample]:
    """Samples with made-up paths and sha256 (no files): enough for splitting and hashing."""
    return [
        Sample(
            path=f"{prefix}/{label}/{i}.png",
            label=label,
            sha256=hashlib.sha256(f"{label}-{i}".encode()).hexdigest(),
        )
        for label, n in counts.items()
        for i in range(n)
    ]


def split_of(samples: list[Sample]) -> dict[str, Split | None]:
    return {s.sha256 or s.path: s.split for s in samples}


@pytest.fixture
def dataset(tmp_path: Path) -> tuple[Path, list[Sample]]:
    root = tmp_path / "data"
    samples = []
    for offset, (label, n) in enumerate((("ok", 12), ("crack", 6))):
        for i in range(n):
            path = root / label / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            seed = 100 * offset + i
            path.write_bytes(
                encode_png(np.random.default_rng(seed).integers(0, 256, (6, 6), dtype=np.uint8))
            )
            samples.append(Sample(path=str(path), label=label))
    return root, samples


def test_split_is_independent_of_input_order() -> None:
    samples = fake_samples({"ok": 40, "dent": 15, "scratch": 7})
    shuffled = [samples[i] for i in np.random.default_rng(5).permutation(len(samples))]
    first = split_of(stratified_split(samples, seed=3))
    assert first == split_of(stratified_split(shuffled, seed=3))
    assert first == split_of(stratified_split(samples, seed=3))


def test_output_keeps_input_order() -> None:
    samples = fake_samples({"ok": 10, "dent": 10})
    out = stratified_split(samples, seed=0)
    assert [s.path for s in out] == [s.path for s in samples]
    assert all(s.split is None for s in samples)  # inputs are not mutated


def test_different_seed_gives_different_split() -> None:
    samples = fake_samples({"ok": 50, "dent": 50})
    assert split_of(stratified_split(samples, seed=0)) != split_of(
        stratified_split(samples, seed=1)
    )


def test_each_class_is_split_close_to_the_requested_fractions() -> None:
    samples = fake_samples({"ok": 200, "dent": 60, "scratch": 20})
    out = stratified_split(samples, seed=7, val=0.2, test=0.1)
    for label, n in (("ok", 200), ("dent", 60), ("scratch", 20)):
        counts = Counter(s.split for s in out if s.label == label)
        assert abs(counts[Split.VAL] / n - 0.2) <= 1 / n + 1e-9
        assert abs(counts[Split.TEST] / n - 0.1) <= 1 / n + 1e-9
        assert sum(counts.values()) == n


def test_small_classes_get_one_sample_in_every_split() -> None:
    out = stratified_split(fake_samples({"ok": 100, "rare": 3, "rarer": 4}), seed=0)
    for label in ("rare", "rarer"):
        counts = Counter(s.split for s in out if s.label == label)
        assert all(counts[split] >= 1 for split in Split)
    # Fewer than three cannot cover every split; training gets them.
    tiny = stratified_split(fake_samples({"ok": 10, "tiny": 2}), seed=0)
    assert {s.split for s in tiny if s.label == "tiny"} == {Split.TRAIN}


def test_stratify_by_metadata_balances_each_subgroup() -> None:
    samples = [
        s.model_copy(update={"metadata": {"cell_type": "mono" if i % 4 else "poly"}})
        for i, s in enumerate(fake_samples({"ok": 80, "defect": 40}))
    ]
    out = stratified_split(samples, seed=2, val=0.25, test=0.25, stratify_by=["cell_type"])
    for label in ("ok", "defect"):
        for cell in ("mono", "poly"):
            group = [s for s in out if s.label == label and s.metadata["cell_type"] == cell]
            counts = Counter(s.split for s in group)
            assert abs(counts[Split.TEST] / len(group) - 0.25) <= 1 / len(group)
    with pytest.raises(DataError, match="metadata has no 'probability'"):
        stratified_split(samples, seed=0, stratify_by=["probability"])


def test_preset_splits_are_kept_and_only_missing_ones_filled() -> None:
    samples = fake_samples({"ok": 20, "dent": 20})
    preset = [
        s.model_copy(update={"split": Split.TEST}) if i % 2 == 0 else s
        for i, s in enumerate(samples)
    ]
    out = stratified_split(preset, seed=0)
    for before, after in zip(preset, out, strict=True):
        if before.split is not None:
            assert after.split is Split.TEST
        else:
            assert after.split is not None
    all_preset = [s.model_copy(update={"split": Split.VAL}) for s in samples]
    assert {s.split for s in stratified_split(all_preset, seed=9)} == {Split.VAL}


def test_bad_fractions_are_refused() -> None:
    with pytest.raises(ValueError, match="leave a share for train"):
        stratified_split(fake_samples({"a": 3, "b": 3}), seed=0, val=0.5, test=0.5)


def test_dataset_hash_ignores_order_and_location() -> None:
    here = stratified_split(fake_samples({"ok": 10, "dent": 5}, prefix="/a"), seed=0)
    there = stratified_split(fake_samples({"ok": 10, "dent": 5}, prefix="/b/c"), seed=0)
    assert dataset_hash(here) == dataset_hash(list(reversed(there)))
    relabelled = [here[0].model_copy(update={"label": "dent"}), *here[1:]]
    assert dataset_hash(relabelled) != dataset_hash(here)
    other = Split.VAL if here[0].split is Split.TEST else Split.TEST
    moved = [here[0].model_copy(update={"split": other}), *here[1:]]
    assert dataset_hash(moved) != dataset_hash(here)


def test_dataset_hash_requires_sha256() -> None:
    with pytest.raises(DataError, match=r"x\.png: sample has no sha256"):
        dataset_hash([Sample(path="x.png", label="ok")])


def test_build_write_load_round_trip(dataset: tuple[Path, list[Sample]], tmp_path: Path) -> None:
    root, samples = dataset
    out = root / "manifest.json"
    manifest = build_manifest(samples, out=out, seed=4, skipped=[("bad.png", "truncated")])
    write_manifest(manifest, out)
    raw = json.loads(out.read_text())
    assert raw["format"] == MANIFEST_FORMAT
    assert raw["classes"] == ["crack", "ok"]
    assert raw["class_counts"] == {"crack": 6, "ok": 12}
    assert sum(raw["split_counts"]["val"].values()) >= 2
    assert raw["samples"][0]["path"] in {"ok/0.png", "crack/0.png"}  # relative, posix
    assert raw["skipped"] == [["bad.png", "truncated"]]
    assert not list(root.glob(".manifest.json.*"))  # no temp file left behind

    loaded = load_manifest(out)
    assert loaded.hash == manifest.hash
    assert {s.path for s in loaded.samples} == {s.path for s in samples}  # absolute again
    assert all(
        s.sha256 == hashlib.sha256(Path(s.path).read_bytes()).hexdigest() for s in loaded.samples
    )
    assert verify_files(loaded) == []

    # Copied elsewhere, the data set keeps its identity and its relative paths still work.
    moved = tmp_path / "elsewhere"
    shutil.copytree(root, moved)
    again = load_manifest(moved / "manifest.json")
    assert again.hash == manifest.hash
    assert all(s.path.startswith(str(moved)) for s in again.samples)
    assert verify_files(again) == []


def test_manifest_outside_the_data_stores_absolute_paths(
    dataset: tuple[Path, list[Sample]], tmp_path: Path
) -> None:
    _, samples = dataset
    out = tmp_path / "manifests" / "m.json"
    write_manifest(build_manifest(samples, out=out), out)
    stored = [s["path"] for s in json.loads(out.read_text())["samples"]]
    assert all(Path(p).is_absolute() for p in stored)
    assert load_manifest(out).hash == dataset_hash(load_manifest(out).samples)


def test_same_files_in_another_order_give_the_same_manifest_hash(
    dataset: tuple[Path, list[Sample]],
) -> None:
    root, samples = dataset
    a = build_manifest(samples, out=root / "a.json", seed=1)
    b = build_manifest(list(reversed(samples)), out=root / "b.json", seed=1)
    assert a.hash == b.hash
    assert a.split_counts == b.split_counts


def test_tampered_manifest_is_rejected(dataset: tuple[Path, list[Sample]]) -> None:
    root, samples = dataset
    out = root / "manifest.json"
    write_manifest(build_manifest(samples, out=out), out)
    raw = json.loads(out.read_text())
    victim = next(s for s in raw["samples"] if s["split"] == "test")
    victim["split"] = "train"  # move a test image into training by hand
    out.write_text(json.dumps(raw))
    with pytest.raises(DataError, match="manifest hash mismatch") as info:
        load_manifest(out)
    assert info.value.path == str(out)


def test_manifest_counts_edited_by_hand_are_rejected(dataset: tuple[Path, list[Sample]]) -> None:
    root, samples = dataset
    out = root / "manifest.json"
    write_manifest(build_manifest(samples, out=out), out)
    raw = json.loads(out.read_text())
    raw["class_counts"]["ok"] = 1000
    out.write_text(json.dumps(raw))
    with pytest.raises(DataError, match="counts do not match"):
        load_manifest(out)


def test_unknown_manifest_format_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"format": "other/9"}))
    with pytest.raises(DataError, match=r"unsupported manifest format 'other/9' \(supported: "):
        load_manifest(path)
    path.write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        load_manifest(path)
    with pytest.raises(DataError, match="manifest not found"):
        load_manifest(tmp_path / "absent.json")


def test_changed_and_missing_files_are_reported(dataset: tuple[Path, list[Sample]]) -> None:
    root, samples = dataset
    out = root / "manifest.json"
    write_manifest(build_manifest(samples, out=out), out)
    (root / "ok" / "3.png").write_bytes(b"different bytes")
    (root / "crack" / "1.png").unlink()
    problems = verify_files(load_manifest(out))
    assert len(problems) == 2
    assert any(
        p.startswith(str(root / "ok" / "3.png")) and "contents changed" in p for p in problems
    )
    assert any(
        p.startswith(str(root / "crack" / "1.png")) and "file not found" in p for p in problems
    )


def test_build_manifest_on_a_missing_file_names_it(tmp_path: Path) -> None:
    samples = [Sample(path=str(tmp_path / "gone.png"), label="ok")]
    with pytest.raises(DataError, match=r"gone\.png: file not found"):
        build_manifest(samples, out=tmp_path / "m.json")
