"""DeepLabV3+ over a dilated ResNet.

The backbone keeps torchvision's ResNet key layout (``conv1``, ``bn1``, ``layer1.0.conv1``,
``layer2.0.downsample.0``...) so ImageNet weights in that layout load as they are; it is
written here because torchvision's BasicBlock refuses dilation, and the study's model is a
dilated ResNet-34. Depth 34 at output stride 8 is exactly the model of the DeepLabV3+ study
this project reproduces.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from seg.checkpoint import WEIGHTS_FORMAT
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


class WeightsError(ValueError):
    """A weights file that does not fit the model: the message names the key."""


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a torch file (weights-only loading: no pickled code)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsError(f"{path}: cannot read weights ({e})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]  # a training checkpoint that wraps the weights
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path}: not a state dict of tensors")
    return state


def load_backbone(model: DeepLabV3Plus, path: str | Path) -> tuple[list[str], list[str]]:
    """Load ImageNet weights in torchvision's ResNet layout into ``model.backbone``.

    Returns (missing, unexpected) keys (``fc.*`` of a classifier is expected to be
    unexpected); a key whose shape differs is refused, naming it.
    """
    state = read_state_dict(path)
    state = {k.removeprefix("module.").removeprefix("backbone."): v for k, v in state.items()}
    own = model.backbone.state_dict()
    for key, value in state.items():
        if key in own and own[key].shape != value.shape:
            raise WeightsError(
                f"{path}: {key} has shape {tuple(value.shape)}, the depth-{_depth(model)} backbone needs "
                f"{tuple(own[key].shape)}: weights of another ResNet depth?"
            )
    result = model.backbone.load_state_dict(state, strict=False)
    return list(result.missing_keys), list(result.unexpected_keys)


def load_weights(model: DeepLabV3Plus, path: str | Path, config: Mapping[str, Any] | None = None) -> None:
    """Load a whole model's weights (``--init-from``). A file that does not fit is refused in
    one line: the file, the first missing, unexpected and mismatched keys with their shapes,
    and the likely cause (its sidecar's model, when it has one, against ``config``)."""
    state = read_state_dict(path)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = sorted((k for k in state if k not in own), key=lambda k: k.endswith("num_batches_tracked"))
    mismatched = [k for k in own if k in state and own[k].shape != state[k].shape]
    if not (missing or unexpected or mismatched):
        model.load_state_dict(state)
        return

    def first(keys: list[str], show: Any) -> str:
        more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
        return f"{len(keys)}, e.g. " + ", ".join(show(k) for k in keys[:3]) + more

    problems = [f"missing {first(missing, lambda k: f'{k} {tuple(own[k].shape)}')}"] if missing else []
    problems += [f"unexpected {first(unexpected, lambda k: f'{k} {tuple(state[k].shape)}')}"] if unexpected else []
    shapes = lambda k: f"{k} {tuple(state[k].shape)} in the file, {tuple(own[k].shape)} here"  # noqa: E731
    problems += [f"other shapes {first(mismatched, shapes)}"] if mismatched else []
    raise WeightsError(
        f"{path}: does not fit the depth-{_depth(model)} model of this config: {'; '.join(problems)}. "
        f"Likely cause: {_misfit_cause(Path(path), state, missing, own, config)}"
    )


def _misfit_cause(
    path: Path, state: Mapping[str, torch.Tensor], missing: list[str], own: Mapping[str, Any], config: Any
) -> str:
    sidecar = path.with_suffix(".json")
    theirs: Any = None
    if sidecar.is_file():
        try:
            theirs = json.loads(sidecar.read_text())["config"]["model"]
        except (json.JSONDecodeError, KeyError, TypeError):
            theirs = None
    if theirs is not None and config is not None:
        differ = [f"model.{k}={theirs.get(k)!r} there, {config[k]!r} here" for k in ("depth", "aspp_pool_norm")]
        differ = [d for d, k in zip(differ, ("depth", "aspp_pool_norm"), strict=True) if theirs.get(k) != config[k]]
        if differ:
            return f"its sidecar describes another model ({'; '.join(differ)}): set the same model keys"
    if len(missing) == len(own):
        if any(k.startswith("layer1.") or k == "fc.weight" for k in state):
            return "an ImageNet backbone in torchvision's layout, not a seg model: pass it as model.pretrained"
        return "not a seg DeepLabV3+ model (weights of another network)"
    differing = [*missing, *(k for k in state if k not in own or state[k].shape != own[k].shape)]
    if any(k.startswith("backbone.") for k in differing):
        return "a model of another ResNet depth: set model.depth to the file's"
    if any(k.startswith("aspp.pool") for k in differing):
        return "model.aspp_pool_norm differs from the file's"
    if "classifier.weight" in state and state["classifier.weight"].shape != own["classifier.weight"].shape:
        return "a model of another class count"
    return "a model of another architecture: model.depth or model.aspp_pool_norm differ from the file's"


def _depth(model: DeepLabV3Plus) -> int:
    layers = tuple(len(getattr(model.backbone, f"layer{i}")) for i in range(1, 5))
    kind = "basic" if isinstance(model.backbone.layer1[0], BasicBlock) else "bottleneck"
    return next(d for d, spec in DEPTHS.items() if spec == (kind, layers))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def load_model(path: str | Path) -> tuple[DeepLabV3Plus, dict[str, Any]]:
    """A model file of ours (safetensors with ``format: seg.deeplabv3plus`` metadata and its
    JSON sidecar) as an eval-mode model on the CPU, and the sidecar."""
    path = Path(path)
    if path.is_dir():
        raise WeightsError(_folder_hint(path))
    if path.suffix == ".json" and path.is_file():
        model = path.with_suffix(".safetensors")
        there = "" if model.is_file() else f" (it is not there: copy it along with {path.name})"
        raise WeightsError(f"{path}: this is a model's JSON sidecar, not the model; pass {model}{there}")
    if not path.is_file():
        raise WeightsError(f"{path}: no such file")
    try:
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error type for a torn or foreign file
        raise WeightsError(f"{path}: not a readable safetensors file ({e}); truncated? copy it again") from None
    if metadata.get("format") != WEIGHTS_FORMAT:
        raise WeightsError(
            f"{path}: not a seg model file (format {metadata.get('format')!r}, expected {WEIGHTS_FORMAT!r}); "
            f"pass a model written by training or tools/reduce_folds.py"
        )
    sidecar_path = path.with_suffix(".json")
    if not sidecar_path.is_file():
        raise WeightsError(f"{path}: no sidecar {sidecar_path.name}; copy it along with the model")
    try:
        sidecar = json.loads(sidecar_path.read_text())
        model = from_config(sidecar["config"]["model"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise WeightsError(f"{sidecar_path}: not a seg model sidecar ({type(e).__name__}: {e})") from None
    try:
        model.load_state_dict(read_state_dict(path))
    except RuntimeError as e:
        raise WeightsError(f"{path}: does not fit the model its sidecar describes ({str(e).splitlines()[0]})") from None
    return model.eval(), sidecar


def _folder_hint(path: Path) -> str:
    """What to pass instead of a folder: the model files in it (a fold's best and final
    weights, a reduction's model), or the model files one level down (a stage's folds)."""
    described = {"best.safetensors": "the fold's best weights", "model.safetensors": "its final weights"}
    found = [path / name for name in described if (path / name).is_file()]
    if found:
        if path.name == "reduced" or len(found) == 1:
            described["model.safetensors"] = "the model"
        choices = " or ".join(f"{p} ({described[p.name]})" for p in found)
        return f"{path}: a folder, not a model file; pass {choices}"
    below = sorted(path.glob("*/best.safetensors")) + sorted(path.glob("reduced/model.safetensors"))
    if below:
        return f"{path}: a folder, not a model file; pass one of {', '.join(map(str, below[:4]))}"
    return f"{path}: a folder with no model file (*.safetensors) in it; pass a .safetensors file"
