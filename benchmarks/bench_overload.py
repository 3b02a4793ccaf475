"""Overload and memory: the service under more load than it can take, and over 50,000 requests.

    python benchmarks/bench_overload.py [--factor 2] [--seconds 30] [--requests 50000]
    python benchmarks/bench_overload.py --soak-minutes 30 [--soak-load 0.7]
    (either with --workers N: N server processes, RSS, descriptors and threads summed)

1. Capacity: `wrk` with 16 clients for 8 s (the same measurement as bench_serving.py).
2. Overload: an open-loop client offers `factor` x capacity for `seconds` — requests go
   out on schedule whether or not earlier ones were answered (a closed-loop tool like wrk
   would slow down with the server and never overload it). Reported: the share of 503s,
   whether each carried Retry-After, and the latency of the *accepted* requests, which
   the per-request deadline (`CELLINSPECT_DEADLINE_MS`, default 2,000 ms) must bound.
3. Recovery: 1-second wrk runs right after the overload until one reaches 90% of
   capacity (how many seconds that took), then capacity again over 8 s.
4. Memory (measured before the overload): resident set size of the server after warm-up
   and after `--requests` more at 16 clients; during the overload, the peak RSS sampled
   every 0.25 s.

With `--soak-minutes M`, steps 2-4 are replaced by a soak: the open-loop client offers
`--soak-load` x capacity for M minutes, one-minute windows, and each window reports the
accepted latency (p50/p99), 503s, and the server's RSS, open file descriptors and threads,
so growth or drift shows as a trend between the first and the last minutes.

The open-loop client is asyncio on raw keep-alive connections (uvloop when installed); it
shares the 2 CPUs with the server, which the report states. Needs the train extra (to
export the untrained benchmark model) and `wrk`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_serving import publish_model, start_server, write_load, wrk  # noqa: E402

ROUTE = "/v1/inspect"


@dataclass
class OpenLoopResult:
    offered: int = 0
    latencies_ok: list[float] = field(default_factory=list)  # seconds, status 200
    latencies_503: list[float] = field(default_factory=list)
    retry_after_missing: int = 0
    other_status: dict[int, int] = field(default_factory=dict)
    client_errors: int = 0  # connection failures, timeouts
    stale_connections: int = 0  # of those: a kept-alive connection the server had closed
    no_connection: int = 0  # scheduled but every connection busy and the cap reached
    lag_max_s: float = 0.0  # how far behind schedule the client fell


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    await reader.readexactly(int(headers.get("content-length", "0")))
    return status, headers


async def open_loop(
    port: int, body: bytes, rate: float, seconds: float, max_connections: int = 1024
) -> OpenLoopResult:
    """Send `rate` requests/s for `seconds` on schedule; each needs an idle connection."""
    request = (
        f"POST {ROUTE} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    result = OpenLoopResult()
    idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    opened = 0
    tasks: set[asyncio.Task[None]] = set()

    async def one(conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None) -> None:
        nonlocal opened
        start = time.perf_counter()
        reused = conn is not None
        try:
            if conn is None:
                conn = await asyncio.open_connection("127.0.0.1", port)
            reader, writer = conn
            writer.write(request)
            status, headers = await asyncio.wait_for(_read_response(reader), 30)
        except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError) as exc:
            result.client_errors += 1
            # uvicorn closes a connection idle for 5 s (timeout_keep_alive); reusing it
            # fails before a byte of answer: the request never reached the service.
            closed_early = isinstance(exc, ConnectionResetError) or (
                isinstance(exc, asyncio.IncompleteReadError) and not exc.partial
            )
            result.stale_connections += reused and closed_early
            opened -= 1
            return
        elapsed = time.perf_counter() - start
        if status == 200:
            result.latencies_ok.append(elapsed)
        elif status == 503:
            result.latencies_503.append(elapsed)
            result.retry_after_missing += "retry-after" not in headers
        else:
            result.other_status[status] = result.other_status.get(status, 0) + 1
        idle.append(conn)

    loop = asyncio.get_running_loop()
    t0 = loop.time()
    total = int(rate * seconds)
    for i in range(total):
        due = t0 + i / rate
        delay = due - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        else:
            result.lag_max_s = max(result.lag_max_s, -delay)
        result.offered += 1
        if idle:
            conn = idle.pop()
        elif opened < max_connections:
            opened += 1
            conn = None
        else:
            result.no_connection += 1
            continue
        task = loop.create_task(one(conn))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.wait(tasks, timeout=60)
    for _, writer in idle:
        writer.close()
    return result


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants (uvicorn's worker processes with `--workers N`)."""
    pids, i = [pid], 0
    while i < len(pids):
        for task in Path(f"/proc/{pids[i]}/task").glob("*/children"):
            pids += [int(child) for child in task.read_text().split()]
        i += 1
    return pids


def _status_field(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} for {pid}")


def rss_mib(pid: int) -> float:
    """Resident set size of `pid` and its descendants, summed."""
    return sum(_status_field(p, "VmRSS:") for p in process_tree(pid)) / 1024


def process_counts(pid: int) -> tuple[int, int]:
    """(open file descriptors, threads) of `pid` and its descendants."""
    tree = process_tree(pid)
    return (
        sum(len(os.listdir(f"/proc/{p}/fd")) for p in tree),
        sum(_status_field(p, "Threads:") for p in tree),
    )


class PeakRss:
    """Samples a process's RSS every `interval_s` in a thread while in a `with` block."""

    def __init__(self, pid: int, interval_s: float = 0.25) -> None:
        self.pid, self.interval_s, self.peak = pid, interval_s, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, rss_mib(self.pid))

    def __enter__(self) -> PeakRss:
        self.peak = rss_mib(self.pid)
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def seconds_to_recover(url: str, script: Path, image: Path, capacity: float) -> int | None:
    """1-second wrk runs until one reaches 90% of `capacity`: how many it took (None: 10
    were not enough)."""
    for second in range(1, 11):
        if wrk(url, 16, 1, script, image)["rps"] >= 0.9 * capacity:
            return second
    return None


def soak(port: int, pid: int, body: bytes, rate: float, minutes: int) -> list[dict[str, float]]:
    """`rate` requests/s for `minutes` one-minute windows; per window the accepted latency,
    503s, client errors and the server's RSS, descriptors and threads at its end."""
    windows = []
    for minute in range(1, minutes + 1):
        run = asyncio.run(open_loop(port, body, rate, 60.0))
        fds, threads = process_counts(pid)
        windows.append(
            {
                "minute": minute,
                "ok": len(run.latencies_ok),
                "p50_ms": pct(run.latencies_ok, 50),
                "p99_ms": pct(run.latencies_ok, 99),
                "503": len(run.latencies_503),
                "errors": run.client_errors + run.no_connection + sum(run.other_status.values()),
                "stale": run.stale_connections,
                "rss_mib": rss_mib(pid),
                "fds": fds,
                "threads": threads,
            }
        )
        w = windows[-1]
        print(
            f"| {minute} | {w['ok']} | {w['p50_ms']:.1f} | {w['p99_ms']:.1f} | {w['503']} | "
            f"{w['errors']} ({w['stale']}) | {w['rss_mib']:.0f} | {fds} | {threads} |",
            flush=True,
        )
    return windows


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) * 1000 if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--factor", type=float, default=2.0, help="offered load / capacity")
    parser.add_argument("--seconds", type=float, default=30.0, help="overload duration")
    parser.add_argument("--requests", type=int, default=50_000, help="for the memory check")
    parser.add_argument("--port", type=int, default=8790)
    parser.add_argument(
        "--soak-minutes", type=int, default=0, help="soak instead of overload (minutes)"
    )
    parser.add_argument("--soak-load", type=float, default=0.7, help="soak load / capacity")
    parser.add_argument(
        "--workers", type=int, default=1, help="server processes (`cellinspect serve --workers`)"
    )
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk not found: apt-get install wrk")
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    with tempfile.TemporaryDirectory(prefix="cellinspect-overload-") as tmp:
        home = Path(tmp)
        publish_model(home, 224)
        image, script = write_load(home, 300)
        url = f"http://127.0.0.1:{args.port}{ROUTE}"
        proc = start_server(  # the service's defaults
            "cellinspect", home, args.port, threads=None, workers=args.workers, new_session=True
        )
        try:
            wrk(url, 16, 3, script, image)  # warm-up
            capacity = statistics.median(wrk(url, 16, 8, script, image)["rps"] for _ in range(2))
            # Memory first, at 16 clients: the overload below holds ~1,000 request bodies at
            # once, and the allocator keeps that high-water mark whatever happens next.
            rss_start = rss_mib(proc.pid)
            seconds = max(5.0, args.requests / max(capacity, 1.0))
            run = wrk(url, 16, seconds, script, image)
            done = int(run["rps"] * round(seconds))
            rss_end = rss_mib(proc.pid)
            if args.soak_minutes:
                rate = args.soak_load * capacity
                print(f"\ncapacity (16 clients, median of 2 x 8 s): {capacity:.0f} img/s")
                print(
                    f"soak: {args.soak_load:g} x capacity = {rate:.0f} req/s, open loop, "
                    f"{args.soak_minutes} one-minute windows\n"
                )
                print(
                    "| minute | 200 | p50 ms | p99 ms | 503 | client errors (stale keep-alive) "
                    "| RSS MiB | fds | threads |"
                )
                print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
                soak(args.port, proc.pid, image.read_bytes(), rate, args.soak_minutes)
                return
            rate = args.factor * capacity
            with PeakRss(proc.pid) as peak:
                over = asyncio.run(open_loop(args.port, image.read_bytes(), rate, args.seconds))
            back_after = seconds_to_recover(url, script, image, capacity)
            recovered = wrk(url, 16, 8, script, image)["rps"]
            answered = len(over.latencies_ok) + len(over.latencies_503)
        finally:
            os.killpg(proc.pid, signal.SIGTERM)  # the group: uvicorn and its workers
            proc.wait(timeout=60)
    print(f"\nserver: cellinspect serve --workers {args.workers}")
    print(f"capacity (16 clients, median of 2 x 8 s): {capacity:.0f} img/s")
    print(
        f"\noverload: offered {args.factor:g}x = {rate:.0f} req/s for {args.seconds:g} s "
        f"({over.offered} requests; client fell behind schedule by at most "
        f"{over.lag_max_s * 1000:.0f} ms)\n"
    )
    print(
        "| answered | 200 | 503 | 503 share | 503 without Retry-After | other "
        "| client errors (stale keep-alive) |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    print(
        f"| {answered} | {len(over.latencies_ok)} | {len(over.latencies_503)} | "
        f"{len(over.latencies_503) / max(answered, 1):.2f} | {over.retry_after_missing} | "
        f"{sum(over.other_status.values())} {over.other_status or ''} | "
        f"{over.client_errors + over.no_connection} ({over.stale_connections}) |"
    )
    print(
        f"\naccepted: {len(over.latencies_ok) / args.seconds:.0f} img/s, latency p50 "
        f"{pct(over.latencies_ok, 50):.0f} ms, p99 {pct(over.latencies_ok, 99):.0f} ms, "
        f"max {pct(over.latencies_ok, 100):.0f} ms; 503 answers p50 "
        f"{pct(over.latencies_503, 50):.1f} ms, p99 {pct(over.latencies_503, 99):.1f} ms"
    )
    print(
        f"recovery: 90% of capacity in the "
        f"{'first 10 s: no' if back_after is None else f'{back_after}. second'} after the "
        f"load dropped; {recovered:.0f} img/s over the next 8 s "
        f"({recovered / capacity:.2f} of capacity)"
    )
    print(f"peak RSS during the overload: {peak.peak:.0f} MiB")
    print(
        f"\nmemory: RSS {rss_start:.0f} MiB after warm-up, {rss_end:.0f} MiB after "
        f"~{done:,} more requests ({rss_end - rss_start:+.0f} MiB)"
    )


if __name__ == "__main__":
    main()
