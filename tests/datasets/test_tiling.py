"""Tiling of large frames and merging of defective tiles into regions (fast, numpy only)."""

from __future__ import annotations

import numpy as np
import pytest

from cellinspect.datasets.tiling import (
    Region,
    Tile,
    classify_tiles,
    iter_tile_batches,
    merge_regions,
    tile_grid,
    to_millimetres,
)

CLASSES = ["ok", "scratch", "crack"]


def coverage(tiles: list[Tile], height: int, width: int) -> np.ndarray:
    counts = np.zeros((height, width), np.int32)
    for t in tiles:
        counts[t.y : t.y + t.h, t.x : t.x + t.w] += 1
    return counts


@pytest.mark.parametrize(
    ("height", "width", "tile", "overlap"),
    [(1000, 300, 128, 0.25), (512, 512, 128, 0.0), (777, 129, 64, 0.5), (256, 2048, 128, 0.8)],
)
def test_grid_covers_every_pixel_inside_the_frame(
    height: int, width: int, tile: int, overlap: float
) -> None:
    tiles = tile_grid(height, width, tile, tile, overlap)
    assert all(t.w == tile and t.h == tile for t in tiles)
    assert all(t.x >= 0 and t.y >= 0 for t in tiles)
    assert all(t.x + t.w <= width and t.y + t.h <= height for t in tiles)
    assert coverage(tiles, height, width).min() >= 1


@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5, 0.75])
def test_neighbours_overlap_at_least_the_requested_fraction(overlap: float) -> None:
    tiles = tile_grid(1000, 1000, 128, 128, overlap)
    xs = sorted({t.x for t in tiles})
    ys = sorted({t.y for t in tiles})
    for starts in (xs, ys):
        steps = np.diff(starts)
        assert (128 - steps).min() >= overlap * 128
        # Interior steps are the stride itself: no more overlap than asked (bar rounding).
        assert steps[:-1].max() == int(128 * (1 - overlap))


def test_zero_overlap_on_an_exact_multiple_tiles_without_overlap() -> None:
    tiles = tile_grid(512, 384, 128, 128, 0.0)
    assert len(tiles) == 4 * 3
    assert coverage(tiles, 512, 384).max() == 1


def test_last_row_and_column_sit_flush_with_the_edges() -> None:
    tiles = tile_grid(1000, 300, 128, 128, 0.25)
    assert max(t.x + t.w for t in tiles) == 300
    assert max(t.y + t.h for t in tiles) == 1000
    assert {t.x for t in tiles} == {0, 96, 172}  # stride 96, then flush with x = 300
    assert tiles[0] == Tile(0, 0, 128, 128)  # row-major: first the top-left tile
    assert tiles[1] == Tile(96, 0, 128, 128)


def test_frame_smaller_than_a_tile_gives_one_frame_sized_tile() -> None:
    assert tile_grid(100, 60, 128, 128) == [Tile(0, 0, 60, 100)]


def test_frame_narrower_than_a_tile_keeps_tiling_along_the_other_axis() -> None:
    tiles = tile_grid(512, 100, 128, 128, 0.5)
    assert {t.w for t in tiles} == {100} and {t.x for t in tiles} == {0}
    assert [t.y for t in tiles] == [0, 64, 128, 192, 256, 320, 384]
    assert coverage(tiles, 512, 100).min() >= 1


def test_rectangular_tiles_follow_the_spec_height_and_width() -> None:
    tiles = tile_grid(1024, 512, 256, 128, 0.5)
    assert {(t.h, t.w) for t in tiles} == {(256, 128)}
    assert coverage(tiles, 1024, 512).min() >= 1


@pytest.mark.parametrize("overlap", [-0.1, 0.9, 1.0, 2.0])
def test_overlap_outside_zero_to_point_nine_is_refused(overlap: float) -> None:
    with pytest.raises(ValueError, match="overlap"):
        tile_grid(512, 512, 128, 128, overlap)


def test_batches_are_views_of_the_frame_with_tile_shapes() -> None:
    image = np.arange(300 * 200, dtype=np.uint16).reshape(300, 200)
    tiles = tile_grid(300, 200, 128, 128, 0.25)
    batches = list(iter_tile_batches(image, tiles, batch_size=4))
    assert [len(b) for b, _ in batches] == [4, 2]  # 3 rows x 2 columns
    assert [t for b, _ in batches for t in b] == tiles
    for batch_tiles, crops in batches:
        assert len(crops) == len(batch_tiles)
        for t, crop in zip(batch_tiles, crops, strict=True):
            assert crop.shape == (t.h, t.w)
            assert np.shares_memory(crop, image)
            assert crop[0, 0] == image[t.y, t.x]


def test_batches_of_a_colour_frame_keep_channels() -> None:
    image = np.zeros((256, 256, 3), np.uint8)
    (_, crops), *_ = iter_tile_batches(image, tile_grid(256, 256, 128, 128), 8)
    assert crops[0].shape == (128, 128, 3) and crops[0].base is not None


def test_batches_refuse_bad_batch_size_and_tiles_outside_the_image() -> None:
    image = np.zeros((64, 64), np.uint8)
    with pytest.raises(ValueError, match="batch_size"):
        next(iter_tile_batches(image, [Tile(0, 0, 64, 64)], 0))
    with pytest.raises(ValueError, match="outside"):
        next(iter_tile_batches(image, [Tile(32, 0, 64, 64)], 1))


def test_classify_tiles_runs_the_classifier_batch_by_batch() -> None:
    image = np.zeros((256, 512), np.uint8)
    image[:, 256:] = 255
    tiles = tile_grid(256, 512, 128, 128, 0.0)
    sizes: list[int] = []

    def classify(crops: list[np.ndarray]) -> np.ndarray:
        sizes.append(len(crops))
        bright = np.array([c.mean() / 255.0 for c in crops])
        return np.stack([1 - bright, bright, np.zeros_like(bright)], axis=1)

    probs = classify_tiles(image, tiles, classify, batch_size=3)
    assert sizes == [3, 3, 2]
    assert probs.shape == (8, 3)
    assert [bool(p[1] > 0.5) for p in probs] == [t.x >= 256 for t in tiles]


def grid_probs(tiles: list[Tile], spots: dict[tuple[int, int], tuple[float, ...]]) -> np.ndarray:
    """All tiles confidently 'ok' except those starting at the given (x, y)."""
    probs = np.tile([0.98, 0.01, 0.01], (len(tiles), 1))
    for k, t in enumerate(tiles):
        if (t.x, t.y) in spots:
            probs[k] = spots[(t.x, t.y)]
    return probs


def test_two_separate_clusters_become_two_regions_with_union_boxes() -> None:
    tiles = tile_grid(1024, 512, 128, 128, 0.5)  # stride 64
    spots = {
        (64, 128): (0.1, 0.8, 0.1),  # cluster A: two overlapping tiles, mostly scratch
        (128, 128): (0.3, 0.3, 0.4),
        (256, 768): (0.05, 0.15, 0.8),  # cluster B: one crack tile
    }
    regions = merge_regions(tiles, grid_probs(tiles, spots), CLASSES, "ok")
    assert len(regions) == 2
    a, b = regions  # sorted top to bottom
    assert (a.x, a.y, a.w, a.h, a.tiles) == (64, 128, 192, 128, 2)
    # Summed scratch 1.1 beats summed crack 0.5, though one tile's argmax is crack.
    assert a.label == "scratch"
    assert a.confidence == pytest.approx(0.9)
    assert (b.x, b.y, b.w, b.h, b.tiles, b.label) == (256, 768, 128, 128, 1, "crack")
    assert b.confidence == pytest.approx(0.95)


def test_tiles_touching_at_an_edge_or_corner_merge() -> None:
    tiles = tile_grid(512, 512, 128, 128, 0.0)
    defect = (0.0, 1.0, 0.0)
    edge = merge_regions(
        tiles, grid_probs(tiles, {(0, 0): defect, (128, 0): defect}), CLASSES, "ok"
    )
    assert [(r.x, r.y, r.w, r.h) for r in edge] == [(0, 0, 256, 128)]
    corner = merge_regions(
        tiles, grid_probs(tiles, {(0, 0): defect, (128, 128): defect}), CLASSES, "ok"
    )
    assert [(r.x, r.y, r.w, r.h, r.tiles) for r in corner] == [(0, 0, 256, 256, 2)]
    apart = merge_regions(
        tiles, grid_probs(tiles, {(0, 0): defect, (256, 0): defect}), CLASSES, "ok"
    )
    assert len(apart) == 2


def test_chain_of_tiles_merges_transitively() -> None:
    tiles = tile_grid(1024, 128, 128, 128, 0.0)
    spots = {(0, y): (0.2, 0.2, 0.6) for y in range(0, 1024, 128)}
    (region,) = merge_regions(tiles, grid_probs(tiles, spots), CLASSES, "ok")
    assert (region.x, region.y, region.w, region.h, region.tiles) == (0, 0, 128, 1024, 8)
    assert region.label == "crack" and region.confidence == pytest.approx(0.8)


def test_threshold_decides_which_tiles_are_defective() -> None:
    tiles = tile_grid(256, 512, 128, 128, 0.0)
    spots = {(0, 0): (0.45, 0.55, 0.0), (384, 128): (0.75, 0.25, 0.0)}
    probs = grid_probs(tiles, spots)
    assert [(r.x, r.y) for r in merge_regions(tiles, probs, CLASSES, "ok")] == [(0, 0)]
    low = merge_regions(tiles, probs, CLASSES, "ok", threshold=0.25)
    assert [(r.x, r.y) for r in low] == [(0, 0), (384, 128)]
    # At exactly the threshold a tile counts as defective (>=, like the operating point).
    exact = merge_regions(tiles, probs, CLASSES, "ok", threshold=0.55)
    assert [(r.x, r.y) for r in exact] == [(0, 0)]
    assert merge_regions(tiles, probs, CLASSES, "ok", threshold=0.9) == []


def test_all_good_frame_has_no_regions() -> None:
    tiles = tile_grid(1024, 1024, 128, 128, 0.5)
    assert merge_regions(tiles, grid_probs(tiles, {}), CLASSES, "ok") == []


def test_good_class_need_not_be_first() -> None:
    tiles = [Tile(0, 0, 8, 8)]
    probs = np.array([[0.7, 0.1, 0.2]])  # "good" is the last column
    (region,) = merge_regions(tiles, probs, ["pinhole", "crack", "good"], "good")
    assert region.label == "pinhole" and region.confidence == pytest.approx(0.8)


def test_merge_refuses_mismatched_inputs() -> None:
    tiles = tile_grid(256, 256, 128, 128, 0.0)
    probs = grid_probs(tiles, {})
    with pytest.raises(ValueError, match="good_class 'good' is not one of"):
        merge_regions(tiles, probs, CLASSES, "good")
    with pytest.raises(ValueError, match="shape"):
        merge_regions(tiles[:3], probs, CLASSES, "ok")
    with pytest.raises(ValueError, match="shape"):
        merge_regions(tiles, probs[:, :2], CLASSES, "ok")
    with pytest.raises(ValueError, match="threshold"):
        merge_regions(tiles, probs, CLASSES, "ok", threshold=1.5)


def test_millimetres_with_square_and_anisotropic_pitch() -> None:
    region = Region(x=100, y=2000, w=50, h=80, label="crack", confidence=0.9, tiles=3)
    assert to_millimetres(region, 0.05) == pytest.approx(
        {"x_mm": 5.0, "y_mm": 100.0, "w_mm": 2.5, "h_mm": 4.0}
    )
    # (across the web, along the web): x and y pitches differ on a line-scan camera.
    assert to_millimetres(region, (0.05, 0.1)) == pytest.approx(
        {"x_mm": 5.0, "y_mm": 200.0, "w_mm": 2.5, "h_mm": 8.0}
    )
    with pytest.raises(ValueError, match="positive"):
        to_millimetres(region, 0.0)
    with pytest.raises(ValueError, match="positive"):
        to_millimetres(region, (0.05, -1.0))


def test_tile_count_limit_refuses_before_building_tiles() -> None:
    assert len(tile_grid(64, 64, 8, 8, 0.0, max_tiles=64)) == 64
    with pytest.raises(
        ValueError, match=r"needs 72 tiles, over the limit of 64; lower the overlap"
    ):
        tile_grid(64, 65, 8, 8, 0.0, max_tiles=64)
