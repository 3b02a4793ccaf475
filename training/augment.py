"""Augmentation presets (albumentations) for inspection images.

They operate on the output of the preprocessing contract's `prepare()` (float32 HxWxC in
[0, 1] at input size), so the geometry and the value range are the ones the model sees
at inference; `normalize()` runs after them. Which flips are allowed depends on what
the defect classes mean: an electrode's coating direction is vertical, so a 90° turn
would turn an uncoated streak into something that never occurs on the line.
"""

from __future__ import annotations

from enum import StrEnum

import albumentations as A


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
    the draws repeatable. Loader workers reseed their copy (`reseed_worker_augmentation`).
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
