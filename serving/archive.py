"""Image archive for retraining: every scrap and review image, a sample of passes.

Layout: `<root>/<YYYY-MM-DD>/<verdict>/<sha256[:2]>/<sha256>.<ext>` (UTC day of the
inspection). Writes are atomic (temp file, fsync, rename), deduplicated by content hash,
held under a byte quota (oldest pass samples go first) and a retention in days.
Archive problems are logged and never raised into the request path: losing an archive
copy must not fail an inspection.
"""

from __future__ import annotations

import heapq
import logging
import random
import re
import shutil
import threading
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, timedelta
from enum import StrEnum
from pathlib import Path, PurePosixPath

from cellinspect.datasets.atomic import write_atomic
from cellinspect.models.card import Verdict

logger = logging.getLogger(__name__)

_SHA256 = re.compile(r"[0-9a-f]{64}")
_DAY_FORMAT = "%Y-%m-%d"
_TEMP_SUFFIX = ".partial"  # leftovers of a crash mid-write, removed at start


class ImageExt(StrEnum):
    """File extensions the archive writes; anything else is stored as `.bin`."""

    PNG = "png"
    JPG = "jpg"
    BMP = "bmp"
    TIF = "tif"
    BIN = "bin"


_EXT_ALIASES = {"jpeg": ImageExt.JPG, "tiff": ImageExt.TIF}


def image_ext(ext: str) -> ImageExt:
    """Normalise "JPEG", ".png", "tiff", ... to the archive's closed set (unknown: bin)."""
    name = ext.strip().lower().lstrip(".")
    if name in _EXT_ALIASES:
        return _EXT_ALIASES[name]
    try:
        return ImageExt(name)
    except ValueError:
        return ImageExt.BIN


@dataclass(frozen=True, slots=True)
class _Entry:
    rel: str  # posix path relative to root
    size: int
    day: str  # YYYY-MM-DD
    verdict: Verdict
    sequence: int = 0  # order of registration: ties within a day go oldest first


class ImageArchive:
    """Content-addressed image archive with quota and retention; thread-safe."""

    def __init__(
        self,
        root: Path,
        *,
        pass_sample_rate: float,
        quota_bytes: int,
        retention_days: float,
        rng: random.Random | None = None,
    ) -> None:
        if not 0.0 <= pass_sample_rate <= 1.0:
            raise ValueError("pass_sample_rate must be within [0, 1]")
        if quota_bytes < 0 or retention_days <= 0:
            raise ValueError("quota_bytes must be >= 0 and retention_days > 0")
        root.mkdir(parents=True, exist_ok=True)
        self.root = root.resolve()
        self.pass_sample_rate = pass_sample_rate
        self.quota_bytes = quota_bytes
        self.retention_days = retention_days
        self._rng = rng or random.Random()
        self._lock = threading.Lock()
        self._index: dict[str, _Entry] = {}  # sha256 -> stored file
        self._in_flight: dict[str, str] = {}  # sha256 -> rel, being written by another thread
        # Eviction order per class: (day, sequence, sha). Entries removed otherwise are
        # skipped lazily when popped.
        self._pass_heap: list[tuple[str, int, str]] = []
        self._kept_heap: list[tuple[str, int, str]] = []
        self._sequence = 0
        self._used = 0
        self._pass_bytes = 0  # what evicting every pass sample could free
        self._reserved = 0  # bytes of writes in progress
        self._scan()

    # -- bookkeeping ---------------------------------------------------------------------

    @property
    def used_bytes(self) -> int:
        """Bytes of archived images (plus writes in progress)."""
        return self._used + self._reserved

    @property
    def file_count(self) -> int:
        """Number of archived images."""
        return len(self._index)

    def _scan(self) -> None:
        """Build the index and byte total once, oldest first, from what is on disk."""
        found: list[tuple[str, float, str, _Entry]] = []
        for day_dir in sorted(self.root.iterdir()):
            if not day_dir.is_dir() or _parse_day(day_dir.name) is None:
                continue
            for verdict in Verdict:
                for prefix_dir in sorted((day_dir / verdict.value).glob("??")):
                    for path in prefix_dir.iterdir():
                        if path.name.endswith(_TEMP_SUFFIX):
                            path.unlink(missing_ok=True)
                            continue
                        sha = path.name.partition(".")[0]
                        if not path.is_file() or not _SHA256.fullmatch(sha):
                            continue
                        stat = path.stat()
                        rel = path.relative_to(self.root).as_posix()
                        found.append(
                            (
                                day_dir.name,
                                stat.st_mtime,
                                sha,
                                _Entry(rel, stat.st_size, day_dir.name, verdict),
                            )
                        )
        found.sort(key=lambda item: (item[0], item[1]))
        for _day, _mtime, sha, entry in found:
            if sha not in self._index:
                self._register(sha, entry)
        logger.info(
            "archive: %s holds %d images, %d bytes (quota %d)",
            self.root,
            len(self._index),
            self._used,
            self.quota_bytes,
        )

    def _register(self, sha: str, entry: _Entry) -> None:
        self._sequence += 1
        entry = replace(entry, sequence=self._sequence)
        self._index[sha] = entry
        self._used += entry.size
        if entry.verdict is Verdict.PASS:
            self._pass_bytes += entry.size
        heap = self._pass_heap if entry.verdict is Verdict.PASS else self._kept_heap
        heapq.heappush(heap, (entry.day, entry.sequence, sha))

    def _forget(self, sha: str, sequence: int | None = None) -> _Entry | None:
        entry = self._index.get(sha)
        if entry is None or (sequence is not None and entry.sequence != sequence):
            return None  # gone already, or a stale heap item of an image stored again since
        del self._index[sha]
        self._used -= entry.size
        if entry.verdict is Verdict.PASS:
            self._pass_bytes -= entry.size
        return entry

    def _evict_oldest(self, heap: list[tuple[str, int, str]], need: int) -> tuple[int, int]:
        """Delete the oldest images of one class until `need` bytes are free."""
        freed = removed = 0
        while heap and freed < need:
            _day, sequence, sha = heapq.heappop(heap)
            entry = self._forget(sha, sequence)
            if entry is None:
                continue
            try:
                (self.root / entry.rel).unlink(missing_ok=True)
            except OSError as exc:
                logger.error("archive: cannot evict %s: %s", entry.rel, exc)
            freed += entry.size
            removed += 1
        return freed, removed

    def _reserve(self, size: int, verdict: Verdict) -> bool:
        """Make room for `size` bytes (lock held); False if the image cannot fit."""
        need = self._used + self._reserved + size - self.quota_bytes
        if need <= 0:
            return True
        evictable = self._used if verdict is not Verdict.PASS else self._pass_bytes
        if need > evictable:  # don't delete anything for an image that cannot fit anyway
            return False
        freed, removed = self._evict_oldest(self._pass_heap, need)
        # Rejects and review cases are what retraining needs most: never drop one for a pass.
        if freed < need and verdict is not Verdict.PASS:
            more, more_removed = self._evict_oldest(self._kept_heap, need - freed)
            freed, removed = freed + more, removed + more_removed
        if removed:
            logger.warning(
                "archive: quota of %d bytes reached; evicted %d oldest images (%d bytes)",
                self.quota_bytes,
                removed,
                freed,
            )
        return freed >= need

    # -- public --------------------------------------------------------------------------

    def should_archive(self, verdict: Verdict) -> bool:
        """Scrap and review always; pass with probability `pass_sample_rate`."""
        if Verdict(verdict) is not Verdict.PASS:  # a plain "pass" string counts as a pass too
            return True
        return self._rng.random() < self.pass_sample_rate

    def stored(self, sha256: str) -> str | None:
        """The path of an image already archived (relative to root), else None.

        For the event loop: one dict lookup, without the lock, which eviction and retention
        hold while they delete files. (A dict read is atomic under the GIL; the entry may be
        evicted a moment later, as it may once `save` has returned it.) A repeated image (a
        camera's retry, a re-inspection) then needs no thread hand-off.
        """
        entry = self._index.get(sha256.lower())
        return None if entry is None else entry.rel

    def save(
        self, data: bytes, *, sha256: str, verdict: Verdict, label: str, created: datetime, ext: str
    ) -> str | None:
        """Archive one image; its path relative to root, or None (logged) if it was not stored."""
        try:
            return self._save(
                data, sha256=sha256, verdict=Verdict(verdict), created=created, ext=ext
            )
        except Exception:  # never into the request path
            logger.exception(
                "archive: failed to store %s image %s (label %s)", verdict, sha256, label
            )
            return None

    def _save(
        self, data: bytes, *, sha256: str, verdict: Verdict, created: datetime, ext: str
    ) -> str | None:
        sha = sha256.lower()
        if not _SHA256.fullmatch(sha):
            logger.error("archive: refusing image with malformed sha256 %r", sha256)
            return None
        day = _utc_day(created)
        rel = f"{day}/{verdict.value}/{sha[:2]}/{sha}.{image_ext(ext).value}"
        size = len(data)
        with self._lock:
            existing = self._index.get(sha)
            if existing is not None:
                return existing.rel
            if sha in self._in_flight:
                return self._in_flight[sha]
            if not self._reserve(size, verdict):
                logger.error(
                    "archive: no room for %s image %s (%d bytes, quota %d, used %d)",
                    verdict.value,
                    sha,
                    size,
                    self.quota_bytes,
                    self._used,
                )
                return None
            self._reserved += size  # held while writing outside the lock
            self._in_flight[sha] = rel
        try:
            write_atomic(self.root / rel, data, temp_suffix=_TEMP_SUFFIX)
        except BaseException:
            with self._lock:
                self._reserved -= size
                del self._in_flight[sha]
            raise
        with self._lock:
            self._reserved -= size
            del self._in_flight[sha]
            self._register(sha, _Entry(rel, size, day, verdict))
        return rel

    def enforce_retention(self, now: datetime | None = None) -> int:
        """Delete day folders whose whole day is older than the retention; files removed."""
        cutoff = (now or datetime.now(UTC)).astimezone(UTC) - timedelta(days=self.retention_days)
        removed = 0
        with self._lock:
            for day_dir in sorted(self.root.iterdir()):
                day = _parse_day(day_dir.name)
                if day is None or not day_dir.is_dir():
                    continue
                day_end = datetime(day.year, day.month, day.day, tzinfo=UTC) + timedelta(days=1)
                if day_end > cutoff:
                    continue
                for sha in [s for s, e in self._index.items() if e.day == day_dir.name]:
                    self._forget(sha)
                removed += sum(1 for p in day_dir.rglob("*") if p.is_file())
                shutil.rmtree(day_dir, ignore_errors=True)
                logger.info("archive: retention removed %s", day_dir.name)
        return removed

    def resolve(self, rel: str) -> Path:
        """Absolute path of an archived file; ValueError for anything outside the root."""
        path = PurePosixPath(rel)
        if not rel or "\x00" in rel or "\\" in rel or path.is_absolute() or ".." in path.parts:
            raise ValueError(f"not an archive path: {rel!r}")
        full = (self.root / path).resolve()
        if not full.is_relative_to(self.root):  # a symlink pointing out
            raise ValueError(f"not an archive path: {rel!r}")
        return full


def _parse_day(name: str) -> date | None:
    try:
        return datetime.strptime(name, _DAY_FORMAT).date()
    except ValueError:
        return None


def _utc_day(created: datetime) -> str:
    if created.tzinfo is None:  # naive means UTC, as in the records
        created = created.replace(tzinfo=UTC)
    return created.astimezone(UTC).strftime(_DAY_FORMAT)
