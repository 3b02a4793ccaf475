"""Manifests: a data set frozen as file hashes, labels and a deterministic stratified split.

A manifest lists every sample with its sha256, so a model's card can name exactly the data
it was trained and evaluated on (`Manifest.hash`), wherever the files are copied to.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from cellinspect.datasets.atomic import write_atomic
from cellinspect.datasets.errors import DataError
from cellinspect.datasets.samples import Sample, Split

MANIFEST_FORMAT: Literal["cellinspect.manifest/1"] = "cellinspect.manifest/1"

Fraction = Annotated[float, Field(ge=0.0, le=1.0)]


class SplitFractions(BaseModel):
    """Requested share of each split (of the samples that had no preset split)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    train: Fraction
    val: Fraction
    test: Fraction

    @model_validator(mode="after")
    def _sums_to_one(self) -> SplitFractions:
        if not math.isclose(self.train + self.val + self.test, 1.0, abs_tol=1e-6):
            raise ValueError("train + val + test fractions must sum to 1")
        return self


class Manifest(BaseModel):
    """The on-disk manifest (`cellinspect.manifest/1`)."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["cellinspect.manifest/1"] = MANIFEST_FORMAT
    classes: list[str]
    seed: Annotated[int, Field(ge=0)]
    fractions: SplitFractions
    stratify_by: list[str] = Field(default_factory=list)
    class_counts: dict[str, int]
    split_counts: dict[Split, dict[str, int]]
    # Relative to the manifest file's folder when inside it, else absolute (posix) on disk;
    # absolute after `load_manifest`.
    samples: list[Sample]
    skipped: list[tuple[str, str]] = Field(default_factory=list)
    created: datetime
    hash: str
    # Folder that relative sample paths are relative to; not serialised.
    _base_dir: Path | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _samples_complete(self) -> Manifest:
        for sample in self.samples:
            if sample.sha256 is None or sample.split is None:
                raise ValueError(f"sample {sample.path} lacks its sha256 or split")
        return self

    def resolve(self, sample: Sample) -> Path:
        """Absolute path of one of this manifest's samples."""
        path = Path(sample.path)
        if path.is_absolute() or self._base_dir is None:
            return path
        return Path(os.path.normpath(self._base_dir / path))


def file_sha256(path: str | Path) -> str:
    """sha256 hex digest of a file, read in chunks."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
    except FileNotFoundError as exc:
        raise DataError("file not found", path) from exc
    return digest.hexdigest()


def dataset_hash(samples: Iterable[Sample]) -> str:
    """sha256 of the sorted (sha256, label, split) triples: independent of paths and order."""
    triples = []
    for s in samples:
        if s.sha256 is None:
            raise DataError("sample has no sha256 (run validate_images first)", s.path)
        triples.append((s.sha256, s.label, None if s.split is None else s.split.value))
    triples.sort(key=lambda t: (t[0], t[1], t[2] or ""))
    canonical = json.dumps(triples, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _round_half_up(x: float) -> int:
    # Python's round() rounds half to even, which would make 2.5 and 3.5 disagree.
    return math.floor(x + 0.5)


def _allocate(n: int, val: float, test: float) -> tuple[int, int, int]:
    """(train, val, test) counts for a group of n: rounded shares, each split >= 1 when n >= 3."""
    n_val, n_test = _round_half_up(n * val), _round_half_up(n * test)
    min_val = 1 if n >= 3 and val > 0 else 0
    min_test = 1 if n >= 3 and test > 0 else 0
    n_val, n_test = max(n_val, min_val), max(n_test, min_test)
    # Train keeps at least one sample; give back from the larger evaluation split first.
    while n - n_val - n_test < 1 and (n_val > min_val or n_test > min_test):
        if n_val > min_val and (n_val >= n_test or n_test <= min_test):
            n_val -= 1
        else:
            n_test -= 1
    return n - n_val - n_test, n_val, n_test


def _group_key(sample: Sample, stratify_by: Sequence[str]) -> tuple[str, ...]:
    values = [sample.label]
    for key in stratify_by:
        if key not in sample.metadata:
            raise DataError(
                f"metadata has no '{key}' to stratify by "
                f"(has: {', '.join(sorted(sample.metadata)) or 'none'})",
                sample.path,
            )
        values.append(str(sample.metadata[key]))
    return tuple(values)


def stratified_split(
    samples: Sequence[Sample],
    *,
    seed: int,
    val: float = 0.15,
    test: float = 0.15,
    stratify_by: Sequence[str] = (),
) -> list[Sample]:
    """Assign a split to samples lacking one, per (label, *stratify_by) group, deterministically."""
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if not (0.0 <= val < 1.0 and 0.0 <= test < 1.0 and val + test < 1.0):
        raise ValueError(f"val={val} and test={test} must be >= 0 and leave a share for train")
    groups: dict[tuple[str, ...], list[int]] = defaultdict(list)
    for i, sample in enumerate(samples):
        if sample.split is None:
            groups[_group_key(sample, stratify_by)].append(i)
    splits: dict[int, Split] = {}
    for key, members in groups.items():
        # Sorting by content hash then path makes the result independent of input order.
        members.sort(key=lambda i: (samples[i].sha256 or "", samples[i].path))
        # One generator per group, seeded by the group's name too: adding a class or an
        # image of another class does not reshuffle this one.
        key_digest = hashlib.sha256("\x1f".join(key).encode("utf-8")).digest()
        rng = np.random.default_rng([seed, int.from_bytes(key_digest[:8], "little")])
        order = [members[j] for j in rng.permutation(len(members))]
        n_train, n_val, _ = _allocate(len(order), val, test)
        for rank, i in enumerate(order):
            splits[i] = (
                Split.TRAIN
                if rank < n_train
                else Split.VAL
                if rank < n_train + n_val
                else Split.TEST
            )
    return [
        s.model_copy(update={"split": splits[i]}) if i in splits else s.model_copy()
        for i, s in enumerate(samples)
    ]


def _with_sha256(samples: Sequence[Sample], workers: int | None = None) -> list[Sample]:
    missing = [s for s in samples if s.sha256 is None]
    if not missing:
        return list(samples)
    with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:
        digests = dict(
            zip(
                (s.path for s in missing),
                pool.map(file_sha256, (s.path for s in missing)),
                strict=True,
            )
        )
    return [s if s.sha256 else s.model_copy(update={"sha256": digests[s.path]}) for s in samples]


def _portable_path(path: Path, base: Path) -> str:
    """Posix path relative to `base` when inside it, else absolute."""
    try:
        return path.relative_to(base).as_posix()
    except ValueError:
        return path.as_posix()


def _counts(
    samples: Sequence[Sample],
) -> tuple[list[str], dict[str, int], dict[Split, dict[str, int]]]:
    classes = sorted({s.label for s in samples})
    class_counts = {c: 0 for c in classes} | dict(Counter(s.label for s in samples))
    split_counts: dict[Split, dict[str, int]] = {sp: {c: 0 for c in classes} for sp in Split}
    for s in samples:
        if s.split is not None:
            split_counts[s.split][s.label] += 1
    return classes, dict(sorted(class_counts.items())), split_counts


def build_manifest(
    samples: Sequence[Sample],
    *,
    out: str | Path,
    seed: int = 0,
    val: float = 0.15,
    test: float = 0.15,
    stratify_by: Sequence[str] = (),
    skipped: Iterable[tuple[str, str]] = (),
) -> Manifest:
    """Hash (if needed), split and count samples into a manifest to be written at `out`."""
    base = Path(out).expanduser().absolute().parent
    hashed = _with_sha256(samples)
    split = stratified_split(hashed, seed=seed, val=val, test=test, stratify_by=stratify_by)
    portable = [
        s.model_copy(update={"path": _portable_path(Path(os.path.abspath(s.path)), base)})
        for s in split
    ]
    classes, class_counts, split_counts = _counts(portable)
    manifest = Manifest(
        classes=classes,
        seed=seed,
        fractions=SplitFractions(train=1.0 - val - test, val=val, test=test),
        stratify_by=list(stratify_by),
        class_counts=class_counts,
        split_counts=split_counts,
        samples=portable,
        skipped=[(str(p), str(problem)) for p, problem in skipped],
        created=datetime.now(UTC),
        hash=dataset_hash(portable),
    )
    manifest._base_dir = base
    return manifest


def write_manifest(manifest: Manifest, path: str | Path) -> Path:
    """Write atomically (temp file + rename); paths inside the folder are stored relative."""
    path = Path(path).expanduser().absolute()
    base = path.parent
    base.mkdir(parents=True, exist_ok=True)
    samples = [
        s.model_copy(update={"path": _portable_path(manifest.resolve(s), base)})
        for s in manifest.samples
    ]
    text = manifest.model_copy(update={"samples": samples}).model_dump_json(indent=2) + "\n"
    write_atomic(path, text)
    return path


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "manifest"
    more = f" (+{exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"{where}: {err['msg']}{more}"


def load_manifest(path: str | Path) -> Manifest:
    """Read and check a manifest; the returned samples carry absolute paths."""
    path = Path(path).expanduser().absolute()
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise DataError("manifest not found", path) from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"manifest is not valid JSON ({exc})", path) from exc
    fmt = raw.get("format") if isinstance(raw, dict) else None
    if fmt != MANIFEST_FORMAT:
        raise DataError(f"unsupported manifest format {fmt!r} (supported: {MANIFEST_FORMAT})", path)
    try:
        manifest = Manifest.model_validate(raw)
    except ValidationError as exc:
        raise DataError(f"invalid manifest: {_first_error(exc)}", path) from exc
    actual = dataset_hash(manifest.samples)
    if actual != manifest.hash:
        raise DataError(
            f"manifest hash mismatch: stored {manifest.hash[:12]}…, samples give "
            f"{actual[:12]}… (edited by hand? rebuild it with `cellinspect data manifest`)",
            path,
        )
    classes, class_counts, split_counts = _counts(manifest.samples)
    if (classes, class_counts, split_counts) != (
        manifest.classes,
        manifest.class_counts,
        manifest.split_counts,
    ):
        raise DataError("manifest classes or counts do not match its samples", path)
    manifest._base_dir = path.parent
    absolute = [s.model_copy(update={"path": str(manifest.resolve(s))}) for s in manifest.samples]
    manifest.samples = absolute
    return manifest


def verify_files(manifest: Manifest, *, workers: int | None = None) -> list[str]:
    """Problems ('<path>: ...') for files that are missing or whose sha256 changed."""
    paths = [manifest.resolve(s) for s in manifest.samples]

    def check(item: tuple[Path, Sample]) -> str | None:
        path, sample = item
        try:
            digest = file_sha256(path)
        except DataError:
            return f"{path}: file not found"
        if digest != sample.sha256:
            return (
                f"{path}: contents changed (sha256 {digest[:12]}…, manifest {sample.sha256[:12]}…)"
            )
        return None

    with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:
        results = pool.map(check, zip(paths, manifest.samples, strict=True))
        return [r for r in results if r is not None]
