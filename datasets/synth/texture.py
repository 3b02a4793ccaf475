"""Shared noise, texture and shape-rasterising helpers for the synthetic generators.

Everything works on float32 arrays and is vectorised: multi-scale texture comes from
low-resolution noise enlarged with `cv2.resize`, never from per-pixel Python loops, so
the same helpers serve a 128 px tile and a 2048x8192 line-scan frame.
"""

from __future__ import annotations

import cv2
import numpy as np

# Rasterise thin lines and small polygons at this factor, then shrink with INTER_AREA:
# that gives sub-pixel widths (1.5 px scratches) and anti-aliased edges for free.
_SUPERSAMPLE = 4


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], scale: float) -> np.ndarray:
    """Zero-mean, unit-std noise whose features are about `scale` pixels across."""
    h, w = shape
    out: np.ndarray
    if scale <= 1.0:
        out = rng.standard_normal((h, w), dtype=np.float32)
    else:
        low = rng.standard_normal(
            (max(2, round(h / scale) + 1), max(2, round(w / scale) + 1)), dtype=np.float32
        )
        out = cv2.resize(low, (w, h), interpolation=cv2.INTER_CUBIC)
    return _standardise(out)


def _standardise(noise: np.ndarray) -> np.ndarray:
    """In place: zero mean, unit std. Large fields use strided statistics (4x faster)."""
    sample = noise[::4, ::4] if noise.size > 65536 else noise
    mean, std = float(sample.mean()), float(sample.std())
    noise -= np.float32(mean)
    noise *= np.float32(1.0 / (std if std > 1e-6 else 1.0))
    return noise


def granular(
    rng: np.random.Generator,
    shape: tuple[int, int],
    scales: tuple[float, ...],
    weights: tuple[float, ...],
    blur: float = 0.0,
) -> np.ndarray:
    """Sum of smooth noise at several feature sizes (unit-ish std), optionally blurred."""
    out: np.ndarray = np.zeros(shape, np.float32)
    for scale, weight in zip(scales, weights, strict=True):
        out += np.float32(weight) * smooth_noise(rng, shape, scale)
    if blur > 0:
        out = cv2.GaussianBlur(out, (0, 0), blur)
    return out


def column_streaks(
    rng: np.random.Generator, shape: tuple[int, int], across: float, along: float
) -> np.ndarray:
    """Unit-std noise stretched vertically: the coating direction of the electrode."""
    h, w = shape
    lh = max(2, round(h / along) + 2)
    lw = max(2, round(w / across) + 2)
    low = rng.standard_normal((lh, lw), dtype=np.float32)
    return _standardise(cv2.resize(low, (w, h), interpolation=cv2.INTER_CUBIC))


def smooth_1d(rng: np.random.Generator, n: int, scale: float) -> np.ndarray:
    """Zero-mean, unit-std 1D noise of length n with features about `scale` samples long."""
    return smooth_noise(rng, (n, 1), scale)[:, 0] if n > 1 else np.zeros(n, np.float32)


def illumination_plane(
    rng: np.random.Generator, shape: tuple[int, int], strength: float
) -> np.ndarray:
    """Multiplicative gain map: a random linear gradient plus a gentle vignette."""
    h, w = shape
    yy = np.linspace(-1.0, 1.0, h, dtype=np.float32)[:, None]
    xx = np.linspace(-1.0, 1.0, w, dtype=np.float32)[None, :]
    angle = rng.uniform(0, 2 * np.pi)
    slope = rng.uniform(0.3, 1.0) * strength
    gain = 1.0 + slope * (np.cos(angle) * xx + np.sin(angle) * yy)
    gain = gain - rng.uniform(0.0, 0.5) * strength * (xx**2 + yy**2)
    return gain.astype(np.float32)


def add_sensor_noise(
    rng: np.random.Generator, image: np.ndarray, sigma: float, shot: float
) -> np.ndarray:
    """Gaussian read noise plus signal-dependent shot noise (its Gaussian approximation).

    One normal draw per pixel serves both terms, which keeps a full frame fast.
    """
    std = np.maximum(image, 0.0) * np.float32(shot)
    std += np.float32(sigma**2)
    np.sqrt(std, out=std)
    std *= rng.standard_normal(image.shape, dtype=np.float32)
    std += image
    return std


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Round and clip float pixels to uint8."""
    return np.clip(image + 0.5, 0, 255).astype(np.uint8)


def blend(canvas: np.ndarray, alpha: np.ndarray, value: np.ndarray | float) -> None:
    """In place: canvas <- canvas + alpha * (value - canvas); alpha broadcasts over colour."""
    if canvas.ndim == 3 and alpha.ndim == 2:
        alpha = alpha[:, :, None]
    canvas += alpha * (value - canvas)


def soft_disc(
    shape: tuple[int, int], cx: float, cy: float, radius: float, edge: float = 1.0
) -> np.ndarray:
    """Alpha in [0, 1] of a disc with a linear edge ramp `edge` pixels wide."""
    h, w = shape
    yy, xx = np.ogrid[:h, :w]
    dist = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2, dtype=np.float32)
    return np.clip((radius - dist) / max(edge, 1e-3) + 0.5, 0.0, 1.0).astype(np.float32)


def polyline_alpha(shape: tuple[int, int], points: np.ndarray, width: float) -> np.ndarray:
    """Anti-aliased alpha of an open polyline (N x 2 array of x, y) of fractional width."""
    h, w = shape
    s = _SUPERSAMPLE
    big = np.zeros((h * s, w * s), np.uint8)
    pts = np.round((np.asarray(points, np.float64) + 0.5) * s - 0.5).astype(np.int32)
    thickness = max(1, round(width * s))
    cv2.polylines(big, [pts.reshape(-1, 1, 2)], False, 255, thickness, cv2.LINE_8)
    return cv2.resize(big, (w, h), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0


def polygon_alpha(shape: tuple[int, int], points: np.ndarray) -> np.ndarray:
    """Anti-aliased alpha of a filled polygon (N x 2 array of x, y)."""
    h, w = shape
    s = _SUPERSAMPLE
    big = np.zeros((h * s, w * s), np.uint8)
    pts = np.round((np.asarray(points, np.float64) + 0.5) * s - 0.5).astype(np.int32)
    cv2.fillPoly(big, [pts.reshape(-1, 1, 2)], 255, cv2.LINE_8)
    return cv2.resize(big, (w, h), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0


def alpha_to_mask(alpha: np.ndarray, threshold: float = 0.3, dilate: int = 0) -> np.ndarray:
    """Binary 0/255 uint8 mask of alpha above threshold, optionally dilated by `dilate` px."""
    mask: np.ndarray = np.where(alpha > threshold, 255, 0).astype(np.uint8)
    if dilate > 0:
        kernel = np.ones((2 * dilate + 1, 2 * dilate + 1), np.uint8)
        mask = cv2.dilate(mask, kernel)
    return mask
