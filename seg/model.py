"""DeepLabV3+ over a dilated ResNet.

The backbone keeps torchvision's ResNet key layout (``conv1``, ``bn1``, ``layer1.0.conv1``,
``layer2.0.downsample.0``...) so ImageNet weights in that layout load as they are; it is
written here because torchvision's BasicBlock refuses dilation, and the study's model is a
dilated ResNet-34. Depth 34 at output stride 8 is exactly the model of the DeepLabV3+ study
this project reproduces. Files are seg/weights.py's: this module knows nothing about them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from seg.cityscapes import NUM_CLASSES

DEPTHS = {18: ("basic", (2, 2, 2, 2)), 34: ("basic", (3, 4, 6, 3)), 50: ("bottleneck", (3, 4, 6, 3)),
          101: ("bottleneck", (3, 4, 23, 3))}  # fmt: skip
# output stride -> (stride, dilation) of layer3 and layer4, and the ASPP rates
OUTPUT_STRIDES = {8: (((1, 2), (1, 4)), (12, 24, 36)), 16: (((2, 1), (1, 2)), (6, 12, 18))}


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
    """A dilated ResNet returning (layer1, layer4) features."""

    def __init__(self, depth: int = 34, output_stride: int = 8) -> None:
        super().__init__()
        if depth not in DEPTHS:
            raise ValueError(f"depth {depth}: choose from {', '.join(map(str, DEPTHS))}")
        if output_stride not in OUTPUT_STRIDES:
            raise ValueError(f"output stride {output_stride}: choose from {', '.join(map(str, OUTPUT_STRIDES))}")
        kind, layers = DEPTHS[depth]
        block = BasicBlock if kind == "basic" else Bottleneck
        (layer3, layer4), _ = OUTPUT_STRIDES[output_stride]
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
        modules = [block(self.channels, width, stride, dilation, downsample)]
        self.channels = width * block.expansion
        modules += [block(self.channels, width, 1, dilation) for _ in range(1, blocks)]
        return nn.Sequential(*modules)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        low = self.layer1(x)
        return low, self.layer4(self.layer3(self.layer2(low)))


def _conv_bn_relu(cin: int, cout: int, kernel: int = 1, dilation: int = 1) -> nn.Sequential:
    padding = 0 if kernel == 1 else dilation
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, padding=padding, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


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


class DeepLabV3Plus(nn.Module):
    """DeepLabV3+: dilated ResNet, ASPP, a decoder fusing 48-channel layer1 features."""

    def __init__(
        self,
        depth: int = 34,
        output_stride: int = 8,
        num_classes: int = NUM_CLASSES,
        aspp_pool_norm: bool = True,
    ) -> None:
        super().__init__()
        self.backbone = ResNet(depth, output_stride)
        _, rates = OUTPUT_STRIDES[output_stride]
        self.aspp = ASPP(self.backbone.out_channels, rates, pool_norm=aspp_pool_norm)
        self.reduce = _conv_bn_relu(self.backbone.low_channels, 48)
        self.decoder = nn.Sequential(_conv_bn_relu(256 + 48, 256, 3), _conv_bn_relu(256, 256, 3))
        self.classifier = nn.Conv2d(256, num_classes, 1)
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low, high = self.backbone(x)
        high = self.aspp(high)
        high = F.interpolate(high, size=low.shape[2:], mode="bilinear", align_corners=False)
        out = self.decoder(torch.cat([high, self.reduce(low)], dim=1))
        return F.interpolate(self.classifier(out), size=x.shape[2:], mode="bilinear", align_corners=False)


def from_config(model: Mapping[str, Any]) -> DeepLabV3Plus:
    """The model a config's ``model`` section (or a sidecar's) describes."""
    return DeepLabV3Plus(model["depth"], model["output_stride"], aspp_pool_norm=model["aspp_pool_norm"])


def depth_of(model: DeepLabV3Plus) -> int:
    """The ResNet depth of ``model``'s backbone (18, 34, 50 or 101)."""
    layers = tuple(len(getattr(model.backbone, f"layer{i}")) for i in range(1, 5))
    kind = "basic" if isinstance(model.backbone.layer1[0], BasicBlock) else "bottleneck"
    return next(d for d, spec in DEPTHS.items() if spec == (kind, layers))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
