"""Large line-scan frames of coated electrode with several known defects.

The frame reuses the tile texture and the tile defect painters: each defect is painted
into its own local window of the big canvas, so its truth box comes straight from the
mask it painted, and windows never overlap.
"""

from __future__ import annotations

import numpy as np

from cellinspect.datasets.synth.electrode import (
    ELECTRODE_CLASSES,
    electrode_texture,
    finish,
    sample_look,
)
from cellinspect.datasets.synth.electrode_defects import DEFECT_PAINTERS
from cellinspect.datasets.synth.texture import smooth_1d

FRAME_DEFECT_CLASSES: tuple[str, ...] = tuple(c for c in ELECTRODE_CLASSES if c != "ok")

_WINDOW = (96, 192)  # defect window side range, px: the scale of the 128 px tiles
_GAP = 16  # minimum spacing between windows, px


def _place_windows(
    rng: np.random.Generator, width: int, height: int, count: int
) -> list[tuple[int, int, int, int]]:
    """Non-overlapping (x, y, w, h) windows: one per randomly chosen cell of a grid.

    Grid cells are the largest window plus a gap, shrunk for small frames until there
    are enough of them; each window sits at a random offset inside its own cell.
    """
    for cell in range(_WINDOW[1] + _GAP, _WINDOW[0] + _GAP - 1, -8):
        cols, rows = width // cell, height // cell
        if cols * rows >= count:
            break
    else:
        raise ValueError(
            f"cannot place {count} non-overlapping defects in a {width}x{height} frame"
        )
    chosen = rng.choice(cols * rows, size=count, replace=False)
    windows = []
    for index in chosen:
        row, col = divmod(int(index), cols)
        side_w = int(rng.integers(_WINDOW[0], cell - _GAP + 1))
        side_h = int(rng.integers(_WINDOW[0], cell - _GAP + 1))
        x = col * cell + int(rng.integers(0, cell - _GAP - side_w + 1))
        y = row * cell + int(rng.integers(0, cell - _GAP - side_h + 1))
        windows.append((x, y, side_w, side_h))
    return windows


def _line_scan_gain(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Illumination of a line light: falls off toward the web edges, drifts slowly in time."""
    xs = np.linspace(-1.0, 1.0, width, dtype=np.float32)
    across = (
        1.0
        - np.float32(rng.uniform(0.04, 0.12)) * xs**2
        + np.float32(rng.uniform(-0.03, 0.03)) * xs
    )
    along = 1.0 + np.float32(rng.uniform(0.005, 0.02)) * smooth_1d(rng, height, 1500.0)
    return (along[:, None] * across[None, :]).astype(np.float32)


def frame_from_rng(
    rng: np.random.Generator, width: int, height: int, n_defects: int
) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """Frame, mask and truth boxes from a generator (see `generate_frame`)."""
    if width < _WINDOW[0] or height < _WINDOW[0]:
        raise ValueError(
            f"frame must be at least {_WINDOW[0]} px on each side, got {width}x{height}"
        )
    if n_defects < 0:
        raise ValueError(f"n_defects must be >= 0, got {n_defects}")
    look_rng, texture_rng, place_rng, defect_rng, noise_rng = rng.spawn(5)
    look = sample_look(look_rng)
    canvas = electrode_texture(texture_rng, (height, width), look)
    mask = np.zeros((height, width), np.uint8)
    truth: list[dict] = []
    windows = _place_windows(place_rng, width, height, n_defects)
    for (x, y, w, h), painter_rng in zip(windows, defect_rng.spawn(len(windows)), strict=True):
        label = FRAME_DEFECT_CLASSES[int(place_rng.integers(len(FRAME_DEFECT_CLASSES)))]
        local = np.zeros((h, w), np.uint8)
        DEFECT_PAINTERS[label](canvas[y : y + h, x : x + w], local, painter_rng, look)
        ys, xs = np.nonzero(local)
        mask[y : y + h, x : x + w] |= local
        x0, y0 = int(xs.min()), int(ys.min())
        truth.append(
            {
                "label": label,
                "x": x + x0,
                "y": y + y0,
                "w": int(xs.max()) - x0 + 1,
                "h": int(ys.max()) - y0 + 1,
            }
        )
    image = finish(noise_rng, canvas, look, _line_scan_gain(noise_rng, width, height))
    return image, mask, truth


def generate_frame(
    seed: int, width: int = 2048, height: int = 8192, n_defects: int = 6
) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """One gray line-scan frame: (image HxW uint8, mask HxW uint8, truth boxes).

    Truth is a list of {label, x, y, w, h} in pixels, one per defect. The frame equals
    frame 0 of `write_synthetic(SynthKind.FRAME, ..., seed=seed)`.
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0, 0]))
    return frame_from_rng(rng, width, height, n_defects)
