"""In-place upgrade of a records table made by an earlier version: add what it lacks.

Additive only: columns added since the first release are nullable and indexes are built
beside the data, so it is safe on a live database, runs at each start-up, and several
workers starting at once on PostgreSQL upgrade it once (an advisory lock) and all start.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from sqlalchemy import Column, Connection, Engine, Index, Table, inspect, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.schema import CreateIndex

# The records logger: upgrade messages read as before this module was split out of records.py.
logger = logging.getLogger("cellinspect.serving.records")


def upgrade_schema(engine: Engine, table: Table) -> None:
    """Bring `table`, as an earlier version made it, up to date in place: add the
    columns and indexes it lacks. Additive only (every column added since the first release
    is nullable: old rows read NULL), so it is safe on a live database and runs at each start."""
    try:
        _add_missing(engine, table)
    except SQLAlchemyError:
        # A second worker starting beside this one may have added them first: fine if done.
        if any(_missing(engine, table)):
            raise


def _missing(
    engine: Engine, table: Table, invalid: set[str] | None = None
) -> tuple[list[Column[Any]], list[Index]]:
    """The table's columns and indexes that the database lacks (or has only half built:
    `invalid`, looked up when not given)."""
    found = inspect(engine)
    columns = {c["name"] for c in found.get_columns(table.name)}
    if invalid is None:
        invalid = _invalid_indexes(engine, table)
    indexes = {i["name"] for i in found.get_indexes(table.name)} - invalid
    return (
        [c for c in table.columns if c.name not in columns],
        [i for i in table.indexes if i.name not in indexes],
    )


def _invalid_indexes(engine: Engine, table: Table) -> set[str]:
    """PostgreSQL: the table's indexes left INVALID by an interrupted concurrent build."""
    if engine.dialect.name != "postgresql":
        return set()
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
                "WHERE i.indrelid = to_regclass(:table) AND NOT i.indisvalid"
            ),
            {"table": table.name},
        )
        return {row[0] for row in rows}


# Held by the one process upgrading a PostgreSQL table; the others wait for it (any bigint).
_UPGRADE_LOCK = 0x63656C6C  # "cell"
_UPGRADE_LOCK_POLL_S = 0.05


def _add_missing(engine: Engine, table: Table) -> None:
    if engine.dialect.name == "postgresql":
        # AUTOCOMMIT: CREATE INDEX CONCURRENTLY cannot run inside a transaction.
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            try:
                conn.execute(text("SET statement_timeout = 0"))  # a large table takes minutes
                # One upgrader at a time: a second worker must not take the first one's
                # index, INVALID while it is being built, for an interrupted build.
                # Polled, not waited for inside pg_advisory_lock: a waiting statement holds a
                # snapshot, and the holder's CREATE INDEX CONCURRENTLY waits for every older
                # snapshot to end: a deadlock, which PostgreSQL breaks by failing a worker.
                take = text("SELECT pg_try_advisory_lock(:key)")
                while not conn.execute(take, {"key": _UPGRADE_LOCK}).scalar():
                    time.sleep(_UPGRADE_LOCK_POLL_S)
                invalid = _invalid_indexes(engine, table)
                columns, indexes = _missing(engine, table, invalid)
                _upgrade(conn, table, columns, indexes, rebuild=invalid)
            finally:
                # Closed, not pooled: ending the session drops the lock and the timeout.
                conn.invalidate()
        return
    columns, indexes = _missing(engine, table)
    if columns or indexes:
        with engine.begin() as conn:
            _upgrade(conn, table, columns, indexes, rebuild=None)


def _upgrade(
    conn: Connection,
    table: Table,
    columns: list[Column[Any]],
    indexes: list[Index],
    *,
    rebuild: set[str] | None,
) -> None:
    """Add `columns` and build `indexes`; `rebuild` (PostgreSQL only, else None) names the
    half-built ones to drop first, and its presence means: build concurrently."""
    required = [c.name for c in columns if not c.nullable]
    if required:
        raise RuntimeError(
            f"the records table lacks required column(s) {', '.join(required)}; "
            "it cannot be upgraded in place"
        )
    quote = conn.dialect.identifier_preparer.quote
    for column in columns:
        logger.warning("records: upgrading table %s: adding column %s", table.name, column.name)
        kind = column.type.compile(dialect=conn.dialect)
        conn.execute(
            text(f"ALTER TABLE {quote(table.name)} ADD COLUMN {quote(column.name)} {kind}")
        )
    for index in indexes:
        logger.warning("records: upgrading table %s: adding index %s", table.name, index.name)
        create = str(CreateIndex(index, if_not_exists=True).compile(dialect=conn.dialect))
        if rebuild is not None:
            # PostgreSQL: other writers (another worker, another station's service) go on
            # while a large table is indexed; a plain CREATE INDEX would block them all.
            if index.name in rebuild:  # an interrupted build left it INVALID: start again
                conn.execute(text(f"DROP INDEX CONCURRENTLY IF EXISTS {quote(str(index.name))}"))
            create = create.replace(" INDEX ", " INDEX CONCURRENTLY ", 1)
        conn.execute(text(create))
