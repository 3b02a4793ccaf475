"""The preprocessing contract: geometry of the resize modes, normalisation, and the gray
shortcut's equality with the general path."""

from __future__ import annotations

import numpy as np
import pytest

from cellinspect.datasets.preprocess import (
    PreprocessSpec,
    ResizeMode,
    normalize,
    prepare,
    preprocess,
)

RGB_SPEC = dict(channels=3, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


def _image(shape: tuple[int, ...], dtype: type, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if dtype is np.float32:
        return rng.random(shape, dtype=np.float32)
    return rng.integers(0, np.iinfo(dtype).max, shape, dtype=dtype, endpoint=True)


@pytest.mark.parametrize("mode", list(ResizeMode))
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
@pytest.mark.parametrize(
    "shape",
    [(300, 300), (300, 300, 1), (97, 150), (224, 224), (40, 64, 1)],
    ids=["shrink", "shrink-1ch", "aspect", "same-size", "enlarge"],
)
def test_gray_into_three_channels_equals_the_general_path(
    mode: ResizeMode, dtype: type, shape: tuple[int, ...]
) -> None:
    spec = PreprocessSpec(height=224, width=224, resize=mode, pad_value=0.3, **RGB_SPEC)
    image = _image(shape, dtype)
    fast = preprocess(image, spec)
    general = normalize(prepare(image, spec), spec)  # gray repeated into RGB, then resized
    assert fast.shape == general.shape == (3, 224, 224)
    assert fast.dtype == np.float32 and fast.flags.c_contiguous
    np.testing.assert_array_equal(fast, general)


def test_normalize_is_per_channel_and_channels_first() -> None:
    spec = PreprocessSpec(height=8, width=8, **RGB_SPEC)
    prepared = _image((8, 8, 3), np.float32)
    out = normalize(prepared, spec)
    assert out.shape == (3, 8, 8) and out.flags.c_contiguous
    for c in range(3):
        expected = (prepared[:, :, c] - spec.mean[c]) / spec.std[c]
        np.testing.assert_allclose(out[c], expected, rtol=1e-6, atol=1e-6)


def test_rgb_keeps_its_channels_apart() -> None:
    spec = PreprocessSpec(height=16, width=16, mean=(0.0,) * 3, std=(1.0,) * 3, channels=3)
    image = np.zeros((32, 32, 3), np.uint8)
    image[:, :, 1] = 255  # pure green
    out = preprocess(image, spec)
    np.testing.assert_allclose(out[0], 0.0)
    np.testing.assert_allclose(out[1], 1.0)
    np.testing.assert_allclose(out[2], 0.0)


def test_colour_into_one_channel_is_its_luminance() -> None:
    spec = PreprocessSpec(height=8, width=8, mean=(0.0,), std=(1.0,))
    image = np.zeros((8, 8, 3), np.uint8)
    image[:, :, 0] = 255  # pure red: BT.601 luma 0.299
    out = preprocess(image, spec)
    assert out.shape == (1, 8, 8)
    np.testing.assert_allclose(out, round(0.299 * 255) / 255, atol=1e-6)


def test_letterbox_keeps_the_aspect_and_pads() -> None:
    spec = PreprocessSpec(
        height=100, width=100, resize=ResizeMode.LETTERBOX, pad_value=0.25, mean=(0.0,), std=(1.0,)
    )
    image = np.full((50, 100), 255, np.uint8)  # 2:1 -> 100 x 50 band in the middle
    out = prepare(image, spec)[:, :, 0]
    np.testing.assert_allclose(out[25:75], 1.0)
    np.testing.assert_allclose(out[:25], 0.25)
    np.testing.assert_allclose(out[75:], 0.25)


def test_center_crop_fills_the_input_with_the_middle() -> None:
    spec = PreprocessSpec(
        height=100, width=100, resize=ResizeMode.CENTER_CROP, mean=(0.0,), std=(1.0,)
    )
    image = np.zeros((100, 300), np.uint8)
    image[:, 100:200] = 255  # only the middle third is bright
    out = prepare(image, spec)[:, :, 0]
    assert out.shape == (100, 100)
    np.testing.assert_allclose(out, 1.0)


def test_sixteen_bit_uses_the_full_range() -> None:
    spec = PreprocessSpec(height=8, width=8, mean=(0.0,), std=(1.0,))
    image = np.full((8, 8), 65535, np.uint16)
    np.testing.assert_allclose(preprocess(image, spec), 1.0)
