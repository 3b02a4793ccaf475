"""Image archive: what is kept, layout and dedupe, quota eviction, retention, path safety."""

from __future__ import annotations

import hashlib
import logging
import os
import random
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from cellinspect.models.card import Verdict
from cellinspect.serving import archive as archive_module
from cellinspect.serving.archive import ImageArchive

DAY0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


def image(i: int, size: int = 100) -> tuple[bytes, str]:
    data = i.to_bytes(4, "big") * (size // 4)
    return data, hashlib.sha256(data).hexdigest()


def make_archive(root: Path, *, quota: int = 10**9, rate: float = 0.0) -> ImageArchive:
    return ImageArchive(
        root, pass_sample_rate=rate, quota_bytes=quota, retention_days=30, rng=random.Random(7)
    )


def save(archive: ImageArchive, i: int, verdict: Verdict, day: int = 0) -> str | None:
    data, sha = image(i)
    created = DAY0 + timedelta(days=day)
    return archive.save(data, sha256=sha, verdict=verdict, label="x", created=created, ext="png")


def files_under(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def test_scrap_and_review_always_pass_sampled(tmp_path: Path) -> None:
    archive = make_archive(tmp_path, rate=0.25)
    assert all(
        archive.should_archive(v) for v in (Verdict.SCRAP, Verdict.REVIEW) for _ in range(100)
    )
    kept = sum(archive.should_archive(Verdict.PASS) for _ in range(4000))
    assert 900 < kept < 1100
    assert not any(
        make_archive(tmp_path, rate=0.0).should_archive(Verdict.PASS) for _ in range(500)
    )
    assert all(make_archive(tmp_path, rate=1.0).should_archive(Verdict.PASS) for _ in range(500))


def test_save_writes_layout_atomically(tmp_path: Path) -> None:
    archive = make_archive(tmp_path)
    data, sha = image(1)
    created = datetime(2024, 5, 1, 23, 30, tzinfo=UTC) + timedelta(hours=1)  # next UTC day
    rel = archive.save(
        data, sha256=sha, verdict=Verdict.SCRAP, label="crack", created=created, ext="PNG"
    )
    assert rel == f"2024-05-02/scrap/{sha[:2]}/{sha}.png"
    assert (tmp_path / rel).read_bytes() == data
    assert files_under(tmp_path) == [rel]  # no temp file left behind
    assert archive.used_bytes == len(data) and archive.file_count == 1


@pytest.mark.parametrize(
    ("ext", "stored"),
    [("jpeg", "jpg"), (".tiff", "tif"), ("bmp", "bmp"), ("exe", "bin"), ("", "bin")],
)
def test_extension_comes_from_a_closed_set(tmp_path: Path, ext: str, stored: str) -> None:
    data, sha = image(2)
    rel = make_archive(tmp_path).save(
        data, sha256=sha, verdict=Verdict.REVIEW, label="x", created=DAY0, ext=ext
    )
    assert rel is not None and rel.endswith(f"{sha}.{stored}")


def test_same_image_is_stored_once(tmp_path: Path) -> None:
    archive = make_archive(tmp_path)
    first = save(archive, 3, Verdict.SCRAP)
    assert first is not None
    before = (tmp_path / first).stat().st_mtime_ns
    again = save(archive, 3, Verdict.REVIEW, day=1)
    assert again == first
    assert (tmp_path / first).stat().st_mtime_ns == before
    assert files_under(tmp_path) == [first] and archive.used_bytes == 100


def test_stored_finds_an_archived_image_until_it_is_evicted(tmp_path: Path) -> None:
    archive = make_archive(tmp_path, quota=200)
    _, sha = image(1)
    assert archive.stored(sha) is None
    rel = save(archive, 1, Verdict.SCRAP)
    assert rel is not None and archive.stored(sha) == rel == archive.stored(sha.upper())
    save(archive, 2, Verdict.SCRAP, day=1)
    save(archive, 3, Verdict.SCRAP, day=2)  # over the quota: the oldest scrap goes
    assert archive.stored(sha) is None and not (tmp_path / rel).exists()


def test_quota_evicts_oldest_pass_samples_first(tmp_path: Path) -> None:
    archive = make_archive(tmp_path, quota=1000)
    passes = [save(archive, i, Verdict.PASS, day=i) for i in range(5)]
    scraps = [save(archive, 10 + i, Verdict.SCRAP, day=i) for i in range(5)]
    assert archive.used_bytes == 1000

    new_scrap = save(archive, 20, Verdict.SCRAP, day=9)
    new_pass = save(archive, 21, Verdict.PASS, day=9)
    assert new_scrap is not None and new_pass is not None
    on_disk = set(files_under(tmp_path))
    assert passes[0] not in on_disk and passes[1] not in on_disk  # the two oldest passes
    assert set(passes[2:]) | set(scraps) | {new_scrap, new_pass} == on_disk
    assert archive.used_bytes == 1000


def test_pass_never_evicts_scrap_or_review(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    archive = make_archive(tmp_path, quota=500)
    kept = [save(archive, i, (Verdict.SCRAP, Verdict.REVIEW)[i % 2], day=i) for i in range(5)]
    with caplog.at_level(logging.ERROR, logger=archive_module.__name__):
        assert save(archive, 9, Verdict.PASS, day=9) is None
    assert "no room" in caplog.text
    assert files_under(tmp_path) == sorted(kept)


def test_scrap_evicts_oldest_scrap_when_no_pass_left(tmp_path: Path) -> None:
    archive = make_archive(tmp_path, quota=500)
    kept = [save(archive, i, Verdict.SCRAP, day=4 - i) for i in range(5)]  # kept[4] is oldest
    newest = save(archive, 9, Verdict.REVIEW, day=9)
    assert newest is not None
    assert files_under(tmp_path) == sorted([*kept[:4], newest])


def test_image_larger_than_quota_evicts_nothing(tmp_path: Path) -> None:
    archive = make_archive(tmp_path, quota=250)
    stored = [save(archive, i, Verdict.PASS) for i in range(2)]
    data, sha = image(5, size=400)
    assert (
        archive.save(data, sha256=sha, verdict=Verdict.SCRAP, label="x", created=DAY0, ext="png")
        is None
    )
    assert files_under(tmp_path) == sorted(stored)


def test_restart_recounts_quota_and_dedupes_from_disk(tmp_path: Path) -> None:
    archive = make_archive(tmp_path, quota=1000)
    first = save(archive, 1, Verdict.PASS)
    save(archive, 2, Verdict.SCRAP, day=1)
    leftover = tmp_path / "2024-05-01" / "pass" / "ab" / ".crash.png.x.partial"
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"half")

    reopened = make_archive(tmp_path, quota=300)
    assert reopened.used_bytes == 200 and reopened.file_count == 2
    assert not leftover.exists()
    assert save(reopened, 1, Verdict.PASS, day=5) == first
    save(reopened, 3, Verdict.SCRAP, day=2)
    save(reopened, 4, Verdict.SCRAP, day=3)  # over quota: the pass sample from before goes
    assert first is not None and not (tmp_path / first).exists()


def test_retention_removes_only_expired_days(tmp_path: Path) -> None:
    archive = make_archive(tmp_path)
    for day in range(5):
        save(archive, day, Verdict.SCRAP, day=day)
        save(archive, 10 + day, Verdict.PASS, day=day)
    (tmp_path / "not-a-day").mkdir()
    # Retention 30 days: at day 0 + 32 12:00 the cutoff is day 2 12:00, so days 0 and 1 ended.
    removed = archive.enforce_retention(DAY0 + timedelta(days=32))
    assert removed == 4
    remaining = {p.name for p in tmp_path.iterdir()}
    assert remaining == {"2024-05-03", "2024-05-04", "2024-05-05", "not-a-day"}
    assert archive.used_bytes == 600 and archive.file_count == 6
    assert save(archive, 0, Verdict.SCRAP, day=0) is not None  # stored again, not "deduped"
    assert archive.file_count == 7


def test_resolve_refuses_paths_outside_root(tmp_path: Path) -> None:
    root = tmp_path / "archive"
    archive = make_archive(root)
    rel = save(archive, 1, Verdict.SCRAP)
    assert rel is not None and archive.resolve(rel) == root.resolve() / rel
    outside = tmp_path / "secret.txt"
    outside.write_text("x")
    os.symlink(outside, root / "link.txt")
    for bad in [
        "../secret.txt",
        "2024-05-01/../../secret.txt",
        str(outside),
        "/etc/passwd",
        "",
        "link.txt",
        "a\\..\\b",
    ]:
        with pytest.raises(ValueError):
            archive.resolve(bad)


def test_write_error_returns_none_and_releases_quota(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    archive = make_archive(tmp_path, quota=1000)

    def disk_full(target: Path, data: bytes, **_: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(archive_module, "write_atomic", disk_full)
    with caplog.at_level(logging.ERROR, logger=archive_module.__name__):
        assert save(archive, 1, Verdict.SCRAP) is None
    assert "No space left" in caplog.text
    assert archive.used_bytes == 0 and archive.file_count == 0

    monkeypatch.undo()
    assert save(archive, 1, Verdict.SCRAP) is not None
    data, _ = image(2)
    assert (
        archive.save(
            data, sha256="../../etc", verdict=Verdict.SCRAP, label="x", created=DAY0, ext="png"
        )
        is None
    )


def test_concurrent_saves_respect_quota(tmp_path: Path) -> None:
    archive = make_archive(tmp_path, quota=5000)
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: save(archive, i, Verdict.PASS, day=i % 7), range(200)))
    assert sum(r is not None for r in results) == 200
    assert archive.used_bytes <= 5000
    assert len(files_under(tmp_path)) == archive.file_count == archive.used_bytes // 100
