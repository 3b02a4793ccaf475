"""A/B of two `cellinspect serve` variants, side by side, on the host's noise.

Runs of the same code on this shared 2-vCPU host differ by up to 20% from one minute to
the next, more than most changes worth measuring. So both variants run at once (each on
its own fresh home, same model and image as bench_serving.py), and `wrk` alternates
between them: A, B, A, B... `--pairs` times per concurrency. Each pair is measured within
seconds, so the B/A ratio per pair is what to read, with its median and spread.
Reported per variant: images/s, p50 and p99 (medians over the pairs) and the server's CPU
time per request (all its threads and processes).

A variant is a set of environment variables (settings) and, optionally, a Python file run
in every server process before the service starts (`--a-patch`, `--b-patch`): how to put
an earlier behaviour back without checking out an earlier tree. benchmarks/ab/ holds the
patches used for the measurements in benchmarks/RESULTS.md.

    python benchmarks/ab_serving.py --b-patch benchmarks/ab/no_gc_freeze.py --concurrency 16
    python benchmarks/ab_serving.py --b-env CELLINSPECT_WORKERS=2 --concurrency 1,16,64

Needs what bench_serving.py needs (the train extra to export the model, `wrk`).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_serving import (  # noqa: E402
    _family,
    benchmark_model,
    publish_model,
    start_server,
    stop_server,
    write_load,
    wrk,
)

TICKS = os.sysconf("SC_CLK_TCK")


def stat_cpu_seconds(stat_path: str) -> float | None:
    """User + system CPU in a /proc stat file (a process's or a thread's), None once gone."""
    try:
        stat = Path(stat_path).read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
    return (int(fields[11]) + int(fields[12])) / TICKS


def cpu_seconds(pid: int) -> float:
    """User + system CPU of `pid` and its descendants (uvicorn's workers) so far."""
    seconds = (stat_cpu_seconds(f"/proc/{child}/stat") for child in _family(pid))
    return sum(s for s in seconds if s is not None)


def variant_env(assignments: list[str], patch: Path | None, tmp: Path) -> dict[str, str]:
    env = {}
    for assignment in assignments:
        name, sep, value = assignment.partition("=")
        if not sep or not name:
            raise SystemExit(f"--a-env/--b-env take NAME=VALUE, got {assignment!r}")
        env[name] = value
    if patch is not None:
        if not patch.is_file():
            raise SystemExit(f"{patch}: no such patch file")
        # sitecustomize runs at every interpreter's start, so uvicorn's spawned workers
        # get the patch too, not only the process that parses the command line.
        site = tmp / f"site-{patch.stem}"
        site.mkdir()
        (site / "sitecustomize.py").write_text(
            f"exec(compile(open({str(patch.resolve())!r}).read(), {str(patch)!r}, 'exec'))\n"
        )
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
    return env


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--a-env", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--b-env", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--a-patch", type=Path, help="Python file run before A's service")
    parser.add_argument("--b-patch", type=Path, help="Python file run before B's service")
    parser.add_argument("--concurrency", default="1,16", help="comma-separated")
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per wrk run")
    parser.add_argument("--size", type=int, default=224, help="model input side")
    parser.add_argument(
        "--model-home",
        type=Path,
        help="serve the benchmark model of this home (see bench_serving.py --home) instead "
        "of exporting one (which needs torch)",
    )
    parser.add_argument("--image-size", type=int, default=300, help="posted image side")
    args = parser.parse_args()
    concurrencies = [int(c) for c in args.concurrency.split(",")]

    with tempfile.TemporaryDirectory(prefix="ab-serving-") as tmp_name:
        tmp = Path(tmp_name)
        homes = {"A": tmp / "a", "B": tmp / "b"}
        if args.model_home is not None:
            benchmark_model(args.model_home, args.size)  # checks it is there, of that size
        for home in homes.values():
            home.mkdir()
            if args.model_home is None:
                publish_model(home, args.size)
            else:
                shutil.copytree(args.model_home / "store", home / "store")
        image, script = write_load(tmp, args.image_size)
        envs = {
            "A": variant_env(args.a_env, args.a_patch, tmp),
            "B": variant_env(args.b_env, args.b_patch, tmp),
        }
        ports = {"A": 8811, "B": 8812}
        servers = {}
        try:
            for name in ("A", "B"):
                servers[name] = start_server(
                    "cellinspect",
                    homes[name],
                    ports[name],
                    None,
                    env=envs[name],
                    new_session=True,
                    # start_server then waits until every worker listens
                    workers=int(envs[name].get("CELLINSPECT_WORKERS", "1")),
                )
            print(f"A: {args.a_env or '-'} {args.a_patch or ''}")
            print(f"B: {args.b_env or '-'} {args.b_patch or ''}")
            print(
                f"{args.pairs} pairs x {args.duration:g} s per concurrency, {os.cpu_count()} CPUs"
            )
            for c in concurrencies:
                rows: dict[str, list[dict[str, float]]] = {"A": [], "B": []}
                for name in ("A", "B"):  # a short warm-up of each at this concurrency
                    url = f"http://127.0.0.1:{ports[name]}/v1/inspect"
                    wrk(url, c, 2, script, image)
                for _ in range(args.pairs):
                    for name in ("A", "B"):
                        url = f"http://127.0.0.1:{ports[name]}/v1/inspect"
                        cpu0 = cpu_seconds(servers[name].pid)
                        result = wrk(url, c, args.duration, script, image)
                        cpu = cpu_seconds(servers[name].pid) - cpu0
                        result["cpu_ms"] = 1000 * cpu / (result["rps"] * args.duration)
                        rows[name].append(result)
                print(f"\nconcurrency {c}")
                for name in ("A", "B"):
                    r = rows[name]
                    print(
                        f"  {name}: {statistics.median(x['rps'] for x in r):6.1f} img/s  "
                        f"p50 {statistics.median(x['p50'] for x in r):6.2f} ms  "
                        f"p99 {statistics.median(x['p99'] for x in r):6.2f} ms  "
                        f"CPU {statistics.median(x['cpu_ms'] for x in r):.3f} ms/request  "
                        f"errors {sum(x['errors'] for x in r):.0f}"
                    )
                for key, label in (("rps", "img/s"), ("p99", "p99"), ("cpu_ms", "CPU/request")):
                    ratios = [b[key] / a[key] for a, b in zip(rows["A"], rows["B"], strict=True)]
                    print(
                        f"  B/A {label:11s} median {statistics.median(ratios):.3f}  "
                        f"pairs {' '.join(f'{x:.2f}' for x in ratios)}"
                    )
        finally:
            for proc in servers.values():
                stop_server(proc)


if __name__ == "__main__":
    sys.exit(main())
