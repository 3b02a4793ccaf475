"""Shared CLI pieces: the console, error reporting and home-relative defaults."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from cellinspect.datasets.errors import DataError
from cellinspect.home import Home

console = Console()
err_console = Console(stderr=True)

# Exceptions that mean "your input is wrong", not "the program is broken": they end the
# command with one line naming the file and the problem instead of a traceback.
USER_ERRORS: tuple[type[Exception], ...] = (
    DataError,
    ValueError,
    FileNotFoundError,
    LookupError,
    PermissionError,
)


def _extra_user_errors() -> tuple[type[Exception], ...]:
    from cellinspect.models.runtime import ModelLoadError
    from cellinspect.models.store import IntegrityError

    return (IntegrityError, ModelLoadError)


@contextmanager
def user_errors() -> Iterator[None]:
    try:
        yield
    except (*USER_ERRORS, *_extra_user_errors()) as exc:
        # Escaped: messages quote paths and hints like cellinspect[data] that rich reads as markup.
        err_console.print(
            f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True
        )
        sys.exit(2)


def home() -> Home:
    return Home.resolve()


def store_root(store: Path | None) -> Path:
    return store if store is not None else home().store
