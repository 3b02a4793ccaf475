"""Classifier networks: a name -> torchvision constructor registry with native 1-channel input.

Nothing is ever downloaded: torchvision constructors are called with `weights=None`, and
pretrained weights come only from a local file the user names (`--weights PATH`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path

import torch
from torch import nn
from torchvision import models as tvm

log = logging.getLogger(__name__)


class Arch(StrEnum):
    RESNET18 = "resnet18"
    MOBILENET_V3_SMALL = "mobilenet_v3_small"
    MOBILENET_V3_LARGE = "mobilenet_v3_large"
    EFFICIENTNET_B0 = "efficientnet_b0"


_BUILDERS: dict[Arch, Callable[..., nn.Module]] = {
    Arch.RESNET18: tvm.resnet18,
    Arch.MOBILENET_V3_SMALL: tvm.mobilenet_v3_small,
    Arch.MOBILENET_V3_LARGE: tvm.mobilenet_v3_large,
    Arch.EFFICIENTNET_B0: tvm.efficientnet_b0,
}


def parse_arch(name: str) -> Arch:
    try:
        return Arch(name)
    except ValueError:
        valid = ", ".join(a.value for a in Arch)
        raise ValueError(f"unknown architecture {name!r}; choose one of: {valid}") from None


def _stem_conv(model: nn.Module) -> tuple[nn.Module, str, nn.Conv2d]:
    """The first convolution and where it hangs, so it can be swapped for another channel count."""
    if isinstance(model, tvm.ResNet):
        return model, "conv1", model.conv1
    features = model.features
    assert isinstance(features, nn.Sequential)
    stem = features[0]  # MobileNetV3 / EfficientNet: Conv2dNormActivation
    assert isinstance(stem, nn.Sequential) and isinstance(stem[0], nn.Conv2d)
    return stem, "0", stem[0]


def adapt_input_conv(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """RGB stem weights -> `in_chans` stem weights; gray sums the RGB filters (same response)."""
    if weight.shape[1] == in_chans:
        return weight
    if in_chans == 1:
        return weight.sum(dim=1, keepdim=True)
    repeat = -(-in_chans // weight.shape[1])
    return weight.repeat(1, repeat, 1, 1)[:, :in_chans] * (weight.shape[1] / in_chans)


def create_model(
    arch: str | Arch,
    *,
    num_classes: int,
    in_chans: int = 1,
    weights: str | Path | None = None,
    bn_momentum: float | None = 0.1,
) -> nn.Module:
    """Build `arch` with `num_classes` outputs and an `in_chans`-channel stem.

    `bn_momentum` overrides the BatchNorm running-statistics momentum (None keeps the
    torchvision default): MobileNetV3 ships 0.01, tuned for ImageNet's 10k+ steps per
    epoch; on a few thousand inspection images trained from scratch, its running
    statistics lag so far behind the weights that evaluation-mode outputs collapse.
    """
    arch = parse_arch(arch) if isinstance(arch, str) else arch
    model = _BUILDERS[arch](weights=None, num_classes=num_classes)
    if bn_momentum is not None:
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.momentum = bn_momentum
    parent, attr, conv = _stem_conv(model)
    if in_chans != conv.in_channels:
        new = nn.Conv2d(
            in_chans,
            conv.out_channels,
            kernel_size=conv.kernel_size,  # type: ignore[arg-type]
            stride=conv.stride,  # type: ignore[arg-type]
            padding=conv.padding,  # type: ignore[arg-type]
            bias=conv.bias is not None,
        )
        setattr(parent, attr, new)
    if weights is not None:
        load_local_weights(model, weights, arch=arch, in_chans=in_chans)
    return model


def load_local_weights(model: nn.Module, path: str | Path, *, arch: Arch, in_chans: int) -> None:
    """Load a local state dict (torchvision or cellinspect checkpoint), adapting stem and head.

    The classifier layer is kept from `model` when its shape differs (different class count).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: weights file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for bad pickles
        raise ValueError(f"{path}: not a loadable PyTorch weights file ({exc})") from exc
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    own = model.state_dict()
    _, _, conv = _stem_conv(model)
    stem_key = next(k for k, v in model.named_parameters() if v is conv.weight)
    if stem_key in state:
        state[stem_key] = adapt_input_conv(state[stem_key], in_chans)
    skipped = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    for key in skipped:
        del state[key]
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise ValueError(
            f"{path}: weights do not fit {arch.value}: unexpected keys {unexpected[:5]}"
        )
    log.info(
        "loaded %s: %d tensors kept from scratch (%s)", path, len(missing), ", ".join(missing[:4])
    )


class ExportableClassifier(nn.Module):
    """The module that goes to ONNX: image -> (logits, probabilities)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.net(image)
        return logits, torch.softmax(logits, dim=1)
