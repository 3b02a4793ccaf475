"""Screen ELPV training ideas cheaply, on the validation split only (never the test quarter).

A half-width ResNet-18 (stages 32-64-128-256: a quarter of its parameters and
multiply-adds) trains in ~45 s an epoch on one CPU core at 224², so two ideas run side by
side on a 2-core box in ~15 minutes, against ~50 minutes for one run of the full recipe.
It reuses the product's manifest, preprocessing contract, augmentation presets and crack
painter; the other ideas live here until one earns a place in `training/`:

    --pool lse          log-sum-exp pooling of per-location logits (multiple-instance
                        learning: the strongest local evidence decides) instead of averaging
    --image-norm image  each image standardised to its own mean and spread
    --image-norm highpass   the same after removing its low frequencies (illumination)
    --synth-cracks Q    share Q of the functional training images get synthetic cracks
                        (the product's `synth_cracks`, datasets/synth/el_cracks.py) and
                        count as defective

Besides the per-epoch log it prints, at the end, the ROC-AUC between expert grades (0 vs 1,
0 vs 2/3, ...) and the AUC on the training images in evaluation mode, which tells
underfitting (train AUC no higher than validation) from overfitting.

    python benchmarks/elpv_screen.py --data HOME/datasets/elpv-binary/manifest.json \\
        --out /tmp/screen/base --threads 1 &
    python benchmarks/elpv_screen.py --data HOME/datasets/elpv-binary/manifest.json \\
        --out /tmp/screen/lse --pool lse --threads 1
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import nn
from torchvision.models import resnet

from cellinspect.datasets.manifest import load_manifest
from cellinspect.datasets.preprocess import PreprocessSpec
from cellinspect.datasets.samples import Split
from cellinspect.training.augment import AugmentPreset, build_augmentation
from cellinspect.training.data import CrackPaintingDataset, PreparedImageDataset, prepare_all
from cellinspect.training.fit import predict_probs, warmup_cosine

sys.path.insert(0, str(Path(__file__).resolve().parent))

from eval_elpv import grade_aucs  # noqa: E402

GOOD = "functional"


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="ELPV binary manifest (cellinspect data elpv)")
    p.add_argument(
        "--out", required=True, help="path prefix for the JSON log and the validation scores"
    )
    p.add_argument("--pool", choices=["avg", "lse"], default="avg")
    p.add_argument("--image-norm", choices=["none", "image", "highpass"], default="none")
    p.add_argument("--synth-cracks", type=float, default=0.0, metavar="Q")
    p.add_argument("--width", type=int, default=32, help="first stage's channels (64: ResNet-18)")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--augment", choices=[a.value for a in AugmentPreset], default="isotropic")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    return p


class ScreenNet(nn.Module):
    """ResNet-18 layout at `width`, 1-channel stem, a 1x1 convolution as classifier so that
    the logits can be pooled per location (avg: the same as torchvision's avgpool + fc)."""

    def __init__(self, width: int, pool: str) -> None:
        super().__init__()
        net = resnet.ResNet(resnet.BasicBlock, [2, 2, 2, 2], num_classes=2)
        net.inplanes = width
        net.conv1 = nn.Conv2d(1, width, 7, 2, 3, bias=False)
        net.bn1 = nn.BatchNorm2d(width)
        net.layer1 = net._make_layer(resnet.BasicBlock, width, 2)
        net.layer2 = net._make_layer(resnet.BasicBlock, 2 * width, 2, stride=2)
        net.layer3 = net._make_layer(resnet.BasicBlock, 4 * width, 2, stride=2)
        net.layer4 = net._make_layer(resnet.BasicBlock, 8 * width, 2, stride=2)
        self.net, self.pool = net, pool
        self.classifier = nn.Conv2d(8 * width, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.net
        x = n.maxpool(n.relu(n.bn1(n.conv1(x))))
        scores = self.classifier(n.layer4(n.layer3(n.layer2(n.layer1(x))))).flatten(2)
        if self.pool == "avg":
            return scores.mean(2)
        # LSE pooling (Pinheiro & Collobert, CVPR 2015), r = 5: between the mean and the max.
        r = 5.0
        return (torch.logsumexp(r * scores, 2) - math.log(scores.shape[2])) / r


def image_norm(images: np.ndarray, mode: str, size: int) -> np.ndarray:
    """Per-image standardisation (optionally of the high-pass image), mapped back into [0, 1]
    so that the augmentation presets and normalize() apply unchanged."""
    if mode == "none":
        return images
    out = np.empty_like(images)
    for i, image in enumerate(images[..., 0]):
        if mode == "highpass":
            image = image - cv2.GaussianBlur(image, (0, 0), sigmaX=size / 28)
        out[i, ..., 0] = np.clip((image - image.mean()) / (image.std() + 1e-3) * 0.15 + 0.5, 0, 1)
    return out


def defect_scores(net: nn.Module, images: np.ndarray, spec: PreprocessSpec, defective: int):
    """P(defective) of each prepared image, through the fit loop's own evaluation path."""
    loader = torch.utils.data.DataLoader(
        PreparedImageDataset(images, np.zeros(len(images), np.int64), spec), batch_size=64
    )
    return predict_probs(net, loader, torch.device("cpu"))[:, defective]


def grade_report(scores: np.ndarray, grades: np.ndarray, types: np.ndarray) -> dict[str, float]:
    """ROC-AUC between pairs of expert grades (eval_elpv.grade_aucs) and per cell type."""
    report = {f"auc_{k.replace(' ', '_')}": v for k, v in grade_aucs(scores, grades).items()}
    for kind in ("mono", "poly"):
        keep = types == kind
        report[f"auc_{kind}"] = roc_auc_score(grades[keep] > 0.5, scores[keep])
    return report


def main(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    manifest = load_manifest(args.data)
    classes = list(manifest.classes)
    good = classes.index(GOOD)
    defective = 1 - good
    spec = PreprocessSpec(height=args.size, width=args.size, channels=1)
    train = [s for s in manifest.samples if s.split == Split.TRAIN]
    val = [s for s in manifest.samples if s.split == Split.VAL]
    y_train = np.array([classes.index(s.label) for s in train])
    y_val = np.array([classes.index(s.label) for s in val])
    x_train, x_val = (
        image_norm(
            prepare_all(s, spec, max_pixels=10**8, threads=args.threads), args.image_norm, args.size
        )
        for s in (train, val)
    )
    augment = build_augmentation(AugmentPreset(args.augment), seed=args.seed)
    data = CrackPaintingDataset(
        x_train,
        y_train,
        spec,
        augment=augment,
        share=args.synth_cracks,
        good=good,
        defective=defective,
        seed=args.seed + 99,
    )
    loader = torch.utils.data.DataLoader(
        data,
        batch_size=32,
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(args.seed),
    )
    # Inverse-frequency class weights, as the recipe's `balance: loss`, on the expected
    # labels after synthetic cracks moved a share of functional images to defective.
    freq = data.expected_counts(2)
    weights = torch.tensor(len(y_train) / (2 * freq), dtype=torch.float32)
    criterion = nn.CrossEntropyLoss(weight=weights, label_smoothing=args.label_smoothing)
    net = ScreenNet(args.width, args.pool).to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(args.epochs * len(loader), len(loader))
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    log, start = [], time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        net.train()
        loss_sum = correct = seen = 0
        for x, y in loader:
            logits = net(x.to(memory_format=torch.channels_last))
            loss = criterion(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += loss.item() * len(y)
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
        scores = defect_scores(net, x_val, spec, defective)
        row = {
            "epoch": epoch,
            "train_loss": round(loss_sum / seen, 4),
            "train_acc": round(correct / seen, 4),
            "val_auc": round(roc_auc_score(y_val == defective, scores), 4),
            "val_acc": round(float(((scores > 0.5) == (y_val == defective)).mean()), 4),
            "minutes": round((time.perf_counter() - start) / 60, 2),
        }
        log.append(row)
        print(json.dumps(row), flush=True)
    grades = np.array([float(s.metadata["probability"]) for s in val])
    types = np.array([str(s.metadata["type"]) for s in val])
    train_scores = defect_scores(net, x_train, spec, defective)
    final = {
        "train_auc_eval_mode": round(roc_auc_score(y_train == defective, train_scores), 4),
        **{k: round(v, 4) for k, v in grade_report(scores, grades, types).items()},
    }
    print(json.dumps(final), flush=True)
    np.save(f"{out}.val_scores.npy", scores)
    Path(f"{out}.json").write_text(json.dumps({"args": vars(args), "log": log, "final": final}))


if __name__ == "__main__":
    main(get_args_parser().parse_args())
