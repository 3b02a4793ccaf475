"""Synthetic cracks painted onto real electroluminescence (EL) cell images.

EL images show a cell's active area bright and cracks dark: thin, mostly straight lines
that start at an edge (busbar stress, handling) and, when a crack isolates part of the
cell, a darker inactive region beside it. Painting such cracks onto images of functional
cells gives the fit loop extra defect examples on the very backgrounds (grain, busbars,
fingers, illumination) that real defects appear on; see `training.data.CrackPaintingDataset`
and `synth_cracks` in the training config. On ELPV, 30% of the functional training images
cracked this way lifted a from-scratch net's validation ROC-AUC from 0.870 to 0.899, and
the recipe built on it reaches 0.863 / 0.851 test accuracy on two seeds against 0.790
(benchmarks/RESULTS.md, "ELPV, sessions 11 and 12").

Hand-written because no augmentation library paints defects: albumentations changes how an
image looks, not what it shows.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from cellinspect.datasets.synth.texture import polygon_alpha, polyline_alpha


def crack_path(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A polyline (N x 2 array of x, y) from a random edge point inwards: steps of 1/40 of
    the image, a slow wander with a rare kink, 30-130% of the image long, cut at the border."""
    side, t = int(rng.integers(4)), float(rng.uniform(0.1, 0.9))
    x, y = [
        (t * width, 0.0),
        (width - 1.0, t * height),
        (t * width, height - 1.0),
        (0.0, t * height),
    ][side]
    heading = [math.pi / 2, math.pi, -math.pi / 2, 0.0][side] + float(rng.uniform(-0.9, 0.9))
    step = max(height, width) / 40
    points = [(x, y)]
    for _ in range(int(rng.uniform(0.3, 1.3) * 40)):
        heading += float(rng.normal(0, 0.04))
        if rng.random() < 0.05:
            heading += float(rng.uniform(-0.7, 0.7))
        x, y = x + step * math.cos(heading), y + step * math.sin(heading)
        if not (0 <= x < width and 0 <= y < height):
            break
        points.append((x, y))
    return np.array(points, np.float32)


def paint_el_cracks(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A copy of `image` (H x W x C float in [0, 1], C = 1 or 3) with one or two dark cracks.

    Each crack darkens its line by 20-55%. About a third of them also darken, by 20-65%,
    the region between the crack and the chord joining its ends when that region covers
    2-50% of the image: a simple stand-in for a part of the cell that the crack isolated.
    """
    if image.ndim != 3 or image.shape[2] not in (1, 3):
        raise ValueError(f"expected an H x W x 1 or H x W x 3 image, got shape {image.shape}")
    h, w = image.shape[:2]
    gain = np.ones((h, w), np.float32)
    lines = np.zeros((h, w), np.float32)
    for _ in range(int(rng.integers(1, 3))):
        path = crack_path(rng, h, w)
        if len(path) < 3:  # started towards a nearby border and left at once
            continue
        np.maximum(
            lines, polyline_alpha((h, w), path, float(rng.choice([1.0, 1.0, 2.0]))), out=lines
        )
        if rng.random() < 0.35:
            region = polygon_alpha((h, w), np.concatenate([path, path[:1]]))
            if 0.02 < region.mean() < 0.5:
                soft = cv2.GaussianBlur(region, (0, 0), 1.0)
                gain *= 1 - soft * float(rng.uniform(0.2, 0.65))
    lines = np.asarray(cv2.GaussianBlur(lines, (0, 0), float(rng.uniform(0.3, 0.7))), np.float32)
    gain *= 1 - float(rng.uniform(0.2, 0.55)) * np.clip(lines, 0, 1)
    return np.clip(image * gain[:, :, None], 0, 1).astype(np.float32)
