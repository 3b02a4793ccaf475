"""Test-time views inside the exported graph: the symmetries, their inverses, the averaging."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from cellinspect.datasets.preprocess import PreprocessSpec
from cellinspect.models.card import (
    HEATMAP_NAME,
    LOGITS_NAME,
    PROBABILITIES_NAME,
    ModelCard,
    ViewSet,
)
from cellinspect.training.config import TrainConfig
from cellinspect.training.views import VIEW_INDICES, ViewAveraged, unview, view, with_views


def test_views_are_distinct_symmetries_and_unview_inverts_them() -> None:
    image = torch.arange(2 * 3 * 5 * 5, dtype=torch.float32).reshape(2, 3, 5, 5)
    seen = []
    for k in range(8):
        turned = view(image, k)
        assert turned.shape == image.shape
        assert torch.equal(unview(turned, k), image)
        assert not any(torch.equal(turned, other) for other in seen)
        seen.append(turned)
    assert torch.equal(view(image, 1)[0, 0, 0], image[0, 0, :, -1])  # counter-clockwise turn
    assert torch.equal(view(image, 4), image.flip(-1))  # left-right mirror
    assert torch.equal(view(image, 6), image.flip(-2))  # top-bottom mirror


def test_flips_keep_the_shape_of_a_rectangle() -> None:
    image = torch.rand(1, 1, 4, 7)
    for k in VIEW_INDICES[ViewSet.FLIPS]:
        assert view(image, k).shape == image.shape
        assert torch.equal(unview(view(image, k), k), image)
    assert len(VIEW_INDICES[ViewSet.FLIPS]) == ViewSet.FLIPS.passes == 4
    assert len(VIEW_INDICES[ViewSet.ISOTROPIC]) == ViewSet.ISOTROPIC.passes == 8


class _Probe(nn.Module):
    """logits = (sum of the top-left quadrant, sum of the rest); heatmap = the image itself:
    a net that sees orientation, and a map whose every pixel says where it came from."""

    output_names = [LOGITS_NAME, PROBABILITIES_NAME, HEATMAP_NAME]

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h, w = image.shape[-2] // 2, image.shape[-1] // 2
        corner = image[..., :h, :w].sum(dim=(1, 2, 3))
        logits = torch.stack([corner, image.sum(dim=(1, 2, 3)) - corner], dim=1)
        return logits, torch.softmax(logits, dim=1), image[:, 0]


@pytest.mark.parametrize("views", [ViewSet.FLIPS, ViewSet.ISOTROPIC])
def test_logits_are_averaged_over_views_and_heatmaps_turned_back(views: ViewSet) -> None:
    image = torch.rand(3, 1, 6, 6)
    probe = _Probe()
    logits, probabilities, heatmap = ViewAveraged(probe, views)(image)
    expected = torch.stack([probe(view(image, k))[0] for k in VIEW_INDICES[views]]).mean(dim=0)
    torch.testing.assert_close(logits, expected)
    torch.testing.assert_close(probabilities, torch.softmax(expected, dim=1))
    # Every view's map, turned back, is the input again: so is their mean. A map averaged
    # without turning back would blur the image into its symmetric part.
    torch.testing.assert_close(heatmap, image[:, 0])
    assert not torch.allclose(logits, probe(image)[0])  # the views did change the answer


def test_none_leaves_the_model_alone_and_quarter_turns_need_a_square() -> None:
    probe = _Probe()
    assert with_views(probe, ViewSet.NONE, (48, 64)) is probe
    assert isinstance(with_views(probe, ViewSet.FLIPS, (48, 64)), ViewAveraged)
    with pytest.raises(ValueError, match="needs a square input, not 48x64; use 'flips'"):
        with_views(probe, ViewSet.ISOTROPIC, (48, 64))


def test_training_config_refuses_quarter_turns_of_a_rectangle() -> None:
    with pytest.raises(ValueError, match="needs a square input"):
        TrainConfig(data="d", out="o", img_size="48x64", test_time_views="isotropic")
    cfg = TrainConfig(data="d", out="o", img_size=64, test_time_views="isotropic")
    assert cfg.test_time_views is ViewSet.ISOTROPIC


def _card(views: str, height: int, width: int) -> ModelCard:
    return ModelCard(
        name="m",
        arch="resnet18_half",
        class_names=["defective", "functional"],
        good_class="functional",
        preprocessing=PreprocessSpec(height=height, width=width),
        opset=18,
        test_time_views=views,
    )


def test_card_records_views_and_older_cards_had_none() -> None:
    card = _card("flips", 48, 64)
    assert ModelCard.model_validate_json(card.to_json()).test_time_views is ViewSet.FLIPS
    older = json.loads(card.to_json())
    del older["test_time_views"]
    assert ModelCard.model_validate(older).test_time_views is ViewSet.NONE
    with pytest.raises(ValueError, match="needs a square input, not 48x64"):
        _card("isotropic", 48, 64)
