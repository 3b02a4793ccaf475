"""No acknowledged verdict is lost: kill -9 the service (or restart its PostgreSQL) under load.

Two scenarios, each against `cellinspect serve` on 127.0.0.1 with a freshly published
small model (an untrained mobilenet_v3_small, through bench_serving.publish_model):

kill-server (default)
    `--clients` threads post images to POST /v1/inspect without pause. At a moment drawn
    uniformly from [--kill-min-s, --kill-max-s] after the server is ready, the whole
    server process group gets SIGKILL; after --down-s it is restarted on the same
    database. After every restart, every inspection acknowledged so far (a 2xx answer
    read in full by a client) must be in the database with the verdict and label the
    client got, and the database must pass its integrity check. Repeated --kills times.
restart-postgres (--restart-postgres)
    The server records into a private PostgreSQL cluster (.ci/postgres.sh on --pg-port,
    data under the temporary folder's sibling, destroyed afterwards) that is stopped
    mid-load --pg-restarts times (modes fast and immediate, the latter as a crash: no
    checkpoint, WAL replay at start), kept down --pg-down-s and started again. While it
    is down, requests must get a 503 (with Retry-After), never a 2xx that is not
    recorded, never a hang; once it is back, the same server process must record again
    (recovery time: from PostgreSQL accepting connections to the first 2xx sent after).

Requests carry line_id = this run's id + one of three lines, station_id = the client,
cell_id = a per-cell serial and an Idempotency-Key unique to the cell: the checks read only
this run's rows, and a cell (or a key) recorded twice is a fault too. A request that got no
answer or a 5xx is retried with the same key (--max-attempts per cell, default no limit),
as a station would: a cell that was recorded although its answer was lost gets the recorded
answer back (Idempotent-Replayed), not a second record. An untrained model gives every image the same verdict, so two of
the lines get their own operating point (CELLINSPECT_LINE_OPERATING_POINTS: one always
passes, one always goes to review, the third keeps the card's): the verdicts differ
between concurrent requests, and a record stored with another request's verdict shows.
Connection errors while the server is down are expected (those requests were never
acknowledged); a client timeout (a hang) or a 5xx other than 503 fails the run.
Integrity: SQLite `PRAGMA integrity_check`; PostgreSQL amcheck (bt_index_check with
heapallindexed on every index of the table, verify_heapam) when the extension can be
created, plus index-vs-heap count and uniqueness queries either way.

    python benchmarks/kill_loop.py                                   # SQLite, 20 kills
    python benchmarks/kill_loop.py --postgres                        # same, private PostgreSQL
    python benchmarks/kill_loop.py --database-url postgresql+psycopg://postgres@127.0.0.1:54329/cellinspect_test
    python benchmarks/kill_loop.py --restart-postgres [--pg-restarts 4]

Exit status: 0 when nothing acknowledged is missing and every check passed, 1 when a
check failed (the reasons are printed; the temporary home with the database and
server.log is kept), 2 when the run could not be carried out. Needs the train extra
(torch, to export the model); --postgres/--restart-postgres need PostgreSQL installed
(or root, for .ci/postgres.sh to install it).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from contextlib import suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from cellinspect.datasets.decode import encode_png
from cellinspect.datasets.synth import ELECTRODE_CLASSES, generate_electrode
from cellinspect.home import Home

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_serving import publish_model, start_server, write_load  # noqa: E402
from killkit import (  # noqa: E402
    EXPECTED_ERRORS,
    Ack,
    ClientPlan,
    DatabaseCheck,
    Ledger,
    PrivatePostgres,
    check_database,
    run_client,
)

PG_STOP_MODES = ("fast", "immediate", "alternate")


# -- the run --------------------------------------------------------------------------------


@dataclass
class Report:
    scenario: str
    backend: str
    clients: int
    down_s: float  # pause between a kill and the restart
    requests_sent: int = 0
    acknowledged: int = 0
    retries: int = 0  # requests repeating an earlier attempt's cell and Idempotency-Key
    replayed: int = 0  # acknowledged with Idempotent-Replayed: recorded by an earlier attempt
    kills: int = 0
    restarts: int = 0  # server restarts (kill-server) or PostgreSQL restarts
    outcomes: dict[str, int] = field(default_factory=dict)
    examples: dict[str, str] = field(default_factory=dict)
    verdicts: dict[str, int] = field(default_factory=dict)
    labels: dict[str, int] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)
    checks_after_restart: list[dict[str, Any]] = field(default_factory=list)
    final: dict[str, Any] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0
    home: str = ""


class Run:
    """One server on one database, the clients, and the checks; `close` ends everything."""

    def __init__(
        self, args: argparse.Namespace, home: Path, database_url: str, images: list[bytes]
    ) -> None:
        self.args = args
        self.home = home
        self.images = images
        self.database_url = database_url
        self.port = args.port or free_port()
        self.api_key = secrets.token_urlsafe(24)
        self.run_id = f"killloop-{secrets.token_hex(4)}"
        self.line_ids = [f"{self.run_id}-{verdict}" for verdict in ("pass", "review", "card")]
        self.deadline = time.monotonic() + args.time_limit_s
        self.ledger = Ledger()
        self.stop = threading.Event()
        self.clients: list[threading.Thread] = []
        self.server: subprocess.Popen | None = None

    def start_server(self) -> subprocess.Popen:
        env = {
            "CELLINSPECT_MODE": "production",
            "CELLINSPECT_API_KEYS": f"station:{self.api_key}",
            "CELLINSPECT_DATABASE_URL": self.database_url,
            "CELLINSPECT_LINE_OPERATING_POINTS": json.dumps(
                {
                    self.line_ids[0]: {"review_low": 1.0, "scrap_threshold": 1.0},
                    self.line_ids[1]: {"review_low": 0.0, "scrap_threshold": 1.0},
                }
            ),
        }
        self.server = start_server(
            "cellinspect",
            self.home,
            self.port,
            self.args.threads,
            env=env,
            log=self.home / "server.log",
            new_session=True,
            ready_timeout_s=min(self.args.ready_timeout_s, max(1.0, self.remaining())),
            workers=self.args.workers,
        )
        return self.server

    def kill_server(self) -> int:
        """SIGKILL the server's whole process group; returns the requests in flight then."""
        assert self.server is not None
        in_flight = self.ledger.in_flight
        with suppress(ProcessLookupError):
            os.killpg(self.server.pid, signal.SIGKILL)
        self.server.wait()
        self.server = None
        return in_flight

    def start_clients(self) -> None:
        plan = ClientPlan(
            port=self.port,
            api_key=self.api_key,
            line_ids=self.line_ids,
            images=self.images,
            timeout_s=self.args.request_timeout_s,
            backoff_s=self.args.backoff_s,
            max_requests=self.args.max_requests,
            deadline=self.deadline,
            max_attempts=self.args.max_attempts,
        )
        for i in range(self.args.clients):
            thread = threading.Thread(
                target=run_client, args=(i, plan, self.ledger, self.stop), name=f"client-{i}"
            )
            thread.start()
            self.clients.append(thread)

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def check(self, acks: list[Ack], answers: dict[str, str] | None = None) -> DatabaseCheck:
        return check_database(self.database_url, self.run_id, acks, answers)

    def close(self) -> None:
        """Stop the clients, then the server gracefully (SIGTERM drains its writer)."""
        self.stop.set()
        for thread in self.clients:
            thread.join(timeout=self.args.request_timeout_s + 5)
        if self.server is not None:
            with suppress(ProcessLookupError):
                os.killpg(self.server.pid, signal.SIGTERM)
            try:
                self.server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill_server()
            self.server = None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def make_images(home: Path, image_size: int, seed: int) -> list[bytes]:
    """bench_serving's scratch tile plus one tile per electrode class (varied answers)."""
    image, _ = write_load(home, image_size)
    rng = np.random.default_rng(seed)
    tiles = [generate_electrode(c, rng, size=image_size)[0] for c in ELECTRODE_CLASSES]
    return [image.read_bytes(), *(encode_png(t) for t in tiles)]


def kill_server_loop(run: Run, report: Report, rng: random.Random) -> None:
    """Kill -9 the server `--kills` times under load; check the database after each restart."""
    args = run.args
    run.start_server()
    run.start_clients()
    for k in range(1, args.kills + 1):
        if run.remaining() < args.kill_max_s:
            report.failures.append(f"time limit reached after {k - 1} of {args.kills} kills")
            break
        up_for = rng.uniform(args.kill_min_s, args.kill_max_s)
        time.sleep(up_for)
        in_flight = run.kill_server()
        killed = time.monotonic()
        acked = run.ledger.acknowledged()  # everything the dead server answered
        report.kills += 1
        time.sleep(args.down_s)
        run.start_server()
        report.restarts += 1
        report.events.append(
            {
                "kill": k,
                "up_s": round(up_for, 3),
                "in_flight": in_flight,
                "acknowledged": len(acked),
                "kill_to_ready_s": round(time.monotonic() - killed, 3),  # --down-s included
            }
        )
        check = run.check(acked)
        report.checks_after_restart.append({"kill": k, **asdict(check)})
        print(
            f"kill {k:2d}/{args.kills}: up {up_for:4.2f} s, {in_flight} in flight; after restart "
            f"{check.acknowledged} acknowledged, {check.lost} lost, integrity {check.integrity}",
            flush=True,
        )
    time.sleep(min(args.settle_s, max(0.0, run.remaining())))


def restart_postgres_loop(
    run: Run, cluster: PrivatePostgres, report: Report, rng: random.Random
) -> None:
    """Stop and start PostgreSQL `--pg-restarts` times under load; the server stays up."""
    args = run.args
    run.start_server()
    run.start_clients()
    for r in range(1, args.pg_restarts + 1):
        budget = args.kill_max_s + args.pg_down_s + args.recovery_limit_s + 10
        if run.remaining() < budget:
            report.failures.append(
                f"time limit reached after {r - 1} of {args.pg_restarts} restarts"
            )
            break
        time.sleep(rng.uniform(args.kill_min_s, args.kill_max_s))
        mode = args.pg_stop_mode
        if mode == "alternate":
            mode = ("fast", "immediate")[(r - 1) % 2]
        stopping = time.monotonic()
        cluster.stop(mode)
        stopped = time.monotonic()
        time.sleep(args.pg_down_s)
        starting = time.monotonic()
        cluster.start()
        window = Downtime(stopping, stopped, starting, up=time.monotonic())
        first = wait_for_ack(run.ledger, window.up, args.recovery_limit_s)
        report.restarts += 1
        event = downtime_event(r, mode, window, run.ledger, first)
        if run.server is None or run.server.poll() is not None:
            report.failures.append(
                f"restart {r}: the server process died while PostgreSQL was down"
            )
            report.events.append(event)
            return
        check = run.check(run.ledger.acknowledged())
        report.events.append(event)
        report.checks_after_restart.append({"restart": r, **asdict(check)})
        print(
            f"restart {r}/{args.pg_restarts} ({mode}): down {event['down_s']:.1f} s, "
            f"{event['answers_while_down']}, recovery {event['recovery_s']} s; "
            f"{check.lost} lost of {check.acknowledged}, integrity {check.integrity}",
            flush=True,
        )
        if first is None:
            report.failures.append(
                f"restart {r}: no inspection recorded within {args.recovery_limit_s:g} s"
                " of PostgreSQL accepting connections again"
            )
    time.sleep(min(args.settle_s, max(0.0, run.remaining())))


def wait_for_ack(ledger: Ledger, after: float, limit_s: float) -> Ack | None:
    """The first acknowledged request sent at or after `after`, waiting up to `limit_s`."""
    until = after + limit_s
    while time.monotonic() < until:
        if (ack := ledger.first_ack_sent_after(after)) is not None:
            return ack
        time.sleep(0.02)
    return None


@dataclass(frozen=True)
class Downtime:
    """One PostgreSQL restart, in time.monotonic() seconds."""

    stopping: float  # pg_ctl stop called
    stopped: float  # it returned: the server is gone
    starting: float  # pg_ctl start called
    up: float  # it returned: connections accepted


def downtime_event(
    index: int, mode: str, window: Downtime, ledger: Ledger, first: Ack | None
) -> dict[str, Any]:
    """What clients got while PostgreSQL was down, and how soon records came back."""
    # Answers are judged only while the server was surely gone: during a fast shutdown
    # commits still succeed, and those 2xx are legitimately recorded.
    down = ledger.outcomes_between(window.stopped, window.starting)
    unavailable = [o for o in down if o.kind.startswith("503")]
    around = ledger.outcomes_between(window.stopping, window.up)
    return {
        "restart": index,
        "stop_mode": mode,
        "stop_s": round(window.stopped - window.stopping, 3),
        "down_s": round(window.starting - window.stopped, 3),
        "start_s": round(window.up - window.starting, 3),
        "answers_while_down": dict(Counter(o.kind for o in down)),
        "answers_while_stopping_or_starting": dict(
            Counter(o.kind for o in around if not window.stopped <= o.done <= window.starting)
        ),
        "503s": len(unavailable),
        "503s_without_retry_after": sum(1 for o in unavailable if not o.retry_after),
        "max_latency_s": round(max((o.done - o.sent for o in around), default=0), 3),
        "recovery_s": None if first is None else round(first.done - window.up, 3),
    }


def judge(report: Report, args: argparse.Namespace) -> None:
    """Fill report.failures from the figures (the promise's conditions)."""
    final = report.final
    if final.get("lost"):
        report.failures.append(
            f"{final['lost']} acknowledged inspections missing from the database"
        )
    if final.get("mismatched"):
        report.failures.append(f"{final['mismatched']} stored with another verdict or label")
    if final.get("duplicate_cells"):
        report.failures.append(f"{final['duplicate_cells']} requests recorded twice")
    if final.get("duplicate_keys"):
        report.failures.append(f"{final['duplicate_keys']} records share an Idempotency-Key")
    if final.get("integrity") != "ok":
        report.failures.append(f"integrity check: {final.get('integrity')}")
    bad_after = [c for c in report.checks_after_restart if c["lost"] or c["integrity"] != "ok"]
    if bad_after:
        report.failures.append(f"{len(bad_after)} checks after a restart failed")
    for kind, n in report.outcomes.items():
        if kind == "timeout":
            report.failures.append(f"{n} requests hung past {args.request_timeout_s:g} s")
        elif kind == "2xx_unreadable":
            report.failures.append(f"{n} 2xx answers without a readable inspection id")
        elif kind[:1] == "5" and not kind.startswith("503"):
            report.failures.append(f"{n} answers {kind}")
    for event in report.events:
        if event.get("503s_without_retry_after"):
            report.failures.append(f"restart {event['restart']}: 503s without Retry-After")
    if report.acknowledged == 0:
        report.failures.append("no request was acknowledged: nothing was tested")


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1])) or "-"


def print_summary(report: Report) -> None:
    final = report.final
    restarts = "PostgreSQL restarts" if report.scenario == "restart-postgres" else "server restarts"
    rows: list[tuple[str, object]] = [
        ("scenario", f"{report.scenario} ({report.backend}), {report.clients} clients"),
        ("requests sent", report.requests_sent),
        ("acknowledged (2xx read in full)", report.acknowledged),
        ("retries (same cell, same Idempotency-Key)", report.retries),
        ("acknowledged as a replay (Idempotent-Replayed)", report.replayed),
        ("server kills (SIGKILL)", report.kills),
        (restarts, report.restarts),
        ("verdicts acknowledged", _counts(report.verdicts)),
        ("labels acknowledged", _counts(report.labels)),
    ]
    if final:  # absent when the run broke off before its final check
        unacknowledged = _counts(final["unacknowledged_answers"])
        rows += [
            ("records of this run in the database", final["records"]),
            ("lost (acknowledged, not recorded)", final["lost"]),
            ("stored with another verdict/label", final["mismatched"]),
            (
                "recorded, never acknowledged (what the client got)",
                f"{final['unacknowledged_records']} ({unacknowledged})",
            ),
            ("requests recorded twice", final["duplicate_cells"]),
            ("records sharing an Idempotency-Key", final["duplicate_keys"]),
            ("integrity", f"{final['integrity']} ({final['integrity_method']})"),
        ]
    for kind, n in sorted(report.outcomes.items(), key=lambda kv: -kv[1]):
        note = " (expected: server down)" if kind in EXPECTED_ERRORS else ""
        rows.append((f"outcome {kind}{note}", n))
    print("\n| figure | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    if report.scenario == "restart-postgres" and report.events:
        print(
            "\n| restart | stop mode | stop s | down s | start s | answers while down |"
            " without Retry-After | answers while stopping/starting | max latency s |"
            " recovery s |\n|---:|---|---:|---:|---:|---|---:|---|---:|---:|"
        )
        for e in report.events:
            print(
                f"| {e['restart']} | {e['stop_mode']} | {e['stop_s']} | {e['down_s']} | "
                f"{e['start_s']} | {_counts(e['answers_while_down'])} | "
                f"{e['503s_without_retry_after']} | "
                f"{_counts(e['answers_while_stopping_or_starting'])} | "
                f"{e['max_latency_s']} | {e['recovery_s']} |"
            )
    ready = [e["kill_to_ready_s"] for e in report.events if "kill_to_ready_s" in e]
    if ready:
        print(
            f"\nkill to ready again: median {statistics.median(ready):.2f} s, max {max(ready):.2f} s"
            f" (--down-s {report.down_s:g} s included)"
        )
    for kind, example in report.examples.items():
        print(f"\nfirst {kind} answer: {example}")
    print(f"\n{report.seconds:.0f} s; " + ("PASS" if not report.failures else "FAIL"))
    for failure in report.failures:
        print(f"  FAIL: {failure}")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    scenario = parser.add_argument_group("scenario")
    scenario.add_argument("--kills", type=int, default=20, help="server kills (kill-server)")
    scenario.add_argument(
        "--kill-min-s",
        type=float,
        default=0.5,
        help="earliest kill (or PostgreSQL stop) after ready",
    )
    scenario.add_argument(
        "--kill-max-s", type=float, default=3.0, help="latest kill (or PostgreSQL stop) after ready"
    )
    scenario.add_argument(
        "--down-s", type=float, default=0.2, help="pause between a kill and the restart"
    )
    scenario.add_argument("--settle-s", type=float, default=1.0, help="load after the last restart")
    scenario.add_argument(
        "--restart-postgres",
        action="store_true",
        help="restart PostgreSQL instead of killing the server",
    )
    scenario.add_argument("--pg-restarts", type=int, default=4)
    scenario.add_argument(
        "--pg-down-s", type=float, default=5.0, help="how long PostgreSQL stays down"
    )
    scenario.add_argument(
        "--pg-stop-mode",
        choices=PG_STOP_MODES,
        default="alternate",
        help="pg_ctl stop mode; alternate: fast, immediate, fast, ...",
    )
    scenario.add_argument(
        "--recovery-limit-s",
        type=float,
        default=30.0,
        help="longest wait for the first 2xx after PostgreSQL is back",
    )
    db = parser.add_argument_group("database")
    db.add_argument(
        "--database-url", help="records database (default: SQLite in the temporary home)"
    )
    db.add_argument(
        "--postgres",
        action="store_true",
        help="records in a private PostgreSQL cluster (.ci/postgres.sh)",
    )
    db.add_argument("--pg-port", type=int, default=54339, help="port of the private cluster")
    load = parser.add_argument_group("load and server")
    load.add_argument("--clients", type=int, default=8, help="concurrent client threads")
    load.add_argument(
        "--request-timeout-s",
        type=float,
        default=15.0,
        help="a request taking longer is a hang (fails the run)",
    )
    load.add_argument(
        "--backoff-s", type=float, default=0.05, help="client pause after a failed request"
    )
    load.add_argument("--max-requests", type=int, default=1_000_000, help="per client")
    load.add_argument(
        "--max-attempts",
        type=int,
        default=0,
        help="attempts per cell, retries sending the same Idempotency-Key (0: no limit)",
    )
    load.add_argument("--size", type=int, default=64, help="model input side")
    load.add_argument("--image-size", type=int, default=128, help="posted image side (gray PNG)")
    load.add_argument("--threads", type=int, default=1, help="ORT intra-op threads of the server")
    load.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    load.add_argument("--port", type=int, default=0, help="server port (0: a free one)")
    load.add_argument(
        "--ready-timeout-s", type=float, default=60.0, help="longest wait for /readyz per start"
    )
    out = parser.add_argument_group("run")
    out.add_argument(
        "--time-limit-s", type=float, default=900.0, help="the whole run stops by then"
    )
    out.add_argument("--seed", type=int, default=0, help="kill moments and images")
    out.add_argument("--json", type=Path, help="write the report here")
    out.add_argument(
        "--keep",
        action="store_true",
        help="keep the temporary home and the private cluster's data (kept anyway on failure)",
    )
    return parser


def validate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.restart_postgres and args.database_url:
        parser.error("--restart-postgres runs its own PostgreSQL cluster; drop --database-url")
    if args.postgres and args.database_url:
        parser.error("--postgres and --database-url both name the database; pick one")
    if not 0 < args.kill_min_s <= args.kill_max_s:
        parser.error("need 0 < --kill-min-s <= --kill-max-s")
    if min(args.kills, args.pg_restarts, args.clients, args.max_requests, args.workers) < 1:
        parser.error("--kills, --pg-restarts, --clients, --max-requests and --workers must be >= 1")
    if args.max_attempts < 0:
        parser.error("--max-attempts must be >= 0 (0: no limit)")
    if args.database_url:
        backend = make_url(args.database_url).get_backend_name()
        if backend not in ("sqlite", "postgresql"):
            parser.error(
                f"unsupported --database-url backend {backend!r}; valid: sqlite, postgresql"
            )


def carry_out(
    args: argparse.Namespace, home: Path, cluster: PrivatePostgres | None, report: Report
) -> int:
    """The scenario and the final check; 0, or 2 when the run itself could not be done."""
    run: Run | None = None
    try:
        url = cluster.start() if cluster else args.database_url or Home.resolve(home).database_url
        report.backend = make_url(url).get_backend_name()
        print(f"publishing the model in {home} ...", flush=True)
        publish_model(home, args.size)
        run = Run(args, home, url, make_images(home, args.image_size, args.seed))
        rng = random.Random(args.seed)
        if cluster is not None and args.restart_postgres:
            restart_postgres_loop(run, cluster, report, rng)
        else:
            kill_server_loop(run, report, rng)
        run.close()  # clients first: every answer read before the final look
        answers = {o.cell_id: o.kind for o in run.ledger.outcomes}
        report.final = asdict(run.check(run.ledger.acknowledged(), answers))
    except (RuntimeError, OSError, subprocess.SubprocessError, SQLAlchemyError) as exc:
        report.failures.append(f"could not carry out the run: {exc}")
        log = home / "server.log"
        if log.is_file():
            print("server.log (last lines):\n" + "\n".join(log.read_text().splitlines()[-30:]))
        return 2
    finally:
        if run is not None:
            run.close()
            ledger = run.ledger
            report.requests_sent = ledger.sent
            report.acknowledged = len(ledger.acks)
            report.retries = sum(1 for o in ledger.outcomes if o.attempt > 1)
            report.replayed = sum(1 for a in ledger.acks if a.replayed)
            report.outcomes = dict(Counter(o.kind for o in ledger.outcomes))
            report.examples = dict(ledger.examples)
            report.verdicts = dict(Counter(a.verdict for a in ledger.acks))
            report.labels = dict(Counter(a.label for a in ledger.acks))
    judge(report, args)
    return 1 if report.failures else 0


def main(argv: list[str] | None = None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    validate(parser, args)
    started = time.monotonic()
    home = Path(tempfile.mkdtemp(prefix="cellinspect-killloop-"))
    cluster = PrivatePostgres(args.pg_port) if args.postgres or args.restart_postgres else None
    scenario = "restart-postgres" if args.restart_postgres else "kill-server"
    report = Report(
        scenario=scenario, backend="", clients=args.clients, down_s=args.down_s, home=str(home)
    )
    status = 2
    try:
        status = carry_out(args, home, cluster, report)
    finally:
        report.seconds = round(time.monotonic() - started, 1)
        print_summary(report)
        if args.json:
            args.json.write_text(json.dumps(asdict(report), indent=2) + "\n")
        keep = args.keep or status != 0  # a failed run's evidence stays for a post-mortem
        if cluster is not None:
            with suppress(RuntimeError, subprocess.SubprocessError):
                if keep:
                    cluster.stop("fast")
                    print(f"PostgreSQL data kept (server stopped): {cluster.data}")
                else:
                    cluster.destroy()
        if keep:
            print(f"temporary home kept: {home}")
        else:
            shutil.rmtree(home, ignore_errors=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
