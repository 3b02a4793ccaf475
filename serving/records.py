"""Durable inspection records: one row per answered image, committed before the answer leaves.

Writes go through a group-commit writer thread: concurrent requests queue their rows, the
writer inserts everything pending in one transaction, and every waiter is released after
the single commit (one fsync for many verdicts). A thread with nothing else to do (the
inference worker after a lone request) may instead commit one record itself while the
writer is idle (`try_commit`): no hand-off to the writer and back. Shadow results (a candidate model's answer
on an already recorded inspection) ride the same queue as updates: nobody waits for them,
the writer holds them for the next commit of records (up to `SHADOW_FLUSH_S`, so they cost
no commit of their own while inspections flow), and they are refused when the writer is
behind. Reads run synchronously in the caller's thread; the API calls them off the event
loop.

A record may carry the client's idempotency key (unique). The writer inserts records
ignoring conflicts on that key, so a duplicate never fails the rest of its group: the
record written first stays, and the waiter of a duplicate gets that record back instead.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, cast

from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from sqlalchemy import (
    JSON,
    Connection,
    DateTime,
    Dialect,
    Engine,
    Float,
    Index,
    String,
    Table,
    bindparam,
    create_engine,
    event,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
from sqlalchemy.types import TypeDecorator

from cellinspect.models.card import Verdict
from cellinspect.serving.schema_upgrade import upgrade_schema
from cellinspect.serving.schemas import Timings

if TYPE_CHECKING:
    from cellinspect.models.shadow import ShadowTally

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 5  # a down database fails a batch in seconds, never hangs it
STATEMENT_TIMEOUT_MS = 30_000  # PostgreSQL: a stuck server cannot hold the writer forever
TCP_USER_TIMEOUT_MS = 10_000  # PostgreSQL: unacknowledged data means the link is dead
SQLITE_BUSY_TIMEOUT_MS = 5_000  # another process (a CLI tool) holding the write lock
STARTUP_RETRY_S = 1.0  # between attempts to reach the database at start-up
# Longest a shadow result waits for a commit of records to ride along in before it is
# committed alone (read when a store is created).
SHADOW_FLUSH_S = 1.0
# A commit slower than this (or failing), by the writer or by `try_commit`, sends every
# record through the writer thread for TRY_COMMIT_PAUSE_S: a database in trouble must stall
# the writer, not the inference worker that `try_commit` would hold (a normal one: < 1 ms).
TRY_COMMIT_SLOW_S = 0.1
TRY_COMMIT_PAUSE_S = 30.0


class RecordStoreUnavailable(RuntimeError):
    """The records database cannot take or serve records right now (down, disk error, closed)."""


class IdempotencyKeyReused(ValueError):
    """An idempotency key already recorded for another request (other image or origin)."""


def _as_utc(value: datetime) -> datetime:
    # Naive datetimes (SQLite, query strings without offset) are taken to be UTC.
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


UTCDatetime = Annotated[datetime, AfterValidator(_as_utc)]


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC in and out, on every backend (SQLite stores naive UTC)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        value = _as_utc(value)
        # SQLite compares the stored text; one fixed naive-UTC form keeps ordering right.
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else _as_utc(value)


class Base(DeclarativeBase):
    pass


class InspectionRow(Base):
    """Storage model of one inspection; the API speaks `InspectionRecord`."""

    __tablename__ = "inspections"
    # Operators browse one line's recent history: line + time is the common filter.
    __table_args__ = (Index("ix_inspections_line_created", "line_id", "created"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    created: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)
    line_id: Mapped[str | None] = mapped_column(String(128), index=True)
    station_id: Mapped[str | None] = mapped_column(String(128), index=True)
    cell_id: Mapped[str | None] = mapped_column(String(128), index=True)
    model_name: Mapped[str] = mapped_column(String(128))
    model_version: Mapped[str] = mapped_column(String(64))
    label: Mapped[str] = mapped_column(String(128))
    confidence: Mapped[float] = mapped_column(Float)
    probabilities: Mapped[dict[str, float]] = mapped_column(JSON)
    verdict: Mapped[str] = mapped_column(String(8), index=True)
    timings: Mapped[dict[str, float]] = mapped_column(JSON)
    image_sha256: Mapped[str] = mapped_column(String(64))
    archive_path: Mapped[str | None] = mapped_column(String(512))
    frame_regions: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON)
    # Shadow deployment (a candidate model scored beside production), filled in later.
    shadow_model_version: Mapped[str | None] = mapped_column(String(64))
    shadow_label: Mapped[str | None] = mapped_column(String(128))
    shadow_verdict: Mapped[str | None] = mapped_column(String(8))
    # Added after the first release: nullable, so `upgrade_schema` can add them in place.
    defect_probability: Mapped[float | None] = mapped_column(Float)
    # The client's Idempotency-Key: one record per key, found again by this unique index.
    idempotency_key: Mapped[str | None] = mapped_column(String(128), unique=True, index=True)


_TABLE = cast(Table, InspectionRow.__table__)


class InspectionRecord(BaseModel):
    """One answered inspection, as stored and as the API returns it."""

    model_config = ConfigDict(from_attributes=True, protected_namespaces=())

    id: str = Field(default_factory=lambda: uuid.uuid4().hex, max_length=32)
    created: UTCDatetime = Field(default_factory=lambda: datetime.now(UTC))
    line_id: str | None = Field(None, max_length=128)
    station_id: str | None = Field(None, max_length=128)
    cell_id: str | None = Field(None, max_length=128)
    model_name: str = Field(max_length=128)
    model_version: str = Field(max_length=64)
    label: str = Field(max_length=128)
    confidence: float
    probabilities: dict[str, float]
    verdict: Verdict
    timings: Timings = Field(default_factory=Timings)
    image_sha256: str = Field(max_length=64)
    archive_path: str | None = Field(None, max_length=512)
    frame_regions: list[dict[str, Any]] | None = None
    shadow_model_version: str | None = Field(None, max_length=64)
    shadow_label: str | None = Field(None, max_length=128)
    shadow_verdict: Verdict | None = None
    defect_probability: float | None = None  # what the thresholds acted on (null: older rows)
    idempotency_key: str | None = Field(None, max_length=128)


class InspectionQuery(BaseModel):
    """Filters and page of a records listing; unset filters match everything."""

    line_id: str | None = None
    station_id: str | None = None
    cell_id: str | None = None
    verdict: Verdict | None = None
    since: UTCDatetime | None = None  # inclusive
    until: UTCDatetime | None = None  # exclusive
    limit: int = Field(100, ge=1, le=1000)
    offset: int = Field(0, ge=0)


def _row_values(record: InspectionRecord) -> dict[str, Any]:
    # JSON mode turns enums into plain strings (psycopg would dump an Enum's *name*).
    values = record.model_dump(mode="json")
    values["created"] = record.created
    return values


def _keyed_elsewhere(
    conn: Connection, records: list[InspectionRecord]
) -> dict[str, InspectionRecord]:
    """After an insert that skipped key conflicts: record id -> the record stored under its
    idempotency key, for each record that was skipped (its key belongs to another record)."""
    keys = {r.idempotency_key for r in records if r.idempotency_key is not None}
    if not keys:
        return {}
    table = _TABLE
    stored = conn.execute(
        select(table.c.idempotency_key, table.c.id).where(table.c.idempotency_key.in_(keys))
    ).all()
    owners: dict[str, str] = {key: record_id for key, record_id in stored}
    skipped = {
        r.id: owners[r.idempotency_key]
        for r in records
        if r.idempotency_key is not None and owners[r.idempotency_key] != r.id
    }
    if not skipped:
        return {}
    # Rare (a retry racing its original): read the winners' whole rows for their waiters.
    rows = conn.execute(select(table).where(table.c.id.in_(set(skipped.values()))))
    winners = {row.id: InspectionRecord.model_validate(dict(row._mapping)) for row in rows}
    return {record_id: winners[owner] for record_id, owner in skipped.items()}


@dataclass(slots=True)
class _Pending:
    record: InspectionRecord
    # None once `record` is committed; the record already stored under its idempotency key
    # when another request's came first (and this one was not written).
    future: asyncio.Future[InspectionRecord | None]
    loop: asyncio.AbstractEventLoop


@dataclass(frozen=True, slots=True)
class ShadowResult:
    """A shadow candidate's answer on one recorded inspection."""

    inspection_id: str
    model_version: str
    label: str
    verdict: Verdict


_Queued = _Pending | ShadowResult

# Core UPDATE by id for many shadow results at once (executemany); the bind names differ
# from the column names, which SQLAlchemy reserves for the SET clause.
_SHADOW_UPDATE = (
    update(InspectionRow.__table__)  # type: ignore[arg-type]
    .where(InspectionRow.__table__.c.id == bindparam("b_id"))
    .values(
        shadow_model_version=bindparam("b_version"),
        shadow_label=bindparam("b_label"),
        shadow_verdict=bindparam("b_verdict"),
    )
)


def _shadow_values(result: ShadowResult) -> dict[str, str]:
    return {
        "b_id": result.inspection_id,
        "b_version": result.model_version,
        "b_label": result.label,
        "b_verdict": result.verdict.value,
    }


_STOP = object()  # sentinel: the writer drains everything queued before it, then exits


_Outcome = tuple[asyncio.Future[InspectionRecord | None], InspectionRecord | None]


def _gather(batch: list[_Queued], item: object) -> None:
    """Add a queued item to `batch`: a shadow result, or the records of one loop turn."""
    if isinstance(item, list):
        batch.extend(item)
    else:
        assert isinstance(item, ShadowResult)
        batch.append(item)


def _settle(outcomes: list[_Outcome], error: BaseException | None) -> None:
    # Runs on the requests' loop; a request may have been cancelled meanwhile.
    for future, stored in outcomes:
        if future.done():
            continue
        if error is None:
            future.set_result(stored)
        else:
            future.set_exception(error)


def _insert_statement(dialect: str) -> Any:
    """INSERT of records that skips a row whose idempotency key is already stored (in the
    table or earlier in the same group), so that one duplicate never fails its group; other
    conflicts (a duplicate id) still raise."""
    builder = postgresql.insert if dialect == "postgresql" else sqlite.insert
    return builder(InspectionRow).on_conflict_do_nothing(
        index_elements=[InspectionRow.idempotency_key]
    )


def _unavailable(exc: BaseException) -> RecordStoreUnavailable:
    # The driver's own message says what is wrong (refused, disk I/O error); SQL text does not.
    cause = exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc
    detail = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    return RecordStoreUnavailable(
        f"inspection records database unavailable ({type(cause).__name__}: {detail})"
    )


class RecordStore:
    """Inspection records in SQLite (default) or PostgreSQL, with group commit."""

    def __init__(
        self,
        url: str,
        *,
        max_group: int = 256,
        commit_wait_ms: float = 0.0,
        on_commit: Callable[[int, float, str], None] | None = None,
        commit_timeout_s: float = 10.0,
        startup_wait_s: float = 0.0,
    ) -> None:
        if max_group < 1 or commit_timeout_s <= 0 or startup_wait_s < 0:
            raise ValueError(
                "max_group must be at least 1, commit_timeout_s positive, startup_wait_s >= 0"
            )
        self.max_group = max_group
        self.commit_timeout_s = commit_timeout_s
        self.commit_wait_s = max(commit_wait_ms, 0.0) / 1000
        self.shadow_flush_s = SHADOW_FLUSH_S
        self.on_commit = on_commit
        self.engine = _create_engine(url)
        self.backend = self.engine.dialect.name
        self._insert = _insert_statement(self.backend)
        # Items: lists of records (one loop turn's, see `add`), shadow results, _STOP.
        self._queue: queue.SimpleQueue[list[_Pending] | ShadowResult | object] = queue.SimpleQueue()
        self._lock = threading.Lock()  # orders "closed" against enqueueing
        # Held by whoever writes records: the writer thread, or a caller of `try_commit`.
        self._commit_lock = threading.Lock()
        self._try_commit_from = 0.0  # time.monotonic() from which try_commit may commit
        # Records added in the current turn of each event loop, not yet queued (see `add`).
        self._outbox: dict[asyncio.AbstractEventLoop, list[_Pending]] = {}
        self._closed = False
        self._writer: threading.Thread | None = None
        self._create_schema(startup_wait_s)

    def _create_schema(self, wait_s: float) -> None:
        # A database that starts alongside the service (compose, a rebooted line PC) gets
        # `wait_s` to come up; after that the service refuses to start, saying why.
        deadline = time.monotonic() + wait_s
        while True:
            try:
                Base.metadata.create_all(self.engine)
                upgrade_schema(self.engine, _TABLE)
                return
            except SQLAlchemyError as exc:
                error = _unavailable(exc)
                if time.monotonic() + STARTUP_RETRY_S > deadline:
                    self.engine.dispose()
                    raise error from exc
                logger.warning("records: %s; retrying for up to %.0f s", error, wait_s)
                time.sleep(STARTUP_RETRY_S)

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the writer thread (idempotent; `add` starts it on first use too)."""
        self.start_sync()

    def start_sync(self) -> None:
        """`start` for synchronous callers."""
        with self._lock:
            if self._closed:
                raise RecordStoreUnavailable("record store is closed")
            if self._writer is None:
                self._writer = threading.Thread(
                    target=self._run, name="records-writer", daemon=True
                )
                self._writer.start()

    async def close(self) -> None:
        """Commit everything already accepted, stop the writer, release connections."""
        self._hand_over(asyncio.get_running_loop())  # this turn's records are accepted too
        # The drain may wait on a commit; keep the event loop free meanwhile.
        await asyncio.to_thread(self.close_sync)

    def close_sync(self) -> None:
        """`close` for synchronous callers (tools, tests)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            writer = self._writer
            self._queue.put(_STOP)
        if writer is not None:
            writer.join()
        with self._commit_lock:  # a try_commit in progress ends first
            self.engine.dispose()

    def __enter__(self) -> RecordStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close_sync()

    @property
    def pending(self) -> int:
        """Items queued for the writer: shadow results and loop turns of records (approximate)."""
        return self._queue.qsize()

    # -- writes ----------------------------------------------------------------------------

    async def add(self, record: InspectionRecord) -> InspectionRecord | None:
        """Return once `record` is durably committed; RecordStoreUnavailable if it cannot be.

        None when `record` was written. When its idempotency key was already recorded (by
        another request, or earlier in the same commit group), `record` is not written and
        the record stored under that key comes back instead.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[InspectionRecord | None] = loop.create_future()
        if self._writer is None:
            self.start_sync()
        with self._lock:
            if self._closed:
                raise RecordStoreUnavailable("record store is closed")
            # Handed to the writer at the end of this turn of the event loop, together with
            # the records other requests add in the same turn: an inference batch wakes all
            # its requests in one turn, so its records become one commit group, rather than
            # the writer committing the first alone while the others are still being built.
            waiting = self._outbox.setdefault(loop, [])
            waiting.append(_Pending(record, future, loop))
            if len(waiting) == 1:
                loop.call_soon(self._hand_over, loop)
        try:
            # Last line of defence against a writer stuck on a frozen server: the request
            # gets an answer. The record may still land later (at-least-once on retry).
            # A timeout (or a cancelled request) cancels `future`; the writer skips it then.
            async with asyncio.timeout(self.commit_timeout_s):
                return await future
        except TimeoutError:
            raise RecordStoreUnavailable(
                f"inspection record not committed within {self.commit_timeout_s:g} s"
            ) from None

    def _hand_over(self, loop: asyncio.AbstractEventLoop) -> None:
        """Queue the records `add` gathered in one turn of `loop` for the writer."""
        with self._lock:
            waiting = self._outbox.pop(loop, [])
            if not self._closed:
                if waiting:  # one item: the writer takes the whole turn's records at once
                    self._queue.put(waiting)
                return
        _settle(
            [(p.future, None) for p in waiting], RecordStoreUnavailable("record store is closed")
        )

    def try_commit(self, record: InspectionRecord) -> tuple[bool, InspectionRecord | None]:
        """Commit `record` in the calling thread, now, if the writer is idle.

        For a lone request on a worker thread that is free anyway: it saves the round trip
        to the writer thread and back to the event loop (two thread hand-offs, 0.2-0.4 ms
        each on a small VM). (False, None): nothing done (the writer is busy or the store
        closed), use `add`. (True, stored): committed, with `add`'s meaning of `stored`.
        RecordStoreUnavailable when the database refuses it. Never call it on an event
        loop's thread: a commit waits for the disk (or the network).
        """
        if time.monotonic() < self._try_commit_from:
            return False, None
        if not self._commit_lock.acquire(blocking=False):
            return False, None
        try:
            if self._closed:  # checked under the lock: close() disposes of the engine under it
                return False, None
            started = time.perf_counter()
            try:
                with self.engine.begin() as conn:
                    conn.execute(self._insert, [_row_values(record)])
                    replays = _keyed_elsewhere(conn, [record])
            except Exception as exc:
                self._timed(None)
                error = _unavailable(exc)
                logger.error("records: 1 record not committed: %s", error)
                raise error from exc
            seconds = self._timed(time.perf_counter() - started)
        finally:
            self._commit_lock.release()
        stored = replays.get(record.id)
        if stored is None:
            self._report(1, seconds, "worker")
        return True, stored

    def _timed(self, seconds: float | None) -> float:
        """Note a commit's time (None: it failed); a slow or failed one pauses try_commit."""
        if seconds is None or seconds > TRY_COMMIT_SLOW_S:
            self._try_commit_from = time.monotonic() + TRY_COMMIT_PAUSE_S
        return seconds or 0.0

    def add_shadow_result(self, result: ShadowResult) -> bool:
        """Queue a shadow result for the writer; False (nothing queued) when the store is closed
        or the writer is behind (a full commit group already waiting): never blocks or raises.

        The writer is started by `start` or the first `add`, not here: a shadow result always
        follows its inspection's own record.
        """
        with self._lock:
            if self._closed or self._queue.qsize() >= self.max_group:
                return False
            self._queue.put(result)
        return True

    def add_many_sync(self, records: Iterable[InspectionRecord]) -> None:
        """Insert records in one transaction from the calling thread (tools, tests)."""
        values = [_row_values(r) for r in records]
        if not values:
            return
        try:
            with self.engine.begin() as conn:
                conn.execute(insert(InspectionRow), values)
        except SQLAlchemyError as exc:
            raise _unavailable(exc) from exc

    def _run(self) -> None:
        held: list[ShadowResult] = []  # waiting for a commit of records to ride along in
        flush_at = 0.0
        while True:
            timeout = max(0.0, flush_at - time.monotonic()) if held else None
            batch, stop = self._take(timeout)
            records: list[_Queued] = []
            for item in batch:
                if isinstance(item, ShadowResult):
                    if not held:
                        flush_at = time.monotonic() + self.shadow_flush_s
                    held.append(item)
                else:
                    records.append(item)
            due = bool(held) and (
                stop or len(held) >= self.max_group or time.monotonic() >= flush_at
            )
            if records or due:
                self._commit([*records, *held])
                held = []
            if stop:
                return

    def _take(self, timeout: float | None) -> tuple[list[_Queued], bool]:
        """Block for one item (at most `timeout` s), then gather what else is pending
        (briefly waiting for more)."""
        try:
            first = self._queue.get(timeout=timeout)
        except queue.Empty:
            return [], False
        if first is _STOP:
            return [], True
        batch: list[_Queued] = []
        _gather(batch, first)
        deadline = time.monotonic() + self.commit_wait_s
        while len(batch) < self.max_group:
            remaining = deadline - time.monotonic()
            try:
                item = (
                    self._queue.get(timeout=remaining)
                    if remaining > 0
                    else self._queue.get_nowait()
                )
            except queue.Empty:
                break
            if item is _STOP:
                return batch, True
            _gather(batch, item)
        return batch, False

    def _commit(self, batch: list[_Queued]) -> None:
        with self._commit_lock:
            self._commit_locked(batch)

    def _commit_locked(self, batch: list[_Queued]) -> None:
        started = time.perf_counter()
        records = [item for item in batch if isinstance(item, _Pending)]
        results = [item for item in batch if isinstance(item, ShadowResult)]
        replays: dict[str, InspectionRecord] = {}
        try:
            with self.engine.begin() as conn:
                # Shadow results come after their records' commits: their rows are there.
                if records:
                    conn.execute(self._insert, [_row_values(p.record) for p in records])
                    replays = _keyed_elsewhere(conn, [p.record for p in records])
                if results:
                    conn.execute(_SHADOW_UPDATE, [_shadow_values(r) for r in results])
        # The writer must outlive any failure: every waiter gets an answer, and the next
        # batch retries on a fresh connection (pool_pre_ping, SQLite reopen).
        except Exception as exc:
            if len(batch) > 1 and not isinstance(exc, OperationalError | InterfaceError | OSError):
                # Not the database being down (a bad row?): one record must not sink its batch.
                logger.warning(
                    "records: batch of %d failed (%s); retrying one by one", len(batch), exc
                )
                for item in batch:
                    self._commit_locked([item])
                return
            self._timed(None)
            error = _unavailable(exc)
            logger.error(
                "records: %d record(s) and %d shadow result(s) not committed: %s",
                len(records),
                len(results),
                error,
            )
            self._release(records, error)
            return
        seconds = self._timed(time.perf_counter() - started)
        if written := len(records) - len(replays):
            self._report(written, seconds, "writer")
        self._release(records, None, replays)

    def _report(self, size: int, seconds: float, path: str) -> None:
        """`on_commit(records, seconds, path)`: path "writer" (the writer thread's group
        commit) or "worker" (`try_commit`, by the inference worker of a lone request)."""
        if self.on_commit is None:
            return
        try:
            self.on_commit(size, seconds, path)
        except Exception:  # a metrics bug must not stop records
            logger.exception("records: on_commit callback failed")

    @staticmethod
    def _release(
        batch: list[_Pending],
        error: RecordStoreUnavailable | None,
        replays: dict[str, InspectionRecord] | None = None,
    ) -> None:
        # One wake-up per event loop, not per record: each call_soon_threadsafe is a
        # self-pipe write and a GIL hand-over, which adds up at hundreds of records/s.
        by_loop: dict[asyncio.AbstractEventLoop, list[_Outcome]] = {}
        for pending in batch:
            stored = replays.get(pending.record.id) if replays else None
            by_loop.setdefault(pending.loop, []).append((pending.future, stored))
        for loop, outcomes in by_loop.items():
            # RuntimeError: the request's loop is gone (shutdown); nobody is waiting.
            with suppress(RuntimeError):
                loop.call_soon_threadsafe(_settle, outcomes, error)

    def ping(self) -> bool:
        """True when the database answers a trivial query now (for readiness probes)."""
        try:
            with self.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        except SQLAlchemyError as exc:
            logger.warning("records: readiness ping failed: %s", _unavailable(exc))
            return False
        return True

    # -- reads -----------------------------------------------------------------------------

    @contextmanager
    def _session(self) -> Iterator[Session]:
        try:
            with Session(self.engine) as session:
                yield session
        except DBAPIError as exc:
            raise _unavailable(exc) from exc

    def get(self, record_id: str) -> InspectionRecord | None:
        """The record with this id, or None."""
        with self._session() as session:
            row = session.get(InspectionRow, record_id)
            return None if row is None else InspectionRecord.model_validate(row)

    def get_by_idempotency_key(self, key: str) -> InspectionRecord | None:
        """The record stored under this idempotency key, or None (one unique-index lookup)."""
        statement = select(InspectionRow).where(InspectionRow.idempotency_key == key)
        with self._session() as session:
            row = session.scalars(statement).first()
            return None if row is None else InspectionRecord.model_validate(row)

    def query(self, q: InspectionQuery) -> tuple[list[InspectionRecord], int]:
        """One page of matching records, newest first, and the total number matching."""
        conditions = []
        for column, value in (
            (InspectionRow.line_id, q.line_id),
            (InspectionRow.station_id, q.station_id),
            (InspectionRow.cell_id, q.cell_id),
            (InspectionRow.verdict, q.verdict.value if q.verdict else None),
        ):
            if value is not None:
                conditions.append(column == value)
        if q.since is not None:
            conditions.append(InspectionRow.created >= q.since)
        if q.until is not None:
            conditions.append(InspectionRow.created < q.until)
        page = (
            select(InspectionRow)
            .where(*conditions)
            .order_by(InspectionRow.created.desc(), InspectionRow.id.desc())
            .limit(q.limit)
            .offset(q.offset)
        )
        with self._session() as session:
            total = session.scalar(
                select(func.count()).select_from(InspectionRow).where(*conditions)
            )
            rows = session.scalars(page).all()
            return [InspectionRecord.model_validate(r) for r in rows], int(total or 0)

    def shadow_tallies(
        self, model_name: str, *, since: datetime | None = None, until: datetime | None = None
    ) -> list[ShadowTally]:
        """Inspections of `model_name` with a shadow result, counted per version pair, labels
        and verdicts (aggregated in the database: one row per combination, not per image)."""
        # Imported here: the service never runs this query, and models.shadow loads models.compare.
        from cellinspect.models.shadow import ShadowTally

        row = InspectionRow
        conditions = [row.model_name == model_name, row.shadow_verdict.is_not(None)]
        if since is not None:
            conditions.append(row.created >= since)  # inclusive
        if until is not None:
            conditions.append(row.created < until)  # exclusive
        keys = (
            row.model_version,
            row.shadow_model_version,
            row.label,
            row.shadow_label,
            row.verdict,
            row.shadow_verdict,
        )
        statement = select(*keys, func.count()).where(*conditions).group_by(*keys)
        with self._session() as session:
            rows = session.execute(statement).all()
        return [
            ShadowTally(
                version=r[0],
                candidate_version=r[1],
                label=r[2],
                candidate_label=r[3],
                verdict=Verdict(r[4]),
                candidate_verdict=Verdict(r[5]),
                count=int(r[6]),
            )
            for r in rows
        ]

    def count(self) -> int:
        """Number of stored records."""
        with self._session() as session:
            return int(session.scalar(select(func.count()).select_from(InspectionRow)) or 0)

    def integrity_check(self) -> str:
        """ "ok", or what is wrong with the database (never raises)."""
        try:
            with self.engine.connect() as conn:
                if self.backend == "sqlite":
                    problems = [str(r[0]) for r in conn.execute(text("PRAGMA integrity_check"))]
                    return "ok" if problems == ["ok"] else "; ".join(problems)
                conn.execute(text("SELECT 1"))
                conn.execute(select(func.count()).select_from(InspectionRow))
                return "ok"
        except Exception as exc:
            return str(_unavailable(exc))


def open_existing(url: str) -> RecordStore:
    """A RecordStore on a database that must already exist (tools that only read): a missing
    SQLite file raises FileNotFoundError instead of becoming a new, empty database."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        path = Path(parsed.database or "").expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"no records database at {path}")
    return RecordStore(url)


def _create_engine(url: str) -> Engine:
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        database = parsed.database or ""
        if database in ("", ":memory:") or database.startswith("file:"):
            # Each pooled connection would see its own empty database.
            raise ValueError(f"records need an SQLite file, not {url!r}")
        Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            parsed,
            # The pool hands a connection to one thread at a time; the writer and readers differ.
            connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000},
        )
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    if backend == "postgresql":
        return create_engine(
            parsed,
            pool_pre_ping=True,  # connections die when the server restarts
            pool_timeout=CONNECT_TIMEOUT_S,
            connect_args={
                "connect_timeout": CONNECT_TIMEOUT_S,
                "options": f"-c statement_timeout={STATEMENT_TIMEOUT_MS}",
                # A network partition surfaces as an error in seconds, not minutes of TCP retries.
                "tcp_user_timeout": TCP_USER_TIMEOUT_MS,
                "keepalives": 1,
                "keepalives_idle": 10,
                "keepalives_interval": 5,
                "keepalives_count": 3,
            },
        )
    raise ValueError(f"unsupported records database {backend!r}; valid: sqlite, postgresql")


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")  # readers never block the writer
        cursor.execute("PRAGMA synchronous=FULL")  # an acknowledged verdict survives power loss
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    finally:
        cursor.close()
