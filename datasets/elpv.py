"""ELPV solar cells (Deitsch et al., Solar Energy 2019) from the `elpv-dataset` pip package.

The package ships `elpv_dataset/data/labels.csv` (whitespace-separated: image path, defect
probability in {0, 1/3, 2/3, 1}, cell type mono/poly) beside `data/images/cellNNNN.png`
(300x300 8-bit gray). Its own `utils.load_dataset()` decodes all 2,624 images into one
array; we read the table and copy the PNG bytes instead, so the files, and therefore the
manifest's hashes, are the authors' bytes on every machine, whatever the encoder.

The images are CC BY-NC-SA 4.0: they are only ever written where the user points (the
home directory by default), never into this repository.

The split follows the paper: 25% test, stratified jointly by (probability, cell type) with
a fixed seed; validation is carved out of the remaining 75%. It is computed from the label
table alone and never looks at the task's labels, so the binary and four-level tasks share
the same held-out quarter and results on them can be compared.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import logging
import os
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import StrEnum
from importlib.resources.abc import Traversable
from pathlib import Path

from cellinspect.datasets.atomic import write_atomic
from cellinspect.datasets.errors import DataError
from cellinspect.datasets.manifest import Manifest, build_manifest, stratified_split, write_manifest
from cellinspect.datasets.samples import Sample, Split

log = logging.getLogger(__name__)

PACKAGE = "elpv_dataset"
INSTALL_HINT = "elpv-dataset is not installed: pip install 'cellinspect[data]'"
MANIFEST_NAME = "manifest.json"
CELL_TYPES = ("mono", "poly")
LEVELS = 3  # annotated probabilities are multiples of 1/3
TEST_FRACTION = 0.25  # the paper's held-out quarter
VAL_FRACTION = 0.15  # of all images, taken from the paper's 75% training share
STRATIFY_BY = ("probability", "type")


class ElpvTask(StrEnum):
    """How the expert probability becomes a class label."""

    BINARY = "binary"  # functional / defective, defective = probability > 0.5 (as the paper)
    FOUR_LEVEL = "four-level"  # one class per annotated probability

    @property
    def classes(self) -> tuple[str, ...]:
        """Class names, the good ('no defect') class first."""
        if self is ElpvTask.BINARY:
            return ("functional", "defective")
        return tuple(f"p{round(100 * level / LEVELS)}" for level in range(LEVELS + 1))

    @property
    def good_class(self) -> str:
        return self.classes[0]

    def label(self, level: int) -> str:
        """Class of a cell whose defect probability is `level`/3."""
        if self is ElpvTask.BINARY:
            return self.classes[1] if level / LEVELS > 0.5 else self.classes[0]
        return self.classes[level]


class ElpvNotInstalledError(DataError):
    """The optional `elpv-dataset` package (extra `data`) is missing."""

    def __init__(self) -> None:
        super().__init__(INSTALL_HINT)


@dataclass(frozen=True)
class ElpvCell:
    """One row of the package's labels.csv."""

    source: str  # path inside the package's data folder, e.g. images/cell0001.png
    probability: float  # as annotated: 0, 1/3, 2/3 or 1
    type: str  # mono or poly

    @property
    def level(self) -> int:
        """The probability in thirds (0..3): exact, unlike the float."""
        return round(self.probability * LEVELS)

    @property
    def name(self) -> str:
        return self.source.rsplit("/", 1)[-1]


def package_data() -> Traversable:
    """The installed package's data folder (labels.csv + images/), wherever pip put it."""
    try:
        root = importlib.resources.files(PACKAGE)
    except ImportError as exc:
        raise ElpvNotInstalledError() from exc
    data = root / "data"
    if not (data / "labels.csv").is_file():
        raise DataError(f"installed {PACKAGE} has no data/labels.csv (reinstall it)", str(root))
    return data


def _parse_row(line: str, where: str) -> ElpvCell:
    fields = line.split()
    if len(fields) != 3:
        raise DataError(f"expected 'path probability type', got {line!r}", where)
    source, raw_probability, cell_type = fields
    try:
        probability = float(raw_probability)
    except ValueError:
        raise DataError(f"probability {raw_probability!r} is not a number", where) from None
    level = round(probability * LEVELS)
    if not (0 <= level <= LEVELS and abs(probability * LEVELS - level) < 1e-6):
        raise DataError(f"probability {raw_probability} is not one of 0, 1/3, 2/3, 1", where)
    if cell_type not in CELL_TYPES:
        raise DataError(f"cell type {cell_type!r} is not one of {', '.join(CELL_TYPES)}", where)
    return ElpvCell(source=source, probability=probability, type=cell_type)


def read_labels(data: Traversable | None = None) -> list[ElpvCell]:
    """The label table of the installed package (or of `data`, a folder like its data/)."""
    data = package_data() if data is None else data
    table = data / "labels.csv"
    cells = [
        _parse_row(line, f"{table}:{number}")
        for number, line in enumerate(table.read_text(encoding="utf-8").splitlines(), 1)
        if line.strip()
    ]
    duplicates = [name for name, n in Counter(c.name for c in cells).items() if n > 1]
    if duplicates:
        raise DataError(f"image names listed more than once: {', '.join(duplicates[:5])}", table)
    return cells


def split_elpv(cells: Sequence[ElpvCell], *, seed: int = 0) -> dict[str, Split]:
    """Image name -> split: 25% test, 15% val, rest train within each (probability, type).

    Reuses the manifest's splitter (per-group seeded permutation, sorted by name first, so
    the input order does not matter) on stand-in samples whose label *is* the stratum:
    the task's labels never enter, so both tasks get the same split.
    """
    strata = [
        Sample(path=c.name, label=f"{c.level}/{LEVELS}", metadata={"type": c.type}) for c in cells
    ]
    split = stratified_split(
        strata, seed=seed, val=VAL_FRACTION, test=TEST_FRACTION, stratify_by=("type",)
    )
    return {s.path: s.split for s in split if s.split is not None}


def _check_out(out: Path, task: ElpvTask) -> None:
    # Refuse to mix with other files: stale class folders of another task or a user's own
    # data would sit beside the new manifest and confuse anyone browsing the folder.
    if not out.exists():
        return
    if not out.is_dir():
        raise DataError("output exists and is not a folder", out)
    expected = {MANIFEST_NAME, *task.classes}
    unexpected = sorted(p.name for p in out.iterdir() if p.name not in expected and _visible(p))
    if unexpected:
        raise DataError(
            f"output folder holds other files ({', '.join(unexpected[:5])}); "
            f"choose an empty folder or one made by `cellinspect data elpv --task {task.value}`",
            out,
        )


def _visible(path: Path) -> bool:
    return not path.name.startswith(".")


def _copy(source: Traversable, target: Path) -> str:
    payload = source.read_bytes()
    # Not fsynced: the files can be rematerialised; the manifest written last is durable.
    write_atomic(target, payload, durable=False)
    return hashlib.sha256(payload).hexdigest()


def materialise_elpv(
    out: str | Path, task: ElpvTask, *, seed: int = 0, workers: int | None = None
) -> Manifest:
    """Copy the ELPV images to `out/<class>/cellNNNN.png` and write `out/manifest.json`.

    Each sample keeps `probability` and `type` (mono/poly) as metadata; the split is the
    paper's (see `split_elpv`) and is stored in the samples like any other manifest's.
    """
    task = ElpvTask(task)
    out = Path(out).expanduser().absolute()
    data = package_data()
    cells = read_labels(data)
    splits = split_elpv(cells, seed=seed)
    _check_out(out, task)
    for label in task.classes:
        (out / label).mkdir(parents=True, exist_ok=True)
    targets = [out / task.label(c.level) / c.name for c in cells]
    sources = [data.joinpath(*c.source.split("/")) for c in cells]
    with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:
        digests = list(pool.map(_copy, sources, targets))
    samples = [
        Sample(
            path=str(target),
            label=task.label(cell.level),
            split=splits[cell.name],
            sha256=digest,
            metadata={"probability": cell.probability, "type": cell.type},
        )
        for cell, target, digest in zip(cells, targets, digests, strict=True)
    ]
    # The splits are preset, so build_manifest keeps them; fractions and stratify_by record
    # how they were drawn ((label, probability, type) groups = (probability, type) here).
    manifest = build_manifest(
        samples,
        out=out / MANIFEST_NAME,
        seed=seed,
        val=VAL_FRACTION,
        test=TEST_FRACTION,
        stratify_by=STRATIFY_BY,
    )
    write_manifest(manifest, out / MANIFEST_NAME)
    log.info("materialised %d ELPV images (%s) in %s", len(samples), task.value, out)
    return manifest


def split_breakdown(
    manifest: Manifest, classes: Sequence[str] | None = None
) -> dict[str, dict[str, int]]:
    """Split (and 'all') -> count per class, per cell type and in total, for reports.

    `classes` orders the class columns (e.g. `task.classes`, good first); default: the
    manifest's (alphabetical) order.
    """
    classes = list(manifest.classes if classes is None else classes)
    rows: dict[str, dict[str, int]] = {}
    for name in [*Split, "all"]:
        chosen = [s for s in manifest.samples if name == "all" or s.split == name]
        row = {c: 0 for c in classes} | {t: 0 for t in CELL_TYPES}
        for sample in chosen:
            cell_type = str(sample.metadata.get("type", "unknown"))
            row[sample.label] = row.get(sample.label, 0) + 1
            row[cell_type] = row.get(cell_type, 0) + 1
        rows[str(name)] = row | {"total": len(chosen)}
    return rows
