"""Typed errors for image and data-set input; each names the file (when known) and the problem."""

from __future__ import annotations

from pathlib import Path


class DataError(Exception):
    """A data-set problem tied to one file or folder."""

    def __init__(self, problem: str, path: str | Path | None = None) -> None:
        self.problem = problem
        self.path = None if path is None else str(path)
        super().__init__(f"{self.path}: {problem}" if self.path else problem)


class ImageDecodeError(DataError):
    """Bytes that cannot become an image. `reason` is a stable machine-readable code."""

    reason = "decode_error"


class EmptyImageError(ImageDecodeError):
    reason = "empty"


class UnsupportedImageError(ImageDecodeError):
    reason = "unsupported"


class TruncatedImageError(ImageDecodeError):
    reason = "truncated"


class ImageTooLargeError(ImageDecodeError):
    reason = "too_large"
