"""Networks: every registered architecture, 1- and 3-channel stems, local weights only."""

from __future__ import annotations

import pytest
import torch

from cellinspect.training.networks import (
    Arch,
    adapt_input_conv,
    aux_cam_head,
    create_model,
    parse_arch,
    resnet18_half,
)


@pytest.mark.parametrize("arch", list(Arch))
@pytest.mark.parametrize("in_chans", [1, 3])
def test_every_arch_builds_with_native_channel_count(arch: Arch, in_chans: int) -> None:
    model = create_model(arch, num_classes=5, in_chans=in_chans).eval()
    with torch.no_grad():
        out = model(torch.randn(2, in_chans, 64, 64))
    assert out.shape == (2, 5)


def test_unknown_arch_lists_valid_choices() -> None:
    with pytest.raises(ValueError, match="resnet18.*mobilenet_v3_small"):
        parse_arch("vgg19")


def test_gray_stem_from_rgb_weights_gives_same_response_to_gray_input() -> None:
    rgb = torch.randn(8, 3, 3, 3)
    gray = adapt_input_conv(rgb, 1)
    x = torch.rand(1, 1, 9, 9)
    expected = torch.nn.functional.conv2d(x.repeat(1, 3, 1, 1), rgb)
    assert torch.allclose(torch.nn.functional.conv2d(x, gray), expected, atol=1e-5)


def test_local_rgb_weights_load_into_gray_model_with_new_head(tmp_path) -> None:
    source = create_model("resnet18", num_classes=1000, in_chans=3)
    path = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), path)
    model = create_model("resnet18", num_classes=4, in_chans=1, weights=path)
    assert torch.allclose(model.conv1.weight, source.conv1.weight.sum(1, keepdim=True))
    assert torch.equal(model.layer1[0].conv1.weight, source.layer1[0].conv1.weight)
    assert model.fc.out_features == 4


def test_missing_weights_file_is_named(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        create_model("resnet18", num_classes=2, weights=tmp_path / "nope.pth")


def test_weights_of_another_arch_are_refused(tmp_path) -> None:
    path = tmp_path / "mnv3.pth"
    torch.save(create_model("mobilenet_v3_small", num_classes=2).state_dict(), path)
    with pytest.raises(ValueError, match="do not fit resnet18"):
        create_model("resnet18", num_classes=2, weights=path)


def test_weights_with_the_aux_cam_head_lend_their_backbone_to_a_model_without_it(
    tmp_path,
) -> None:
    source = create_model("mobilenet_v3_small", num_classes=2, aux_cam=True)
    path = tmp_path / "aux.pth"
    torch.save(source.state_dict(), path)
    model = create_model("mobilenet_v3_small", num_classes=2, weights=path)
    assert aux_cam_head(model) is None
    assert torch.equal(model.classifier[0].weight, source.classifier[0].weight)
    with_head = create_model("mobilenet_v3_small", num_classes=2, aux_cam=True, weights=path)
    assert aux_cam_head(with_head) is not None


def test_aux_cam_head_leaves_a_seeded_models_weights_and_later_draws_unchanged() -> None:
    torch.manual_seed(0)
    plain, plain_draw = create_model("mobilenet_v3_small", num_classes=3), torch.rand(4)
    torch.manual_seed(0)
    with_head, head_draw = (
        create_model("mobilenet_v3_small", num_classes=3, aux_cam=True),
        torch.rand(4),
    )
    assert torch.equal(plain_draw, head_draw)
    state = with_head.state_dict()
    assert all(torch.equal(value, state[key]) for key, value in plain.state_dict().items())
    assert set(state) - set(plain.state_dict()) == {"aux_cam.weight", "aux_cam.bias"}


def test_resnet18_half_has_half_the_channels_and_a_quarter_of_the_weights() -> None:
    full, half = (create_model(a, num_classes=2, in_chans=1) for a in ("resnet18", "resnet18_half"))
    for stage in ("conv1", "layer1", "layer2", "layer3", "layer4"):
        full_out = [m for m in getattr(full, stage).modules() if isinstance(m, torch.nn.Conv2d)]
        half_out = [m for m in getattr(half, stage).modules() if isinstance(m, torch.nn.Conv2d)]
        assert [2 * m.out_channels for m in half_out] == [m.out_channels for m in full_out]
    ratio = sum(p.numel() for p in half.parameters()) / sum(p.numel() for p in full.parameters())
    assert 0.24 < ratio < 0.26
    # initialised like torchvision's own ResNet layers (He, fan-out), not PyTorch's default
    weight = half.layer4[1].conv2.weight
    assert abs(float(weight.detach().std()) - (2 / (256 * 9)) ** 0.5) < 0.002


def test_resnet18_half_has_no_published_weights() -> None:
    with pytest.raises(ValueError, match="no published weights"):
        resnet18_half(weights="IMAGENET1K_V1")
