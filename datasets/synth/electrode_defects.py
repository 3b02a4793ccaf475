"""Electrode defect painters: each paints one defect somewhere inside the window it is given.

A painter takes a float32 canvas window (a view, painted in place), the matching uint8
mask window (defect pixels set to 255) and its own generator. Tiles pass the whole tile,
line-scan frames pass a local window of the large canvas, so both share this logic.
Contrasts are absolute gray levels chosen to stay well above the sensor noise
(sigma <= ~4.5 levels at the brightest foil) even for the subtle draws.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import cv2
import numpy as np

from cellinspect.datasets.synth.texture import (
    alpha_to_mask,
    blend,
    granular,
    polygon_alpha,
    polyline_alpha,
    smooth_1d,
    smooth_noise,
    soft_disc,
)

if TYPE_CHECKING:
    from cellinspect.datasets.synth.electrode import ElectrodeLook

Painter = Callable[[np.ndarray, np.ndarray, np.random.Generator, "ElectrodeLook"], None]


def _centre(rng: np.random.Generator, shape: tuple[int, int], margin: float) -> tuple[float, float]:
    """Random (x, y) at least `margin` px inside the window (or its middle if too small)."""
    h, w = shape
    mx, my = min(margin, (w - 1) / 2), min(margin, (h - 1) / 2)
    return float(rng.uniform(mx, w - 1 - mx)), float(rng.uniform(my, h - 1 - my))


def _merge(mask: np.ndarray, new: np.ndarray) -> None:
    np.maximum(mask, new, out=mask)


def _grid(shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    h, w = shape
    yy, xx = np.mgrid[:h, :w]
    return xx.astype(np.float32), yy.astype(np.float32)


def paint_pinhole(
    canvas: np.ndarray, mask: np.ndarray, rng: np.random.Generator, look: ElectrodeLook
) -> None:
    """Small round bright spot where bare foil shows through the coating."""
    shape = canvas.shape
    radius = float(rng.uniform(1.5, 4.0))
    cx, cy = _centre(rng, shape, radius + 4)
    alpha = soft_disc(shape, cx, cy, radius, edge=float(rng.uniform(0.8, 1.6)))
    if rng.random() < 0.5:
        # Many pinholes sit in a small crater whose rim reads slightly darker.
        rim = np.clip(soft_disc(shape, cx, cy, radius + 1.5, 1.2) - alpha, 0, 1)
        canvas -= rim * np.float32(rng.uniform(5, 14))
    blend(canvas, alpha * np.float32(rng.uniform(0.5, 1.0)), look.foil)
    _merge(mask, alpha_to_mask(alpha, 0.3))


def paint_agglomerate(
    canvas: np.ndarray, mask: np.ndarray, rng: np.random.Generator, look: ElectrodeLook
) -> None:
    """Raised irregular clump with its own coarse grain, lit from one side."""
    shape = canvas.shape
    radius = float(rng.uniform(5.0, 14.0))
    cx, cy = _centre(rng, shape, radius * 1.4 + 2)
    xx, yy = _grid(shape)
    dx, dy = xx - cx, yy - cy
    theta = np.arctan2(dy, dx)
    outline = np.ones_like(theta)
    for k in range(2, 6):
        outline += np.float32(rng.uniform(0, 0.3) / k * 1.5) * np.cos(
            k * theta + rng.uniform(0, 2 * np.pi)
        )
    rho = np.sqrt(dx**2 + dy**2) / (radius * outline)
    alpha = np.clip((1.0 - rho) * radius / 1.5 + 0.5, 0, 1).astype(np.float32)
    dome = (np.clip(1.0 - rho**2, 0, None) ** 0.7 * np.float32(radius * 0.6)).astype(np.float32)
    height = cv2.GaussianBlur(dome, (0, 0), 1.0)
    gy, gx = np.gradient(height)
    light = rng.uniform(0, 2 * np.pi)
    lx, ly = np.cos(light), np.sin(light)
    shade = -(gx * lx + gy * ly) * np.float32(rng.uniform(12, 24))
    texture = granular(rng, shape, (1.5, 3.5), (0.7, 0.5)) * np.float32(look.grain * 1.8)
    offset = np.float32(rng.uniform(-10, 18))
    canvas += alpha * (texture + offset) + shade
    # Cast shadow on the side away from the light.
    shift = radius * 0.35
    m = np.array([[1, 0, -lx * shift], [0, 1, -ly * shift]], np.float32)
    cast = cv2.warpAffine(alpha, m, (shape[1], shape[0]))
    canvas -= np.clip(cast - alpha, 0, 1) * np.float32(rng.uniform(8, 20))
    _merge(mask, alpha_to_mask(alpha, 0.5))


def paint_scratch(
    canvas: np.ndarray, mask: np.ndarray, rng: np.random.Generator, look: ElectrodeLook
) -> None:
    """Thin, long, nearly straight line at any angle, bright where the tool bared the foil.

    Always brighter than the coating: a dark thin line on an electrode is a crack, and the
    classes must stay separable by what an inspector would call them.
    """
    shape = canvas.shape
    h, w = shape
    length = float(rng.uniform(0.35, 0.7)) * min(h, w)
    angle = rng.uniform(0, np.pi)
    direction = np.array([np.cos(angle), np.sin(angle)])
    normal = np.array([-direction[1], direction[0]])
    centre = np.array([rng.uniform(0.3, 0.7) * w, rng.uniform(0.3, 0.7) * h])
    t = np.linspace(0.0, 1.0, max(8, int(length / 3)))[:, None]
    bend = rng.uniform(-0.08, 0.08) * length
    pts = centre + (t - 0.5) * length * direction + normal * bend * 4 * t * (1 - t)
    alpha = polyline_alpha(shape, pts, float(rng.uniform(1.0, 2.5)))
    # The tool presses unevenly, so intensity varies along the line.
    alpha_vis = alpha * (0.75 + 0.25 * np.tanh(smooth_noise(rng, shape, 12.0)))
    value = look.foil
    strength = rng.uniform(0.5, 1.0)
    blend(canvas, alpha_vis * np.float32(strength), value)
    _merge(mask, alpha_to_mask(alpha, 0.3, dilate=1))


def _walk(
    rng: np.random.Generator, start: np.ndarray, heading: float, steps: int, step: float
) -> np.ndarray:
    """Jagged random walk that keeps returning toward `heading` (a crack's main direction)."""
    pts = [start]
    angle = heading
    for _ in range(steps):
        angle = heading + 0.5 * (angle - heading) + rng.normal(0, 0.5)
        pts.append(pts[-1] + step * np.array([np.cos(angle), np.sin(angle)]))
    return np.array(pts)


def paint_crack(
    canvas: np.ndarray, mask: np.ndarray, rng: np.random.Generator, look: ElectrodeLook
) -> None:
    """Jagged dark line with a few short branches (dried-coating crack)."""
    shape = canvas.shape
    h, w = shape
    step = float(rng.uniform(1.5, 2.5))
    length = float(rng.uniform(0.35, 0.75)) * min(h, w)
    heading = rng.uniform(0, 2 * np.pi)
    centre = np.array([rng.uniform(0.3, 0.7) * w, rng.uniform(0.3, 0.7) * h])
    start = centre - 0.5 * length * np.array([np.cos(heading), np.sin(heading)])
    main = _walk(rng, start, heading, max(6, int(length / step)), step)
    width = float(rng.uniform(1.0, 2.0))
    alpha = polyline_alpha(shape, main, width)
    for _ in range(int(rng.integers(1, 4))):
        at = main[int(rng.integers(2, len(main) - 2))]
        branch_heading = heading + rng.choice([-1, 1]) * rng.uniform(0.5, 1.2)
        branch = _walk(rng, at, branch_heading, int(rng.integers(3, 8)), step)
        np.maximum(alpha, polyline_alpha(shape, branch, max(1.0, width * 0.7)), out=alpha)
    blend(canvas, alpha * np.float32(rng.uniform(0.75, 1.0)), look.base * rng.uniform(0.15, 0.45))
    _merge(mask, alpha_to_mask(alpha, 0.3, dilate=1))


def paint_uncoated_streak(
    canvas: np.ndarray, mask: np.ndarray, rng: np.random.Generator, look: ElectrodeLook
) -> None:
    """Vertical band of bare foil along the coating direction, its width wandering slowly."""
    shape = canvas.shape
    h, w = shape
    width = float(rng.uniform(3.5, 10.0))
    x0 = float(rng.uniform(width + 4, w - width - 4))
    ys = np.arange(h, dtype=np.float32)
    widths = width * np.clip(1.0 + 0.2 * smooth_1d(rng, h, 40.0), 0.6, 1.5)
    centres = x0 + 0.8 * smooth_1d(rng, h, 64.0)
    dist = np.abs(np.arange(w, dtype=np.float32)[None, :] - centres[:, None])
    across = np.clip((widths[:, None] / 2 - dist) / rng.uniform(0.7, 1.5) + 0.5, 0, 1)
    span = float(rng.uniform(0.85, 1.2)) * h
    if span >= h:
        y0, y1 = -10.0, h + 10.0  # runs through the whole window
    else:
        y0 = float(rng.uniform(0, h - span))
        y1 = y0 + span
    along = np.clip((ys - y0) / 4, 0, 1) * np.clip((y1 - ys) / 4, 0, 1)
    alpha = (across * along[:, None]).astype(np.float32)
    # The blade leaves a thin, uneven film, so the foil is not perfectly clean.
    value = look.foil - rng.uniform(0, 25) + 5 * smooth_noise(rng, shape, 2.0)
    blend(canvas, alpha * np.float32(rng.uniform(0.55, 1.0)), value)
    _merge(mask, alpha_to_mask(alpha, 0.3))


def paint_foreign_particle(
    canvas: np.ndarray, mask: np.ndarray, rng: np.random.Generator, look: ElectrodeLook
) -> None:
    """Small sharp-edged dark polygon (metal or dirt particle), sometimes with a tiny glint.

    Dark on the coating, where a pinhole is bright foil: the two differ the way an
    inspector tells them apart, not only by shape at a few pixels.
    """
    shape = canvas.shape
    radius = float(rng.uniform(2.8, 5.5))
    cx, cy = _centre(rng, shape, radius + 4)
    n = int(rng.integers(4, 8))
    angles = (np.arange(n) + rng.uniform(-0.3, 0.3, n)) * 2 * np.pi / n + rng.uniform(0, 2 * np.pi)
    radii = radius * rng.uniform(0.75, 1.0, n)
    pts = np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], axis=1)
    alpha = polygon_alpha(shape, pts)
    blend(canvas, alpha, float(rng.uniform(5, 30)))
    if rng.random() < 0.4:
        facet = rng.uniform(0, 2 * np.pi)
        gx = cx + 0.4 * radius * np.cos(facet)
        gy = cy + 0.4 * radius * np.sin(facet)
        glint = soft_disc(shape, gx, gy, float(rng.uniform(0.5, 0.9)), 0.6) * alpha
        blend(canvas, glint * np.float32(rng.uniform(0.4, 0.8)), 230.0)
    _merge(mask, alpha_to_mask(alpha, 0.3))


def paint_wrinkle(
    canvas: np.ndarray, mask: np.ndarray, rng: np.random.Generator, look: ElectrodeLook
) -> None:
    """A smooth ridge across the coating direction, seen as a highlight/shadow pair."""
    shape = canvas.shape
    h, w = shape
    ridge_width = float(rng.uniform(6.0, 16.0))
    phi = np.deg2rad(rng.uniform(-40, 40))  # from horizontal: across the vertical coating
    px, py = rng.uniform(0.3, 0.7) * w, rng.uniform(0.25, 0.75) * h
    xx, yy = _grid(shape)
    along = (xx - px) * np.cos(phi) + (yy - py) * np.sin(phi)
    across = -(xx - px) * np.sin(phi) + (yy - py) * np.cos(phi)
    # Gently curved rather than ruler-straight.
    period = rng.uniform(1.5, 4.0) * max(h, w)
    across = across - rng.uniform(0, 4) * np.sin(
        2 * np.pi * along / period + rng.uniform(0, 2 * np.pi)
    )
    inside = np.abs(across) < ridge_width / 2
    phase = 2 * np.pi * across / ridge_width
    amplitude = np.float32(rng.uniform(16, 36) * rng.choice([-1, 1]))
    varying = 0.75 + 0.25 * np.tanh(smooth_noise(rng, shape, 24.0))
    # sin is the derivative of the cosine bump: light from one side of the ridge.
    shade = amplitude * np.sin(phase) * varying + np.float32(rng.uniform(-5, 5)) * (
        1 + np.cos(phase)
    )
    canvas += np.where(inside, shade, 0).astype(np.float32)
    _merge(mask, np.where(inside, 255, 0).astype(np.uint8))


DEFECT_PAINTERS: dict[str, Painter] = {
    "pinhole": paint_pinhole,
    "agglomerate": paint_agglomerate,
    "scratch": paint_scratch,
    "crack": paint_crack,
    "uncoated_streak": paint_uncoated_streak,
    "foreign_particle": paint_foreign_particle,
    "wrinkle": paint_wrinkle,
}
