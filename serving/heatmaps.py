"""Defect heatmaps in answers: a base64 gray PNG or a coarse grid of numbers, on request."""

from __future__ import annotations

import base64

import numpy as np

from cellinspect.datasets.decode import encode_png
from cellinspect.models.heatmap import coarse_grid, heatmap_to_uint8
from cellinspect.serving.schemas import GridHeatmap, HeatmapFormat, PngHeatmap

GRID_CELLS = 8  # rows and columns of a `grid` heatmap: enough to say where, small as JSON
GRID_DECIMALS = 3


def encode_heatmap(heatmap: np.ndarray, fmt: HeatmapFormat) -> PngHeatmap | GridHeatmap:
    """One H x W heatmap in [0, 1] -> the answer's `heatmap` in the requested format."""
    if fmt is HeatmapFormat.PNG:
        data = base64.b64encode(encode_png(heatmap_to_uint8(heatmap))).decode("ascii")
        return PngHeatmap(width=heatmap.shape[1], height=heatmap.shape[0], data=data)
    rows, cols = min(GRID_CELLS, heatmap.shape[0]), min(GRID_CELLS, heatmap.shape[1])
    grid = coarse_grid(heatmap, rows, cols).round(GRID_DECIMALS)
    return GridHeatmap(rows=rows, cols=cols, values=grid.ravel().tolist())
