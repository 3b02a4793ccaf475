"""Inspection records on SQLite: group commit, durability, failure and recovery, queries."""

from __future__ import annotations

import asyncio
import threading
import time
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, event, inspect, text
from sqlalchemy.exc import OperationalError

from cellinspect.models.card import Verdict
from cellinspect.serving import records
from cellinspect.serving.records import (
    Base,
    InspectionQuery,
    InspectionRecord,
    RecordStore,
    RecordStoreUnavailable,
)

T0 = datetime(2024, 5, 1, 8, 0, tzinfo=UTC)


def make_record(i: int = 0, **overrides: Any) -> InspectionRecord:
    values: dict[str, Any] = {
        "created": T0 + timedelta(seconds=i),
        "line_id": "line-1",
        "station_id": "st-1",
        "cell_id": f"cell-{i:05d}",
        "model_name": "electrode-defects",
        "model_version": "3",
        "label": "good",
        "confidence": 0.97,
        "probabilities": {"good": 0.97, "crack": 0.03},
        "verdict": Verdict.PASS,
        "timings": {"decode_ms": 1.0, "queue_ms": 0.5, "infer_ms": 2.0, "total_ms": 3.6},
        "image_sha256": f"{i:064x}",
    }
    values.update(overrides)
    return InspectionRecord(**values)


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'db' / 'inspections.sqlite3'}"


class FailInserts:
    """Makes every INSERT fail like a broken disk while `on` is set."""

    def __init__(self, store: RecordStore) -> None:
        self.on = True
        event.listen(store.engine, "before_cursor_execute", self)

    def __call__(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if self.on and statement.lstrip().upper().startswith("INSERT"):
            raise OperationalError(statement, None, Exception("disk I/O error"))


def test_concurrent_adds_share_commits(store: RecordStore, commits: list[int]) -> None:
    async def main() -> None:
        await asyncio.gather(*(store.add(make_record(i)) for i in range(200)))

    asyncio.run(main())
    assert sum(commits) == 200
    assert len(commits) <= 20, f"200 adds took {len(commits)} commits: {commits}"
    assert store.count() == 200


def test_awaited_adds_are_readable_after_reopen(url: str) -> None:
    records = [make_record(i, verdict=Verdict.SCRAP, label="crack") for i in range(30)]

    async def main() -> None:
        store = RecordStore(url)
        await store.start()
        await asyncio.gather(*(store.add(r) for r in records))
        await store.close()

    asyncio.run(main())
    with RecordStore(url) as reopened:
        assert reopened.count() == 30
        for record in records:
            assert reopened.get(record.id) == record


def test_close_commits_everything_already_accepted(url: str) -> None:
    async def main() -> list[BaseException | None]:
        store = RecordStore(url, commit_wait_ms=20)
        tasks = [asyncio.create_task(store.add(make_record(i))) for i in range(50)]
        await asyncio.sleep(0)  # every add is queued, few or none committed yet
        await store.close()
        return await asyncio.gather(*tasks, return_exceptions=True)

    assert asyncio.run(main()) == [None] * 50
    with RecordStore(url) as reopened:
        assert reopened.count() == 50


def test_add_after_close_is_refused(store: RecordStore) -> None:
    store.close_sync()
    with pytest.raises(RecordStoreUnavailable, match="closed"):
        asyncio.run(store.add(make_record()))


def test_failed_commit_fails_every_waiter_and_writer_recovers(
    store: RecordStore, commits: list[int]
) -> None:
    fault = FailInserts(store)

    async def add_all(first: int, n: int) -> list[BaseException | None]:
        return await asyncio.gather(
            *(store.add(make_record(first + i)) for i in range(n)), return_exceptions=True
        )

    failed = asyncio.run(add_all(0, 20))
    assert all(isinstance(e, RecordStoreUnavailable) for e in failed), failed
    assert "disk I/O error" in str(failed[0])
    assert store.count() == 0 and commits == []

    fault.on = False
    assert asyncio.run(add_all(100, 20)) == [None] * 20
    assert store.count() == 20


def test_stuck_commit_answers_within_timeout(url: str) -> None:
    release = threading.Event()

    def hang(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith("INSERT"):
            release.wait(5)  # a frozen server: the writer cannot finish this batch

    with RecordStore(url, commit_timeout_s=0.2) as store:
        event.listen(store.engine, "before_cursor_execute", hang)
        started = time.monotonic()
        with pytest.raises(RecordStoreUnavailable, match="not committed within 0.2 s"):
            asyncio.run(store.add(make_record()))
        assert time.monotonic() - started < 2
        release.set()
    with RecordStore(url) as reopened:
        assert reopened.count() == 1  # it landed after all: at-least-once, never lost


def test_one_bad_record_does_not_sink_its_batch(store: RecordStore) -> None:
    first = make_record(0)
    store.add_many_sync([first])

    async def main() -> list[BaseException | None]:
        duplicate = make_record(1, id=first.id)
        others = [store.add(make_record(i)) for i in range(2, 12)]
        return await asyncio.gather(store.add(duplicate), *others, return_exceptions=True)

    results = asyncio.run(main())
    assert isinstance(results[0], RecordStoreUnavailable)
    assert results[1:] == [None] * 10
    assert store.count() == 11


def test_failing_metrics_callback_does_not_stop_records(url: str) -> None:
    def broken(_n: int, _s: float, _path: str) -> None:
        raise ValueError("metrics bug")

    with RecordStore(url, on_commit=broken) as store:
        asyncio.run(store.add(make_record()))
        asyncio.run(store.add(make_record(1)))
        assert store.count() == 2


def test_query_filters_newest_first_with_total(store: RecordStore) -> None:
    records = [
        make_record(
            i,
            line_id=f"line-{i % 2}",
            station_id=f"st-{i % 3}",
            verdict=(Verdict.PASS, Verdict.REVIEW, Verdict.SCRAP)[i % 3],
        )
        for i in range(30)
    ]
    store.add_many_sync(records)

    page, total = store.query(InspectionQuery(limit=5))
    assert total == 30
    assert [r.id for r in page] == [r.id for r in reversed(records[-5:])]

    page, total = store.query(InspectionQuery(limit=5, offset=25))
    assert total == 30 and [r.id for r in page] == [r.id for r in reversed(records[:5])]

    page, total = store.query(InspectionQuery(line_id="line-1", verdict=Verdict.SCRAP))
    expected = {r.id for r in records if r.line_id == "line-1" and r.verdict is Verdict.SCRAP}
    assert total == len(expected) == 5 and {r.id for r in page} == expected

    page, total = store.query(InspectionQuery(station_id="st-2"))
    assert total == 10 and all(r.station_id == "st-2" for r in page)

    page, total = store.query(InspectionQuery(cell_id="cell-00007"))
    assert total == 1 and page[0].id == records[7].id

    since, until = T0 + timedelta(seconds=10), T0 + timedelta(seconds=20)
    page, total = store.query(InspectionQuery(since=since, until=until))
    assert total == 10 and {r.id for r in page} == {r.id for r in records[10:20]}

    # The same instant written with an offset selects the same rows.
    cest = timezone(timedelta(hours=2))
    page, total = store.query(InspectionQuery(since=since.astimezone(cest), limit=1000))
    assert total == 20


def test_created_comes_back_timezone_aware_utc(store: RecordStore) -> None:
    local = datetime(2024, 5, 1, 10, 30, tzinfo=timezone(timedelta(hours=2)))
    record = make_record(created=local)
    store.add_many_sync([record])
    stored = store.get(record.id)
    assert stored is not None
    assert stored.created == local and stored.created.tzinfo == UTC
    assert store.get("0" * 32) is None


def test_sqlite_is_wal_with_full_sync(store: RecordStore) -> None:
    with store.engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert conn.execute(text("PRAGMA synchronous")).scalar() == 2  # FULL
    assert store.integrity_check() == "ok"


def test_unsupported_urls_are_refused() -> None:
    with pytest.raises(ValueError, match="SQLite file"):
        RecordStore("sqlite://")
    with pytest.raises(ValueError, match="valid: sqlite, postgresql"):
        RecordStore("mysql://localhost/x")


def test_query_limits_are_validated() -> None:
    with pytest.raises(ValueError):
        InspectionQuery(limit=0)
    with pytest.raises(ValueError):
        InspectionQuery(limit=1001)
    with pytest.raises(ValueError):
        InspectionQuery(offset=-1)


def test_ping_answers_true_on_a_live_database(store: RecordStore) -> None:
    assert store.ping() is True


def test_unreachable_database_fails_start_after_the_wait_naming_the_cause() -> None:
    pytest.importorskip("psycopg")
    url = "postgresql+psycopg://nobody:x@127.0.0.1:1/none"  # port 1: refused at once
    started = time.monotonic()
    with pytest.raises(RecordStoreUnavailable, match="unavailable"):
        RecordStore(url, startup_wait_s=0)
    assert time.monotonic() - started < 5
    started = time.monotonic()
    with pytest.raises(RecordStoreUnavailable):
        RecordStore(url, startup_wait_s=2.0)
    waited = time.monotonic() - started
    assert 1.0 <= waited < 8, waited  # retried through the wait, then gave up


def test_database_that_comes_up_during_the_wait_is_used(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = Base.metadata.create_all
    attempts: list[float] = []

    def down_twice(*args: Any, **kwargs: Any) -> None:
        attempts.append(time.monotonic())
        if len(attempts) <= 2:  # a server still starting: refused, refused, then up
            raise OperationalError("connect", {}, ConnectionRefusedError("refused"))
        real(*args, **kwargs)

    monkeypatch.setattr(Base.metadata, "create_all", down_twice)
    with RecordStore(url, startup_wait_s=10) as store:
        assert store.ping()
    assert len(attempts) == 3
    assert attempts[-1] - attempts[0] >= 1.5  # it waited between attempts, it did not spin


# -- idempotency keys and upgrading older databases (shared with test_records_postgres.py) --


def check_duplicate_key_in_a_group_keeps_the_others(url: str) -> None:
    """A key already stored, and a key twice in one group: the rest of the group is written."""
    commits: list[int] = []
    # A generous gathering window: every add below lands in one commit group.
    with RecordStore(
        url, commit_wait_ms=200, on_commit=lambda n, _s, _path: commits.append(n)
    ) as store:
        first = make_record(0, idempotency_key="st-1:cell-0:a")
        store.add_many_sync([first])
        twins = [make_record(i, idempotency_key="st-1:cell-20:a") for i in (20, 21)]

        async def main() -> list[Any]:
            return await asyncio.gather(
                store.add(make_record(1, idempotency_key=first.idempotency_key)),
                *(
                    store.add(make_record(i, idempotency_key=f"st-1:cell-{i}:a"))
                    for i in range(2, 12)
                ),
                store.add(make_record(12)),  # no key at all
                *(store.add(t) for t in twins),
            )

        results = asyncio.run(main())
        assert results[0] == first  # not written: the stored record comes back
        assert results[1:12] == [None] * 11
        winner = next(t for t in twins if store.get(t.id) is not None)
        assert results[12:] == [None if t is winner else winner for t in twins]
        assert commits == [12], commits  # one transaction, nothing failed
        assert store.count() == 13
        assert store.get_by_idempotency_key("st-1:cell-20:a") == winner
        assert store.get_by_idempotency_key("never-used") is None


def test_duplicate_key_in_a_group_keeps_the_others(url: str) -> None:
    check_duplicate_key_in_a_group_keeps_the_others(url)


def test_duplicate_id_still_fails_while_keys_are_in_use(store: RecordStore) -> None:
    first = make_record(0, idempotency_key="k-0")
    store.add_many_sync([first])
    with pytest.raises(RecordStoreUnavailable):
        asyncio.run(store.add(make_record(1, id=first.id, idempotency_key="k-1")))
    assert store.count() == 1


# The table as the first release created it, before defect_probability and idempotency_key
# ({timestamp}: DATETIME on SQLite, TIMESTAMP WITH TIME ZONE on PostgreSQL).
OLD_SCHEMA = [
    """CREATE TABLE inspections (
        id VARCHAR(32) NOT NULL, created {timestamp} NOT NULL, line_id VARCHAR(128),
        station_id VARCHAR(128), cell_id VARCHAR(128), model_name VARCHAR(128) NOT NULL,
        model_version VARCHAR(64) NOT NULL, label VARCHAR(128) NOT NULL,
        confidence FLOAT NOT NULL, probabilities JSON NOT NULL, verdict VARCHAR(8) NOT NULL,
        timings JSON NOT NULL, image_sha256 VARCHAR(64) NOT NULL, archive_path VARCHAR(512),
        frame_regions JSON, shadow_model_version VARCHAR(64), shadow_label VARCHAR(128),
        shadow_verdict VARCHAR(8), PRIMARY KEY (id))""",
    "CREATE INDEX ix_inspections_cell_id ON inspections (cell_id)",
    "CREATE INDEX ix_inspections_station_id ON inspections (station_id)",
    "CREATE INDEX ix_inspections_line_created ON inspections (line_id, created)",
    "CREATE INDEX ix_inspections_verdict ON inspections (verdict)",
    "CREATE INDEX ix_inspections_created ON inspections (created)",
    "CREATE INDEX ix_inspections_line_id ON inspections (line_id)",
    """INSERT INTO inspections (id, created, line_id, station_id, cell_id, model_name,
        model_version, label, confidence, probabilities, verdict, timings, image_sha256)
        VALUES ('{old_id}', '2024-05-01 08:00:00', 'line-1', 'st-1', 'cell-old', 'm', '1',
        'crack', 0.9, '{{"good": 0.1, "crack": 0.9}}', 'scrap', '{{}}', '{sha}')""",
]
OLD_ID = "a" * 32


def check_old_database_upgrades_in_place(url: str, timestamp: str) -> None:
    setup = create_engine(url)
    with setup.begin() as conn:
        for statement in OLD_SCHEMA:
            conn.execute(text(statement.format(timestamp=timestamp, old_id=OLD_ID, sha="0" * 64)))
    for _ in range(2):  # the second start finds nothing to do
        with RecordStore(url) as store:
            old = store.get(OLD_ID)
            assert old is not None and (old.verdict, old.cell_id) == (Verdict.SCRAP, "cell-old")
            assert old.idempotency_key is None and old.defect_probability is None
            if store.count() == 1:
                keyed = make_record(1, idempotency_key="st-1:cell-1:a", defect_probability=0.2)
                assert asyncio.run(store.add(keyed)) is None
                assert asyncio.run(store.add(make_record(2, idempotency_key="st-1:cell-1:a")))
                assert store.get(keyed.id) == keyed
            assert store.count() == 2
    indexes = {i["name"]: i for i in inspect(setup).get_indexes("inspections")}
    assert indexes["ix_inspections_idempotency_key"]["unique"]
    assert indexes["ix_inspections_idempotency_key"]["column_names"] == ["idempotency_key"]
    setup.dispose()


def test_old_sqlite_database_upgrades_in_place_and_keeps_its_rows(url: str) -> None:
    Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True)
    check_old_database_upgrades_in_place(url, "DATETIME")


def test_table_lacking_a_required_column_is_refused(url: str) -> None:
    Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True)
    setup = create_engine(url)
    with setup.begin() as conn:
        conn.execute(text("CREATE TABLE inspections (id VARCHAR(32) PRIMARY KEY)"))
    setup.dispose()
    with pytest.raises(RuntimeError, match="lacks required column.*created"):
        RecordStore(url)


def test_records_added_in_one_turn_of_the_loop_commit_as_one_group(
    store: RecordStore, commits: list[int]
) -> None:
    """An inference batch wakes its requests in one turn of the event loop: their records
    reach the writer together, not the first alone while the others are being built."""

    async def main() -> list[Any]:
        together = await asyncio.gather(*(store.add(make_record(i)) for i in range(6)))
        return [*together, await store.add(make_record(6))]  # alone in its turn

    assert asyncio.run(main()) == [None] * 7
    assert commits == [6, 1]


def test_close_commits_the_records_of_its_own_turn(store: RecordStore, commits: list[int]) -> None:
    async def main() -> Any:
        adding = asyncio.create_task(store.add(make_record(1)))
        await asyncio.sleep(0)  # add() has run: its record waits for the end of the turn
        await store.close()
        return await adding

    assert asyncio.run(main()) is None
    assert commits == [1]


def check_try_commit_writes_in_the_calling_thread(store: RecordStore, commits: list[int]) -> None:
    first = make_record(1, idempotency_key="st-1:cell-1:a")
    assert store.try_commit(first) == (True, None)
    assert store.get(first.id) == first and commits == [1]
    # The key is taken: like add, the stored record comes back and nothing is written.
    again = make_record(2, idempotency_key=first.idempotency_key)
    assert store.try_commit(again) == (True, first)
    assert store.get(again.id) is None and store.count() == 1 and commits == [1]


def test_try_commit_writes_in_the_calling_thread_when_the_writer_is_idle(
    store: RecordStore, commits: list[int]
) -> None:
    check_try_commit_writes_in_the_calling_thread(store, commits)


def test_try_commit_declines_while_the_writer_commits_and_add_takes_over(url: str) -> None:
    inside, release = threading.Event(), threading.Event()

    def slow_commit(_size: int, _seconds: float, _path: str) -> None:  # inside the commit
        inside.set()
        release.wait(10)

    store = RecordStore(url, on_commit=slow_commit)

    async def main() -> tuple[Any, ...]:
        adding = asyncio.create_task(store.add(make_record(1)))
        assert await asyncio.to_thread(inside.wait, 10)
        declined = store.try_commit(make_record(2))
        release.set()
        return declined, await adding

    assert asyncio.run(main()) == ((False, None), None)
    assert store.try_commit(make_record(3)) == (True, None)  # idle again
    store.close_sync()
    assert store.try_commit(make_record(4)) == (False, None)  # closed: add says why
    with pytest.raises(RecordStoreUnavailable, match="closed"):
        asyncio.run(store.add(make_record(4)))
    reopened = RecordStore(url)
    assert reopened.count() == 2
    reopened.close_sync()


def test_a_failed_or_slow_commit_pauses_try_commit_for_a_while(
    store: RecordStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A database in trouble must hold up the writer thread, not the inference worker:
    after a failed or slow commit, try_commit declines (records go through add) until
    TRY_COMMIT_PAUSE_S has passed."""
    monkeypatch.setattr(records, "TRY_COMMIT_PAUSE_S", 0.3)
    failing = FailInserts(store)
    with pytest.raises(RecordStoreUnavailable, match="disk I/O error"):
        store.try_commit(make_record(1))
    failing.on = False
    assert store.try_commit(make_record(2)) == (False, None)  # paused: nothing written
    assert asyncio.run(store.add(make_record(3))) is None  # the writer still commits
    time.sleep(0.35)
    assert store.try_commit(make_record(4)) == (True, None)
    # The writer's commits count too: a slow one pauses try_commit as well.
    monkeypatch.setattr(records, "TRY_COMMIT_SLOW_S", 0.0)
    assert asyncio.run(store.add(make_record(5))) is None
    assert store.try_commit(make_record(6)) == (False, None)
    assert sorted(r.cell_id for r in store.query(InspectionQuery())[0]) == [
        "cell-00003",
        "cell-00004",
        "cell-00005",
    ]
