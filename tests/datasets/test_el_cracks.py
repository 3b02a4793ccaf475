"""Synthetic EL cracks: dark, thin, from an edge inwards, repeatable, any channel count."""

from __future__ import annotations

import numpy as np
import pytest

from cellinspect.datasets.synth.el_cracks import crack_path, paint_el_cracks


def cell(channels: int = 1, size: int = 96) -> np.ndarray:
    rng = np.random.default_rng(1)
    return np.clip(rng.normal(0.6, 0.05, (size, size, channels)), 0, 1).astype(np.float32)


@pytest.mark.parametrize("seed", range(20))
def test_a_crack_starts_on_the_border_and_stays_inside(seed: int) -> None:
    path = crack_path(np.random.default_rng(seed), 60, 80)
    x, y = path[:, 0], path[:, 1]
    assert min(x[0], y[0], 79 - x[0], 59 - y[0]) < 1e-3
    assert (x >= 0).all() and (x < 80).all() and (y >= 0).all() and (y < 60).all()
    # steps of 1/40 of the longer side
    if len(path) > 1:
        np.testing.assert_allclose(np.hypot(*np.diff(path, axis=0).T), 2.0, rtol=1e-4)


def test_cracks_only_darken_and_touch_a_thin_share_of_the_image() -> None:
    image = cell()
    changed = []
    for seed in range(40):
        out = paint_el_cracks(image, np.random.default_rng(seed))
        assert out.shape == image.shape and out.dtype == np.float32
        assert (out <= image + 1e-6).all()
        changed.append(float((out < image - 0.02).mean()))
    # Some cracks isolate a region (up to half the image); most are thin lines.
    assert np.median(changed) < 0.12
    assert min(changed) >= 0.0 and max(changed) > 0.02
    assert sum(c > 0.005 for c in changed) >= 36  # nearly every draw leaves a visible crack


def test_cracks_are_darkest_along_a_line() -> None:
    image = np.full((96, 96, 1), 0.8, np.float32)
    out = paint_el_cracks(image, np.random.default_rng(3))
    dark = out[..., 0] < 0.8 * 0.9
    assert 0 < dark.sum() < 0.6 * dark.size
    assert out.min() >= 0.8 * (1 - 0.55) * (1 - 0.65) ** 2 - 1e-6


def test_the_same_seed_paints_the_same_crack_and_colour_channels_alike() -> None:
    gray = cell(1)
    a = paint_el_cracks(gray, np.random.default_rng(7))
    b = paint_el_cracks(gray, np.random.default_rng(7))
    c = paint_el_cracks(gray, np.random.default_rng(8))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    colour = np.repeat(gray, 3, axis=2)
    out = paint_el_cracks(colour, np.random.default_rng(7))
    for ch in range(3):
        np.testing.assert_allclose(out[..., ch], a[..., 0], atol=1e-6)


def test_the_input_is_left_untouched() -> None:
    image = cell()
    before = image.copy()
    paint_el_cracks(image, np.random.default_rng(0))
    np.testing.assert_array_equal(image, before)


@pytest.mark.parametrize("shape", [(32, 32), (32, 32, 2), (4, 32, 32, 1)])
def test_other_shapes_are_refused(shape) -> None:
    with pytest.raises(ValueError, match="H x W x 1 or H x W x 3"):
        paint_el_cracks(np.zeros(shape, np.float32), np.random.default_rng(0))
