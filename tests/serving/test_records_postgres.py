"""Inspection records on PostgreSQL: the core behaviours, plus surviving a server outage.

Needs a server: `eval "$(.ci/postgres.sh)"`, then `pytest -m postgres`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, delete, event, text
from sqlalchemy.engine import make_url

from cellinspect.models.card import Verdict
from cellinspect.serving.records import (
    InspectionQuery,
    InspectionRow,
    RecordStore,
    RecordStoreUnavailable,
)

from .test_records import (
    OLD_ID,
    OLD_SCHEMA,
    T0,
    check_duplicate_key_in_a_group_keeps_the_others,
    check_old_database_upgrades_in_place,
    check_try_commit_writes_in_the_calling_thread,
    make_record,
)

URL_ENV = "CELLINSPECT_TEST_POSTGRES_URL"
URL = os.environ.get(URL_ENV)

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.skipif(not URL, reason=f"{URL_ENV} is not set; start one with .ci/postgres.sh"),
]


@pytest.fixture
def url() -> Iterator[str]:
    assert URL
    with RecordStore(URL) as store, store.engine.begin() as conn:
        conn.execute(delete(InspectionRow))  # one shared test database: start empty
    yield URL


class Outage:
    """A TCP relay in front of the server that can drop every connection and refuse new ones."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.port = 0
        self._sockets: list[socket.socket] = []
        self._listener: socket.socket | None = None
        self.up()

    def up(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen()
        self.port = listener.getsockname()[1]
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def down(self) -> None:
        # shutdown() first: close() alone does not wake a thread blocked in accept/recv.
        assert self._listener is not None
        for sock in [self._listener, *self._sockets]:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        self._sockets.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.target)
            self._sockets += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


def test_concurrent_adds_share_commits(store: RecordStore, commits: list[int]) -> None:
    async def main() -> None:
        await asyncio.gather(*(store.add(make_record(i)) for i in range(200)))

    asyncio.run(main())
    assert sum(commits) == 200 and len(commits) <= 20, commits
    assert store.count() == 200


def test_awaited_adds_are_readable_after_reopen(url: str) -> None:
    records = [make_record(i, verdict=Verdict.REVIEW) for i in range(30)]

    async def main() -> None:
        store = RecordStore(url)
        await asyncio.gather(*(store.add(r) for r in records))
        await store.close()

    asyncio.run(main())
    with RecordStore(url) as reopened:
        assert reopened.count() == 30
        for record in records:
            assert reopened.get(record.id) == record


def test_close_drains_and_then_refuses(url: str) -> None:
    async def main() -> list[Any]:
        store = RecordStore(url, commit_wait_ms=20)
        tasks = [asyncio.create_task(store.add(make_record(i))) for i in range(50)]
        await asyncio.sleep(0)
        await store.close()
        with pytest.raises(RecordStoreUnavailable, match="closed"):
            await store.add(make_record(99))
        return await asyncio.gather(*tasks, return_exceptions=True)

    assert asyncio.run(main()) == [None] * 50
    with RecordStore(url) as reopened:
        assert reopened.count() == 50


def test_query_filters_and_pages(store: RecordStore) -> None:
    records = [
        make_record(i, line_id=f"line-{i % 2}", verdict=(Verdict.PASS, Verdict.SCRAP)[i % 2])
        for i in range(30)
    ]
    store.add_many_sync(records)
    page, total = store.query(InspectionQuery(limit=5, offset=5))
    assert total == 30 and [r.id for r in page] == [r.id for r in reversed(records[20:25])]
    page, total = store.query(InspectionQuery(line_id="line-1", verdict=Verdict.SCRAP))
    assert total == 15 and all(r.verdict is Verdict.SCRAP for r in page)
    window = InspectionQuery(since=T0 + timedelta(seconds=10), until=T0 + timedelta(seconds=20))
    page, total = store.query(window)
    assert total == 10 and {r.id for r in page} == {r.id for r in records[10:20]}
    page, total = store.query(InspectionQuery(cell_id="cell-00003"))
    assert total == 1 and page[0] == records[3]
    assert page[0].created.utcoffset() == timedelta(0)
    assert store.integrity_check() == "ok"


def test_writer_survives_server_outage(url: str) -> None:
    parsed = make_url(url)
    relay = Outage(parsed.host or "127.0.0.1", parsed.port or 5432)
    through_relay = parsed.set(host="127.0.0.1", port=relay.port)
    store = RecordStore(through_relay.render_as_string(hide_password=False))

    async def add_all(first: int, n: int) -> list[Any]:
        return await asyncio.gather(
            *(store.add(make_record(first + i)) for i in range(n)), return_exceptions=True
        )

    try:
        assert asyncio.run(add_all(0, 5)) == [None] * 5
        relay.down()  # the server "restarts": live connections drop, new ones are refused
        started = time.monotonic()
        failed = asyncio.run(add_all(100, 10))
        assert all(isinstance(e, RecordStoreUnavailable) for e in failed), failed
        assert time.monotonic() - started < 15  # bounded, never a hang
        assert "unavailable" in store.integrity_check()

        relay.up()
        assert asyncio.run(add_all(200, 5)) == [None] * 5
        assert store.count() == 10
    finally:
        store.close_sync()
        relay.down()


def test_terminated_connections_are_replaced(store: RecordStore) -> None:
    asyncio.run(store.add(make_record(0)))
    with store.engine.connect() as conn:
        conn.execute(
            text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        )
    asyncio.run(store.add(make_record(1)))  # pool_pre_ping finds the dead connection
    assert store.count() == 2


def test_duplicate_key_in_a_group_keeps_the_others(url: str) -> None:
    check_duplicate_key_in_a_group_keeps_the_others(url)


@contextlib.contextmanager
def own_database() -> Iterator[str]:
    """The URL of a fresh database of its own, dropped afterwards (the shared one's table
    is already upgraded by the other tests)."""
    assert URL
    server = create_engine(make_url(URL).set(database="postgres"), isolation_level="AUTOCOMMIT")
    name = f"cellinspect_upgrade_{secrets.token_hex(4)}"
    with server.connect() as conn:
        conn.execute(text(f"CREATE DATABASE {name}"))
    try:
        yield make_url(URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with server.connect() as conn:
            conn.execute(text(f"DROP DATABASE {name} WITH (FORCE)"))
        server.dispose()


@contextlib.contextmanager
def statements_run() -> Iterator[list[str]]:
    """Every SQL statement any engine sends while inside."""
    seen: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        seen.append(statement)

    event.listen(Engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(Engine, "before_cursor_execute", record)


def test_try_commit_writes_in_the_calling_thread_when_the_writer_is_idle(
    store: RecordStore, commits: list[int]
) -> None:
    check_try_commit_writes_in_the_calling_thread(store, commits)


def test_old_database_upgrades_in_place_and_keeps_its_rows() -> None:
    with own_database() as url, statements_run() as seen:
        check_old_database_upgrades_in_place(url, "TIMESTAMP WITH TIME ZONE")
    # The upgrade's (the old schema's own CREATE INDEX statements have no IF NOT EXISTS),
    # built concurrently, so writers elsewhere (another worker or station) are not blocked.
    built = [s for s in seen if "INDEX" in s and "IF NOT EXISTS" in s]
    assert built and all("INDEX CONCURRENTLY IF NOT EXISTS" in s for s in built), built


def test_workers_starting_together_upgrade_once_and_all_start() -> None:
    with own_database() as url:
        setup = create_engine(url)
        with setup.begin() as conn:  # the first release's table: no key column or index
            for statement in OLD_SCHEMA:
                conn.execute(
                    text(
                        statement.format(
                            timestamp="TIMESTAMP WITH TIME ZONE", old_id=OLD_ID, sha="0" * 64
                        )
                    )
                )
        errors: list[BaseException] = []

        def start() -> None:
            try:
                RecordStore(url).close_sync()
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        with statements_run() as seen:
            workers = [threading.Thread(target=start) for _ in range(3)]
            for worker in workers:
                worker.start()
            for worker in workers:
                worker.join(60)
        assert errors == []
        built = [s for s in seen if "INDEX CONCURRENTLY" in s]
        assert len(built) == 1, built  # one upgrader; the others found it done
        with setup.connect() as conn:
            assert not conn.execute(
                text("SELECT count(*) FROM pg_index WHERE NOT indisvalid")
            ).scalar_one()
        setup.dispose()


def test_a_half_built_index_is_built_again_and_timeouts_stay_in_force() -> None:
    with own_database() as url:
        RecordStore(url).close_sync()
        admin = create_engine(url)
        with admin.begin() as conn:  # what an interrupted CREATE INDEX CONCURRENTLY leaves
            conn.execute(
                text(
                    "UPDATE pg_index SET indisvalid = false "
                    "WHERE indexrelid = 'ix_inspections_cell_id'::regclass"
                )
            )
        valid = text(
            "SELECT indisvalid FROM pg_index WHERE indexrelid = 'ix_inspections_cell_id'::regclass"
        )
        with statements_run() as seen, RecordStore(url) as store:
            with admin.connect() as conn:
                assert conn.execute(valid).scalar_one() is True
            # The upgrade lifted the statement timeout on its own session only.
            with store.engine.connect() as conn:
                assert conn.execute(text("SHOW statement_timeout")).scalar_one() == "30s"
            assert asyncio.run(store.add(make_record(1))) is None
        assert any("DROP INDEX CONCURRENTLY" in s and "ix_inspections_cell_id" in s for s in seen)
        admin.dispose()
