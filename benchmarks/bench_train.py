"""Is the data path fast enough? Training images/s through the real loader vs the bare model.

Bare: forward + backward + AdamW step on batches already in memory (the model's ceiling).
Loader: the same step fed by the training DataLoader (augmentation + contract normalize)
with 0, 1 and 2 worker processes. Both run side by side in one process, same threads.

    python benchmarks/bench_train.py --data cellinspect-home/datasets/electrode-demo
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from cellinspect.datasets.samples import Split
from cellinspect.training.augment import AugmentPreset, build_augmentation
from cellinspect.training.config import TrainConfig
from cellinspect.training.data import PreparedImageDataset, load_training_data, prepare_all
from cellinspect.training.fit import build_spec, train_one_epoch, warmup_cosine
from cellinspect.training.networks import create_model

MEMORY_FORMAT = torch.channels_last  # fit()'s default (TrainConfig.channels_last)


def step_rate(model, batches, optimizer, criterion) -> float:
    """Images/s of forward+backward+step over pre-made batches."""
    model.train()
    start, seen = time.perf_counter(), 0
    for x, y in batches:
        x = x.to(memory_format=MEMORY_FORMAT)  # as fit() does, so both sides pay the same
        optimizer.zero_grad(set_to_none=True)
        criterion(model(x), y).backward()
        optimizer.step()
        seen += len(y)
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data", type=Path, required=True, help="synthetic data folder with manifest.json"
    )
    parser.add_argument("--arch", default="mobilenet_v3_small")
    parser.add_argument("--img-size", type=int, default=128)
    parser.add_argument(
        "--batch-size", type=int, default=TrainConfig.model_fields["batch_size"].default
    )
    parser.add_argument("--batches", type=int, default=12, help="batches per measurement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = TrainConfig(data=str(args.data), out="/tmp/bench-train", img_size=args.img_size)
    data = load_training_data(cfg)
    spec = build_spec(cfg, data)
    samples = data.splits[Split.TRAIN][: args.batch_size * args.batches]
    prepared = prepare_all(samples, spec, max_pixels=cfg.max_pixels)
    labels = data.labels(Split.TRAIN)[: len(samples)]
    dataset = PreparedImageDataset(prepared, labels, spec, build_augmentation(AugmentPreset.FLIPS))

    model = create_model(args.arch, num_classes=len(data.class_names), in_chans=spec.channels)
    model = model.to(memory_format=MEMORY_FORMAT)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    criterion = torch.nn.CrossEntropyLoss()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(10**6, 0))
    bare_batches = [
        (torch.randn(args.batch_size, *spec.input_shape), torch.randint(0, 2, (args.batch_size,)))
        for _ in range(args.batches)
    ]
    step_rate(model, bare_batches[:2], optimizer, criterion)  # warm-up

    results: dict[str, list[float]] = {"bare model": []}
    loaders = {
        f"loader, {w} worker(s)": DataLoader(
            dataset,
            batch_size=args.batch_size,
            shuffle=True,
            num_workers=w,
            persistent_workers=w > 0,
        )
        for w in (0, 1, 2)
    }
    for _ in range(args.rounds):  # interleaved rounds: drift hits every variant alike
        results["bare model"].append(step_rate(model, bare_batches, optimizer, criterion))
        for label, loader in loaders.items():
            _, seen, seconds = train_one_epoch(
                model,
                loader,
                criterion,
                optimizer,
                scheduler,
                None,
                torch.device("cpu"),
                label,
                False,
                MEMORY_FORMAT,
            )
            results.setdefault(label, []).append(seen / seconds)

    bare = statistics.median(results["bare model"])
    print(
        f"\n{args.arch} {args.img_size}px batch {args.batch_size}, torch threads {torch.get_num_threads()}, "
        f"median of {args.rounds} rounds x {args.batches} batches\n"
    )
    print("| path | images/s | share of bare model |\n|---|---:|---:|")
    for label, rates in results.items():
        median = statistics.median(rates)
        print(f"| {label} | {median:.0f} | {median / bare:.2f} |")
    print(f"\nprepare_all (decode + resize) of {len(samples)} images is done once per run.")


if __name__ == "__main__":
    main()
