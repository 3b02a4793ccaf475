"""Leakage guard: no evaluation on images a model was trained or calibrated on.

Cards are immutable and name their training data only by the manifest's hash, so the
image hashes must be found elsewhere and proven to be that data:

1. `training_hashes.txt` in the model's store folder (one `sha256<TAB>label<TAB>split` line
   per training-manifest sample): accepted when its `dataset_hash` equals the card's
   `training_data.manifest_hash`, so the file cannot silently describe other data;
2. the training manifest named by the card's training config (`data`: a manifest file or a
   folder with manifest.json; `out`: the run folder, where training writes the manifest it
   built), accepted only with the card's hash.

Train and validation images count (validation fits the temperature and the operating
point); the training manifest's test split does not, and its overlap is reported only.
"""

from __future__ import annotations

import logging
from enum import StrEnum
from pathlib import Path

from pydantic import BaseModel

from cellinspect.datasets.errors import DataError
from cellinspect.datasets.manifest import Manifest, dataset_hash, load_manifest
from cellinspect.datasets.samples import Sample, Split
from cellinspect.models.card import ModelCard

logger = logging.getLogger(__name__)

TRAINING_HASHES_FILE = "training_hashes.txt"
TRAINING_HASHES_HEADER = "# cellinspect.training-hashes/1"
LEAKY_SPLITS = frozenset({Split.TRAIN, Split.VAL})  # fitted on, calibrated on


class LeakageError(ValueError):
    """The held-out set shares images with the model's training data, or that is unknown."""


class LeakageStatus(StrEnum):
    CLEAN = "clean"  # training hashes found; no shared image
    OVERLAP_ALLOWED = "overlap_allowed"  # shared images, evaluated anyway (--allow-overlap)
    UNVERIFIED = "unverified"  # training hashes not found, evaluated anyway (--allow-overlap)


class LeakageCheck(BaseModel):
    """What the guard found; saved with every evaluation."""

    status: LeakageStatus
    source: str | None = None  # where the training hashes came from
    shared: int = 0  # held-out images also in the training or validation split
    shared_test: int = 0  # held-out images also in the training manifest's test split
    message: str


def training_hashes_text(manifest: Manifest) -> str:
    """The `training_hashes.txt` an export can write beside model.onnx (see module doc)."""
    lines = [f"{TRAINING_HASHES_HEADER} manifest {manifest.hash}"]
    for s in manifest.samples:
        if any(c in s.label for c in "\t\r\n"):
            raise ValueError(f"label {s.label!r} cannot be written as one tab-separated field")
        lines.append(f"{s.sha256}\t{s.label}\t{'' if s.split is None else s.split.value}")
    return "\n".join(lines) + "\n"


def _read_training_hashes(path: Path, expected: str) -> list[Sample]:
    samples = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line or line.startswith("#"):
            continue
        fields = line.split("\t")
        if len(fields) != 3:
            raise DataError(f"line {number}: expected sha256<TAB>label<TAB>split", path)
        sha, label, split = fields
        samples.append(
            Sample(path=sha, label=label, sha256=sha, split=Split(split) if split else None)
        )
    found = dataset_hash(samples)
    if found != expected:
        raise DataError(
            f"lists data with hash {found[:12]}…, the card was trained on {expected[:12]}…", path
        )
    return samples


def _config_candidates(config: dict[str, object]) -> list[Path]:
    paths: list[Path] = []
    data, out = config.get("data"), config.get("out")
    if isinstance(data, str) and data:
        source = Path(data).expanduser()
        paths.append(source if source.suffix == ".json" else source / "manifest.json")
    if isinstance(out, str) and out:
        paths.append(Path(out).expanduser() / "manifest.json")
    return paths


def training_samples(card: ModelCard, version_dir: Path | None) -> tuple[list[Sample], str]:
    """The samples (hash, label, split) the card was trained on and where they were found.

    LookupError explaining every place looked in when none holds the card's data.
    """
    if card.training_data is None:
        raise LookupError(f"{card.name}@{card.version}'s card does not record its training data")
    expected = card.training_data.manifest_hash
    tried: list[str] = []
    if version_dir is not None:
        path = version_dir / TRAINING_HASHES_FILE
        if path.is_file():
            try:
                return _read_training_hashes(path, expected), str(path)
            except (DataError, ValueError, OSError) as exc:
                tried.append(str(exc))
        else:
            tried.append(f"{path}: not found")
    for path in _config_candidates(card.training_config):
        try:
            manifest = load_manifest(path)
        except DataError as exc:
            tried.append(str(exc))
            continue
        if manifest.hash == expected:
            return manifest.samples, str(path)
        tried.append(f"{path}: manifest hash {manifest.hash[:12]}…, not {expected[:12]}…")
    if not tried:
        tried.append("the training config names no data")
    raise LookupError(
        f"the training data of {card.name}@{card.version} (manifest {expected[:12]}…) "
        f"cannot be found: {'; '.join(tried)}"
    )


def check_leakage(
    card: ModelCard,
    heldout: Manifest,
    *,
    version_dir: Path | None,
    allow_overlap: bool = False,
) -> LeakageCheck:
    """Refuse (LeakageError) a held-out set sharing images with the model's training or
    validation data, or whose independence cannot be checked, unless `allow_overlap`."""
    ref = f"{card.name}@{card.version}"
    try:
        samples, source = training_samples(card, version_dir)
    except LookupError as exc:
        if not allow_overlap:
            raise LeakageError(
                f"cannot rule out leakage: {exc}; pass --allow-overlap to evaluate anyway"
            ) from exc
        logger.warning("leakage not checked for %s: %s", ref, exc)
        return LeakageCheck(
            status=LeakageStatus.UNVERIFIED,
            message=f"NOT CHECKED for leakage (--allow-overlap): {exc}",
        )
    leaky = {s.sha256 for s in samples if s.split in LEAKY_SPLITS}
    test = {s.sha256 for s in samples if s.split not in LEAKY_SPLITS} - leaky
    shared = sum(s.sha256 in leaky for s in heldout.samples)
    shared_test = sum(s.sha256 in test for s in heldout.samples)
    if shared and not allow_overlap:
        example = next(s.path for s in heldout.samples if s.sha256 in leaky)
        raise LeakageError(
            f"{shared} of {len(heldout.samples)} held-out images were used to train or calibrate "
            f"{ref} (e.g. {example}; training data from {source}); "
            "pass --allow-overlap to evaluate anyway"
        )
    status = LeakageStatus.OVERLAP_ALLOWED if shared else LeakageStatus.CLEAN
    message = (
        f"{shared} held-out image(s) shared with the training/validation data (--allow-overlap)"
        if shared
        else "no held-out image in the training/validation data"
    )
    if shared_test:
        message += f"; {shared_test} in the training manifest's test split (allowed)"
    return LeakageCheck(
        status=status, source=source, shared=shared, shared_test=shared_test, message=message
    )
