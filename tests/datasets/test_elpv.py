"""ELPV from the pip package: labels, metadata, the paper's split and its manifest.

The images are CC BY-NC-SA: every test writes them under pytest's tmp dirs only.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

import pytest
from typer.testing import CliRunner

pytest.importorskip(
    "elpv_dataset",
    reason="elpv-dataset is not installed (pip install 'cellinspect[data]')",
)

from cellinspect.cli import app  # noqa: E402
from cellinspect.datasets.elpv import (  # noqa: E402
    ElpvCell,
    ElpvTask,
    materialise_elpv,
    read_labels,
    split_elpv,
)
from cellinspect.datasets.errors import DataError  # noqa: E402
from cellinspect.datasets.manifest import Manifest, load_manifest, verify_files  # noqa: E402
from cellinspect.datasets.samples import Split  # noqa: E402

N_IMAGES = 2624
TOLERANCE = 2  # images per stratum that rounding may move between splits


@pytest.fixture(scope="module")
def cells() -> list[ElpvCell]:
    return read_labels()


@pytest.fixture(scope="module")
def binary(tmp_path_factory: pytest.TempPathFactory) -> Manifest:
    out = tmp_path_factory.mktemp("elpv") / "binary"
    materialise_elpv(out, ElpvTask.BINARY, seed=0)
    return load_manifest(out / "manifest.json")


@pytest.fixture(scope="module")
def four_level(tmp_path_factory: pytest.TempPathFactory) -> Manifest:
    out = tmp_path_factory.mktemp("elpv") / "four-level"
    materialise_elpv(out, ElpvTask.FOUR_LEVEL, seed=0)
    return load_manifest(out / "manifest.json")


def by_name(manifest: Manifest) -> dict[str, Split | None]:
    return {Path(s.path).name: s.split for s in manifest.samples}


def test_package_lists_2624_cells_with_thirds_and_both_types(cells: list[ElpvCell]) -> None:
    assert len(cells) == N_IMAGES
    assert {c.level for c in cells} == {0, 1, 2, 3}
    assert Counter(c.type for c in cells) == {"mono": 1074, "poly": 1550}


def test_binary_label_is_defective_exactly_when_probability_above_half(binary: Manifest) -> None:
    assert len(binary.samples) == N_IMAGES
    assert binary.classes == ["defective", "functional"]
    for sample in binary.samples:
        expected = "defective" if sample.metadata["probability"] > 0.5 else "functional"
        assert sample.label == expected, sample.path
    assert binary.class_counts == {"defective": 821, "functional": 1803}


def test_four_level_label_names_the_probability(four_level: Manifest) -> None:
    names = {0.0: "p0", 1 / 3: "p33", 2 / 3: "p67", 1.0: "p100"}
    for sample in four_level.samples:
        assert sample.label == names[sample.metadata["probability"]], sample.path
    assert ElpvTask.FOUR_LEVEL.good_class == "p0"
    assert ElpvTask.BINARY.good_class == "functional"


def test_probability_and_type_are_kept_per_sample(binary: Manifest, cells: list[ElpvCell]) -> None:
    table = {c.name: (c.probability, c.type) for c in cells}
    kept = {
        Path(s.path).name: (s.metadata["probability"], s.metadata["type"]) for s in binary.samples
    }
    assert kept == table


def test_split_is_75_25_within_every_probability_and_type(cells: list[ElpvCell]) -> None:
    split = split_elpv(cells, seed=0)
    strata: dict[tuple[int, str], Counter[Split]] = defaultdict(Counter)
    for cell in cells:
        strata[(cell.level, cell.type)][split[cell.name]] += 1
    assert len(strata) == 8
    for key, counts in strata.items():
        n = sum(counts.values())
        assert abs(counts[Split.TEST] - 0.25 * n) <= TOLERANCE, key
        assert abs(counts[Split.VAL] - 0.15 * n) <= TOLERANCE, key
    overall = Counter(split.values())
    assert abs(overall[Split.TEST] - 0.25 * N_IMAGES) <= TOLERANCE * len(strata)
    assert abs(overall[Split.VAL] - 0.15 * N_IMAGES) <= TOLERANCE * len(strata)


def test_same_seed_gives_same_split_whatever_the_order_and_other_seed_differs(
    cells: list[ElpvCell],
) -> None:
    first = split_elpv(cells, seed=0)
    assert split_elpv(list(reversed(cells)), seed=0) == first
    assert split_elpv(cells, seed=1) != first


def test_test_quarter_is_the_same_for_binary_and_four_level(
    binary: Manifest, four_level: Manifest
) -> None:
    assert by_name(binary) == by_name(four_level)
    assert sum(1 for s in binary.samples if s.split == Split.TEST) == 657


def test_manifest_records_the_split_and_its_files_verify(binary: Manifest) -> None:
    assert verify_files(binary) == []
    assert binary.seed == 0
    assert binary.stratify_by == ["probability", "type"]
    assert (binary.fractions.train, binary.fractions.val, binary.fractions.test) == pytest.approx(
        (0.60, 0.15, 0.25)
    )
    assert sum(binary.split_counts[Split.TEST].values()) == 657
    assert all(Path(s.path).parent.name == s.label for s in binary.samples)


def test_materialising_again_gives_the_same_manifest_and_other_seed_differs(
    binary: Manifest, tmp_path: Path
) -> None:
    again = materialise_elpv(tmp_path / "again", ElpvTask.BINARY, seed=0)
    assert again.hash == binary.hash
    assert by_name(again) == by_name(binary)
    reseeded = materialise_elpv(tmp_path / "again", ElpvTask.BINARY, seed=1)
    assert reseeded.hash != binary.hash


def test_other_task_into_the_same_folder_is_refused(binary: Manifest, tmp_path: Path) -> None:
    out = tmp_path / "elpv"
    (out / "functional").mkdir(parents=True)
    with pytest.raises(DataError, match="holds other files"):
        materialise_elpv(out, ElpvTask.FOUR_LEVEL)


def test_malformed_label_row_names_the_line(tmp_path: Path) -> None:
    (tmp_path / "labels.csv").write_text("images/a.png 1.0 mono\nimages/b.png 0.5 poly\n")
    with pytest.raises(DataError, match=r"labels\.csv:2.*not one of 0, 1/3, 2/3, 1"):
        read_labels(tmp_path)


def test_cli_writes_to_home_and_prints_counts(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app,
        ["data", "elpv", "--task", "four-level", "--seed", "0"],
        env={"CELLINSPECT_HOME": str(tmp_path), "COLUMNS": "200"},
    )
    assert result.exit_code == 0, result.output
    manifest = load_manifest(tmp_path / "datasets" / "elpv-four-level" / "manifest.json")
    assert len(manifest.samples) == N_IMAGES
    assert "2624" in result.output
    for word in ("p0", "p100", "mono", "poly", "train", "val", "test", "657"):
        assert word in result.output


def test_cli_without_the_package_says_how_to_install(tmp_path: Path) -> None:
    script = (
        "import sys; sys.modules['elpv_dataset'] = None\n"
        "from cellinspect.cli import main\n"
        f"sys.argv = ['cellinspect', 'data', 'elpv', '--out', {str(tmp_path / 'x')!r}]\n"
        "main()\n"
    )
    env = {**os.environ, "CELLINSPECT_HOME": str(tmp_path), "COLUMNS": "200"}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 2
    assert "error: elpv-dataset is not installed: pip install 'cellinspect[data]'" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "x").exists()
