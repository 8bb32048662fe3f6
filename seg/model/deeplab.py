"""DeepLabV3+ over a dilated ResNet.

The backbone keeps torchvision's ResNet key layout (``conv1``, ``bn1``, ``layer1.0.conv1``,
``layer2.0.downsample.0``...) so ImageNet weights in that layout load as they are; it is
written here because torchvision's BasicBlock refuses dilation, and the study's model is a
dilated ResNet-34. Depth 34 at output stride 8 is exactly the model of the DeepLabV3+ study
this project reproduces. Files are seg/model/weights.py's: this module knows nothing about them.

mmsegmentation's DeepLabV3+ (``deeplabv3plus_r50-d8``) is the same skeleton with other parts,
each an option: ResNetV1c's deep stem (``stem="deep"``) and contracted dilations
(``contract_dilation``), its ``DepthwiseSeparableASPPHead`` (``head="separable-aspp"``) and
its auxiliary ``FCNHead`` on layer3 (``aux_head``, training only). Those modules keep the
layer order of mmseg's, so a checkpoint of mmseg's maps onto them key for key
(tools/convert_mmseg.py). Exact for the bottleneck depths (50, 101), mmseg's configs: at
depths 18 and 34 seg's basic block dilates both its convs (the study's), mmseg's the first.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from seg.core.cityscapes import NUM_CLASSES

DEPTHS = {18: ("basic", (2, 2, 2, 2)), 34: ("basic", (3, 4, 6, 3)), 50: ("bottleneck", (3, 4, 6, 3)),
          101: ("bottleneck", (3, 4, 23, 3))}  # fmt: skip
# output stride -> (stride, dilation) of layer3 and layer4, and the ASPP rates
OUTPUT_STRIDES = {8: (((1, 2), (1, 4)), (12, 24, 36)), 16: (((2, 1), (1, 2)), (6, 12, 18))}
STEMS = ("torchvision", "deep")  # 7x7 conv | ResNetV1c's three 3x3 convs (32-32-64 channels)
# the study's ASPP and decoder (256 channels, dense convs) | mmseg's DepthwiseSeparableASPPHead
HEADS = {"aspp": 256, "separable-aspp": 512}  # -> the head's channels
AUX_CHANNELS = 256  # mmseg's auxiliary FCNHead: one 3x3 conv of 256 channels on layer3


def _conv3x3(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, width: int, stride: int = 1, dilation: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = _conv3x3(cin, width, stride, dilation)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = _conv3x3(width, width, 1, dilation)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class Bottleneck(nn.Module):
    expansion = 4  # torchvision's v1.5: the stride sits on the 3x3 conv

    def __init__(self, cin: int, width: int, stride: int = 1, dilation: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = _conv3x3(width, width, stride, dilation)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, width * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(width * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class ResNet(nn.Module):
    """A dilated ResNet returning (layer1, layer4) features.

    ``stem="deep"`` is ResNetV1c's stem (mmseg's and open-mmlab's ``resnet50_v1c``), keys
    ``stem.0``...``stem.7`` as there; ``contract_dilation`` halves the dilation of a dilated
    layer's first block, as mmseg's ResLayer does for ResNetV1c."""

    def __init__(
        self, depth: int = 34, output_stride: int = 8, stem: str = "torchvision", contract_dilation: bool = False
    ) -> None:
        super().__init__()
        if depth not in DEPTHS:
            raise ValueError(f"depth {depth}: choose from {', '.join(map(str, DEPTHS))}")
        if output_stride not in OUTPUT_STRIDES:
            raise ValueError(f"output stride {output_stride}: choose from {', '.join(map(str, OUTPUT_STRIDES))}")
        if stem not in STEMS:
            raise ValueError(f"stem {stem!r}: choose from {', '.join(STEMS)}")
        kind, layers = DEPTHS[depth]
        block = BasicBlock if kind == "basic" else Bottleneck
        (layer3, layer4), _ = OUTPUT_STRIDES[output_stride]
        self.contract_dilation = contract_dilation
        if stem == "deep":
            self.stem = nn.Sequential(
                *_conv_bn_relu(3, 32, 3, stride=2), *_conv_bn_relu(32, 32, 3), *_conv_bn_relu(32, 64, 3)
            )
        else:
            self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
            self.bn1 = nn.BatchNorm2d(64)
            self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.channels = 64
        self.layer1 = self._layer(block, 64, layers[0], stride=1, dilation=1)
        self.layer2 = self._layer(block, 128, layers[1], stride=2, dilation=1)
        self.layer3 = self._layer(block, 256, layers[2], *layer3)
        self.layer4 = self._layer(block, 512, layers[3], *layer4)
        self.low_channels = 64 * block.expansion
        self.out_channels = 512 * block.expansion

    def _layer(self, block: type, width: int, blocks: int, stride: int, dilation: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.channels != width * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.channels, width * block.expansion, 1, stride=stride, bias=False),
                nn.BatchNorm2d(width * block.expansion),
            )
        first = dilation // 2 if self.contract_dilation and dilation > 1 else dilation
        modules = [block(self.channels, width, stride, first, downsample)]
        self.channels = width * block.expansion
        modules += [block(self.channels, width, 1, dilation) for _ in range(1, blocks)]
        return nn.Sequential(*modules)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        low, _, high = self.features(x)
        return low, high

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """layer1, layer3 and layer4 features (layer3 feeds the auxiliary head)."""
        x = self.stem(x) if hasattr(self, "stem") else self.relu(self.bn1(self.conv1(x)))
        low = self.layer1(self.maxpool(x))
        mid = self.layer3(self.layer2(low))
        return low, mid, self.layer4(mid)


def _conv_bn_relu(cin: int, cout: int, kernel: int = 1, dilation: int = 1, stride: int = 1) -> nn.Sequential:
    padding = 0 if kernel == 1 else dilation
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


def _separable(cin: int, cout: int, dilation: int = 1) -> nn.Sequential:
    """mmcv's DepthwiseSeparableConvModule: a depthwise 3x3 conv and a pointwise 1x1 conv,
    each followed by BN and ReLU (keys 0, 1 and 3, 4)."""
    depthwise = nn.Conv2d(cin, cin, 3, padding=dilation, dilation=dilation, groups=cin, bias=False)
    return nn.Sequential(depthwise, nn.BatchNorm2d(cin), nn.ReLU(inplace=True), *_conv_bn_relu(cin, cout))


class ImagePooling(nn.Module):
    """ASPP's global branch: average pool, 1x1 conv, back to the feature map's size.

    With BN (the study's model), training needs more than one value per channel: a batch
    of 2+ on the device, or SyncBatchNorm over 2+ processes. ``norm=False`` replaces BN by
    a conv bias, so batch 1 on a single device trains too.
    """

    def __init__(self, cin: int, cout: int, norm: bool = True) -> None:
        super().__init__()
        if norm:
            self.project = _conv_bn_relu(cin, cout)
        else:
            self.project = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=True), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.project(F.adaptive_avg_pool2d(x, 1))
        return pooled.expand(-1, -1, x.shape[2], x.shape[3])


class ASPP(nn.Module):
    def __init__(self, cin: int, rates: tuple[int, ...], channels: int = 256, pool_norm: bool = True) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            [_conv_bn_relu(cin, channels)] + [_conv_bn_relu(cin, channels, 3, rate) for rate in rates]
        )
        self.pool = ImagePooling(cin, channels, norm=pool_norm)
        self.project = nn.Sequential(_conv_bn_relu(channels * (len(rates) + 2), channels), nn.Dropout(0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(torch.cat([branch(x) for branch in self.branches] + [self.pool(x)], dim=1))


class SeparableASPP(nn.Module):
    """The ASPP of mmseg's DepthwiseSeparableASPPHead, in its order: image pooling first, a
    1x1 conv, depthwise-separable atrous convs, then ASPPHead's dense 3x3 bottleneck (mmseg
    1.x keeps its parent's; no dropout here: mmseg drops out before the classifier)."""

    def __init__(self, cin: int, rates: tuple[int, ...], channels: int = 512, pool_norm: bool = True) -> None:
        super().__init__()
        self.pool = ImagePooling(cin, channels, norm=pool_norm)
        self.branches = nn.ModuleList([_conv_bn_relu(cin, channels)] + [_separable(cin, channels, r) for r in rates])
        self.project = _conv_bn_relu(channels * (len(rates) + 2), channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(torch.cat([self.pool(x)] + [branch(x) for branch in self.branches], dim=1))


def aux_head(cin: int, num_classes: int) -> nn.Sequential:
    """mmseg's auxiliary FCNHead (num_convs 1, concat_input False): a 3x3 conv, BN, ReLU,
    dropout 0.1, a 1x1 classifier."""
    return nn.Sequential(
        _conv_bn_relu(cin, AUX_CHANNELS, 3), nn.Dropout2d(0.1), nn.Conv2d(AUX_CHANNELS, num_classes, 1)
    )


class DeepLabV3Plus(nn.Module):
    """DeepLabV3+: dilated ResNet, ASPP, a decoder fusing 48-channel layer1 features.

    ``head="separable-aspp"`` is mmseg's head (512 channels, separable convs, Dropout2d 0.1
    before the classifier); ``aux=True`` adds mmseg's auxiliary head on layer3, whose logits
    the forward returns beside the main ones in training mode only: ``(logits, aux_logits)``,
    both at the input's size. In eval mode the forward is the same with or without it."""

    def __init__(
        self,
        depth: int = 34,
        output_stride: int = 8,
        num_classes: int = NUM_CLASSES,
        aspp_pool_norm: bool = True,
        stem: str = "torchvision",
        contract_dilation: bool = False,
        head: str = "aspp",
        aux: bool = False,
    ) -> None:
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"head {head!r}: choose from {', '.join(HEADS)}")
        self.backbone = ResNet(depth, output_stride, stem, contract_dilation)
        _, rates = OUTPUT_STRIDES[output_stride]
        channels, cin, study = HEADS[head], self.backbone.out_channels, head == "aspp"
        # registered in the study model's order (backbone, aspp, reduce, decoder, classifier):
        # reset_parameters draws each module's init in that order, so a seed gives its weights as before
        aspp = ASPP if study else SeparableASPP
        self.aspp: nn.Module = aspp(cin, rates, channels, pool_norm=aspp_pool_norm)
        self.reduce = _conv_bn_relu(self.backbone.low_channels, 48)
        if study:
            self.decoder = nn.Sequential(
                _conv_bn_relu(channels + 48, channels, 3), _conv_bn_relu(channels, channels, 3)
            )
            self.dropout: nn.Module = nn.Identity()  # the study's dropout is in the ASPP's projection
        else:
            self.decoder = nn.Sequential(_separable(channels + 48, channels), _separable(channels, channels))
            self.dropout = nn.Dropout2d(0.1)
        self.classifier = nn.Conv2d(channels, num_classes, 1)
        self.aux_head = aux_head(self.backbone.out_channels // 2, num_classes) if aux else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Kaiming normal (fan_out, relu) for convs; BN weight 1, bias 0 (the study's init)."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.modules.batchnorm._BatchNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        low, mid, high = self.backbone.features(x)
        high = self.aspp(high)
        high = F.interpolate(high, size=low.shape[2:], mode="bilinear", align_corners=False)
        out = self.decoder(torch.cat([high, self.reduce(low)], dim=1))
        logits = F.interpolate(
            self.classifier(self.dropout(out)), size=x.shape[2:], mode="bilinear", align_corners=False
        )
        if self.aux_head is None or not self.training:
            return logits
        aux = F.interpolate(self.aux_head(mid), size=x.shape[2:], mode="bilinear", align_corners=False)
        return logits, aux


def from_config(model: Mapping[str, Any], training: bool = False) -> DeepLabV3Plus:
    """The model a config's ``model`` section (or a sidecar's) describes; with ``training``,
    its auxiliary head too when ``model.aux_head`` asks for one (inference never needs it).
    Keys a sidecar older than them lacks take the study's values."""
    return DeepLabV3Plus(
        model["depth"],
        model["output_stride"],
        aspp_pool_norm=model["aspp_pool_norm"],
        stem=model.get("stem", "torchvision"),
        contract_dilation=model.get("contract_dilation", False),
        head=model.get("head", "aspp"),
        aux=training and bool(model.get("aux_head", False)),
    )


def depth_of(model: DeepLabV3Plus) -> int:
    """The ResNet depth of ``model``'s backbone (18, 34, 50 or 101)."""
    layers = tuple(len(getattr(model.backbone, f"layer{i}")) for i in range(1, 5))
    kind = "basic" if isinstance(model.backbone.layer1[0], BasicBlock) else "bottleneck"
    return next(d for d, spec in DEPTHS.items() if spec == (kind, layers))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
