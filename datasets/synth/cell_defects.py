"""Cell defect painters, in two stages around the shading of `cell.py`.

Geometry defects (dent, cap damage) run before shading: they bend the surface height or
cut the silhouette, and the lighting model turns that into shadow and highlight. Surface
marks (scratch, corrosion) run after shading and paint over the lit colours.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import cv2
import numpy as np

from cellinspect.datasets.synth.texture import (
    alpha_to_mask,
    polyline_alpha,
    smooth_1d,
    smooth_noise,
)

if TYPE_CHECKING:
    from cellinspect.datasets.synth.cell import CellScene

PrePainter = Callable[["CellScene", np.ndarray, np.random.Generator], None]
PostPainter = Callable[["CellScene", np.ndarray, np.ndarray, np.random.Generator], None]

_RUST = np.array([[205, 115, 45], [150, 75, 30], [95, 55, 30]], np.float32)


def _merge(mask: np.ndarray, new: np.ndarray) -> None:
    np.maximum(mask, new, out=mask)


def _on_body(
    scene: CellScene, rng: np.random.Generator, margin_s: float, margin_v: float
) -> tuple[float, float]:
    """Random (s, v) on the plain can body, clear of the crimp and the far end."""
    s0 = float(rng.uniform(scene.body_start + margin_s, scene.length - margin_s))
    v0 = float(rng.uniform(-1, 1)) * max(scene.radius - margin_v, 1.0)
    return s0, v0


def _ellipse_bump(
    scene: CellScene, s0: float, v0: float, a: float, b: float, turn: float
) -> np.ndarray:
    """exp(-r^2) bump of semi-axes a (along the axis) and b, rotated by `turn`."""
    ds, dv = scene.s - s0, scene.v - v0
    p = ds * np.cos(turn) + dv * np.sin(turn)
    q = -ds * np.sin(turn) + dv * np.cos(turn)
    return np.exp(-2.0 * ((p / a) ** 2 + (q / b) ** 2)).astype(np.float32)


def dent(scene: CellScene, mask: np.ndarray, rng: np.random.Generator) -> None:
    """Local elliptical depression: bends the normals, so the highlight bulges around it."""
    a, b = float(rng.uniform(5, 14)), float(rng.uniform(4, 10))
    s0, v0 = _on_body(scene, rng, a + 4, 0.4 * scene.radius)
    shape = _ellipse_bump(scene, s0, v0, a, b, float(rng.uniform(-0.5, 0.5)))
    depth = float(rng.uniform(0.5, 1.1)) * min(a, b)
    scene.bump -= depth * shape
    _merge(mask, alpha_to_mask(shape, 0.3))


def cap_damage(scene: CellScene, mask: np.ndarray, rng: np.random.Generator) -> None:
    """Notch cut into the crimp edge, a crushed crimp, or a missing piece exposing the gasket."""
    side = 1.0 if rng.random() < 0.5 else -1.0
    can = (
        (np.abs(scene.v) < scene.local_radius() - 0.5) & (scene.s > 0.5) & (scene.s < scene.length)
    )
    kind = int(rng.integers(3))
    if kind == 0:
        # Sharp notch in the crimp edge; the torn metal rim catches the light.
        s0 = float(rng.uniform(0, scene.lip + 0.5 * scene.groove))
        half = float(rng.uniform(4, 8))
        depth = float(rng.uniform(4, 9))
        jag = 1.0 + 0.25 * smooth_noise(rng, scene.s.shape, 2.0)
        profile = depth * jag * np.clip(1 - np.abs(scene.s - s0) / half, 0, 1) ** 0.7
        cut = np.clip(side * scene.v - (scene.local_radius() - profile) + 0.5, 0, 1)
        cut = np.where(profile > 0.3, cut, 0).astype(np.float32)
        np.maximum(scene.cut, cut, out=scene.cut)
        rim = np.clip(cv2.dilate(cut, np.ones((5, 5), np.uint8)) - cut, 0, 1) * can
        scene.overlays.append((0.8 * rim.astype(np.float32), np.array([240, 240, 235], np.float32)))
        _merge(mask, alpha_to_mask(np.maximum(cut, rim) * can, 0.5))
    elif kind == 1:
        # Crushed crimp: the outline is pushed in smoothly and the metal folds into shadow.
        s0 = float(rng.uniform(0.2, 0.8)) * (scene.lip + scene.groove)
        half = float(rng.uniform(5, 10))
        depth = float(rng.uniform(4.0, 7.0))
        profile = depth * np.clip(1 - ((scene.s - s0) / half) ** 2, 0, 1)
        cut = np.clip(side * scene.v - (scene.local_radius() - profile) + 0.5, 0, 1)
        cut = np.where(profile > 0.2, cut, 0).astype(np.float32)
        np.maximum(scene.cut, cut, out=scene.cut)
        v0 = side * (scene.radius - depth - 2)
        a, b = half * 0.7, float(rng.uniform(5, 9))
        shape = _ellipse_bump(scene, s0, v0, a, b, 0.0)
        scene.bump -= float(rng.uniform(1.0, 1.6)) * a * shape
        scene.overlays.append((0.75 * shape, np.array([35, 35, 38], np.float32)))
        crease = np.clip(cv2.dilate(cut, np.ones((3, 3), np.uint8)) - cut, 0, 1) * can
        scene.overlays.append(
            (0.7 * crease.astype(np.float32), np.array([235, 235, 230], np.float32))
        )
        _merge(mask, alpha_to_mask(np.maximum(np.maximum(shape, cut), crease) * can, 0.35))
    else:
        v0 = side * float(rng.uniform(0.0, 0.7)) * scene.radius
        half = float(rng.uniform(5, 12))
        reach = (
            scene.lip * float(rng.uniform(0.7, 1.2))
            + 1.5 * smooth_1d(rng, scene.s.shape[0], 3.0)[:, None]
        )
        inside = np.clip(half - np.abs(scene.v - v0) + 0.5, 0, 1) * np.clip(
            reach - scene.s + 0.5, 0, 1
        )
        inside = (inside * can).astype(np.float32)
        gasket = np.float32(rng.uniform(20, 45)) * np.array([1.0, 0.95, 0.9], np.float32)
        scene.overlays.append((inside, gasket))
        _merge(mask, alpha_to_mask(inside, 0.5))


def _to_image(scene: CellScene, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Cell coordinates (s, v) -> image points (x, y)."""
    u = scene.cap_sign * (scene.length / 2 - s)
    c, k = np.cos(scene.angle), np.sin(scene.angle)
    return np.stack([scene.cx + u * c - v * k, scene.cy + u * k + v * c], axis=-1)


def scratch(scene: CellScene, rgb: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> None:
    """Thin line on the can: bright on the dark flanks, dark across the specular band."""
    length = float(rng.uniform(20, 80))
    turn = rng.uniform(-0.45, 0.45) if rng.random() < 0.7 else rng.uniform(0, np.pi)
    s0, v0 = _on_body(scene, rng, 6, 0.25 * scene.radius)
    t = np.linspace(-0.5, 0.5, 16)
    bend = rng.uniform(-0.05, 0.05) * length * (1 - 4 * t**2)
    s = s0 + t * length * np.cos(turn) - bend * np.sin(turn)
    v = v0 + t * length * np.sin(turn) + bend * np.cos(turn)
    body = (scene.alpha > 0.99) & (scene.s > scene.body_start)
    alpha = (
        polyline_alpha(scene.s.shape, _to_image(scene, s, v), float(rng.uniform(1.0, 2.0))) * body
    )
    lum = np.minimum(rgb, 255).mean(axis=-1, keepdims=True)
    # Radiance in the specular band exceeds 255 before clipping: darken from the clipped value.
    target = np.where(lum > 165, np.minimum(rgb, 255) * 0.4, np.float32(245))
    rgb += (alpha * np.float32(rng.uniform(0.6, 0.95)))[..., None] * (target - rgb)
    _merge(mask, alpha_to_mask(alpha, 0.3, dilate=1) * body)


def corrosion(
    scene: CellScene, rgb: np.ndarray, mask: np.ndarray, rng: np.random.Generator
) -> None:
    """Brown-orange mottled blotches with ragged edges and dark pits."""
    shape = scene.s.shape
    body = np.clip(scene.alpha * 2 - 1, 0, 1)
    total = np.zeros(shape, np.float32)
    s0, v0 = _on_body(scene, rng, 18, 0.3 * scene.radius)
    for _ in range(int(rng.integers(1, 4))):
        radius = float(rng.uniform(7, 18))
        ds, dv = rng.uniform(-12, 12, 2)
        dist = np.hypot(scene.s - s0 - ds, scene.v - v0 - dv) / radius
        ragged = 1.0 - dist + 0.4 * smooth_noise(rng, shape, float(rng.uniform(2.5, 5.0)))
        np.maximum(total, np.clip((ragged - 0.35) * 3, 0, 1), out=total)
    alpha = total * body
    mottle = np.clip(0.5 + 0.45 * smooth_noise(rng, shape, 2.5), 0, 1)[..., None]
    light = np.clip(rgb.mean(axis=-1, keepdims=True) / 180, 0.6, 1.2)
    rust = (_RUST[0] * (1 - mottle) + _RUST[1] * mottle) * (0.55 + 0.45 * light)
    pits = (smooth_noise(rng, shape, 1.5) > 1.6)[..., None]
    rust = np.where(pits, _RUST[2] * 0.6, rust)
    rgb += alpha[..., None] * np.float32(rng.uniform(0.75, 1.0)) * (rust - rgb)
    _merge(mask, alpha_to_mask(alpha, 0.5))


PRE_SHADING: dict[str, PrePainter] = {"dent": dent, "cap_damage": cap_damage}
POST_SHADING: dict[str, PostPainter] = {"scratch": scratch, "corrosion": corrosion}
