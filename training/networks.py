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
from torch.nn import functional
from torchvision import models as tvm

from cellinspect.models.card import (
    HEATMAP_NAME,
    LOGITS_NAME,
    PROBABILITIES_NAME,
    HeatmapSource,
)

log = logging.getLogger(__name__)


class Arch(StrEnum):
    RESNET18 = "resnet18"
    RESNET18_HALF = "resnet18_half"  # a quarter of the compute: long CPU schedules
    RESNET34 = "resnet34"  # larger configurations, for GPU training
    RESNET50 = "resnet50"
    MOBILENET_V3_SMALL = "mobilenet_v3_small"
    MOBILENET_V3_LARGE = "mobilenet_v3_large"
    EFFICIENTNET_B0 = "efficientnet_b0"


def resnet18_half(*, weights: object = None, num_classes: int = 1000) -> tvm.ResNet:
    """ResNet-18 at half width (stages of 32, 64, 128, 256 channels): a quarter of its
    parameters (2.8 M) and multiply-adds, so a CPU budget buys four times the epochs; on
    ELPV, 60 epochs of it beat 40 of the full net (benchmarks/RESULTS.md). torchvision
    fixes ResNet's widths at 64-512, so the layers are rebuilt here, then initialised as
    torchvision initialises its own."""
    if weights is not None:
        raise ValueError("resnet18_half has no published weights; pass a local weights file")
    block = tvm.resnet.BasicBlock
    net = tvm.ResNet(block, [2, 2, 2, 2], num_classes=num_classes)
    net.inplanes = 32
    net.conv1 = nn.Conv2d(3, 32, kernel_size=7, stride=2, padding=3, bias=False)
    net.bn1 = nn.BatchNorm2d(32)
    net.layer1 = net._make_layer(block, 32, 2)
    net.layer2 = net._make_layer(block, 64, 2, stride=2)
    net.layer3 = net._make_layer(block, 128, 2, stride=2)
    net.layer4 = net._make_layer(block, 256, 2, stride=2)
    net.fc = nn.Linear(256, num_classes)
    for module in net.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    return net


_BUILDERS: dict[Arch, Callable[..., nn.Module]] = {
    Arch.RESNET18: tvm.resnet18,
    Arch.RESNET18_HALF: resnet18_half,
    Arch.RESNET34: tvm.resnet34,
    Arch.RESNET50: tvm.resnet50,
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
    aux_cam: bool = False,
) -> nn.Module:
    """Build `arch` with `num_classes` outputs and an `in_chans`-channel stem.

    `aux_cam` adds the auxiliary class-activation head on the stride-16 feature map
    (`add_aux_cam_head`), which the fit loop trains and the exported heatmap reads.

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
    if aux_cam:
        add_aux_cam_head(model, num_classes)
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
    # A source trained with the auxiliary head lends its backbone to a model without one.
    skipped += [k for k in state if k.startswith(f"{AUX_CAM}.") and k not in own]
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


# The auxiliary head's attribute on the net, and so its state-dict prefix ("aux_cam.weight").
AUX_CAM = "aux_cam"


def add_aux_cam_head(net: nn.Module, num_classes: int) -> nn.Linear:
    """Attach the auxiliary class-activation head to `net` and return it.

    A linear layer on the globally averaged stride-16 feature map: the same as a 1 x 1
    convolution to one map per class followed by global average pooling, so its
    class-activation map is exact CAM (Zhou et al. 2016), at input / 16 instead of the last
    feature map's input / 32. It is trained beside the main head (TrainConfig.aux_cam_weight)
    and only the heatmap reads it: the logits never do.

    Zero-initialised, so it draws nothing from the random generator (a seeded run's backbone
    and main head start from the same weights with or without it) and sends no gradient into
    the backbone before it has learnt something.
    """
    channels = _last_conv(_stride16_block(net)).out_channels
    head = nn.utils.skip_init(nn.Linear, channels, num_classes)  # nn.Linear would draw
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    setattr(net, AUX_CAM, head)
    return head


def aux_cam_head(net: nn.Module) -> nn.Linear | None:
    """The net's auxiliary CAM head, or None for a net built without one."""
    head = getattr(net, AUX_CAM, None)
    return head if isinstance(head, nn.Linear) else None


def has_aux_cam_weights(state: dict[str, torch.Tensor]) -> bool:
    """Whether a state dict was saved from a net with the auxiliary CAM head."""
    return any(key.startswith(f"{AUX_CAM}.") for key in state)


def forward_with_aux(net: nn.Module, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, auxiliary logits) of a net with the auxiliary head, in one pass; the logits
    are bit-identical to `net(image)`."""
    head = aux_cam_head(net)
    if head is None:
        raise ValueError(f"{type(net).__name__} has no auxiliary CAM head ({AUX_CAM})")
    fine, last = _feature_maps(net, image)
    pool = net.avgpool
    assert isinstance(pool, nn.Module)
    logits = _head(net)(torch.flatten(pool(last), 1))
    return logits, head(fine.mean(dim=(2, 3)))


# What a net with the auxiliary head exports unless told otherwise, chosen by the pointing
# game on the validation split (benchmarks/RESULTS.md, "Defect heatmaps", session 4): as
# good as the auxiliary map alone on average over seeds, and no seed far below 0.80.
DEFAULT_AUX_SOURCE = HeatmapSource.AUX_CAM_X_GRAD_CAM


class ExportableClassifier(nn.Module):
    """The module that goes to ONNX: image -> (logits, probabilities[, heatmap]).

    With `good_index` (the card's good class) it also returns a defect heatmap, N x H x W
    in [0, 1] at the input size, from the same forward pass: a class-activation map of the
    defect log-odds, log(sum over defect classes of exp(logit)) - logit[good], the score
    whose sigmoid is the defect probability the operating point thresholds.

    `source` picks the map (HeatmapSource); by default a net with the auxiliary stride-16
    head exports DEFAULT_AUX_SOURCE and a net without it the Grad-CAM map, exactly as before
    the head existed.

    Grad-CAM is taken at the last convolutional feature map A, in closed form (the exporter
    cannot trace autograd): weights w = d(score)/d(pooled features) through the head, map =
    ReLU(sum_k w_k A_k). For a linear head after global average pooling (resnet18,
    efficientnet_b0) that is exactly CAM (Zhou et al. 2016) of the score's linearisation; for
    MobileNetV3's Linear-Hardswish-Linear head the Hardswish slope is taken at the image's own
    pooled features. Its resolution is input / 32: on 128 px tiles a 4 x 4 grid, whose peak
    lands on one of 16 cell centres 32 px apart, too coarse for pinhole-sized defects. The
    auxiliary head's map is exact CAM of its own defect log-odds at input / 16. Maps are
    upsampled bilinearly. The defect classes are weighed by their softmax at temperature 1
    (calibration comes after export; it barely moves where the map peaks), and a map with no
    real positive evidence stays dim rather than being stretched (HEATMAP_FLOOR).
    """

    def __init__(
        self,
        net: nn.Module,
        *,
        good_index: int | None = None,
        source: HeatmapSource | None = None,
    ) -> None:
        super().__init__()
        self.net = net
        self.good_index = good_index
        has_aux = aux_cam_head(net) is not None
        if source is None:
            source = DEFAULT_AUX_SOURCE if has_aux else HeatmapSource.GRAD_CAM
        if source is not HeatmapSource.GRAD_CAM and not has_aux:
            raise ValueError(
                f"heatmap source {source.value!r} needs the auxiliary CAM head, which this net "
                f"lacks; without it choose {HeatmapSource.GRAD_CAM.value!r}"
            )
        self.source = source
        if good_index is not None:
            head = _head(net)
            classes = next(m for m in reversed(list(head.modules())) if isinstance(m, nn.Linear))
            if not 0 <= good_index < classes.out_features:
                raise ValueError(
                    f"good_index {good_index} is not a class index (0..{classes.out_features - 1})"
                )

    @property
    def output_names(self) -> list[str]:
        names = [LOGITS_NAME, PROBABILITIES_NAME]
        return names if self.good_index is None else [*names, HEATMAP_NAME]

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.good_index is None:
            logits = self.net(image)
            return logits, torch.softmax(logits, dim=1)
        fine, last = _feature_maps(self.net, image)
        pool = self.net.avgpool
        assert isinstance(pool, nn.Module)  # the net's own pooling: logits stay bit-identical
        pooled = torch.flatten(pool(last), 1)
        logits, weights = _head_with_evidence(_head(self.net), pooled, self.good_index)
        size = image.shape[-2:]
        if self.source is HeatmapSource.GRAD_CAM:
            return (
                logits,
                torch.softmax(logits, dim=1),
                class_activation_map(last, weights, size=size),
            )
        aux = aux_cam_head(self.net)
        assert aux is not None  # checked in __init__
        aux_logits = aux(fine.mean(dim=(2, 3)))
        aux_weights = _defect_direction(aux_logits, self.good_index) @ aux.weight
        heatmap = class_activation_map(fine, aux_weights, size=size)
        if self.source is HeatmapSource.AUX_CAM_X_GRAD_CAM:
            heatmap = gated_map(heatmap, class_activation_map(last, weights, size=size))
        return logits, torch.softmax(logits, dim=1), heatmap


# A map whose positive evidence peaks below this share of its strongest (mostly negative)
# evidence is left dim instead of being stretched to 1: "nothing defect-like anywhere".
HEATMAP_FLOOR = 1e-2


def class_activation_map(
    features: torch.Tensor, weights: torch.Tensor, *, size: tuple[int, int] | torch.Size
) -> torch.Tensor:
    """ReLU(sum_k w_k A_k), upsampled bilinearly to `size`, scaled to a peak of 1 per image.

    features: N x C x h x w; weights: N x C -> N x H x W float in [0, 1].
    """
    raw = torch.bmm(weights.unsqueeze(1), features.flatten(2))  # N x 1 x hw
    raw = raw.view(features.shape[0], 1, features.shape[2], features.shape[3])
    cam = functional.interpolate(torch.relu(raw), size=size, mode="bilinear", align_corners=False)
    peak = cam.amax(dim=(2, 3), keepdim=True)
    scale = torch.maximum(peak, HEATMAP_FLOOR * raw.abs().amax(dim=(2, 3), keepdim=True))
    return (cam / _nonzero(scale)).squeeze(1)


def gated_map(fine: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
    """fine * coarse (N x H x W maps in [0, 1]), rescaled so its peak is the product of the
    two maps' peaks: two full maps give a full one, a dim one keeps the result dim, and maps
    that barely overlap are not stretched beyond 1 / HEATMAP_FLOOR."""
    both = fine * coarse
    peak = both.amax(dim=(1, 2), keepdim=True)
    target = fine.amax(dim=(1, 2), keepdim=True) * coarse.amax(dim=(1, 2), keepdim=True)
    scale = torch.maximum(peak, HEATMAP_FLOOR * target)
    return both * target / _nonzero(scale)


def _nonzero(scale: torch.Tensor) -> torch.Tensor:
    """`scale` with zeros replaced by 1: a map with no evidence at all (an untrained auxiliary
    head) is all 0 and stays 0 instead of 0 / 0. An epsilon would not do: the ONNX exporter
    folds `x + 1e-12` away, and a NaN anywhere in the graph also breaks INT8 calibration."""
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def _stride16_block(net: nn.Module) -> nn.Module:
    """The module whose output is the last stride-16 feature map (input / 16)."""
    if isinstance(net, tvm.ResNet):
        return net.layer3
    if isinstance(net, tvm.MobileNetV3 | tvm.EfficientNet):
        features = net.features
        assert isinstance(features, nn.Sequential)
        return features[_stride16_index(features)]
    raise TypeError(f"no heatmap for {type(net).__name__}; supported: {', '.join(Arch)}")


def _stride16_index(features: nn.Sequential) -> int:
    """The block before the last downsampling one: its output is at input / 16."""
    downsampling = [
        i
        for i, block in enumerate(features)
        if any(isinstance(m, nn.Conv2d) and max(m.stride) > 1 for m in block.modules())
    ]
    return downsampling[-1] - 1


def _last_conv(module: nn.Module) -> nn.Conv2d:
    return [m for m in module.modules() if isinstance(m, nn.Conv2d)][-1]


def _feature_maps(net: nn.Module, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the last stride-16 feature map, the last feature map: what global average pooling
    reads), from one pass through the backbone."""
    if isinstance(net, tvm.ResNet):
        x = net.maxpool(net.relu(net.bn1(net.conv1(image))))
        fine = net.layer3(net.layer2(net.layer1(x)))
        return fine, net.layer4(fine)
    if isinstance(net, tvm.MobileNetV3 | tvm.EfficientNet):
        features = net.features
        assert isinstance(features, nn.Sequential)
        split = _stride16_index(features) + 1
        fine = features[:split](image)
        return fine, features[split:](fine)
    raise TypeError(f"no heatmap for {type(net).__name__}; supported: {', '.join(Arch)}")


def _head(net: nn.Module) -> nn.Module:
    """The layers after global average pooling."""
    if isinstance(net, tvm.ResNet):
        return net.fc
    if isinstance(net, tvm.MobileNetV3 | tvm.EfficientNet):
        return net.classifier
    raise TypeError(f"no heatmap for {type(net).__name__}; supported: {', '.join(Arch)}")


def _hardswish_slope(x: torch.Tensor) -> torch.Tensor:
    """d/dx of x * relu6(x + 3) / 6."""
    inner = (2 * x + 3) / 6
    return torch.where(x <= -3, torch.zeros_like(x), torch.where(x >= 3, torch.ones_like(x), inner))


def _defect_direction(logits: torch.Tensor, good_index: int) -> torch.Tensor:
    """d(defect log-odds)/d(logits): d/dz [logsumexp(z_defect) - z_good] is the softmax over
    the defect classes, and -1 at good."""
    good = functional.one_hot(torch.tensor(good_index), logits.shape[1]).to(logits.dtype)
    defect_share = torch.softmax(logits.masked_fill(good.bool(), float("-inf")), dim=1)
    return defect_share - good


def _head_with_evidence(
    head: nn.Module, pooled: torch.Tensor, good_index: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, d(defect log-odds)/d(pooled)): one forward through the head, one closed-form
    backward through its Linear / activation / Dropout layers (inference: Dropout is identity).
    """
    layers = list(head) if isinstance(head, nn.Sequential) else [head]
    inputs = []
    x = pooled
    for layer in layers:
        inputs.append(x)
        x = layer(x)
    logits = x
    grad = _defect_direction(logits, good_index)
    for layer, x in zip(reversed(layers), reversed(inputs), strict=True):
        if isinstance(layer, nn.Linear):
            grad = grad @ layer.weight
        elif isinstance(layer, nn.Hardswish):
            grad = grad * _hardswish_slope(x)
        elif isinstance(layer, nn.ReLU):
            grad = grad * (x > 0).to(grad.dtype)
        elif not isinstance(layer, nn.Dropout | nn.Identity):
            raise TypeError(f"no closed-form heatmap through {type(layer).__name__} in the head")
    return logits, grad
