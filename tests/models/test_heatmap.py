"""Heatmap numbers: peaks, the pointing game, coarse grids, 8-bit conversion; and models
that carry a heatmap output (or do not) through LoadedModel."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from cellinspect.datasets.preprocess import preprocess_batch
from cellinspect.models.heatmap import coarse_grid, heatmap_peaks, heatmap_to_uint8, pointing_game
from cellinspect.models.predict import LoadedModel
from cellinspect.models.runtime import ModelLoadError

OUTPUTS = ["logits", "probabilities", "heatmap"]


def spot(row: int, col: int, shape: tuple[int, int] = (16, 16)) -> np.ndarray:
    heatmap = np.zeros(shape, np.float32)
    heatmap[row, col] = 1.0
    return heatmap


def box(top: int, left: int, size: int, shape: tuple[int, int] = (16, 16)) -> np.ndarray:
    mask = np.zeros(shape, np.uint8)
    mask[top : top + size, left : left + size] = 255
    return mask


def test_peaks_are_row_col_of_each_maximum() -> None:
    maps = np.stack([spot(3, 5), spot(15, 0)])
    np.testing.assert_array_equal(heatmap_peaks(maps), [[3, 5], [15, 0]])


def test_pointing_game_counts_peaks_on_the_mask() -> None:
    maps = np.stack([spot(4, 4), spot(12, 12), spot(0, 15)])
    masks = np.stack([box(2, 2, 4), box(2, 2, 4), box(0, 12, 4)])
    assert pointing_game(maps, masks) == (2, 3)


def test_pointing_game_tolerance_is_a_disc_around_the_peak() -> None:
    maps, mask = spot(8, 8)[None], box(2, 2, 3)[None]  # mask covers rows/cols 2..4
    # The nearest mask pixel, (4, 4), lies 4 rows and 4 columns away: sqrt(32) = 5.66.
    assert pointing_game(maps, mask, tolerance=5) == (0, 1)
    assert pointing_game(maps, mask, tolerance=6) == (1, 1)
    straight = box(8, 0, 3)[None]  # nearest pixel (8, 2): 6 columns away on the same row
    assert pointing_game(maps, straight, tolerance=5) == (0, 1)
    assert pointing_game(maps, straight, tolerance=6) == (1, 1)


def test_a_map_without_positive_values_points_nowhere() -> None:
    assert pointing_game(np.zeros((1, 16, 16)), box(0, 0, 16)[None]) == (0, 1)


def test_pointing_game_refuses_empty_masks_and_shape_mismatch() -> None:
    with pytest.raises(ValueError, match=r"masks \[1\] have no defect pixel"):
        pointing_game(np.stack([spot(1, 1)] * 2), np.stack([box(0, 0, 2), box(0, 0, 0)]))
    with pytest.raises(ValueError, match="differ in shape"):
        pointing_game(spot(1, 1), box(0, 0, 2, shape=(8, 8)))


def test_coarse_grid_averages_cells_and_counts_every_pixel_once() -> None:
    heatmap = np.arange(36, dtype=np.float32).reshape(6, 6)
    grid = coarse_grid(heatmap, 2, 3)
    np.testing.assert_allclose(grid, heatmap.reshape(2, 3, 3, 2).mean(axis=(1, 3)))
    uneven = coarse_grid(heatmap, 4, 4)  # 6 px into 4 cells: widths 2, 1, 2, 1 (rounded edges)
    assert uneven.shape == (4, 4)
    assert uneven[0, 0] == pytest.approx(heatmap[:2, :2].mean())
    with pytest.raises(ValueError, match="does not fit"):
        coarse_grid(heatmap, 7, 2)


def test_uint8_conversion_rounds_and_clips() -> None:
    values = np.array([[-0.5, 0.0, 0.5, 1.0, 1.5]], np.float32)
    np.testing.assert_array_equal(heatmap_to_uint8(values), [[0, 0, 128, 255, 255]])


def test_model_with_heatmap_returns_it_from_the_same_run(tmp_path, tiny) -> None:
    path = tiny.build_classifier(tmp_path / "heat.onnx", heatmap=True)
    model = LoadedModel.from_files(path, tiny.make_card(output_names=OUTPUTS))
    assert model.has_heatmap
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (8, 8), dtype=np.uint8) for _ in range(5)]
    logits, heatmaps = model.run_with_heatmaps(preprocess_batch(images, tiny.spec))
    np.testing.assert_allclose(heatmaps, np.stack(images) / 255.0, atol=1e-6)
    probs, again = model.predict_with_heatmaps(images, batch_size=2)
    np.testing.assert_allclose(probs, model.probabilities(logits), rtol=1e-6)
    np.testing.assert_array_equal(again, heatmaps)
    # Padded to a fixed batch size (as on a GPU), both outputs are cut back to the real rows.
    fixed = LoadedModel(model.card, model.session, fixed_batch_size=4)
    fixed_logits, fixed_heatmaps = fixed.run_with_heatmaps(preprocess_batch(images, tiny.spec))
    np.testing.assert_allclose(fixed_logits, logits, rtol=1e-6)
    np.testing.assert_array_equal(fixed_heatmaps, heatmaps)


def test_model_without_heatmap_loads_and_says_so(onnx_model, card) -> None:
    model = LoadedModel.from_files(onnx_model, card)
    assert not model.has_heatmap
    with pytest.raises(ValueError, match="no 'heatmap' output"):
        model.run_with_heatmaps(np.zeros((1, 1, 8, 8), np.float32))


def test_heatmap_not_at_input_size_is_a_model_load_error(tmp_path, tiny) -> None:
    path = tiny.build_classifier(tmp_path / "heat.onnx", heatmap=True)
    model = onnx.load(str(path))  # reshape the map to 4 x 16: same pixels, wrong size
    dims = model.graph.output[2].type.tensor_type.shape.dim
    dims[1].dim_value, dims[2].dim_value = 4, 16
    target = next(t for t in model.graph.initializer if t.name == "HW")
    target.CopyFrom(onnx.numpy_helper.from_array(np.array([-1, 4, 16], np.int64), "HW"))
    onnx.save(model, str(path))
    with pytest.raises(ModelLoadError, match=r"expected \[N, 8, 8\]"):
        LoadedModel.from_files(path, tiny.make_card(output_names=OUTPUTS))


def test_card_names_the_map_of_its_heatmap_output(tiny) -> None:
    from pydantic import ValidationError

    from cellinspect.models.card import HeatmapSource, ModelCard

    card = tiny.make_card(output_names=OUTPUTS, heatmap="aux-cam-x-grad-cam")
    assert card.heatmap is HeatmapSource.AUX_CAM_X_GRAD_CAM
    assert ModelCard.model_validate_json(card.to_json()).heatmap is card.heatmap
    assert "stride-16" in card.heatmap.description
    assert tiny.make_card(output_names=OUTPUTS).heatmap is None  # cards from before the field
    with pytest.raises(ValidationError, match="no 'heatmap' output"):
        tiny.make_card(heatmap="grad-cam")  # logits and probabilities only
    with pytest.raises(ValidationError):
        tiny.make_card(output_names=OUTPUTS, heatmap="saliency")
