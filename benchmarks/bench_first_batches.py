"""What the first batch of each size costs once the service has warmed a model up.

The registry warms a model with a batch of 1 and batches of the largest size; the
micro-batcher then sends whatever size has gathered (1 to max_batch_size). An execution
provider that prepares per input shape (cuDNN's algorithm search on CUDA, TensorRT's
engine build) pays that on the first batch of each new size: on a request, unless the
warm-up covered it. This loads the model exactly as `cellinspect serve` does and times, per
batch size, the first run, the second, and the median of the next five.

    python benchmarks/bench_first_batches.py --home HOME --model bench --providers cuda
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from pathlib import Path

import numpy as np

from cellinspect.models.store import ModelStore
from cellinspect.serving.engine import ModelRegistry
from cellinspect.serving.settings import Settings


def first_batches(home: Path, model: str, providers: str, max_batch: int) -> list[list[float]]:
    settings = Settings(home=home, models=[model], providers=providers, max_batch_size=max_batch)
    registry = ModelRegistry(ModelStore(home / "store"), settings)
    start = time.perf_counter()
    asyncio.run(registry.load_all())
    loaded = registry.get(model).loaded
    print(
        f"{providers}: loaded and warmed in {time.perf_counter() - start:.2f} s on "
        f"{loaded.session.get_providers()}"
    )
    rng = np.random.default_rng(0)
    rows = []
    for n in range(1, max_batch + 1):
        batch = rng.normal(0, 1, (n, *loaded.card.preprocessing.input_shape)).astype(np.float32)
        times = []
        for _ in range(7):
            t0 = time.perf_counter()
            loaded.predict_logits(batch, batch_size=n)
            times.append((time.perf_counter() - t0) * 1000)
        rows.append([n, times[0], times[1], statistics.median(times[2:])])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--home", type=Path, required=True, help="home whose store has --model")
    parser.add_argument("--model", default="bench")
    parser.add_argument(
        "--providers", default="cuda;cpu", help="provider lists to compare, ';'-separated"
    )
    parser.add_argument("--max-batch", type=int, default=8)
    args = parser.parse_args()
    for providers in args.providers.split(";"):
        rows = first_batches(args.home, args.model, providers, args.max_batch)
        print(f"\n{providers}: | batch | first run ms | second ms | median of next 5 ms |")
        print("|---:|---:|---:|---:|")
        for n, first, second, rest in rows:
            print(f"| {n} | {first:.1f} | {second:.1f} | {rest:.2f} |")
        print()


if __name__ == "__main__":
    main()
