"""Throughput of the synthetic generators: images/s in memory and written, seconds per frame.

    python benchmarks/bench_synth.py [--tiles 64] [--rounds 3] [--frames 3]

Prints a Markdown table of medians over the rounds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from cellinspect.datasets.synth import (
    CELL_CLASSES,
    ELECTRODE_CLASSES,
    SynthKind,
    generate_cell,
    generate_electrode,
    generate_frame,
    write_synthetic,
)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Benchmark the synthetic generators.")
    parser.add_argument("--tiles", type=int, default=64, help="images per class per round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; the median is reported")
    parser.add_argument("--frames", type=int, default=3, help="2048x8192 frames timed")
    return parser


def _median_rate(run: Callable[[], int], rounds: int) -> float:
    """Median items/s of `run`, which returns how many items it produced."""
    rates = []
    for _ in range(rounds):
        start = time.perf_counter()
        n = run()
        rates.append(n / (time.perf_counter() - start))
    return statistics.median(rates)


def _in_memory(generate: Callable, classes: tuple[str, ...], per_class: int) -> Callable[[], int]:
    def run() -> int:
        for ci, label in enumerate(classes):
            for i in range(per_class):
                generate(label, np.random.default_rng(np.random.SeedSequence([0, ci, i])))
        return per_class * len(classes)

    return run


def _written(
    kind: SynthKind, classes: tuple[str, ...], per_class: int, workers: int
) -> Callable[[], int]:
    def run() -> int:
        with tempfile.TemporaryDirectory() as tmp:
            write_synthetic(kind, Path(tmp), count=per_class, workers=workers)
        return per_class * len(classes)

    return run


def main(args: argparse.Namespace) -> None:
    rows = []
    for name, kind, generate, classes in (
        ("electrode 128x128 gray", SynthKind.ELECTRODE, generate_electrode, ELECTRODE_CLASSES),
        ("cell 128x256 RGB", SynthKind.CELL, generate_cell, CELL_CLASSES),
    ):
        run = _in_memory(generate, classes, args.tiles)
        rows.append((name, "in memory", f"{_median_rate(run, args.rounds):,.0f} images/s"))
        for workers in (1, 2):
            run = _written(kind, classes, args.tiles, workers)
            rate = _median_rate(run, args.rounds)
            rows.append((name, f"write_synthetic, workers={workers}", f"{rate:,.0f} images/s"))
    seconds = []
    for seed in range(args.frames):
        start = time.perf_counter()
        generate_frame(seed)
        seconds.append(time.perf_counter() - start)
    rows.append(
        (
            "frame 2048x8192 gray",
            f"in memory, {args.frames} seeds",
            f"{statistics.median(seconds):.2f} s/frame (max {max(seconds):.2f})",
        )
    )
    print(f"{os.cpu_count()} CPUs, {args.tiles} images/class/round, median of {args.rounds}\n")
    print("| generator | mode | result |")
    print("| --- | --- | --- |")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
