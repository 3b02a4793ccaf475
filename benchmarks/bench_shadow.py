"""Shadow mode's cost to the live answer: the service with and without a shadow candidate.

Claim under test: "shadow mode adds no measurable latency to the primary answer at the
median". Each round starts `cellinspect serve` twice on the same model and image, once
plain and once with a second version shadowing it on every request (`SHADOW_SHARE=1`),
in alternating order, and loads each with wrk (C clients, one thread) on loopback.
Printed side by side: the median over rounds of each run's p50 / p95 and throughput, the
per-round p50s (the noise the difference must be read against), and, from /metrics, how
many requests the candidate actually answered and how many were dropped and why: a
shadow that is always dropped would cost nothing and prove nothing.

    python benchmarks/bench_shadow.py [--size 224] [--rounds 3] [--duration 8] [--concurrency 1,4]

Needs the train extra (torch, to export two untrained mobilenet_v3_small versions: speed
does not depend on the weights) and `wrk` (Debian package).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_serving import MODEL, publish_model, start_server, write_load, wrk  # noqa: E402

MODES = ("off", "on")
BASE_PORT = 8750
SETTLE_S = 0.5  # lets shadow runs of the previous load finish before counters are read


def shadow_counts(port: int) -> dict[str, float]:
    """Shadow runs and drops (by reason) so far, from the service's /metrics."""
    time.sleep(SETTLE_S)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "cellinspect_shadow_runs_total":
                counts["runs"] = counts.get("runs", 0) + s.value
            elif s.name == "cellinspect_shadow_dropped_total":
                key = f"dropped:{s.labels['reason']}"
                counts[key] = counts.get(key, 0) + s.value
            elif s.name == "cellinspect_verdicts_total":  # one per answered image
                counts["answered"] = counts.get("answered", 0) + s.value
    return counts


def _delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v - before.get(k, 0.0)}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=224, help="model input side")
    parser.add_argument("--image-size", type=int, default=300, help="posted image side (gray PNG)")
    parser.add_argument("--threads", type=int, default=2, help="ORT intra-op threads (served)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per wrk run")
    parser.add_argument("--concurrency", default="1,4")
    parser.add_argument("--share", type=float, default=1.0, help="CELLINSPECT_SHADOW_SHARE")
    parser.add_argument(
        "--warmup", type=float, default=2.0, help="seconds of load before measuring"
    )
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk not found: apt-get install wrk")
    levels = [int(c) for c in args.concurrency.split(",")]
    results: dict[tuple[str, int], list[dict[str, float]]] = {}
    shadowed: dict[int, list[dict[str, float]]] = {c: [] for c in levels}
    with tempfile.TemporaryDirectory(prefix="cellinspect-bench-shadow-") as tmp:
        home = Path(tmp)
        publish_model(home, args.size)  # bench@1: served
        publish_model(home, args.size)  # bench@2: the candidate (other random weights)
        image_path, script = write_load(home, args.image_size)
        port = BASE_PORT
        for round_ in range(args.rounds):
            # Alternating order, so drift (thermal, page cache) does not favour one mode.
            for mode in MODES if round_ % 2 == 0 else MODES[::-1]:
                port += 1
                shadow = {MODEL: f"{MODEL}@2"} if mode == "on" else {}
                proc = start_server(
                    "cellinspect",
                    home,
                    port,
                    args.threads,
                    model=f"{MODEL}@1",
                    env={
                        "CELLINSPECT_SHADOW_MODELS": json.dumps(shadow),
                        "CELLINSPECT_SHADOW_SHARE": str(args.share),
                    },
                )
                try:
                    url = f"http://127.0.0.1:{port}/v1/inspect"
                    wrk(url, 4, args.warmup, script, image_path)  # warm-up
                    for c in levels:
                        before = shadow_counts(port)
                        results.setdefault((mode, c), []).append(
                            wrk(url, c, args.duration, script, image_path)
                        )
                        if mode == "on":
                            shadowed[c].append(_delta(shadow_counts(port), before))
                finally:
                    proc.send_signal(signal.SIGTERM)
                    proc.wait(timeout=60)
    print(
        f"\nmobilenet_v3_small {args.size}², {args.image_size}² gray PNG, ORT {args.threads} "
        f"threads served + 1 shadow (share {args.share:g}), {os.cpu_count()} CPUs, median of "
        f"{args.rounds} rounds x "
        f"{args.duration:g} s\n"
    )
    print(
        "| clients | p50 off ms | p50 on ms | Δ p50 ms | p50 per round (off / on) "
        "| p95 off ms | p95 on ms | img/s off | img/s on | shadowed | dropped |"
    )
    print("|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---|")
    for c in levels:
        off, on = results[("off", c)], results[("on", c)]
        med = {
            mode: {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            for mode, runs in (("off", off), ("on", on))
        }
        rounds = " ".join(f"{a['p50']:.1f}/{b['p50']:.1f}" for a, b in zip(off, on, strict=True))
        answered = sum(d.get("answered", 0) for d in shadowed[c])
        runs = sum(d.get("runs", 0) for d in shadowed[c])
        drops: dict[str, float] = {}
        for d in shadowed[c]:
            for k, v in d.items():
                if k.startswith("dropped:"):
                    reason = k.removeprefix("dropped:")
                    drops[reason] = drops.get(reason, 0) + v
        dropped = ", ".join(f"{k} {v:.0f}" for k, v in sorted(drops.items())) or "none"
        share = f"{100 * runs / answered:.0f}%" if answered else "-"
        print(
            f"| {c} | {med['off']['p50']:.1f} | {med['on']['p50']:.1f} | "
            f"{med['on']['p50'] - med['off']['p50']:+.1f} | {rounds} | {med['off']['p95']:.1f} | "
            f"{med['on']['p95']:.1f} | {med['off']['rps']:.0f} | {med['on']['rps']:.0f} | "
            f"{share} | {dropped} |"
        )


if __name__ == "__main__":
    main()
