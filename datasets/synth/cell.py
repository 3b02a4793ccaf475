"""Side views of cylindrical Li-ion cells (18650/21700-like) lying on a conveyor, RGB.

The cell is rendered analytically in its own axis-aligned coordinates (u along the
axis, v across it), so slight rotation and offset cost nothing and every defect is
placed in cell coordinates. Shading is a small Phong model on the cylinder normal,
which is what makes a dent readable: it bends the normal, the highlight moves.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

from cellinspect.datasets.synth.cell_defects import POST_SHADING, PRE_SHADING
from cellinspect.datasets.synth.electrode import class_index
from cellinspect.datasets.synth.texture import (
    add_sensor_noise,
    column_streaks,
    granular,
    smooth_noise,
    to_uint8,
)

CELL_CLASSES: tuple[str, ...] = ("ok", "dent", "scratch", "corrosion", "cap_damage")

_SLEEVE_COLOURS = (
    (40, 80, 190),  # blue
    (30, 130, 70),  # green
    (170, 35, 40),  # red
    (110, 50, 140),  # purple
    (35, 35, 40),  # black
    (20, 120, 140),  # teal
)


@dataclass
class CellScene:
    """Geometry and per-pixel fields of one rendered cell; painters edit it in place."""

    u: np.ndarray  # along the axis, px from the cell centre
    v: np.ndarray  # across the axis, px from the axis
    s: np.ndarray  # distance from the positive (cap) end along the axis, px
    cx: float  # image position of the cell centre, px
    cy: float
    cap_sign: float  # +1 when the cap is at the +u end
    angle: float  # rotation of the axis from the image x axis, radians
    radius: float
    length: float
    lip: float  # width of the rolled crimp lip at the cap end, px
    groove: float  # width of the crimp groove behind the lip, px
    light: np.ndarray  # unit light direction (u, v, z)
    sleeved: bool
    alpha: np.ndarray = field(init=False)  # silhouette coverage in [0, 1]
    bump: np.ndarray = field(init=False)  # surface height offsets (dents, deformation), px
    cut: np.ndarray = field(init=False)  # 1 where material is missing (notches)
    overlays: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.bump = np.zeros_like(self.u)
        self.cut = np.zeros_like(self.u)

    @property
    def body_start(self) -> float:
        """Distance from the cap end where the plain can (or sleeve) begins."""
        return self.lip + self.groove + 2.0

    def local_radius(self) -> np.ndarray:
        """Can radius along the axis: the crimp groove pinches it."""
        centre = self.lip + self.groove / 2
        pinch = np.exp(-(((self.s - centre) / (self.groove / 2)) ** 2))
        return self.radius * (1.0 - 0.07 * pinch)


def _sample_scene(rng: np.random.Generator, height: int, width: int) -> CellScene:
    radius = height * float(rng.uniform(0.24, 0.29))
    length = min(2 * radius * float(rng.uniform(2.9, 3.4)), width * 0.9)
    cx = width / 2 + float(rng.uniform(-0.03, 0.03)) * width
    cy = height / 2 + float(rng.uniform(-0.06, 0.06)) * height
    angle = np.deg2rad(rng.uniform(-3.0, 3.0))
    yy, xx = np.mgrid[:height, :width].astype(np.float32)
    u = (xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)
    v = -(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle)
    cap_sign = 1.0 if rng.random() < 0.5 else -1.0
    light = np.array([rng.uniform(-0.2, 0.2), rng.uniform(-0.6, -0.1), 1.0])
    return CellScene(
        u=u.astype(np.float32),
        v=v.astype(np.float32),
        s=(length / 2 - cap_sign * u).astype(np.float32),
        cx=float(cx),
        cy=float(cy),
        cap_sign=cap_sign,
        angle=float(angle),
        radius=radius,
        length=length,
        lip=float(rng.uniform(0.035, 0.05)) * length,
        groove=float(rng.uniform(3.0, 5.0)),
        light=light / np.linalg.norm(light),
        sleeved=bool(rng.random() < 0.5),
    )


def _silhouette(scene: CellScene) -> np.ndarray:
    """Anti-aliased coverage of the can (rounded ends, pinched groove) plus the cap button."""
    r = scene.local_radius()
    corner = 0.15 * scene.radius
    half = scene.length / 2
    qx = np.abs(scene.u) - half + corner
    qy = np.abs(scene.v) - r + corner
    outside = np.hypot(np.maximum(qx, 0), np.maximum(qy, 0))
    sdf = outside + np.minimum(np.maximum(qx, qy), 0) - corner
    can = np.clip(0.5 - sdf, 0, 1)
    # The positive terminal button stands a little proud of the crimp.
    nub_len = max(2.0, 0.012 * scene.length)
    nub = np.clip(scene.s + nub_len + 0.5, 0, 1) * np.clip(1.5 - scene.s, 0, 1)
    nub = nub * np.clip(0.35 * scene.radius - np.abs(scene.v) + 0.5, 0, 1)
    return np.maximum(can, nub).astype(np.float32)


def _shade(rng: np.random.Generator, scene: CellScene) -> np.ndarray:
    """RGB float radiance of the cell surface (metal can, crimp zone, optional sleeve)."""
    f32 = np.float32
    nv = np.clip(scene.v / scene.local_radius(), -0.995, 0.995)
    nz = np.sqrt(1.0 - nv * nv)
    if scene.bump.any():
        # A height field tilts the normal by its gradient, taken along the cell axes.
        gy, gx = np.gradient(scene.bump)
        cos_a, sin_a = f32(np.cos(scene.angle)), f32(np.sin(scene.angle))
        nu = -(gx * cos_a + gy * sin_a)
        nv = nv - (-gx * sin_a + gy * cos_a) * nz
        norm = np.sqrt(nu * nu + nv * nv + nz * nz)
        nu, nv, nz = nu / norm, nv / norm, nz / norm
    else:
        nu = np.zeros_like(nv)
    light = scene.light
    half_vec = (light + np.array([0.0, 0.0, 1.0])) / np.linalg.norm(
        light + np.array([0.0, 0.0, 1.0])
    )
    diffuse = np.clip(nu * f32(light[0]) + nv * f32(light[1]) + nz * f32(light[2]), 0, 1)
    ndh = np.clip(nu * f32(half_vec[0]) + nv * f32(half_vec[1]) + nz * f32(half_vec[2]), 0, 1)
    # Integer powers by repeated squaring: np.power is slow on float arrays.
    ndh2 = ndh * ndh
    ndh10 = ndh2 * ndh2
    ndh10 = ndh10 * ndh10 * ndh2
    ndh40 = ndh10 * ndh10
    ndh40 *= ndh40
    # Drawn steel has fine lines along the axis.
    brushed = column_streaks(rng, scene.u.shape[::-1], across=1.5, along=40.0).T
    metal = np.float32(rng.uniform(175, 215)) * np.array([1.0, 1.0, 1.03], np.float32)
    metal_lum = 0.22 + 0.45 * diffuse + 0.02 * brushed
    spec = 0.55 * ndh10 + 0.7 * ndh40 * ndh40
    in_crimp = np.clip(scene.body_start + 1 - scene.s, 0, 1)
    groove = np.exp(-(((scene.s - scene.lip - scene.groove / 2) / (scene.groove / 2)) ** 2))
    # The rolled lip catches light in rings; the groove sits in shadow.
    ring = 1.0 + 0.18 * np.cos(2 * np.pi * scene.s / max(scene.lip / 1.5, 2.0)) * in_crimp
    metal_rgb = (metal_lum * ring * (1 - 0.55 * groove))[..., None] * metal
    metal_rgb += (f32(255.0) * spec * (1 - 0.6 * groove))[..., None]
    if not scene.sleeved:
        return metal_rgb.astype(np.float32)
    colour = np.array(_SLEEVE_COLOURS[int(rng.integers(len(_SLEEVE_COLOURS)))], np.float32)
    colour = colour * np.float32(rng.uniform(0.8, 1.15))
    sleeve_rgb = (0.25 + 0.75 * diffuse)[..., None] * colour + 255.0 * (0.35 * ndh40)[..., None]
    on_sleeve = np.clip(scene.s - scene.body_start - 1, 0, 1)[..., None]
    return (metal_rgb * (1 - on_sleeve) + sleeve_rgb * on_sleeve).astype(np.float32)


def _conveyor(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Dark rubber belt with fine grain and faint weave, sometimes fixture rails."""
    shape = (height, width)
    tint = np.float32(rng.uniform(0.9, 1.1, 3))
    base = np.float32(rng.uniform(35, 75))
    grain = granular(rng, shape, (1.0, 3.0), (0.7, 0.5)) * np.float32(rng.uniform(3, 7))
    weave = column_streaks(rng, (width, height), across=3.0, along=60.0).T * np.float32(2.0)
    lum = base + grain + weave + 4 * smooth_noise(rng, shape, 64.0)
    if rng.random() < 0.6:
        # Guide rails of the V-block fixture, above and below the cell.
        ys = np.arange(height, dtype=np.float32)[:, None]
        for centre in (rng.uniform(0.05, 0.14) * height, rng.uniform(0.86, 0.95) * height):
            half = rng.uniform(3, 7)
            rail = np.clip(half - np.abs(ys - centre) + 0.5, 0, 1)
            lum = lum + rail * np.float32(rng.uniform(40, 90))
    return lum[..., None] * tint / tint.mean()


def generate_cell(
    label: str, rng: np.random.Generator, height: int = 128, width: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """One cell side view of class `label`: (image HxWx3 RGB uint8, defect mask HxW uint8)."""
    class_index(label, CELL_CLASSES)
    if height < 48 or width < 96:
        raise ValueError(f"cell image must be at least 48x96 px, got {height}x{width}")
    # Separate streams: the same generator state with another label changes only the defect.
    scene_rng, bg_rng, surface_rng, defect_rng, noise_rng = rng.spawn(5)
    scene = _sample_scene(scene_rng, height, width)
    mask = np.zeros((height, width), np.uint8)
    if label in PRE_SHADING:
        PRE_SHADING[label](scene, mask, defect_rng)
    scene.alpha = _silhouette(scene) * (1 - scene.cut)
    rgb = _shade(surface_rng, scene)
    for overlay_alpha, overlay_rgb in scene.overlays:
        rgb += overlay_alpha[..., None] * (overlay_rgb - rgb)
    if label in POST_SHADING:
        POST_SHADING[label](scene, rgb, mask, defect_rng)
    background = _conveyor(bg_rng, height, width)
    # Soft contact shadow: the light comes from above the camera, slightly to one side.
    shadow = cv2.GaussianBlur(scene.alpha, (0, 0), 4.0)
    shadow = cv2.warpAffine(shadow, np.array([[1, 0, 0], [0, 1, 4]], np.float32), (width, height))
    background *= (1 - 0.5 * shadow)[..., None]
    a = scene.alpha[..., None]
    image = background * (1 - a) + rgb * a
    image *= np.float32(noise_rng.uniform(0.85, 1.15)) * np.float32(
        noise_rng.uniform(0.96, 1.04, 3)
    )
    image = add_sensor_noise(noise_rng, image, float(noise_rng.uniform(1.5, 3.0)), 0.02)
    return to_uint8(image), mask
