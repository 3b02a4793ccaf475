"""Tiling of large line-scan frames: overlapping crops at the model's tile size, and
defective tiles merged back into defect regions.

Pure numpy (plus scipy's graph routines): the classifier is passed in as a callable, so
the service, QA and tests share this code without any model runtime in it.

    frame --tile_grid()--> tiles --iter_tile_batches()/classify_tiles()--> N x K probs
          --merge_regions()--> regions --to_millimetres()--> sizes on the web
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

MAX_OVERLAP = 0.9  # exclusive: at 0.9 a 128 px tile would advance 12 px per step


@dataclass(frozen=True)
class Tile:
    """One crop of a frame, in pixels: columns x..x+w-1, rows y..y+h-1."""

    x: int
    y: int
    w: int
    h: int


@dataclass
class Region:
    """A connected group of defective tiles: union box, majority label, peak confidence."""

    x: int
    y: int
    w: int
    h: int
    label: str
    confidence: float  # max defect probability (1 - P(good)) among its tiles
    tiles: int  # how many defective tiles it merges


def _axis_starts(length: int, tile: int, overlap: float) -> tuple[list[int], int]:
    """Tile starts along one axis and the tile side used there (shrunk for short axes)."""
    if length <= tile:
        return [0], length
    # Floor the stride so neighbours overlap by at least the requested fraction.
    stride = max(1, int(tile * (1.0 - overlap)))
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] + tile < length:
        starts.append(length - tile)  # the last tile sits flush with the edge
    return starts, tile


def tile_grid(
    height: int,
    width: int,
    tile_h: int,
    tile_w: int,
    overlap: float = 0.25,
    *,
    max_tiles: int | None = None,
) -> list[Tile]:
    """Row-major tiles covering every pixel of a height x width frame.

    Neighbouring tiles overlap by at least `overlap` of the tile side; the last row and
    column are aligned to the frame's edge (so they may overlap more). Along an axis
    shorter than the tile, one tile spans the whole axis (preprocessing resizes it).
    More than `max_tiles` tiles is a ValueError, raised before any tile is built.
    """
    if not 0.0 <= overlap < MAX_OVERLAP:
        raise ValueError(f"overlap must be in [0, {MAX_OVERLAP}), got {overlap}")
    if min(height, width) < 1:
        raise ValueError(f"frame must be at least 1x1 px, got {width}x{height} (w x h)")
    if min(tile_h, tile_w) < 1:
        raise ValueError(f"tile must be at least 1x1 px, got {tile_w}x{tile_h} (w x h)")
    ys, th = _axis_starts(height, tile_h, overlap)
    xs, tw = _axis_starts(width, tile_w, overlap)
    if max_tiles is not None and len(ys) * len(xs) > max_tiles:
        raise ValueError(
            f"a {width}x{height} frame in {tile_w}x{tile_h} tiles at overlap {overlap} needs "
            f"{len(ys) * len(xs):,} tiles, over the limit of {max_tiles:,}; lower the overlap "
            "or send a smaller frame"
        )
    return [Tile(x, y, tw, th) for y in ys for x in xs]


def iter_tile_batches(
    image: np.ndarray, tiles: Sequence[Tile], batch_size: int
) -> Iterator[tuple[list[Tile], list[np.ndarray]]]:
    """Yield (tiles, crops) `batch_size` at a time; crops are views into `image`, not copies."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    height, width = image.shape[:2]
    for start in range(0, len(tiles), batch_size):
        chunk = list(tiles[start : start + batch_size])
        for t in chunk:
            if t.x < 0 or t.y < 0 or t.x + t.w > width or t.y + t.h > height:
                raise ValueError(f"{t} lies outside the {width}x{height} (w x h) image")
        yield chunk, [image[t.y : t.y + t.h, t.x : t.x + t.w] for t in chunk]


def classify_tiles(
    image: np.ndarray,
    tiles: Sequence[Tile],
    classify: Callable[[list[np.ndarray]], np.ndarray],
    *,
    batch_size: int = 32,
) -> np.ndarray:
    """Run `classify` (crops -> n x K probabilities) over all tiles in batches; N x K out."""
    parts = [
        np.asarray(classify(crops)) for _, crops in iter_tile_batches(image, tiles, batch_size)
    ]
    if not parts:
        raise ValueError("no tiles to classify")
    probs = np.concatenate(parts)
    if probs.ndim != 2 or len(probs) != len(tiles):
        raise ValueError(
            f"classifier returned shape {probs.shape} for {len(tiles)} tiles; expected (N, K)"
        )
    return probs


def _touching_pairs(boxes: np.ndarray, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (i < j) of boxes [x0, y0, x1, y1) that overlap or share an edge or corner.

    Compared `chunk` rows at a time so that a frame full of defects needs chunk x N booleans,
    not N x N.
    """
    x0, y0, x1, y1 = (boxes[:, k] for k in range(4))
    firsts, seconds = [], []
    for start in range(0, len(boxes), chunk):
        rows = slice(start, start + chunk)
        touch = (
            (x0[rows, None] <= x1[None, :])
            & (x0[None, :] <= x1[rows, None])
            & (y0[rows, None] <= y1[None, :])
            & (y0[None, :] <= y1[rows, None])
        )
        i, j = np.nonzero(touch)
        i += start
        keep = i < j
        firsts.append(i[keep])
        seconds.append(j[keep])
    return np.concatenate(firsts), np.concatenate(seconds)


def merge_regions(
    tiles: Sequence[Tile],
    probs: np.ndarray,
    class_names: Sequence[str],
    good_class: str,
    *,
    threshold: float = 0.5,
) -> list[Region]:
    """Group defective tiles (1 - P(good) >= threshold) into regions, top to bottom.

    Tiles whose boxes overlap or touch form one region (connected components of the
    tile-adjacency graph) with their union box. A region's label is the defect class
    with the largest probability summed over its tiles; its confidence is the largest
    defect probability among them.
    """
    probs = np.asarray(probs, dtype=np.float64)
    names = list(class_names)
    if good_class not in names:
        raise ValueError(f"good_class {good_class!r} is not one of {names}")
    if len(names) < 2:
        raise ValueError(f"need a good class and at least one defect class, got {names}")
    if probs.ndim != 2 or probs.shape != (len(tiles), len(names)):
        raise ValueError(
            f"expected probabilities of shape ({len(tiles)}, {len(names)}), got {probs.shape}"
        )
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")

    good = names.index(good_class)
    defect_idx = np.array([k for k in range(len(names)) if k != good])
    defect_p = 1.0 - probs[:, good]
    hit = np.flatnonzero(defect_p >= threshold)
    if hit.size == 0:
        return []
    flagged = [tiles[int(k)] for k in hit]
    boxes = np.array([[t.x, t.y, t.x + t.w, t.y + t.h] for t in flagged], dtype=np.int64)
    i, j = _touching_pairs(boxes)
    graph = coo_matrix((np.ones(i.size, np.int8), (i, j)), shape=(hit.size, hit.size))
    n_groups, group_of = connected_components(graph, directed=False)

    regions = []
    for g in range(n_groups):
        members = np.flatnonzero(group_of == g)
        x0, y0 = boxes[members, :2].min(axis=0)
        x1, y1 = boxes[members, 2:].max(axis=0)
        class_mass = probs[np.ix_(hit[members], defect_idx)].sum(axis=0)
        regions.append(
            Region(
                x=int(x0),
                y=int(y0),
                w=int(x1 - x0),
                h=int(y1 - y0),
                label=names[int(defect_idx[int(np.argmax(class_mass))])],
                confidence=float(defect_p[hit[members]].max()),
                tiles=int(members.size),
            )
        )
    regions.sort(key=lambda r: (r.y, r.x))
    return regions


def to_millimetres(region: Region, pixel_pitch_mm: float | tuple[float, float]) -> dict:
    """Region box in millimetres: {x_mm, y_mm, w_mm, h_mm}.

    `pixel_pitch_mm` is one pitch for square pixels, or (across, along) = (x, y): a line
    camera's across-web pitch is set by its optics, the along-web pitch by the encoder.
    """
    if isinstance(pixel_pitch_mm, tuple):
        if len(pixel_pitch_mm) != 2:
            raise ValueError(f"pixel_pitch_mm must be one value or (x, y), got {pixel_pitch_mm}")
        px, py = (float(v) for v in pixel_pitch_mm)
    else:
        px = py = float(pixel_pitch_mm)
    if px <= 0 or py <= 0:
        raise ValueError(f"pixel pitch must be positive, got {pixel_pitch_mm}")
    return {
        "x_mm": region.x * px,
        "y_mm": region.y * py,
        "w_mm": region.w * px,
        "h_mm": region.h * py,
    }
