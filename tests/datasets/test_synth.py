"""Synthetic generators: determinism, masks that mark real defects, frames, and the writer."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from cellinspect.datasets.samples import Sample
from cellinspect.datasets.synth import (
    CELL_CLASSES,
    ELECTRODE_CLASSES,
    SynthKind,
    generate_cell,
    generate_electrode,
    generate_frame,
    write_synthetic,
)

# Largest Gaussian read noise the generators draw, in gray levels; defects must stand
# at least 2.5 sigma above it so they cannot drown in sensor noise.
MAX_NOISE_SIGMA = 3.0
SEEDS = range(4)


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed]))


def _gray_diff(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16)).astype(np.float32)
    return diff.mean(axis=-1) if diff.ndim == 3 else diff


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_class_lists_are_the_documented_ones_in_order() -> None:
    assert ELECTRODE_CLASSES == (
        "ok",
        "pinhole",
        "agglomerate",
        "scratch",
        "crack",
        "uncoated_streak",
        "foreign_particle",
        "wrinkle",
    )
    assert CELL_CLASSES == ("ok", "dent", "scratch", "corrosion", "cap_damage")


@pytest.mark.parametrize(
    ("generate", "label"),
    [(generate_electrode, c) for c in ELECTRODE_CLASSES]
    + [(generate_cell, c) for c in CELL_CLASSES],
)
def test_same_seed_gives_identical_images_and_other_seed_differs(generate, label) -> None:
    image_a, mask_a = generate(label, _rng(5))
    image_b, mask_b = generate(label, _rng(5))
    image_c, _ = generate(label, _rng(6))
    assert np.array_equal(image_a, image_b) and np.array_equal(mask_a, mask_b)
    assert not np.array_equal(image_a, image_c)


def test_electrode_tiles_are_gray_uint8_of_requested_size() -> None:
    for size in (128, 96):
        image, mask = generate_electrode("scratch", _rng(0), size=size)
        assert image.shape == mask.shape == (size, size)
        assert image.dtype == mask.dtype == np.uint8
        assert set(np.unique(mask)) <= {0, 255}


def test_cell_images_are_rgb_uint8_with_gray_mask() -> None:
    image, mask = generate_cell("dent", _rng(0))
    assert image.shape == (128, 256, 3) and mask.shape == (128, 256)
    assert image.dtype == mask.dtype == np.uint8
    assert set(np.unique(mask)) <= {0, 255}
    image, mask = generate_cell("ok", _rng(0), height=96, width=200)
    assert image.shape == (96, 200, 3) and mask.shape == (96, 200)


@pytest.mark.parametrize(
    ("generate", "label"),
    [(generate_electrode, c) for c in ELECTRODE_CLASSES]
    + [(generate_cell, c) for c in CELL_CLASSES],
)
def test_only_ok_has_an_empty_mask(generate, label) -> None:
    for seed in SEEDS:
        _, mask = generate(label, _rng(seed))
        assert (mask.any()) == (label != "ok")


@pytest.mark.parametrize(
    ("generate", "label"),
    [(generate_electrode, c) for c in ELECTRODE_CLASSES[1:]]
    + [(generate_cell, c) for c in CELL_CLASSES[1:]],
)
def test_masked_pixels_stand_out_from_the_same_scene_without_defect(generate, label) -> None:
    # Same generator state, label "ok": same look, texture and noise, no defect.
    for seed in SEEDS:
        image, mask = generate(label, _rng(seed))
        clean, _ = generate("ok", _rng(seed))
        diff = _gray_diff(image, clean)
        inside = diff[mask > 0]
        assert np.percentile(inside, 90) >= 2.5 * MAX_NOISE_SIGMA, (label, seed)
        assert inside.mean() >= 1.5 * MAX_NOISE_SIGMA, (label, seed)
        # The defect is local: most of the scene is untouched.
        assert np.median(diff[mask == 0]) == 0, (label, seed)


@pytest.mark.parametrize("generate", [generate_electrode, generate_cell])
def test_unknown_label_raises_value_error_listing_valid_classes(generate) -> None:
    with pytest.raises(ValueError, match="valid classes: ok, ") as info:
        generate("bubble", _rng(0))
    assert "bubble" in str(info.value)


def test_frame_truth_boxes_are_inside_disjoint_and_cover_mask() -> None:
    width, height, n = 512, 1536, 6
    image, mask, truth = generate_frame(3, width=width, height=height, n_defects=n)
    assert image.shape == mask.shape == (height, width) and image.dtype == np.uint8
    assert len(truth) == n
    covered = np.zeros_like(mask, dtype=bool)
    for box in truth:
        assert box["label"] in ELECTRODE_CLASSES[1:]
        x, y, w, h = box["x"], box["y"], box["w"], box["h"]
        assert 0 <= x <= x + w <= width and 0 <= y <= y + h <= height
        assert mask[y : y + h, x : x + w].any()
        assert not covered[y : y + h, x : x + w].any(), "boxes overlap"
        covered[y : y + h, x : x + w] = True
    assert not mask[~covered].any(), "mask pixels outside every truth box"


def test_frame_is_deterministic_per_seed() -> None:
    a = generate_frame(1, width=256, height=1024, n_defects=3)
    b = generate_frame(1, width=256, height=1024, n_defects=3)
    c = generate_frame(2, width=256, height=1024, n_defects=3)
    assert np.array_equal(a[0], b[0]) and a[2] == b[2]
    assert not np.array_equal(a[0], c[0])


def test_frame_with_too_many_defects_for_its_size_raises() -> None:
    with pytest.raises(ValueError, match="cannot place"):
        generate_frame(0, width=128, height=128, n_defects=5)


def test_write_electrode_layout_samples_and_manifest(tmp_path: Path) -> None:
    samples = write_synthetic(SynthKind.ELECTRODE, tmp_path, count=2, seed=7, size=64)
    assert len(samples) == 2 * len(ELECTRODE_CLASSES)
    assert all(isinstance(s, Sample) and s.split is None for s in samples)
    assert [s.label for s in samples[:3]] == ["ok", "ok", "pinhole"]
    assert samples[2].path == "images/pinhole/pinhole_7_00000.png"
    for sample in samples:
        assert (tmp_path / sample.path).is_file()
        if sample.label == "ok":
            assert sample.metadata == {}
        else:
            assert sample.metadata["mask"] == sample.path.replace("images/", "masks/", 1)
            assert (tmp_path / sample.metadata["mask"]).is_file()
    assert not (tmp_path / "masks" / "ok").exists()
    assert not list(tmp_path.rglob("*.tmp"))
    manifest = json.loads((tmp_path / "synth.json").read_text())
    assert manifest["kind"] == "electrode" and manifest["seed"] == 7
    assert manifest["count"] == 2 and manifest["size"] == 64
    assert manifest["classes"] == list(ELECTRODE_CLASSES)
    assert "generator_version" in manifest


def test_written_tile_matches_in_memory_generation(tmp_path: Path) -> None:
    import cv2

    samples = write_synthetic(SynthKind.ELECTRODE, tmp_path, count=2, seed=4, size=64)
    crack = next(s for s in samples if s.label == "crack" and s.path.endswith("00001.png"))
    expected, expected_mask = generate_electrode(
        "crack", np.random.default_rng(np.random.SeedSequence([4, 4, 1])), size=64
    )
    on_disk = cv2.imread(str(tmp_path / crack.path), cv2.IMREAD_UNCHANGED)
    mask = cv2.imread(str(tmp_path / crack.metadata["mask"]), cv2.IMREAD_UNCHANGED)
    assert np.array_equal(on_disk, expected) and np.array_equal(mask, expected_mask)


def test_output_does_not_depend_on_worker_count(tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    samples_one = write_synthetic(SynthKind.CELL, one, count=2, seed=3, size=64, workers=1)
    samples_two = write_synthetic(SynthKind.CELL, two, count=2, seed=3, size=64, workers=2)
    assert samples_one == samples_two
    assert _tree_digest(one) == _tree_digest(two)


def test_write_cell_images_are_rgb_pngs(tmp_path: Path) -> None:
    import cv2

    samples = write_synthetic(SynthKind.CELL, tmp_path, count=1, seed=0)
    assert [s.label for s in samples] == list(CELL_CLASSES)
    image = cv2.imread(str(tmp_path / samples[1].path), cv2.IMREAD_UNCHANGED)
    assert image.shape == (128, 256, 3)
    expected, _ = generate_cell("dent", np.random.default_rng(np.random.SeedSequence([0, 1, 0])))
    assert np.array_equal(cv2.cvtColor(image, cv2.COLOR_BGR2RGB), expected)


def test_write_frames_with_truth_files(tmp_path: Path) -> None:
    samples = write_synthetic(SynthKind.FRAME, tmp_path, count=2, seed=5, size=256)
    assert [s.path for s in samples] == ["frames/frame_5_0.png", "frames/frame_5_1.png"]
    assert all(s.label == "frame" for s in samples)
    truth = json.loads((tmp_path / samples[0].metadata["truth"]).read_text())
    assert truth["width"] == 256 and truth["height"] == 1024
    _, _, expected = generate_frame(5, width=256, height=1024)
    assert truth["truth"] == expected
    assert json.loads((tmp_path / "synth.json").read_text())["kind"] == "frame"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kind": "wafer", "count": 1}, "valid kinds: electrode, cell, frame"),
        ({"kind": SynthKind.ELECTRODE, "count": 0}, "count must be >= 1"),
        ({"kind": SynthKind.ELECTRODE, "count": 1, "workers": 0}, "workers must be >= 1"),
    ],
)
def test_write_synthetic_rejects_bad_arguments(tmp_path: Path, kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        write_synthetic(out=tmp_path, **kwargs)
