"""Test-time views inside the exported graph: the net sees each symmetric view of the input in
one batch, its logits are averaged and its heatmaps turned back and averaged.

Kept in the ONNX file rather than in serving so that every consumer (the service, `models
eval`, QA comparisons, the INT8 calibration) runs the same function with one call, and the
card's temperature and operating point are fitted to the averaged logits.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import nn

from cellinspect.models.card import HEATMAP_NAME, ViewSet, check_views_fit

# Elements of the square's symmetry group by index k in 0..7: k % 4 quarter turns
# (counter-clockwise), then a left-right mirror when k >= 4. FLIPS is the subgroup that keeps
# any rectangle's shape: identity, 180 degrees, left-right and (180 + left-right) top-bottom.
VIEW_INDICES: dict[ViewSet, tuple[int, ...]] = {
    ViewSet.NONE: (0,),
    ViewSet.FLIPS: (0, 2, 4, 6),
    ViewSet.ISOTROPIC: tuple(range(8)),
}


def view(image: torch.Tensor, k: int) -> torch.Tensor:
    """Symmetry k of the last two dimensions of `image`."""
    turned = torch.rot90(image, k % 4, dims=(-2, -1))
    return torch.flip(turned, dims=(-1,)) if k >= 4 else turned


def unview(image: torch.Tensor, k: int) -> torch.Tensor:
    """The inverse of `view(., k)`: a map of the view back onto the original image."""
    mirrored = torch.flip(image, dims=(-1,)) if k >= 4 else image
    return torch.rot90(mirrored, -(k % 4), dims=(-2, -1))


class ViewAveraged(nn.Module):
    """`model` (image -> logits, probabilities[, heatmap]) averaged over `views` of its input.

    The views run as one batch of len(views) x N images, so the cost is one larger forward
    pass. Logits are averaged (the probabilities are their softmax); a heatmap of view k is
    mapped back with `unview` before the maps are averaged, so it stays in [0, 1] and points
    at the same place of the original image.
    """

    def __init__(self, model: nn.Module, views: ViewSet) -> None:
        super().__init__()
        self.model = model
        self.views = views
        self.indices = VIEW_INDICES[views]

    @property
    def output_names(self) -> list[str]:
        return list(cast(list[str], self.model.output_names))

    @property
    def source(self) -> object:
        return getattr(self.model, "source", None)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        count = len(self.indices)
        outputs = self.model(torch.cat([view(image, k) for k in self.indices]))
        logits = outputs[0].reshape(count, -1, outputs[0].shape[-1]).mean(dim=0)
        result = [logits, torch.softmax(logits, dim=1)]
        if HEATMAP_NAME in self.output_names:
            maps = outputs[self.output_names.index(HEATMAP_NAME)]
            maps = maps.reshape(count, -1, *maps.shape[1:])
            result.append(
                torch.stack([unview(maps[i], k) for i, k in enumerate(self.indices)]).mean(dim=0)
            )
        return tuple(result)


def with_views(model: nn.Module, views: ViewSet, input_size: tuple[int, int]) -> nn.Module:
    """`model` itself for ViewSet.NONE (the graph is unchanged), else it wrapped in
    ViewAveraged; refuses quarter turns of a non-square `input_size` (height, width)."""
    check_views_fit(views, *input_size)
    return model if views is ViewSet.NONE else ViewAveraged(model, views).eval()
