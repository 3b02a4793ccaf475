"""Frozen held-out sets: a manifest registered by name and hash, re-verified before each use.

`cellinspect data freeze MANIFEST --name NAME` writes HOME/heldout/NAME.json naming the
manifest file and its hash. Evaluations refer to the set by name; `load_heldout` re-hashes
every file first, so a figure is never computed on data that drifted since it was frozen.
Every sample of the manifest belongs to the set, whatever its split.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cellinspect.datasets.atomic import fsync_dir, write_atomic
from cellinspect.datasets.errors import DataError
from cellinspect.datasets.manifest import Manifest, load_manifest, verify_files

HELDOUT_FORMAT: Literal["cellinspect.heldout/1"] = "cellinspect.heldout/1"
SHOWN_PROBLEMS = 5  # changed files named in an error; the rest are counted

# Names become file names and parts of report folder names: the model store's rules.
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


class HeldoutChangedError(DataError):
    """A frozen set whose files are missing or whose contents changed since it was frozen."""


class HeldoutSet(BaseModel):
    """HOME/heldout/NAME.json: which manifest a held-out name stands for."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["cellinspect.heldout/1"] = HELDOUT_FORMAT
    name: str
    manifest: str  # absolute path of the manifest file
    manifest_hash: str  # the identity of the set: Manifest.hash when frozen
    count: int = Field(ge=1)
    class_counts: dict[str, int]
    frozen: datetime


def validate_heldout_name(name: str) -> str:
    if not _NAME_RE.fullmatch(name):
        raise ValueError(
            f"invalid held-out set name {name!r}: use 1-64 characters from lower-case letters, "
            "digits, '.', '_' and '-', starting with a letter or digit"
        )
    return name


def heldout_file(root: Path, name: str) -> Path:
    return Path(root) / f"{validate_heldout_name(name)}.json"


def _changed_error(name: str, problems: list[str], when: str) -> HeldoutChangedError:
    shown = "; ".join(problems[:SHOWN_PROBLEMS])
    more = f" (+{len(problems) - SHOWN_PROBLEMS} more)" if len(problems) > SHOWN_PROBLEMS else ""
    return HeldoutChangedError(
        f"held-out set {name!r} {when}: {len(problems)} file(s) missing or changed: {shown}{more}"
    )


def _create_exclusive(target: Path, text: str) -> bool:
    """Write `target` only if it does not exist yet (atomic: temp file + link); False if it did."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(temp, target)  # fails if another freeze got there first
        except FileExistsError:
            return False
        fsync_dir(target.parent)
        return True
    finally:
        Path(temp).unlink(missing_ok=True)


def read_heldout(root: Path, name: str) -> HeldoutSet:
    """The registry entry of `name`; LookupError listing the frozen names if there is none."""
    path = heldout_file(root, name)
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        known = ", ".join(s.name for s in list_heldout(root)) or "none"
        raise LookupError(
            f"no held-out set named {name!r} in {root} (frozen: {known}); "
            "freeze one with `cellinspect data freeze MANIFEST --name NAME`"
        ) from exc
    try:
        return HeldoutSet.model_validate_json(raw)
    except ValidationError as exc:
        raise DataError(
            f"not a valid held-out set record ({exc.errors()[0]['msg']})", path
        ) from exc


def list_heldout(root: Path) -> list[HeldoutSet]:
    """Every readable registry entry under `root`, by name."""
    if not Path(root).is_dir():
        return []
    found = []
    for path in sorted(Path(root).glob("*.json")):
        try:
            found.append(HeldoutSet.model_validate_json(path.read_text(encoding="utf-8")))
        except (OSError, ValidationError, json.JSONDecodeError):
            continue
    return found


def freeze_heldout(manifest_path: str | Path, name: str, *, root: Path) -> tuple[HeldoutSet, bool]:
    """Register `manifest_path` as held-out set `name`; (entry, whether it was newly created).

    The files are verified against the manifest first. Freezing the same data (same hash)
    again is a no-op that records the manifest's current path; a different hash under an
    existing name is refused: the name must keep meaning the same images.
    """
    path = Path(manifest_path).expanduser().absolute()
    manifest = load_manifest(path)
    problems = verify_files(manifest)
    if problems:
        raise _changed_error(name, problems, "cannot be frozen (manifest out of date)")
    entry = HeldoutSet(
        name=validate_heldout_name(name),
        manifest=str(path),
        manifest_hash=manifest.hash,
        count=len(manifest.samples),
        class_counts=manifest.class_counts,
        frozen=datetime.now(UTC),
    )
    target = heldout_file(root, name)
    if _create_exclusive(target, entry.model_dump_json(indent=2) + "\n"):
        return entry, True
    existing = read_heldout(root, name)
    if existing.manifest_hash != manifest.hash:
        raise ValueError(
            f"held-out set {name!r} is already frozen with manifest hash "
            f"{existing.manifest_hash[:12]}… ({existing.manifest}); {path} has "
            f"{manifest.hash[:12]}…: a name always means the same images, choose another name"
        )
    if existing.manifest != str(path):  # same images, moved manifest: remember where it is now
        existing = existing.model_copy(update={"manifest": str(path)})
        write_atomic(target, existing.model_dump_json(indent=2) + "\n")
    return existing, False


def load_heldout(
    root: Path, name: str, *, workers: int | None = None
) -> tuple[HeldoutSet, Manifest]:
    """The entry and its manifest (absolute sample paths), after re-hashing every file.

    HeldoutChangedError names the files that are missing or changed; DataError when the
    manifest itself is gone or no longer has the frozen hash.
    """
    entry = read_heldout(root, name)
    try:
        manifest = load_manifest(entry.manifest)
    except DataError as exc:
        raise DataError(f"held-out set {name!r}: {exc.problem}", exc.path) from exc
    if manifest.hash != entry.manifest_hash:
        raise HeldoutChangedError(
            f"held-out set {name!r} was frozen with manifest hash {entry.manifest_hash[:12]}…, "
            f"the manifest now has {manifest.hash[:12]}…: freeze the new data under a new name",
            entry.manifest,
        )
    problems = verify_files(manifest, workers=workers)
    if problems:
        raise _changed_error(name, problems, "changed since it was frozen; refusing to use it")
    return entry, manifest
