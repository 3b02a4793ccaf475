"""Defect heatmaps as numbers: where a map points, whether that is on the defect, coarse grids.

Heatmaps are the model's optional `heatmap` output: N x H x W float in [0, 1] at the
model's input size (see cellinspect.training.networks.ExportableClassifier). Numpy only,
so QA reports and the service share it without torch.
"""

from __future__ import annotations

import numpy as np


def _as_batch(array: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3:
        raise ValueError(f"{name} must be H x W or N x H x W, got shape {array.shape}")
    return array


def heatmap_peaks(heatmaps: np.ndarray) -> np.ndarray:
    """(row, col) of each map's maximum, N x 2.

    Where the top is flat (bilinear upsampling holds the edge cells' values constant out to
    the border), the peak is the top pixel nearest the top's centroid, not its first pixel
    in row-major order, which would put the peak in the image corner.
    """
    maps = _as_batch(heatmaps, "heatmaps")
    peaks = np.empty((len(maps), 2), np.int64)
    for i, heatmap in enumerate(maps):
        rows, cols = np.nonzero(heatmap == heatmap.max())
        nearest = np.argmin((rows - rows.mean()) ** 2 + (cols - cols.mean()) ** 2)
        peaks[i] = rows[nearest], cols[nearest]
    return peaks


def pointing_game(
    heatmaps: np.ndarray, masks: np.ndarray, *, tolerance: int = 0
) -> tuple[int, int]:
    """(hits, n): how many maps peak on their defect mask (Zhang et al., 2016).

    A hit is a peak within `tolerance` pixels (Euclidean distance) of a mask pixel: the
    protocol's 15 px in the original, which absorbs the coarseness of the maps; 0 means on
    the mask itself. A map without any positive value points
    nowhere and counts as a miss. Masks (nonzero = defect) must have the maps' size and at
    least one defect pixel each: an unannotated defect image is an error in the data.
    """
    maps = _as_batch(heatmaps, "heatmaps")
    marks = _as_batch(masks, "masks") > 0
    if maps.shape != marks.shape:
        raise ValueError(f"heatmaps {maps.shape} and masks {marks.shape} differ in shape")
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0 pixels, got {tolerance}")
    empty = np.flatnonzero(~marks.reshape(len(marks), -1).any(axis=1))
    if len(empty):
        raise ValueError(f"masks {empty[:10].tolist()} have no defect pixel")
    hits = 0
    for heatmap, mask, (row, col) in zip(maps, marks, heatmap_peaks(maps), strict=True):
        if not heatmap[row, col] > 0:
            continue
        top, left = max(0, row - tolerance), max(0, col - tolerance)
        near_rows, near_cols = np.nonzero(
            mask[top : row + tolerance + 1, left : col + tolerance + 1]
        )
        distance2 = (near_rows + top - row) ** 2 + (near_cols + left - col) ** 2
        hits += bool((distance2 <= tolerance**2).any())
    return hits, len(maps)


def coarse_grid(heatmap: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Mean of `heatmap` (H x W) over a rows x cols grid of cells; cell edges are rounded to
    whole pixels, so every pixel counts once even where H or W is not a multiple."""
    heatmap = np.asarray(heatmap, np.float64)
    if heatmap.ndim != 2:
        raise ValueError(f"heatmap must be H x W, got shape {heatmap.shape}")
    height, width = heatmap.shape
    if not (1 <= rows <= height and 1 <= cols <= width):
        raise ValueError(f"grid {rows} x {cols} does not fit a {height} x {width} heatmap")
    row_edges = np.linspace(0, height, rows + 1).round().astype(int)
    col_edges = np.linspace(0, width, cols + 1).round().astype(int)
    # Sums over each cell from per-block reductions: add.reduceat over both axes.
    sums = np.add.reduceat(np.add.reduceat(heatmap, row_edges[:-1], axis=0), col_edges[:-1], 1)
    counts = np.outer(np.diff(row_edges), np.diff(col_edges))
    return sums / counts


def heatmap_to_uint8(heatmap: np.ndarray) -> np.ndarray:
    """[0, 1] floats -> 0..255 gray levels (clipped, rounded): for PNGs and overlays."""
    return np.clip(np.rint(np.asarray(heatmap, np.float32) * 255.0), 0, 255).astype(np.uint8)
