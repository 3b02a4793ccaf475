"""Augmentation presets (albumentations) for inspection images.

They operate on the output of the preprocessing contract's `prepare()` (float32 HxWxC in
[0, 1] at input size), so the geometry and the value range are the ones the model sees
at inference; `normalize()` runs after them. Which flips are allowed depends on what
the defect classes mean: an electrode's coating direction is vertical, so a 90° turn
would turn an uncoated streak into something that never occurs on the line.
"""

from __future__ import annotations

import math
from enum import StrEnum

import albumentations as A
import numpy as np
import torch
from torch.nn import functional


class AugmentPreset(StrEnum):
    NONE = "none"
    FLIPS = "flips"  # mirror flips only: keeps a coating direction or a cell's axis in place
    ISOTROPIC = "isotropic"  # no preferred direction (EL images of solar cells): flips + 90°


def _photometric() -> list[A.BasicTransform]:
    # Lighting drifts and focus/noise changes between stations, not new defect shapes.
    return [
        A.RandomBrightnessContrast(brightness_limit=0.12, contrast_limit=0.15, p=0.7),
        A.OneOf(
            [A.GaussianBlur(blur_limit=(3, 3), sigma_limit=(0.1, 0.6)), A.MotionBlur(blur_limit=3)],
            p=0.2,
        ),
        A.GaussNoise(std_range=(0.005, 0.02), p=0.3),
    ]


def build_augmentation(preset: AugmentPreset, seed: int | None = None) -> A.Compose | None:
    """The training-time transform for `preset`, or None for no augmentation.

    Albumentations keeps its own random state (global seeds do not reach it): `seed` makes
    the draws repeatable. Loader workers reseed their copy (`reseed_worker`).
    """
    if preset is AugmentPreset.NONE:
        return None
    geometric: list[A.BasicTransform] = [A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5)]
    if preset is AugmentPreset.ISOTROPIC:
        geometric.append(A.RandomRotate90(p=0.5))
    # Small shifts/zooms only: large rotations would tilt the coating direction and
    # border fill would paint artificial edges that look like defects.
    geometric.append(
        A.Affine(
            translate_percent=(-0.06, 0.06),
            scale=(0.93, 1.07),
            rotate=(-4, 4),
            border_mode=4,  # cv2.BORDER_REFLECT_101
            p=0.5,
        )
    )
    return A.Compose([*geometric, *_photometric()], seed=seed)


class BatchMixer:
    """MixUp (Zhang et al., 2018) or CutMix (Yun et al., 2019) on a training batch, with
    probability targets; each batch picks one of the enabled ones (alpha > 0).

    Written here rather than taken from torchvision.transforms.v2.MixUp/CutMix: those take
    class indices only, and soft targets (expert defect probabilities) must be mixed as
    probabilities. Draws come from a seeded generator, so runs repeat.
    """

    def __init__(
        self, num_classes: int, *, mixup_alpha: float, cutmix_alpha: float, seed: int
    ) -> None:
        self.num_classes = num_classes
        self.alphas = [
            (kind, a) for kind, a in (("mixup", mixup_alpha), ("cutmix", cutmix_alpha)) if a > 0
        ]
        self.rng = np.random.default_rng(seed)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if y.ndim == 1:
            y = functional.one_hot(y, self.num_classes).to(torch.float32)
        if not self.alphas or len(x) < 2:
            return x, y
        kind, alpha = self.alphas[self.rng.integers(len(self.alphas))]
        lam = float(self.rng.beta(alpha, alpha))
        perm = torch.from_numpy(self.rng.permutation(len(x))).to(x.device)
        if kind == "mixup":
            x = lam * x + (1.0 - lam) * x[perm]
        else:  # paste a box of area (1 - lam) from the partner image; lam = what is left
            height, width = int(x.shape[-2]), int(x.shape[-1])
            cut = math.sqrt(1.0 - lam)
            cy, cx = int(self.rng.integers(height)), int(self.rng.integers(width))
            y0, y1 = max(cy - round(height * cut / 2), 0), min(cy + round(height * cut / 2), height)
            x0, x1 = max(cx - round(width * cut / 2), 0), min(cx + round(width * cut / 2), width)
            x = x.clone()
            x[..., y0:y1, x0:x1] = x[perm][..., y0:y1, x0:x1]
            lam = 1.0 - (y1 - y0) * (x1 - x0) / (height * width)
        return x, lam * y + (1.0 - lam) * y[perm]
