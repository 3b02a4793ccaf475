"""What kill_loop.py needs besides the scenarios: the clients and their ledger of
acknowledged verdicts, the checks of the records database against it, and a private
PostgreSQL cluster to restart.
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlencode

from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url

ROUTE = "/v1/inspect"
PG_SCRIPT = Path(__file__).resolve().parents[1] / ".ci" / "postgres.sh"
# What a client sees while the server is dead or dying: never acknowledged, so never owed.
EXPECTED_ERRORS = frozenset({"refused", "reset", "disconnected", "incomplete", "broken_pipe"})


# -- the clients' ledger --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ack:
    """One 2xx answer read in full: what the service promised to have recorded."""

    inspection_id: str
    verdict: str
    label: str
    cell_id: str
    sent: float
    done: float
    replayed: bool = False  # Idempotent-Replayed: recorded by an earlier attempt of this cell


@dataclass(frozen=True, slots=True)
class Outcome:
    """Every request's fate: "2xx", "503 records_unavailable", "refused", "timeout", ..."""

    kind: str
    cell_id: str
    sent: float
    done: float
    retry_after: bool = False
    attempt: int = 1  # 2 and up: a retry of the same cell with the same Idempotency-Key


class Ledger:
    """What the clients sent and got, shared by the client threads (one lock, tiny sections)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.acks: list[Ack] = []
        self.outcomes: list[Outcome] = []
        self.in_flight = 0
        self.sent = 0
        self.examples: dict[str, str] = {}  # the first answer of each non-2xx kind, for the report

    def begin(self) -> float:
        with self._lock:
            self.in_flight += 1
            self.sent += 1
        return time.monotonic()

    def end(self, outcome: Outcome, ack: Ack | None = None, example: str = "") -> None:
        with self._lock:
            self.in_flight -= 1
            self.outcomes.append(outcome)
            if ack is not None:
                self.acks.append(ack)
            if example:
                self.examples.setdefault(outcome.kind, example)

    def acknowledged(self) -> list[Ack]:
        with self._lock:
            return list(self.acks)

    def first_ack_sent_after(self, moment: float) -> Ack | None:
        with self._lock:
            sent_after = [a for a in reversed(self.acks) if a.sent >= moment]
        return min(sent_after, key=lambda a: a.done, default=None)

    def outcomes_between(self, start: float, end: float) -> list[Outcome]:
        with self._lock:
            return [o for o in self.outcomes if start <= o.done <= end]


def error_kind(exc: BaseException) -> str:
    # RemoteDisconnected is a ConnectionResetError: test it first, it says more.
    if isinstance(exc, http.client.RemoteDisconnected):
        return "disconnected"
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, ConnectionResetError):
        return "reset"
    if isinstance(exc, BrokenPipeError):
        return "broken_pipe"
    if isinstance(exc, http.client.IncompleteRead):
        return "incomplete"
    if isinstance(exc, TimeoutError):
        return "timeout"
    return type(exc).__name__


@dataclass(frozen=True)
class ClientPlan:
    port: int
    api_key: str
    line_ids: list[str]  # client i posts as line i mod len
    images: list[bytes]
    timeout_s: float  # beyond it a request counts as a hang
    backoff_s: float  # pause after a failure (bounded, so recovery is probed finely)
    max_requests: int
    deadline: float  # time.monotonic() after which every client stops
    # Attempts per cell (0: no limit): a failed request (no answer, or a 5xx) is retried with
    # the same Idempotency-Key, so a cell recorded despite the failure is not recorded twice.
    max_attempts: int = 0


def run_client(index: int, plan: ClientPlan, ledger: Ledger, stop: threading.Event) -> None:
    """Post images until `stop`, the deadline or `max_requests`; log every outcome."""
    headers = {"Content-Type": "image/png", "X-API-Key": plan.api_key}
    conn: http.client.HTTPConnection | None = None
    serial, attempt, key = -1, 0, ""
    for _ in range(plan.max_requests):
        if stop.is_set() or time.monotonic() > plan.deadline:
            break
        if conn is None:
            conn = http.client.HTTPConnection("127.0.0.1", plan.port, timeout=plan.timeout_s)
        if not key or (plan.max_attempts and attempt >= plan.max_attempts):
            # A new cell, with a key unique to it (what a station would send).
            serial, attempt = serial + 1, 0
            key = f"client-{index}:c{index}-{serial}:{uuid.uuid4().hex}"
        attempt += 1
        cell_id = f"c{index}-{serial}"
        query = urlencode(
            {
                "line_id": plan.line_ids[index % len(plan.line_ids)],
                "station_id": f"client-{index}",
                "cell_id": cell_id,
            }
        )
        sent = ledger.begin()
        try:
            conn.request(
                "POST",
                f"{ROUTE}?{query}",
                plan.images[serial % len(plan.images)],  # a retry sends the same bytes
                {**headers, "Idempotency-Key": key},
            )
            reply = conn.getresponse()
            body = reply.read()
        except (OSError, http.client.HTTPException) as exc:
            ledger.end(Outcome(error_kind(exc), cell_id, sent, time.monotonic(), attempt=attempt))
            conn.close()
            conn = None
            stop.wait(plan.backoff_s)
            continue
        done = time.monotonic()
        if 200 <= reply.status < 300:
            key = ""  # answered: the next request is a new cell
            try:
                answer = json.loads(body)
                ack = Ack(
                    answer["inspection_id"],
                    answer["verdict"],
                    answer["label"],
                    cell_id,
                    sent,
                    done,
                    reply.getheader("Idempotent-Replayed") == "true",
                )
            except (ValueError, KeyError, TypeError):
                ledger.end(Outcome("2xx_unreadable", cell_id, sent, done, attempt=attempt))
                continue
            ledger.end(Outcome("2xx", cell_id, sent, done, attempt=attempt), ack)
            continue
        if reply.status < 500:
            key = ""  # the request itself is wrong: sending it again would not help
        try:
            code = json.loads(body).get("code", "?")
        except (ValueError, AttributeError):
            code = "?"
        retry_after = reply.getheader("Retry-After")
        example = f"Retry-After: {retry_after}; {body[:300].decode(errors='replace')}"
        ledger.end(
            Outcome(
                f"{reply.status} {code}", cell_id, sent, done, retry_after is not None, attempt
            ),
            example=example,
        )
        stop.wait(plan.backoff_s)
    if conn is not None:
        conn.close()


# -- checks on the database -----------------------------------------------------------------


@dataclass
class DatabaseCheck:
    """Acknowledged inspections against the rows of this run, and the database's health."""

    acknowledged: int
    records: int  # rows of this run (its line ids)
    lost: int  # acknowledged, no row
    mismatched: int  # row there, other verdict or label
    # Committed, but the client never read a 2xx: killed between commit and answer, or a
    # commit whose outcome the service could not know (connection lost during COMMIT).
    # Racy while clients run (answers still on their way): only the final check's counts.
    unacknowledged_records: int
    duplicate_cells: int  # one request recorded twice
    duplicate_keys: int  # rows beyond the first for one Idempotency-Key (a unique index forbids)
    integrity: str  # "ok" or the problems
    integrity_method: str
    # What the client got instead for those, by outcome kind (final check only).
    unacknowledged_answers: dict[str, int] = field(default_factory=dict)
    lost_ids: list[str] = field(default_factory=list)  # the first few, to look up
    mismatches: list[dict[str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (
            self.lost == 0
            and self.mismatched == 0
            and self.duplicate_cells == 0
            and self.duplicate_keys == 0
            and self.integrity == "ok"
        )


def open_database(url: str) -> Engine:
    if make_url(url).get_backend_name() == "postgresql":
        return create_engine(url, connect_args={"connect_timeout": 5})
    return create_engine(url)


def check_database(
    url: str, run_id: str, acks: list[Ack], answers: dict[str, str] | None = None
) -> DatabaseCheck:
    """Every acknowledged inspection present with the same verdict and label; integrity.

    `answers` (cell id -> outcome kind) explains the rows nobody acknowledged.
    """
    engine = open_database(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                text(
                    "SELECT id, verdict, label, cell_id, idempotency_key FROM inspections"
                    " WHERE line_id LIKE :lines"
                ),
                {"lines": f"{run_id}-%"},
            ).all()
        integrity, method = integrity_check(engine)
    finally:
        engine.dispose()
    stored = {r[0]: (r[1], r[2]) for r in rows}
    lost = [a.inspection_id for a in acks if a.inspection_id not in stored]
    mismatches = [
        {
            "id": a.inspection_id,
            "acknowledged": f"{a.verdict}/{a.label}",
            "stored": "/".join(stored[a.inspection_id]),
        }
        for a in acks
        if a.inspection_id in stored and stored[a.inspection_id] != (a.verdict, a.label)
    ]
    acked_ids = {a.inspection_id for a in acks}
    unacknowledged = [r for r in rows if r[0] not in acked_ids]
    explained = (
        {} if answers is None else dict(Counter(answers.get(r[3], "none") for r in unacknowledged))
    )
    cells = Counter(r[3] for r in rows)
    keys = Counter(r[4] for r in rows if r[4] is not None)
    return DatabaseCheck(
        acknowledged=len(acks),
        records=len(rows),
        lost=len(lost),
        mismatched=len(mismatches),
        unacknowledged_records=len(unacknowledged),
        unacknowledged_answers=explained,
        duplicate_cells=sum(n - 1 for n in cells.values() if n > 1),
        duplicate_keys=sum(n - 1 for n in keys.values() if n > 1),
        integrity=integrity,
        integrity_method=method,
        lost_ids=lost[:10],
        mismatches=mismatches[:10],
    )


def integrity_check(engine: Engine) -> tuple[str, str]:
    """("ok" or the problems, how it was checked)."""
    if engine.dialect.name == "sqlite":
        with engine.connect() as conn:
            problems = [str(r[0]) for r in conn.execute(text("PRAGMA integrity_check"))]
        return ("ok" if problems == ["ok"] else "; ".join(problems)), "PRAGMA integrity_check"
    problems, methods = _pg_consistency(engine)
    amcheck_problems, amcheck_method = _pg_amcheck(engine)
    return ("; ".join(problems + amcheck_problems) or "ok"), " + ".join([*methods, amcheck_method])


def _pg_consistency(engine: Engine) -> tuple[list[str], list[str]]:
    # The same count through the heap and through the primary key's index: a torn index
    # or heap disagrees. SET LOCAL keeps the planner settings inside this transaction.
    problems = []
    # One snapshot for every count: the service keeps inserting meanwhile.
    with (
        engine.connect().execution_options(isolation_level="REPEATABLE READ") as conn,
        conn.begin(),
    ):
        total, distinct = conn.execute(
            text("SELECT count(*), count(DISTINCT id) FROM inspections")
        ).one()
        conn.execute(text("SET LOCAL enable_indexscan = off"))
        conn.execute(text("SET LOCAL enable_indexonlyscan = off"))
        conn.execute(text("SET LOCAL enable_bitmapscan = off"))
        by_heap = conn.execute(text("SELECT count(id) FROM inspections")).scalar_one()
        conn.execute(text("SET LOCAL enable_seqscan = off"))
        conn.execute(text("SET LOCAL enable_indexonlyscan = on"))
        by_index = conn.execute(
            text("SELECT count(id) FROM inspections WHERE id > ''")
        ).scalar_one()
    if total != distinct:
        problems.append(f"{total - distinct} duplicated primary keys")
    if by_heap != by_index:
        problems.append(f"heap counts {by_heap} rows, primary-key index {by_index}")
    return problems, ["count/uniqueness, heap vs index"]


def _pg_amcheck(engine: Engine) -> tuple[list[str], str]:
    try:
        with engine.begin() as conn:
            conn.execute(text("CREATE EXTENSION IF NOT EXISTS amcheck"))
    except Exception as exc:  # not installed, or no right to create it: say so, go on
        return [], f"amcheck unavailable ({type(exc).__name__})"
    problems = []
    with engine.connect() as conn:
        indexes = conn.execute(
            text(
                "SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
                " WHERE i.indrelid = 'inspections'::regclass"
            )
        ).scalars()
        for index in list(indexes):
            try:
                # heapallindexed: every heap tuple must also be found in the index.
                conn.execute(
                    text("SELECT bt_index_check(CAST(:index AS regclass), true)"),
                    {"index": index},
                )
            except Exception as exc:
                problems.append(f"index {index}: {str(exc).splitlines()[0]}")
                conn.rollback()
        heap = conn.execute(
            text("SELECT blkno, msg FROM verify_heapam('inspections') LIMIT 5")
        ).all()
    problems += [f"heap block {blkno}: {msg}" for blkno, msg in heap]
    return problems, "amcheck bt_index_check(heapallindexed) + verify_heapam"


# -- a private PostgreSQL -------------------------------------------------------------------


class PrivatePostgres:
    """A throwaway cluster through .ci/postgres.sh on its own port and data folder, so the
    shared test cluster on 54329 is never restarted under someone else's tests."""

    def __init__(self, port: int) -> None:
        self.data = Path(tempfile.gettempdir()) / f"cellinspect-pg-killloop-{port}"
        self.env = {
            **os.environ,
            "CELLINSPECT_PG_PORT": str(port),
            "CELLINSPECT_PG_DIR": str(self.data),
        }

    def _run(self, *args: str) -> str:
        done = subprocess.run(
            [str(PG_SCRIPT), *args], env=self.env, capture_output=True, text=True, timeout=300
        )
        if done.returncode != 0:
            raise RuntimeError(f"{PG_SCRIPT.name} {' '.join(args)} failed: {done.stderr.strip()}")
        return done.stdout

    def start(self) -> str:
        """Start it (creating it the first time); returns its URL once it accepts connections."""
        out = self._run("start")
        _, sep, url = out.strip().partition("CELLINSPECT_TEST_POSTGRES_URL=")
        if not sep:
            raise RuntimeError(f"{PG_SCRIPT.name} printed no URL: {out!r}")
        return url

    def stop(self, mode: str) -> None:
        self._run("stop", mode)

    def destroy(self) -> None:
        self._run("destroy")
