"""Where `cellinspect serve` spends its CPU under load, thread by thread.

Starts the service on bench_serving.py's model and image, loads it with `wrk` for
`--duration` seconds at `--concurrency` clients, and reads every thread's user + system
time of the server's process tree from /proc before and after. Prints cores used and CPU
milliseconds per image for each thread (named with py-spy when it is installed: Python
threads carry no OS name) and for wrk itself.

    python benchmarks/thread_cpu.py [--workers 2] [--concurrency 16] [--duration 12]
        [--env NAME=VALUE ...] [--patch FILE]

`--env` and `--patch` work as in ab_serving.py (a patch file puts an earlier behaviour back).

Needs what bench_serving.py needs (the train extra to export the model, `wrk`).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ab_serving import stat_cpu_seconds, variant_env  # noqa: E402
from bench_serving import (  # noqa: E402
    _family,
    publish_model,
    start_server,
    stop_server,
    write_load,
    wrk,
)


def thread_cpu(root: int) -> dict[tuple[int, int], float]:
    """(pid, tid) -> CPU seconds so far, for every thread of `root`'s process tree."""
    out = {}
    for pid in _family(root):
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            if (seconds := stat_cpu_seconds(f"/proc/{pid}/task/{tid}/stat")) is not None:
                out[(pid, int(tid))] = seconds
    return out


def thread_names(pids: set[int]) -> dict[int, str]:
    """tid -> Python thread name, from `py-spy dump` (empty without py-spy)."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        return {}
    names = {}
    for pid in pids:
        dump = subprocess.run([spy, "dump", "--pid", str(pid)], capture_output=True, text=True)
        for match in re.finditer(r'Thread (\d+) \(\w+\)(?:: "([^"]*)")?', dump.stdout):
            names[int(match.group(1))] = match.group(2) or "main (event loop)"
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--duration", type=float, default=12.0)
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--patch", type=Path, help="Python file run before the service")
    parser.add_argument("--size", type=int, default=224, help="model input side")
    parser.add_argument("--image-size", type=int, default=300, help="posted image side")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        env = variant_env(args.env, args.patch, Path(tmp))
        home = Path(tmp) / "home"
        home.mkdir()
        publish_model(home, args.size)
        image, script = write_load(home, args.image_size)
        port = 8790
        url = f"http://127.0.0.1:{port}/v1/inspect"
        proc = start_server(
            "cellinspect", home, port, None, env=env, new_session=True, workers=args.workers
        )
        try:
            wrk(url, 4, 2, script, image)  # warm-up
            before, clock, children = thread_cpu(proc.pid), time.monotonic(), os.times()
            result = wrk(url, args.concurrency, args.duration, script, image)
            after, elapsed, children_after = (
                thread_cpu(proc.pid),
                time.monotonic() - clock,
                os.times(),
            )
            names = thread_names({pid for pid, _ in after})
        finally:
            stop_server(proc)
    images = result["rps"] * elapsed
    used = Counter({k: v - before.get(k, 0.0) for k, v in after.items()})
    total = sum(used.values())
    client = (children_after.children_user + children_after.children_system) - (
        children.children_user + children.children_system
    )
    print(
        f"{args.workers} worker(s), {args.concurrency} clients, {elapsed:.1f} s: "
        f"{result['rps']:.1f} img/s, p50 {result['p50']:.1f} ms, p99 {result['p99']:.1f} ms"
    )
    print(f"server: {total / elapsed:.2f} cores, {1000 * total / images:.3f} CPU ms per image")
    print(f"wrk:    {client / elapsed:.2f} cores")
    print(f"{'pid':>8} {'tid':>8}  {'thread':<28} {'cores':>6} {'ms/image':>9}")
    for (pid, tid), seconds in used.most_common():
        if seconds >= 0.01:
            name = names.get(tid, "?")
            print(
                f"{pid:>8} {tid:>8}  {name:<28} {seconds / elapsed:6.3f} "
                f"{1000 * seconds / images:9.3f}"
            )


if __name__ == "__main__":
    main()
