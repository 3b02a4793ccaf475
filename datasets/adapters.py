"""Adapters from on-disk data-set layouts to the one `Sample` list.

Two kinds of problems are told apart: a bad *file* (wrong extension, undecodable or
truncated image, missing file) raises `DataError` naming it, or with `skip_bad=True` is
skipped and listed; a bad *structure* (missing root, empty class folder, a single class,
a malformed CSV) always raises, because no amount of skipping makes it a usable data set.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from cellinspect.datasets.decode import DEFAULT_MAX_PIXELS, decode_image, read_bytes
from cellinspect.datasets.errors import DataError
from cellinspect.datasets.manifest import load_manifest
from cellinspect.datasets.samples import IMAGE_EXTENSIONS, Sample, Split

log = logging.getLogger(__name__)

GOOD = "good"  # MVTec AD's name for the defect-free class
DEFECT = "defect"  # the single defect label of `from_mvtec(binary=True)`
MANIFEST_NAME = "manifest.json"


class DataFormat(StrEnum):
    """On-disk layouts `load_samples` understands."""

    AUTO = "auto"
    IMAGEFOLDER = "imagefolder"
    MVTEC = "mvtec"
    CSV = "csv"
    MANIFEST = "manifest"


@dataclass
class LoadResult:
    """Usable samples plus the files left out, as (path, problem)."""

    samples: list[Sample]
    skipped: list[tuple[str, str]] = field(default_factory=list)


class BadFiles:
    """Collects per-file problems: raises at once, or with `skip_bad` records and goes on."""

    def __init__(self, *, skip_bad: bool = False) -> None:
        self.skip_bad = skip_bad
        self.skipped: list[tuple[str, str]] = []

    def report(self, path: str | Path, problem: str) -> None:
        if not self.skip_bad:
            raise DataError(problem, path)
        log.warning("skipping %s: %s", path, problem)
        self.skipped.append((str(path), problem))


def _visible(name: str) -> bool:
    return not name.startswith(".")


def _extension_problem(path: Path) -> str | None:
    suffix = path.suffix.lower()
    if suffix in IMAGE_EXTENSIONS:
        return None
    shown = f"'{suffix}'" if suffix else "none"
    return f"unsupported file extension {shown} (expected one of {', '.join(IMAGE_EXTENSIONS)})"


def _require_dir(root: str | Path, what: str = "data set folder") -> Path:
    root = Path(root).expanduser().absolute()
    if not root.exists():
        raise DataError(f"{what} not found", root)
    if not root.is_dir():
        raise DataError(f"{what} is not a directory", root)
    return root


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and _visible(p.name))


def _image_files(folder: Path, bad: BadFiles) -> list[Path]:
    """Image files under `folder` (recursively, hidden entries ignored), sorted."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if _visible(d))  # prune hidden dirs in place
        for name in sorted(filenames):
            if not _visible(name):
                continue
            path = Path(dirpath) / name
            problem = _extension_problem(path)
            if problem:
                bad.report(path, problem)
            else:
                found.append(path)
    return found


def _class_samples(folder: Path, label: str, split: Split | None, bad: BadFiles) -> list[Sample]:
    files = _image_files(folder, bad)
    if not files:
        raise DataError("class folder has no images", folder)
    return [Sample(path=str(p), label=label, split=split) for p in files]


def _require_two_classes(samples: Sequence[Sample], root: Path) -> None:
    classes = sorted({s.label for s in samples})
    if not classes:
        raise DataError("no images found", root)
    if len(classes) == 1:
        raise DataError(
            f"only one class found ({classes[0]}); a classifier needs at least two", root
        )


def _loose_files(folder: Path, bad: BadFiles, where: str) -> None:
    # Only images are a problem here: a labels.csv, README or manifest.json beside the
    # class folders is normal and not part of the data.
    for path in sorted(folder.iterdir()):
        if path.is_file() and _visible(path.name) and _extension_problem(path) is None:
            bad.report(path, f"image is not inside a class folder ({where})")


def _imagefolder(root: Path, bad: BadFiles) -> list[Sample]:
    root = _require_dir(root)
    subdirs = _subdirs(root)
    split_names = [s.value for s in Split]
    split_dirs = [d for d in subdirs if d.name in split_names]
    samples: list[Sample] = []
    if split_dirs:
        others = [d.name for d in subdirs if d.name not in split_names]
        if others:
            raise DataError(
                f"mixes split folders ({', '.join(d.name for d in split_dirs)}) with other "
                f"folders ({', '.join(others)}); use root/<class>/ or "
                f"root/{{{','.join(split_names)}}}/<class>/",
                root,
            )
        for split_dir in split_dirs:
            _loose_files(split_dir, bad, "expected <split>/<class>/<image>")
            classes = _subdirs(split_dir)
            if not classes:
                raise DataError("split folder has no class folders", split_dir)
            for class_dir in classes:
                samples += _class_samples(class_dir, class_dir.name, Split(split_dir.name), bad)
    else:
        _loose_files(root, bad, "expected <class>/<image>")
        for class_dir in subdirs:
            samples += _class_samples(class_dir, class_dir.name, None, bad)
    _require_two_classes(samples, root)
    return samples


def _mask_for(root: Path, defect_type: str, stem: str) -> Path | None:
    folder = root / "ground_truth" / defect_type
    for ext in IMAGE_EXTENSIONS:
        mask = folder / f"{stem}_mask{ext}"
        if mask.is_file():
            return mask
    return None


def _mvtec(root: Path, bad: BadFiles, *, binary: bool = False) -> list[Sample]:
    root = _require_dir(root)
    for needed in ("train/good", "test"):
        if not (root / needed).is_dir():
            raise DataError(f"not an MVTec AD category: missing folder '{needed}'", root)
    samples: list[Sample] = []
    for split in (Split.TRAIN, Split.TEST):
        split_dir = root / split.value
        _loose_files(split_dir, bad, "expected <split>/<good|defect_type>/<image>")
        for type_dir in _subdirs(split_dir):
            defect_type = type_dir.name
            label = DEFECT if binary and defect_type != GOOD else defect_type
            for sample in _class_samples(type_dir, label, split, bad):
                metadata: dict[str, str] = {"defect_type": defect_type}
                mask = _mask_for(root, defect_type, Path(sample.path).stem)
                if mask is not None:
                    metadata["mask"] = str(mask)
                samples.append(sample.model_copy(update={"metadata": metadata}))
    _require_two_classes(samples, root)
    return samples


def _csv(path: Path, bad: BadFiles) -> list[Sample]:
    path = Path(path).expanduser().absolute()
    if not path.is_file():
        raise DataError("CSV file not found", path)
    base = path.parent
    split_values = [s.value for s in Split]
    samples: list[Sample] = []
    seen: dict[str, int] = {}
    with path.open(newline="", encoding="utf-8-sig") as fh:  # -sig: Excel writes a BOM
        reader = csv.DictReader(fh)
        columns = [c.strip() for c in reader.fieldnames or []]
        missing = [c for c in ("path", "label") if c not in columns]
        if missing:
            raise DataError(
                f"CSV lacks column(s) {', '.join(missing)} (found: {', '.join(columns) or 'none'}; "
                "needs path,label and optionally split plus any metadata columns)",
                path,
            )
        for raw in reader:
            line = reader.line_num
            if None in raw:  # DictReader files surplus fields under the key None
                raise DataError(f"line {line}: more fields than header columns", path)
            row = {k.strip(): (v or "").strip() for k, v in raw.items() if k is not None}
            if not row["path"] or not row["label"]:
                raise DataError(f"line {line}: empty path or label", path)
            split_text = row.pop("split", "")
            if split_text and split_text not in split_values:
                raise DataError(
                    f"line {line}: invalid split '{split_text}' "
                    f"(valid: {', '.join(split_values)}, or empty)",
                    path,
                )
            image = Path(row.pop("path")).expanduser()
            image = image if image.is_absolute() else base / image
            key = os.path.normpath(image)
            if key in seen:
                raise DataError(f"line {line}: {image} already listed on line {seen[key]}", path)
            seen[key] = line
            label = row.pop("label")
            problem = _extension_problem(image) or (None if image.is_file() else "file not found")
            if problem:
                bad.report(image, problem)
                continue
            samples.append(
                Sample(
                    path=key,
                    label=label,
                    split=Split(split_text) if split_text else None,
                    metadata={k: v for k, v in row.items() if k},
                )
            )
    _require_two_classes(samples, path)
    return samples


def _manifest(path: Path, bad: BadFiles) -> list[Sample]:
    # Per-file problems surface later, in `validate_images`, against the stored sha256.
    return list(load_manifest(path / MANIFEST_NAME if path.is_dir() else path).samples)


def from_imagefolder(root: str | Path, *, skip_bad: bool = False) -> list[Sample]:
    """`root/<class>/*` (no split) or `root/{train,val,test}/<class>/*` -> samples."""
    return _imagefolder(Path(root), BadFiles(skip_bad=skip_bad))


def from_mvtec(root: str | Path, *, binary: bool = False, skip_bad: bool = False) -> list[Sample]:
    """One MVTec AD category folder -> samples labelled `good` or the defect type."""
    return _mvtec(Path(root), BadFiles(skip_bad=skip_bad), binary=binary)


def from_csv(path: str | Path, *, skip_bad: bool = False) -> list[Sample]:
    """A `path,label[,split][,metadata...]` CSV -> samples; relative paths are CSV-relative."""
    return _csv(Path(path), BadFiles(skip_bad=skip_bad))


# One entry per layout. ELPV needs none of its own: `cellinspect data elpv` (datasets/elpv.py)
# writes a manifest, with probability and cell type in each sample's metadata.
_ADAPTERS: dict[DataFormat, Callable[[Path, BadFiles], list[Sample]]] = {
    DataFormat.IMAGEFOLDER: _imagefolder,
    DataFormat.MVTEC: _mvtec,
    DataFormat.CSV: _csv,
    DataFormat.MANIFEST: _manifest,
}


def detect_format(source: str | Path) -> DataFormat:
    """The layout of `source`, by the rules of `DataFormat.AUTO`."""
    source = Path(source)
    if source.is_dir():
        if (source / MANIFEST_NAME).is_file():
            return DataFormat.MANIFEST
        if (source / "train" / "good").is_dir() and (source / "test").is_dir():
            return DataFormat.MVTEC
        return DataFormat.IMAGEFOLDER
    suffix = source.suffix.lower()
    if suffix == ".csv":
        return DataFormat.CSV
    if suffix == ".json":
        return DataFormat.MANIFEST
    if not source.exists():
        raise DataError("data set not found", source)
    raise DataError(
        f"cannot tell the data-set format of a '{suffix}' file "
        "(expected a folder, a .csv or a manifest .json)",
        source,
    )


def _check_image(sample: Sample, max_pixels: int) -> Sample:
    data = read_bytes(sample.path)
    digest = hashlib.sha256(data).hexdigest()
    if sample.sha256 is not None and sample.sha256 != digest:
        raise DataError(
            f"file changed since it was listed (sha256 {digest[:12]}…, "
            f"expected {sample.sha256[:12]}…)",
            sample.path,
        )
    decode_image(data, max_pixels=max_pixels, source=sample.path)
    return sample.model_copy(update={"sha256": digest})


def validate_images(
    samples: Iterable[Sample],
    *,
    skip_bad: bool = False,
    workers: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> LoadResult:
    """Decode every image (thread pool) and fill `sha256`; bad files raise or are skipped."""
    samples = list(samples)
    workers = workers or min(8, os.cpu_count() or 1)
    bad = BadFiles(skip_bad=skip_bad)
    kept: list[Sample] = []

    def check(sample: Sample) -> Sample | DataError:
        try:
            return _check_image(sample, max_pixels)
        except DataError as exc:  # returned, not raised, so the first bad file in order wins
            return exc

    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="validate-images")
    try:
        for sample, result in zip(samples, pool.map(check, samples), strict=True):
            if isinstance(result, DataError):
                bad.report(sample.path, result.problem)
            else:
                kept.append(result)
    finally:
        # On the first error (skip_bad=False) stop decoding the rest.
        pool.shutdown(wait=True, cancel_futures=True)
    return LoadResult(samples=kept, skipped=bad.skipped)


def load_samples(
    source: str | Path,
    fmt: DataFormat = DataFormat.AUTO,
    *,
    skip_bad: bool = False,
    verify: bool = True,
    workers: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> LoadResult:
    """Any supported layout -> samples with absolute paths (and sha256 when `verify`)."""
    source = Path(source).expanduser().absolute()
    try:
        fmt = DataFormat(fmt)
    except ValueError:
        raise ValueError(f"unknown data format '{fmt}' (valid: {', '.join(DataFormat)})") from None
    if fmt is DataFormat.AUTO:
        fmt = detect_format(source)
    bad = BadFiles(skip_bad=skip_bad)
    samples = _ADAPTERS[fmt](source, bad)
    if not verify:
        return LoadResult(samples=samples, skipped=bad.skipped)
    checked = validate_images(samples, skip_bad=skip_bad, workers=workers, max_pixels=max_pixels)
    if checked.skipped:
        # Skipping may have emptied a class; the data set must still be usable.
        _require_two_classes(checked.samples, source)
    return LoadResult(samples=checked.samples, skipped=bad.skipped + checked.skipped)
