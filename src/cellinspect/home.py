"""The one home directory that holds everything a user generates."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

HOME_ENV = "CELLINSPECT_HOME"
DEFAULT_HOME = "cellinspect-home"  # visible, relative to the working directory, git-ignored


@dataclass(frozen=True)
class Home:
    """Layout of the home directory: data sets, runs, model store, database, archive."""

    root: Path

    @classmethod
    def resolve(cls, root: str | Path | None = None) -> Home:
        """Explicit argument > $CELLINSPECT_HOME > ./cellinspect-home."""
        chosen = root if root is not None else os.environ.get(HOME_ENV) or DEFAULT_HOME
        return cls(Path(chosen).expanduser().resolve())

    @property
    def datasets(self) -> Path:
        return self.root / "datasets"

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    @property
    def store(self) -> Path:
        return self.root / "store"

    @property
    def archive(self) -> Path:
        return self.root / "archive"

    @property
    def heldout(self) -> Path:
        """Frozen held-out sets: one NAME.json per set (`cellinspect data freeze`)."""
        return self.root / "heldout"

    @property
    def evals(self) -> Path:
        """Evaluation reports and the prediction cache (`cellinspect models eval/compare`)."""
        return self.root / "evals"

    @property
    def database_url(self) -> str:
        return f"sqlite:///{self.root / 'inspections.sqlite3'}"
