"""The versioned model store: `<store>/<name>/<version>/{model.onnx, card.json}` plus aliases.

Publishing writes a new version aside and renames it into place, so readers never see a
half-written version. Aliases (`production`, `staging`, ...) are pointers to versions;
every move is appended to `aliases.log`, which is also what rollback walks back through.
"""

from __future__ import annotations

import contextlib
import fcntl
import getpass
import hashlib
import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path

from cellinspect.datasets.atomic import fsync_dir, write_atomic
from cellinspect.models.card import ModelCard

logger = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
CARD_FILE = "card.json"
ALIASES_FILE = "aliases.json"
ALIASES_LOG = "aliases.log"
LOCK_FILE = ".lock"
TMP_PREFIX = ".tmp-"
PRODUCTION = "production"

# Names become directory names: no separators, no leading dot, bounded length.
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_HASH_CHUNK = 1 << 20


class ModelNotFoundError(LookupError):
    """A model name, version or alias that the store does not hold."""


class IntegrityError(Exception):
    """A stored version whose files are missing, unreadable or fail their sha256 check."""


class AliasAction(StrEnum):
    SET = "set"
    PROMOTE = "promote"
    ROLLBACK = "rollback"


def is_version_number(text: str) -> bool:
    """ASCII digits only: str.isdigit() also takes '²', which int() refuses."""
    return text.isascii() and text.isdigit()


def validate_name(name: str, what: str = "model name") -> str:
    """Return `name` if it is a safe store name, else raise ValueError saying what is allowed."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        shown = name if len(str(name)) <= 80 else f"{str(name)[:80]}..."
        raise ValueError(
            f"invalid {what} {shown!r}: use 1-64 characters from lower-case letters, digits, "
            "'.', '_' and '-', starting with a letter or digit"
        )
    return name


def validate_alias(alias: str) -> str:
    """Aliases follow model-name rules and must not be all digits (those select versions)."""
    validate_name(alias, "alias")
    if is_version_number(alias):
        raise ValueError(f"invalid alias {alias!r}: an all-digit alias would read as a version")
    return alias


@dataclass(frozen=True)
class ModelRef:
    """`name`, `name@3` or `name@production`; selector None means the default version."""

    name: str
    selector: str | None = None

    def __str__(self) -> str:
        return self.name if self.selector is None else f"{self.name}@{self.selector}"


def parse_model_ref(text: str) -> ModelRef:
    """Parse "name", "name@<version>" or "name@<alias>"; ValueError on anything else."""
    name, sep, selector = text.strip().partition("@")
    validate_name(name)
    if not sep:
        return ModelRef(name)
    if is_version_number(selector):
        if int(selector) < 1:
            raise ValueError(f"invalid version in {text!r}: versions start at 1")
        return ModelRef(name, str(int(selector)))
    validate_alias(selector)
    return ModelRef(name, selector)


def _as_ref(ref: str | ModelRef) -> ModelRef:
    return ref if isinstance(ref, ModelRef) else parse_model_ref(ref)


@dataclass(frozen=True)
class ModelSummary:
    """One model's versions and aliases, as `list_models` reports them."""

    name: str
    versions: list[str]
    aliases: dict[str, str]
    latest: str | None


@dataclass(frozen=True)
class AliasMove:
    """One line of aliases.log."""

    time: str
    alias: str
    from_version: str | None
    to_version: str
    action: AliasAction
    user: str

    def to_json(self) -> str:
        record = asdict(self)
        record["from"] = record.pop("from_version")
        record["to"] = record.pop("to_version")
        return json.dumps(record, sort_keys=True)

    @classmethod
    def from_json(cls, line: str) -> AliasMove:
        record = json.loads(line)
        return cls(
            time=record["time"],
            alias=record["alias"],
            from_version=record["from"],
            to_version=record["to"],
            action=AliasAction(record["action"]),
            user=record.get("user", "unknown"),
        )


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _current_user() -> str:
    # getpass raises in containers whose uid has no passwd entry; the log must still be written.
    try:
        return os.environ.get("CELLINSPECT_USER") or getpass.getuser()
    except (OSError, KeyError):
        return "unknown"


class ModelStore:
    """A folder of published models; safe for several processes publishing at once."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"ModelStore({str(self.root)!r})"

    # ---- layout -------------------------------------------------------------------------

    def _model_dir(self, name: str) -> Path:
        return self.root / validate_name(name)

    @contextlib.contextmanager
    def _locked(self, name: str) -> Iterator[Path]:
        """Hold the model's exclusive lock; every writer (publish, alias moves) takes it."""
        model_dir = self._model_dir(name)
        model_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(model_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield model_dir
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def names(self) -> list[str]:
        """Names of models with at least one published version."""
        if not self.root.is_dir():
            return []
        return sorted(
            p.name
            for p in self.root.iterdir()
            if p.is_dir() and _NAME_RE.fullmatch(p.name) and self.versions(p.name)
        )

    def versions(self, name: str) -> list[str]:
        """Published versions of `name`, oldest first (empty if none)."""
        model_dir = self._model_dir(name)
        if not model_dir.is_dir():
            return []
        # Only renamed-into-place directories have all-digit names; temp dirs start with '.'.
        found = [p.name for p in model_dir.iterdir() if p.is_dir() and is_version_number(p.name)]
        return sorted(found, key=int)

    def aliases(self, name: str) -> dict[str, str]:
        """{alias: version} for `name`."""
        path = self._model_dir(name) / ALIASES_FILE
        if not path.is_file():
            return {}
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise IntegrityError(f"{path} is not a JSON object of alias -> version")
        return {str(k): str(v) for k, v in data.items()}

    def list_models(self) -> list[ModelSummary]:
        """Every model in the store with its versions and aliases."""
        summaries = []
        for name in self.names():
            versions = self.versions(name)
            summaries.append(
                ModelSummary(
                    name=name,
                    versions=versions,
                    aliases=self.aliases(name),
                    latest=versions[-1] if versions else None,
                )
            )
        return summaries

    # ---- lookup -------------------------------------------------------------------------

    def resolve(self, ref: str | ModelRef) -> tuple[str, str]:
        """Ref -> (name, version): no selector -> `production` alias, else the latest version."""
        ref = _as_ref(ref)
        versions = self.versions(ref.name)
        if not versions:
            known = ", ".join(self.names()) or "none"
            raise ModelNotFoundError(
                f"no model named {ref.name!r} in {self.root} (models: {known})"
            )
        aliases = self.aliases(ref.name)
        if ref.selector is None:
            return ref.name, aliases.get(PRODUCTION, versions[-1])
        if is_version_number(ref.selector):
            version = str(int(ref.selector))
            if version not in versions:
                raise ModelNotFoundError(
                    f"{ref.name} has no version {version} (versions: {', '.join(versions)})"
                )
            return ref.name, version
        if ref.selector not in aliases:
            shown = ", ".join(f"{a}={v}" for a, v in sorted(aliases.items())) or "none"
            raise ModelNotFoundError(f"{ref.name} has no alias {ref.selector!r} (aliases: {shown})")
        return ref.name, aliases[ref.selector]

    def path(self, ref: str | ModelRef) -> Path:
        """The resolved version's directory (holding model.onnx and card.json)."""
        name, version = self.resolve(ref)
        return self._model_dir(name) / version

    def card(self, ref: str | ModelRef) -> ModelCard:
        """The resolved version's model card (not integrity-checked; see `load_verified`)."""
        return ModelCard.load(self.path(ref) / CARD_FILE)

    def load_verified(self, ref: str | ModelRef) -> tuple[ModelCard, Path]:
        """(card, path to model.onnx) after checking the file against the card's sha256."""
        name, version = self.resolve(ref)
        version_dir = self._model_dir(name) / version
        card_path, model_path = version_dir / CARD_FILE, version_dir / MODEL_FILE
        for required in (card_path, model_path):
            if not required.is_file():
                raise IntegrityError(f"{name}@{version} is missing {required}")
        try:
            card = ModelCard.load(card_path)
        except (OSError, ValueError) as exc:
            raise IntegrityError(f"{card_path} of {name}@{version} is unreadable: {exc}") from exc
        if (card.name, card.version) != (name, version):
            raise IntegrityError(
                f"{card_path} describes {card.name}@{card.version}, not {name}@{version}"
            )
        found = sha256_file(model_path)
        if found != card.onnx_sha256:
            raise IntegrityError(
                f"{model_path.name} of {name}@{version} fails its sha256 check "
                f"(expected {card.onnx_sha256 or '<none>'}, found {found}): "
                f"the file was modified or corrupted ({model_path})"
            )
        return card, model_path

    # ---- publishing ---------------------------------------------------------------------

    def publish(
        self,
        onnx_path: str | Path,
        card: ModelCard,
        *,
        name: str | None = None,
        extra_files: Mapping[str, bytes] | None = None,
    ) -> ModelCard:
        """Store `onnx_path` with `card` as the next version of `card.name`; return the final card.

        `name`, when given, must equal `card.name` (a guard for callers that pick the name).
        `extra_files` (plain file name -> bytes) land in the same version folder, in the
        same atomic rename: e.g. the training images' hashes for the leakage guard.
        """
        extra = dict(extra_files or {})
        for file_name in extra:
            if file_name in (MODEL_FILE, CARD_FILE) or Path(file_name).name != file_name:
                raise ValueError(f"extra file name {file_name!r} must be a plain, new file name")
        onnx_path = Path(onnx_path)
        model_dir = self._model_dir(card.name)
        if name is not None and name != card.name:
            raise ValueError(f"card name {card.name!r} does not match the store name {name!r}")
        if not onnx_path.is_file():
            raise FileNotFoundError(f"ONNX file to publish not found: {onnx_path}")
        model_dir.mkdir(parents=True, exist_ok=True)
        tmp_dir = model_dir / f"{TMP_PREFIX}{uuid.uuid4().hex}"
        tmp_dir.mkdir()
        try:
            # The copy and hash happen outside the lock so a large model does not block others.
            shutil.copyfile(onnx_path, tmp_dir / MODEL_FILE)
            with (tmp_dir / MODEL_FILE).open("rb") as f:
                os.fsync(f.fileno())
            sha = sha256_file(tmp_dir / MODEL_FILE)
            for file_name, payload in extra.items():
                with (tmp_dir / file_name).open("wb") as f:
                    f.write(payload)
                    f.flush()
                    os.fsync(f.fileno())
            with self._locked(card.name):
                versions = self.versions(card.name)
                version = str(int(versions[-1]) + 1) if versions else "1"
                final_dir = model_dir / version
                # rename(2) silently replaces an empty directory; never risk it.
                if final_dir.exists():
                    raise FileExistsError(f"{final_dir} already exists; refusing to overwrite")
                final = card.model_copy(update={"version": version, "onnx_sha256": sha})
                with (tmp_dir / CARD_FILE).open("w", encoding="utf-8") as f:
                    f.write(final.to_json())
                    f.flush()
                    os.fsync(f.fileno())
                fsync_dir(tmp_dir)
                os.rename(tmp_dir, final_dir)
                fsync_dir(model_dir)
        except BaseException:
            shutil.rmtree(tmp_dir, ignore_errors=True)
            raise
        logger.info("published %s@%s (sha256 %s) to %s", card.name, version, sha, final_dir)
        return final

    # ---- aliases ------------------------------------------------------------------------

    def alias_history(self, name: str, alias: str | None = None) -> list[AliasMove]:
        """Moves recorded in aliases.log, oldest first, optionally for one alias."""
        path = self._model_dir(name) / ALIASES_LOG
        if not path.is_file():
            return []
        moves = [
            AliasMove.from_json(line)
            for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip()
        ]
        return [m for m in moves if alias is None or m.alias == alias]

    def _move_alias(
        self, name: str, alias: str, version: str | int | None, action: AliasAction
    ) -> AliasMove:
        validate_alias(alias)
        if not self.versions(name):  # checked first so a typo does not create a model folder
            known = ", ".join(self.names()) or "none"
            raise ModelNotFoundError(f"no model named {name!r} in {self.root} (models: {known})")
        with self._locked(name) as model_dir:
            aliases = self.aliases(name)
            previous = aliases.get(alias)
            if action is AliasAction.ROLLBACK:
                target = self._rollback_target(name, alias)
            elif is_version_number(str(version)):
                target = str(int(str(version)))
            else:
                raise ValueError(f"version must be a positive integer, got {version!r}")
            versions = self.versions(name)
            if target not in versions:
                shown = ", ".join(versions) or "none"
                raise ModelNotFoundError(f"{name} has no version {target} (versions: {shown})")
            move = AliasMove(
                time=datetime.now(UTC).isoformat(),
                alias=alias,
                from_version=previous,
                to_version=target,
                action=action,
                user=_current_user(),
            )
            if previous == target and action is not AliasAction.ROLLBACK:
                return move  # nothing moves, so nothing to log or to roll back to later
            aliases[alias] = target
            write_atomic(model_dir / ALIASES_FILE, json.dumps(aliases, indent=2, sort_keys=True))
            with (model_dir / ALIASES_LOG).open("a", encoding="utf-8") as f:
                f.write(move.to_json() + "\n")
                f.flush()
                os.fsync(f.fileno())
        logger.info("%s %s@%s: %s -> %s", action.value, name, alias, previous, target)
        return move

    def _rollback_target(self, name: str, alias: str) -> str:
        # Replay the log as a stack so repeated rollbacks walk further back, not back and forth.
        stack: list[str] = []
        for move in self.alias_history(name, alias):
            if move.action is AliasAction.ROLLBACK:
                if stack:
                    stack.pop()
            elif move.from_version is not None:
                stack.append(move.from_version)
        if not stack:
            raise ModelNotFoundError(
                f"{name}@{alias} has no earlier version to roll back to "
                f"(history: {len(self.alias_history(name, alias))} move(s))"
            )
        return stack[-1]

    def set_alias(self, name: str, alias: str, version: str | int) -> AliasMove:
        """Point `alias` at `version` (which must exist) and log the move."""
        return self._move_alias(name, alias, version, AliasAction.SET)

    def promote(self, name: str, version: str | int, alias: str = PRODUCTION) -> AliasMove:
        """Point `alias` (default `production`) at `version` and log it as a promotion."""
        return self._move_alias(name, alias, version, AliasAction.PROMOTE)

    def rollback(self, name: str, alias: str = PRODUCTION) -> AliasMove:
        """Move `alias` back to the version it pointed at before its latest move."""
        return self._move_alias(name, alias, None, AliasAction.ROLLBACK)
