"""Top-view tiles of coated electrode foil: background look, texture and tile assembly.

The coating runs vertically (down the image), as a line-scan camera over the coater
sees it. Defect painters live in `electrode_defects`; this module builds the defect-free
surface they paint on and finishes it with illumination and sensor noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cellinspect.datasets.synth.electrode_defects import DEFECT_PAINTERS
from cellinspect.datasets.synth.texture import (
    add_sensor_noise,
    column_streaks,
    granular,
    illumination_plane,
    smooth_noise,
    to_uint8,
)

ELECTRODE_CLASSES: tuple[str, ...] = (
    "ok",
    "pinhole",
    "agglomerate",
    "scratch",
    "crack",
    "uncoated_streak",
    "foreign_particle",
    "wrinkle",
)


@dataclass(frozen=True)
class ElectrodeLook:
    """Gray levels and texture strengths of one electrode type under one camera setting."""

    kind: str  # "anode" (graphite) or "cathode" (NMC)
    base: float  # mean coating gray level
    foil: float  # gray level of bare current-collector foil (Cu or Al), always brighter
    grain: float  # amplitude of the granular coating texture
    streak: float  # amplitude of the coating-direction streaks
    noise_sigma: float  # Gaussian read noise, gray levels
    shot: float  # shot-noise variance per gray level


def sample_look(rng: np.random.Generator) -> ElectrodeLook:
    """Pick anode or cathode and jitter its levels, as lots and exposure settings vary."""
    noise_sigma = float(rng.uniform(1.5, 3.0))
    shot = float(rng.uniform(0.01, 0.035))
    if rng.random() < 0.5:
        return ElectrodeLook(
            kind="anode",
            base=float(rng.uniform(95, 125)),
            foil=float(rng.uniform(190, 228)),
            grain=float(rng.uniform(7.0, 11.0)),
            streak=float(rng.uniform(2.0, 4.0)),
            noise_sigma=noise_sigma,
            shot=shot,
        )
    return ElectrodeLook(
        kind="cathode",
        base=float(rng.uniform(55, 80)),
        foil=float(rng.uniform(195, 235)),
        grain=float(rng.uniform(4.0, 6.5)),
        streak=float(rng.uniform(1.5, 3.0)),
        noise_sigma=noise_sigma,
        shot=shot,
    )


def electrode_texture(
    rng: np.random.Generator, shape: tuple[int, int], look: ElectrodeLook
) -> np.ndarray:
    """Defect-free coating surface as float32 gray levels (before illumination and noise)."""
    if look.kind == "anode":
        # Graphite: coarser grains, saturated so that they read as flat flakes.
        grain = granular(rng, shape, (1.5, 4.0, 10.0), (0.6, 0.6, 0.35))
        grain *= np.float32(1.6)
        np.tanh(grain, out=grain)
    else:
        # NMC: fine, dense particles.
        grain = granular(rng, shape, (1.0, 2.5, 8.0), (0.8, 0.4, 0.25), blur=0.6)
    along = float(rng.uniform(48.0, 160.0))
    streaks = column_streaks(rng, shape, across=float(rng.uniform(2.0, 4.0)), along=along)
    # Coat weight drifts slowly across the web.
    weight = smooth_noise(rng, shape, float(rng.uniform(48.0, 96.0)))
    # In place throughout: a full frame is 16M pixels per temporary.
    canvas = grain
    canvas *= np.float32(look.grain)
    canvas += np.float32(look.base)
    streaks *= np.float32(look.streak)
    canvas += streaks
    weight *= np.float32(rng.uniform(1.0, 3.0))
    canvas += weight
    return canvas


def finish(
    rng: np.random.Generator, canvas: np.ndarray, look: ElectrodeLook, gain: np.ndarray | None
) -> np.ndarray:
    """Apply illumination and sensor noise, return uint8."""
    if gain is not None:
        canvas = canvas * gain
    return to_uint8(add_sensor_noise(rng, canvas, look.noise_sigma, look.shot))


def class_index(label: str, classes: tuple[str, ...]) -> int:
    """Index of `label` in `classes`; ValueError naming the valid classes otherwise."""
    try:
        return classes.index(label)
    except ValueError:
        raise ValueError(f"unknown class {label!r}; valid classes: {', '.join(classes)}") from None


def generate_electrode(
    label: str, rng: np.random.Generator, size: int = 128
) -> tuple[np.ndarray, np.ndarray]:
    """One electrode tile of class `label`: (image HxW uint8, defect mask HxW uint8 0/255)."""
    class_index(label, ELECTRODE_CLASSES)
    if size < 32:
        raise ValueError(f"electrode tile size must be >= 32 px, got {size}")
    # Independent streams per stage: a tile of another class from the same generator
    # state shares look, texture and noise, so the defect is the only difference.
    look_rng, texture_rng, defect_rng, noise_rng = rng.spawn(4)
    look = sample_look(look_rng)
    shape = (size, size)
    canvas = electrode_texture(texture_rng, shape, look)
    mask = np.zeros(shape, np.uint8)
    if label != "ok":
        DEFECT_PAINTERS[label](canvas, mask, defect_rng, look)
    gain = illumination_plane(noise_rng, shape, 0.12)
    return finish(noise_rng, canvas, look, gain), mask
