"""The fit loop: weighted loss or sampler, AdamW + warm-up/cosine, AMP on CUDA,
best-by-validation checkpoints, resume, early stopping, metrics.jsonl."""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, WeightedRandomSampler
from tqdm import tqdm

from cellinspect.datasets.preprocess import PreprocessSpec
from cellinspect.datasets.samples import Split
from cellinspect.training.augment import BatchMixer, build_augmentation
from cellinspect.training.config import BalanceMode, OptimizerKind, TrainConfig
from cellinspect.training.data import (
    CrackPaintingDataset,
    PreparedImageDataset,
    TrainingData,
    infer_channels,
    load_training_data,
    prepare_all,
    reseed_worker,
)
from cellinspect.training.networks import create_model, forward_with_aux, has_aux_cam_weights

log = logging.getLogger(__name__)

LAST = "last.pt"
BEST = "best.pt"
METRICS = "metrics.jsonl"
CONFIG = "config.yaml"


@dataclass
class FitResult:
    run_dir: Path
    best_epoch: int
    best_val_macro_f1: float
    epochs_run: int
    stopped_early: bool
    train_images_per_s: float


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_spec(cfg: TrainConfig, data: TrainingData) -> PreprocessSpec:
    channels = cfg.channels or infer_channels(data.splits[Split.TRAIN][0], cfg.max_pixels)
    height, width = cfg.img_size
    # Fixed, data-independent statistics: [0,1] pixels -> roughly [-2, 2]; the network's
    # first BatchNorm adapts, and the spec stays identical across data refreshes.
    return PreprocessSpec(
        height=height,
        width=width,
        channels=channels,
        resize=cfg.resize,
        mean=(0.5,) * channels,
        std=(0.25,) * channels,
    )


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer is OptimizerKind.SGD:
        return torch.optim.SGD(
            model.parameters(),
            lr=cfg.lr,
            momentum=0.9,
            nesterov=True,
            weight_decay=cfg.weight_decay,
        )
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def warmup_cosine(total_steps: int, warmup_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


@torch.inference_mode()
def predict_probs(model: nn.Module, loader: DataLoader, device: torch.device) -> np.ndarray:
    model.eval()
    chunks = [torch.softmax(model(x.to(device)), dim=1).float().cpu() for x, _ in loader]
    return torch.cat(chunks).numpy()


def training_loss(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, criterion: nn.Module, aux_weight: float
) -> torch.Tensor:
    """The main head's loss, plus `aux_weight` times the auxiliary CAM head's on the same
    targets (one forward pass feeds both; aux_weight > 0 needs a model with that head)."""
    if not aux_weight:
        return criterion(model(x), y)
    logits, aux_logits = forward_with_aux(model, x)
    return criterion(logits, y) + aux_weight * criterion(aux_logits, y)


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None,
    device: torch.device,
    desc: str,
    progress: bool,
    memory_format: torch.memory_format = torch.contiguous_format,
    ema: AveragedModel | None = None,
    mixer: BatchMixer | None = None,
    aux_weight: float = 0.0,
) -> tuple[float, int, float]:
    """One pass over `loader` (updating `ema` after each step); returns (mean loss, images
    seen, seconds)."""
    model.train()
    seen, loss_sum, start = 0, 0.0, time.perf_counter()
    bar = tqdm(loader, desc=desc, disable=not progress, leave=False)
    for x, y in bar:
        x = x.to(device, non_blocking=True, memory_format=memory_format)
        y = y.to(device, non_blocking=True)
        if mixer is not None:
            x, y = mixer(x, y)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.float16, enabled=scaler is not None):
            loss = training_loss(model, x, y, criterion, aux_weight)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        if ema is not None:
            ema.update_parameters(model)
        scheduler.step()
        seen += len(y)
        loss_sum += loss.item() * len(y)
        rate = seen / (time.perf_counter() - start)
        bar.set_postfix(loss=f"{loss_sum / seen:.4f}", img_s=f"{rate:.0f}")
    return loss_sum / max(seen, 1), seen, time.perf_counter() - start


def validate(
    model: nn.Module, loader: DataLoader, labels: np.ndarray, device: torch.device
) -> dict[str, float]:
    probs = predict_probs(model, loader, device)
    pred = probs.argmax(1)
    n_classes = probs.shape[1]
    nll = -np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None)).mean()
    record = {
        "val_loss": float(nll),
        "val_accuracy": float(accuracy_score(labels, pred)),
        "val_macro_f1": float(
            f1_score(labels, pred, average="macro", labels=range(n_classes), zero_division=0)
        ),
    }
    if n_classes == 2 and len(np.unique(labels)) == 2:
        # Threshold-free: with a class-weighted loss the 0.5 boundary that accuracy and F1
        # use can land anywhere, and the export picks its own operating point.
        record["val_roc_auc"] = float(roc_auc_score(labels, probs[:, 1]))
    return record


def build_train_dataset(
    cfg: TrainConfig,
    data: TrainingData,
    images: np.ndarray,
    labels: np.ndarray,
    spec: PreprocessSpec,
    targets: np.ndarray | None,
) -> PreparedImageDataset:
    """The augmented training set; with `synth_cracks` (binary tasks), one that paints
    cracks on a share of the good images."""
    augment = build_augmentation(cfg.augment, seed=cfg.seed)
    if not cfg.synth_cracks:
        return PreparedImageDataset(images, labels, spec, augment, targets)
    good = data.class_names.index(data.good_class)
    return CrackPaintingDataset(
        images,
        labels,
        spec,
        augment,
        targets,
        share=cfg.synth_cracks,
        good=good,
        defective=1 - good,
        seed=cfg.seed,
    )


def build_loaders(
    cfg: TrainConfig,
    train_ds: PreparedImageDataset,
    val_ds: PreparedImageDataset,
    inv_freq: np.ndarray,
    device: torch.device,
) -> tuple[DataLoader, DataLoader]:
    """Training loader (shuffled or class-balanced sampling, worker processes) and validation loader."""
    sampler = None
    if cfg.balance is BalanceMode.SAMPLER:
        weights = inv_freq[train_ds.labels].tolist()
        sampler = WeightedRandomSampler(weights, num_samples=len(train_ds), replacement=True)
    train_loader = DataLoader(
        train_ds,
        batch_size=cfg.batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        drop_last=len(train_ds) > cfg.batch_size,
        generator=torch.Generator().manual_seed(cfg.seed),
        num_workers=cfg.loader_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=cfg.loader_workers > 0,
        worker_init_fn=reseed_worker,
    )
    # Validation images need no augmentation, so the main process normalises them directly.
    val_loader = DataLoader(val_ds, batch_size=cfg.batch_size * 2, shuffle=False, num_workers=0)
    return train_loader, val_loader


def checkpoint_state(
    model: nn.Module, optimizer, scheduler, scaler, epoch: int, best: dict[str, Any], extra: dict
) -> dict[str, Any]:
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "epoch": epoch,
        "best": best,
        **extra,
    }


def save_atomic(state: dict[str, Any], path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def fit(cfg: TrainConfig, *, progress: bool = True) -> FitResult:
    """Train per `cfg`; resumes from `<out>/last.pt` when it exists."""
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / CONFIG).write_text(cfg.to_yaml())
    seed_everything(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    use_amp = cfg.amp and device.type == "cuda"

    data = load_training_data(cfg)
    spec = build_spec(cfg, data)
    n_classes = len(data.class_names)
    if cfg.synth_cracks and n_classes != 2:  # before minutes of decoding
        raise ValueError(
            f"{data.manifest_path}: synth_cracks needs two classes (good and defective), "
            f"not {n_classes}: {data.class_names}"
        )
    train_y, val_y = data.labels(Split.TRAIN), data.labels(Split.VAL)
    t0 = time.perf_counter()
    train_x = prepare_all(data.splits[Split.TRAIN], spec, max_pixels=cfg.max_pixels)
    val_x = prepare_all(data.splits[Split.VAL], spec, max_pixels=cfg.max_pixels)
    log.info("decoded %d images in %.1fs", len(train_x) + len(val_x), time.perf_counter() - t0)
    held_out = len(val_x) > 0  # fit_on train+val leaves nothing to validate on

    counts = np.bincount(train_y, minlength=n_classes).astype(np.float64)
    missing = [c for c, n in zip(data.class_names, counts, strict=True) if n == 0]
    if missing:
        raise ValueError(f"{data.manifest_path}: no training images for class(es) {missing}")

    train_targets = (
        data.soft_targets(Split.TRAIN, cfg.soft_label_key) if cfg.soft_label_key else None
    )
    train_ds = build_train_dataset(cfg, data, train_x, train_y, spec, train_targets)
    counts = train_ds.expected_counts(n_classes)
    inv_freq = counts.sum() / (n_classes * counts)
    val_ds = PreparedImageDataset(val_x, val_y, spec)
    train_loader, val_loader = build_loaders(cfg, train_ds, val_ds, inv_freq, device)

    model = create_model(
        cfg.arch,
        num_classes=n_classes,
        in_chans=spec.channels,
        weights=cfg.weights,
        aux_cam=cfg.aux_cam_weight > 0,
    )
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model.to(device, memory_format=memory_format)
    # The averaged copy (buffers too: BatchNorm statistics) is what is validated and exported.
    ema = (
        AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True)
        if cfg.ema_decay
        else None
    )
    evaluated = ema.module if ema is not None else model
    mixer = (
        BatchMixer(
            n_classes, mixup_alpha=cfg.mixup_alpha, cutmix_alpha=cfg.cutmix_alpha, seed=cfg.seed
        )
        if cfg.mixup_alpha or cfg.cutmix_alpha
        else None
    )
    class_weight = (
        torch.as_tensor(inv_freq, dtype=torch.float32, device=device)
        if cfg.balance is BalanceMode.LOSS
        else None
    )
    criterion = nn.CrossEntropyLoss(weight=class_weight, label_smoothing=cfg.label_smoothing)
    optimizer = make_optimizer(model, cfg)
    steps_per_epoch = len(train_loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        warmup_cosine(cfg.epochs * steps_per_epoch, round(cfg.warmup_epochs * steps_per_epoch)),
    )
    scaler = torch.amp.GradScaler("cuda") if use_amp else None

    extra = {
        "config": cfg.model_dump(mode="json"),
        "class_names": data.class_names,
        "good_class": data.good_class,
        "preprocessing": spec.model_dump(mode="json"),
        "manifest_path": str(data.manifest_path),
        "manifest_hash": data.manifest.hash,
    }
    best: dict[str, Any] = {"macro_f1": -1.0, "epoch": -1}
    start_epoch, stale = 0, 0
    if (run_dir / LAST).is_file():
        state = torch.load(run_dir / LAST, map_location=device, weights_only=False)
        if (
            state["class_names"] != data.class_names
            or state["preprocessing"] != extra["preprocessing"]
        ):
            raise ValueError(f"{run_dir / LAST}: checkpoint was made for other classes or input")
        has_aux = has_aux_cam_weights(state["model"])
        if has_aux != (cfg.aux_cam_weight > 0):
            raise ValueError(
                f"{run_dir / LAST}: checkpoint was made {'with' if has_aux else 'without'} the "
                f"auxiliary CAM head; resume with aux_cam_weight {'> 0' if has_aux else '0'}"
            )
        model.load_state_dict(state.get("train_model", state["model"]))
        if ema is not None:
            ema.module.load_state_dict(state["model"])
            ema.n_averaged.fill_(state.get("ema_updates", 1))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["lr_scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start_epoch, best, stale = state["epoch"] + 1, state["best"], state.get("stale", 0)
        log.info(
            "resuming %s at epoch %d (best macro-F1 %.4f)", run_dir, start_epoch, best["macro_f1"]
        )

    epochs_run, rates = 0, []
    stopped_early = stale >= cfg.patience
    for epoch in range(start_epoch, cfg.epochs if not stopped_early else start_epoch):
        desc = f"epoch {epoch + 1}/{cfg.epochs}"
        loss, seen, seconds = train_one_epoch(
            model,
            train_loader,
            criterion,
            optimizer,
            scheduler,
            scaler,
            device,
            desc,
            progress,
            memory_format,
            ema,
            mixer,
            cfg.aux_cam_weight,
        )
        rates.append(seen / seconds)
        record = {
            "epoch": epoch,
            "train_loss": loss,
            **(validate(evaluated, val_loader, val_y, device) if held_out else {}),
        }
        record.update(
            lr=float(scheduler.get_last_lr()[0]),
            train_images_per_s=seen / seconds,
            epoch_seconds=seconds,
        )
        with open(run_dir / METRICS, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        # Fitted on train+val, no epoch is validated: no best.pt, no early stop.
        improved = held_out and record["val_macro_f1"] > best["macro_f1"] + 1e-6
        if improved:
            best, stale = {"macro_f1": record["val_macro_f1"], "epoch": epoch}, 0
        elif held_out:
            stale += 1
        # With EMA, "model" holds the averaged weights (the ones exported), "train_model" the
        # raw ones that resuming continues from.
        raw = (
            {"train_model": model.state_dict(), "ema_updates": int(ema.n_averaged)}
            if ema is not None
            else {}
        )
        state = checkpoint_state(
            evaluated, optimizer, scheduler, scaler, epoch, best, {**extra, **raw, "stale": stale}
        )
        if improved:
            save_atomic(state, run_dir / BEST)
        save_atomic(state, run_dir / LAST)
        epochs_run += 1
        if held_out:
            log.info(
                "epoch %d: loss %.4f val macro-F1 %.4f acc %.4f (%.0f img/s)%s",
                epoch + 1,
                loss,
                record["val_macro_f1"],
                record["val_accuracy"],
                seen / seconds,
                " *" if improved else "",
            )
        else:
            log.info(
                "epoch %d: loss %.4f (%.0f img/s; fitted on train+val, nothing validated)",
                epoch + 1,
                loss,
                seen / seconds,
            )
        if stale >= cfg.patience:
            stopped_early = epoch + 1 < cfg.epochs
            break

    return FitResult(
        run_dir=run_dir,
        best_epoch=best["epoch"],
        best_val_macro_f1=best["macro_f1"],
        epochs_run=epochs_run,
        stopped_early=stopped_early,
        train_images_per_s=float(np.median(rates)) if rates else 0.0,
    )
