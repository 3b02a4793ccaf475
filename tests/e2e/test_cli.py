"""The command line as users run it: exit codes and error lines that name the file and problem."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from clikit import cli

from cellinspect.datasets.decode import encode_png


def write_png(path: Path, value: int = 128) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    path.write_bytes(encode_png(rng.integers(0, 255, (16, 16), dtype=np.uint8)))


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    for label in ("ok", "crack"):
        for i in range(4):
            write_png(root / label / f"{i}.png", value=i + (10 if label == "ok" else 20))
    return root


def test_manifest_of_good_folder_succeeds(folder: Path, tmp_path: Path) -> None:
    result = cli("data", "manifest", str(folder), "--out", str(tmp_path / "m.json"), home=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "8 images" in result.stdout and (tmp_path / "m.json").is_file()


def test_corrupt_image_is_named_or_skipped_and_counted(folder: Path, tmp_path: Path) -> None:
    bad = folder / "crack" / "broken.png"
    bad.write_bytes(encode_png(np.zeros((16, 16), np.uint8))[:40])
    out = tmp_path / "m.json"
    result = cli("data", "manifest", str(folder), "--out", str(out), home=tmp_path)
    assert result.returncode == 2
    assert "broken.png" in result.stderr and "truncated" in result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists()
    result = cli("data", "manifest", str(folder), "--out", str(out), "--skip-bad", home=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "skipped 1 bad file" in result.stdout and "broken.png" in result.stdout


def test_wrong_extension_is_named(folder: Path, tmp_path: Path) -> None:
    (folder / "ok" / "notes.txt").write_text("hello")
    result = cli("data", "manifest", str(folder), "--out", str(tmp_path / "m.json"), home=tmp_path)
    assert result.returncode == 2
    assert "notes.txt" in result.stderr and "unsupported file extension" in result.stderr


def test_empty_class_folder_is_named(folder: Path, tmp_path: Path) -> None:
    (folder / "scratch").mkdir()
    result = cli("data", "manifest", str(folder), "--out", str(tmp_path / "m.json"), home=tmp_path)
    assert result.returncode == 2
    assert "scratch" in result.stderr and "no images" in result.stderr


def test_single_class_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "one"
    for i in range(3):
        write_png(root / "ok" / f"{i}.png", value=i)
    result = cli("data", "manifest", str(root), "--out", str(tmp_path / "m.json"), home=tmp_path)
    assert result.returncode == 2 and "only one class" in result.stderr


def test_train_with_unknown_arch_lists_choices(folder: Path, tmp_path: Path) -> None:
    result = cli("train", "--data", str(folder), "--arch", "vgg19", home=tmp_path)
    assert result.returncode == 2
    assert "arch" in result.stderr and "mobilenet_v3_small" in result.stderr


def test_train_with_missing_data_names_the_path(tmp_path: Path) -> None:
    result = cli("train", "--data", str(tmp_path / "nowhere"), home=tmp_path)
    assert result.returncode == 2 and "nowhere" in result.stderr


def test_export_refuses_bad_model_name(tmp_path: Path) -> None:
    result = cli("export", str(tmp_path), "--name", "../escape", home=tmp_path)
    assert result.returncode == 2 and "model name" in result.stderr


def test_unknown_model_is_reported(tmp_path: Path) -> None:
    result = cli("models", "show", "nosuch", home=tmp_path)
    assert result.returncode == 2 and "nosuch" in result.stderr


def test_info_prints_home(tmp_path: Path) -> None:
    result = cli("info", home=tmp_path)
    assert result.returncode == 0 and str(tmp_path) in result.stdout


def test_synth_cell_and_frame_write_their_layouts(tmp_path: Path) -> None:
    cells = tmp_path / "cells"
    result = cli("data", "synth", "cell", "--out", str(cells), "--count", "2", home=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (
        len(list((cells / "images").glob("*/*.png"))) == 10 and (cells / "manifest.json").is_file()
    )
    frames = tmp_path / "frames"
    result = cli(
        "data",
        "synth",
        "frame",
        "--out",
        str(frames),
        "--count",
        "1",
        "--size",
        "512",
        home=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert (
        len(list(frames.glob("frames/*.png"))) == 1 and len(list(frames.glob("frames/*.json"))) == 1
    )


def test_synth_rejects_unknown_kind(tmp_path: Path) -> None:
    result = cli("data", "synth", "pouch", home=tmp_path)
    assert result.returncode == 2 and "electrode" in result.stderr
