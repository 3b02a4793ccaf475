"""Adapters: each layout to samples; bad files raise naming them or are skipped and listed."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from cellinspect.datasets.adapters import (
    DataFormat,
    detect_format,
    from_csv,
    from_imagefolder,
    from_mvtec,
    load_samples,
    validate_images,
)
from cellinspect.datasets.decode import encode_png
from cellinspect.datasets.errors import DataError
from cellinspect.datasets.manifest import build_manifest, write_manifest
from cellinspect.datasets.samples import Sample, Split


def write_png(path: Path, seed: int = 0, size: int = 8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8)
    path.write_bytes(encode_png(pixels))
    return path


@pytest.fixture
def imagefolder(tmp_path: Path) -> Path:
    root = tmp_path / "folder"
    for c, label in enumerate(("ok", "scratch")):
        for i in range(3):
            write_png(root / label / f"{label}_{i}.png", seed=10 * c + i)
    return root


@pytest.fixture
def split_imagefolder(tmp_path: Path) -> Path:
    root = tmp_path / "split_folder"
    seed = 0
    for split in ("train", "val", "test"):
        for label in ("ok", "dent"):
            for i in range(2):
                seed += 1
                write_png(root / split / label / f"{i}.png", seed=seed)
    return root


@pytest.fixture
def mvtec(tmp_path: Path) -> Path:
    root = tmp_path / "bottle"
    for i in range(3):
        write_png(root / "train" / "good" / f"{i:03d}.png", seed=i)
    write_png(root / "test" / "good" / "000.png", seed=20)
    for d, defect in enumerate(("broken_large", "contamination")):
        for i in range(2):
            write_png(root / "test" / defect / f"{i:03d}.png", seed=30 + 10 * d + i)
            write_png(root / "ground_truth" / defect / f"{i:03d}_mask.png", seed=99)
    (root / "ground_truth" / "contamination" / "001_mask.png").unlink()  # one mask missing
    return root


def test_imagefolder_without_splits(imagefolder: Path) -> None:
    samples = from_imagefolder(imagefolder)
    assert len(samples) == 6
    assert {s.label for s in samples} == {"ok", "scratch"}
    assert all(s.split is None and Path(s.path).is_absolute() for s in samples)


def test_imagefolder_with_split_folders(split_imagefolder: Path) -> None:
    samples = from_imagefolder(split_imagefolder)
    assert len(samples) == 12
    for s in samples:
        assert s.split == Split(Path(s.path).parent.parent.name)
        assert s.label == Path(s.path).parent.name


def test_imagefolder_ignores_hidden_files_and_folders(imagefolder: Path) -> None:
    (imagefolder / "ok" / ".DS_Store").write_bytes(b"junk")
    write_png(imagefolder / ".thumbnails" / "x.png")
    write_png(imagefolder / "ok" / ".cache" / "y.png")
    assert len(from_imagefolder(imagefolder)) == 6


def test_imagefolder_wrong_extension_raises_naming_the_file(imagefolder: Path) -> None:
    notes = imagefolder / "ok" / "notes.txt"
    notes.write_text("hello")
    with pytest.raises(DataError, match=r"unsupported file extension '\.txt'") as info:
        from_imagefolder(imagefolder)
    assert info.value.path == str(notes)
    assert ".png" in str(info.value)  # lists the valid extensions


def test_imagefolder_wrong_extension_skipped_when_asked(imagefolder: Path) -> None:
    (imagefolder / "ok" / "notes.txt").write_text("hello")
    result = load_samples(imagefolder, skip_bad=True)
    assert len(result.samples) == 6
    assert [Path(p).name for p, _ in result.skipped] == ["notes.txt"]
    assert "unsupported file extension" in result.skipped[0][1]


def test_empty_class_folder_always_raises(imagefolder: Path) -> None:
    (imagefolder / "crack").mkdir()
    for skip_bad in (False, True):
        with pytest.raises(DataError, match="class folder has no images") as info:
            load_samples(imagefolder, skip_bad=skip_bad)
        assert info.value.path == str(imagefolder / "crack")


def test_single_class_always_raises(tmp_path: Path) -> None:
    root = tmp_path / "one"
    write_png(root / "ok" / "a.png")
    for skip_bad in (False, True):
        with pytest.raises(DataError, match=r"only one class found \(ok\)") as info:
            load_samples(root, skip_bad=skip_bad)
        assert str(root) in str(info.value)


def test_missing_root_raises(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found") as info:
        load_samples(tmp_path / "absent")
    assert "absent" in str(info.value)
    file = tmp_path / "file.png"
    write_png(file)
    with pytest.raises(DataError, match="not a directory"):
        from_imagefolder(file)


def test_mixed_split_and_class_folders_raise(split_imagefolder: Path) -> None:
    write_png(split_imagefolder / "extra" / "a.png")
    with pytest.raises(DataError, match=r"mixes split folders .* \(extra\)"):
        from_imagefolder(split_imagefolder)


def test_corrupt_image_raises_naming_it(imagefolder: Path) -> None:
    bad = imagefolder / "scratch" / "corrupt.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(DataError) as info:
        load_samples(imagefolder)
    assert info.value.path == str(bad) and "corrupt.png" in str(info.value)


def test_truncated_image_raises_naming_it(imagefolder: Path) -> None:
    bad = imagefolder / "ok" / "ok_1.png"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="truncated") as info:
        load_samples(imagefolder)
    assert info.value.path == str(bad)


def test_bad_images_are_skipped_and_counted(imagefolder: Path) -> None:
    corrupt = imagefolder / "scratch" / "corrupt.png"
    corrupt.write_bytes(b"\x00" * 50)
    truncated = imagefolder / "ok" / "ok_1.png"
    truncated.write_bytes(truncated.read_bytes()[:40])
    (imagefolder / "ok" / "readme.md").write_text("#")
    result = load_samples(imagefolder, skip_bad=True, workers=2)
    assert len(result.samples) == 5  # 6 good ones minus the truncated one
    skipped = dict(result.skipped)
    assert set(skipped) == {str(corrupt), str(truncated), str(imagefolder / "ok" / "readme.md")}
    assert "truncated" in skipped[str(truncated)]
    assert "not a recognised image format" in skipped[str(corrupt)]


def test_skipping_that_leaves_one_class_raises(tmp_path: Path) -> None:
    root = tmp_path / "data"
    write_png(root / "ok" / "a.png")
    (root / "nok").mkdir()
    (root / "nok" / "b.png").write_bytes(b"broken")
    with pytest.raises(DataError, match="only one class found"):
        load_samples(root, skip_bad=True)


def test_verification_fills_sha256(imagefolder: Path) -> None:
    result = load_samples(imagefolder)
    for s in result.samples:
        assert s.sha256 == hashlib.sha256(Path(s.path).read_bytes()).hexdigest()
    assert all(s.sha256 is None for s in load_samples(imagefolder, verify=False).samples)


def test_validate_images_keeps_input_order(imagefolder: Path) -> None:
    samples = from_imagefolder(imagefolder)
    result = validate_images(list(reversed(samples)), workers=4)
    assert [s.path for s in result.samples] == [s.path for s in reversed(samples)]


def test_mvtec_layout(mvtec: Path) -> None:
    samples = from_mvtec(mvtec)
    assert len(samples) == 8
    assert {s.label for s in samples} == {"good", "broken_large", "contamination"}
    train = [s for s in samples if s.split is Split.TRAIN]
    assert len(train) == 3 and {s.label for s in train} == {"good"}
    by_name = {(Path(s.path).parent.name, Path(s.path).name): s for s in samples}
    broken = by_name[("broken_large", "000.png")]
    assert broken.split is Split.TEST
    assert broken.metadata["defect_type"] == "broken_large"
    assert broken.metadata["mask"] == str(mvtec / "ground_truth/broken_large/000_mask.png")
    assert "mask" not in by_name[("contamination", "001.png")].metadata
    assert "mask" not in by_name[("good", "000.png")].metadata


def test_mvtec_binary_labels(mvtec: Path) -> None:
    samples = from_mvtec(mvtec, binary=True)
    assert {s.label for s in samples} == {"good", "defect"}
    defects = [s for s in samples if s.label == "defect"]
    assert {s.metadata["defect_type"] for s in defects} == {"broken_large", "contamination"}


def test_mvtec_is_detected_automatically(mvtec: Path) -> None:
    assert detect_format(mvtec) is DataFormat.MVTEC
    assert len(load_samples(mvtec).samples) == 8


def test_mvtec_with_only_good_images_raises(tmp_path: Path) -> None:
    root = tmp_path / "cat"
    write_png(root / "train" / "good" / "0.png")
    write_png(root / "test" / "good" / "0.png", seed=1)
    with pytest.raises(DataError, match=r"only one class found \(good\)"):
        from_mvtec(root)


def test_csv_with_relative_paths_split_and_metadata(imagefolder: Path) -> None:
    csv_path = imagefolder / "labels.csv"
    csv_path.write_text(
        "path,label,split,camera\n"
        "ok/ok_0.png,ok,train,cam1\n"
        "ok/ok_1.png,ok,,cam2\n"
        f"{imagefolder / 'scratch' / 'scratch_0.png'},scratch,test,cam1\n"
    )
    samples = from_csv(csv_path)
    assert [s.path for s in samples] == [
        str(imagefolder / "ok" / "ok_0.png"),
        str(imagefolder / "ok" / "ok_1.png"),
        str(imagefolder / "scratch" / "scratch_0.png"),
    ]
    assert [s.split for s in samples] == [Split.TRAIN, None, Split.TEST]
    assert samples[1].metadata == {"camera": "cam2"}
    assert detect_format(csv_path) is DataFormat.CSV
    assert len(load_samples(csv_path).samples) == 3


def test_csv_invalid_split_lists_valid_ones(imagefolder: Path) -> None:
    csv_path = imagefolder / "labels.csv"
    csv_path.write_text("path,label,split\nok/ok_0.png,ok,training\nscratch/scratch_0.png,s,\n")
    with pytest.raises(
        DataError, match=r"line 2: invalid split 'training' \(valid: train, val, test"
    ):
        from_csv(csv_path)


def test_csv_missing_columns_raise(tmp_path: Path) -> None:
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text("file,class\na.png,ok\n")
    with pytest.raises(DataError, match=r"lacks column\(s\) path, label \(found: file, class"):
        from_csv(csv_path)


def test_csv_missing_file_raises_or_is_skipped(imagefolder: Path) -> None:
    csv_path = imagefolder / "labels.csv"
    csv_path.write_text(
        "path,label\nok/ok_0.png,ok\nok/gone.png,ok\nscratch/scratch_0.png,scratch\n"
    )
    with pytest.raises(DataError, match="file not found") as info:
        from_csv(csv_path)
    assert info.value.path == str(imagefolder / "ok" / "gone.png")
    result = load_samples(csv_path, skip_bad=True)
    assert len(result.samples) == 2 and result.skipped[0][1] == "file not found"


def test_manifest_is_detected_and_loaded_with_absolute_paths(imagefolder: Path) -> None:
    samples = load_samples(imagefolder).samples
    out = imagefolder / "manifest.json"
    write_manifest(build_manifest(samples, out=out, seed=1), out)
    assert detect_format(imagefolder) is DataFormat.MANIFEST
    assert detect_format(out) is DataFormat.MANIFEST
    for source in (imagefolder, out):
        loaded = load_samples(source).samples
        assert sorted(s.path for s in loaded) == sorted(s.path for s in samples)
        assert all(s.split is not None and Path(s.path).is_absolute() for s in loaded)


def test_manifest_load_detects_changed_file(imagefolder: Path) -> None:
    out = imagefolder / "manifest.json"
    write_manifest(build_manifest(load_samples(imagefolder).samples, out=out), out)
    changed = imagefolder / "ok" / "ok_0.png"
    write_png(changed, seed=1234)
    with pytest.raises(DataError, match="file changed since it was listed") as info:
        load_samples(out)
    assert info.value.path == str(changed)


def test_explicit_format_overrides_detection(imagefolder: Path) -> None:
    assert len(load_samples(imagefolder, DataFormat.IMAGEFOLDER).samples) == 6
    with pytest.raises(DataError, match="missing folder 'train/good'"):
        load_samples(imagefolder, "mvtec")
    with pytest.raises(ValueError, match=r"unknown data format 'coco' \(valid: auto, imagefolder"):
        load_samples(imagefolder, "coco")


def test_sample_objects_validate(imagefolder: Path) -> None:
    # Adapters return plain `Sample`s that survive a JSON round trip.
    for s in from_imagefolder(imagefolder):
        assert Sample.model_validate_json(s.model_dump_json()) == s


def test_loose_image_beside_class_folders_is_a_bad_file(imagefolder: Path) -> None:
    (imagefolder / "labels.csv").write_text("path,label\n")  # non-images here are ignored
    stray = write_png(imagefolder / "stray.png")
    with pytest.raises(DataError, match="image is not inside a class folder") as info:
        from_imagefolder(imagefolder)
    assert info.value.path == str(stray)
    result = load_samples(imagefolder, DataFormat.IMAGEFOLDER, skip_bad=True)
    assert len(result.samples) == 6 and result.skipped[0][0] == str(stray)
