"""Test-time inference: whole image or sliding window, with flip and multi-scale averaging.

Class probabilities are accumulated at the label's size and averaged over every view
(scales x flips), as mmseg does; the prediction is their argmax.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from seg.cli import format_size, parse_size


@dataclass(frozen=True)
class TestTimeAugmentation:
    __test__ = False  # not a pytest test class, despite its name
    mode: str = "whole"  # whole | slide
    crop: tuple[int, int] = (512, 1024)  # slide: window (H, W) at each scale
    stride: tuple[int, int] = (341, 683)  # slide: step (H, W); mmseg's 2/3 overlap
    scales: tuple[float, ...] = (1.0,)
    flip: bool = False

    def __post_init__(self) -> None:
        if self.mode not in ("whole", "slide"):
            raise ValueError(f"mode {self.mode!r}: whole or slide")

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """The command-line options of a tool that predicts (tools/evaluate.py, tools/predict.py)."""
        parser.add_argument("--mode", choices=("whole", "slide"), default=cls.mode)
        parser.add_argument("--crop", type=parse_size, default=format_size(cls.crop), help="slide window WIDTHxHEIGHT")
        parser.add_argument(
            "--stride", type=parse_size, default=format_size(cls.stride), help="slide step WIDTHxHEIGHT"
        )
        parser.add_argument("--flip", action="store_true", help="also predict the mirrored image")
        parser.add_argument("--scales", type=float, nargs="+", default=list(cls.scales))

    @classmethod
    def from_arguments(cls, args: argparse.Namespace) -> TestTimeAugmentation:
        return cls(args.mode, tuple(args.crop), tuple(args.stride), tuple(args.scales), args.flip)


def slide_windows(height: int, width: int, crop: tuple[int, int], stride: tuple[int, int]) -> tuple[int, int, int, int]:
    """The sliding windows over a (height, width) image: (rows, columns, window height, window width)."""
    crop_h, crop_w = min(crop[0], height), min(crop[1], width)
    rows = max(height - crop_h + stride[0] - 1, 0) // stride[0] + 1
    cols = max(width - crop_w + stride[1] - 1, 0) // stride[1] + 1
    return rows, cols, crop_h, crop_w


def _slide(model: nn.Module, image: torch.Tensor, crop: tuple[int, int], stride: tuple[int, int]) -> torch.Tensor:
    """Logits of overlapping windows, averaged where they overlap (mmseg's slide_inference)."""
    n, _, height, width = image.shape
    rows, cols, crop_h, crop_w = slide_windows(height, width, crop, stride)
    logits = None
    count = torch.zeros(1, 1, height, width, device=image.device)
    for row in range(rows):
        for col in range(cols):
            y0, x0 = min(row * stride[0], height - crop_h), min(col * stride[1], width - crop_w)
            window = model(image[:, :, y0 : y0 + crop_h, x0 : x0 + crop_w]).float()
            if logits is None:
                logits = torch.zeros(n, window.shape[1], height, width, device=image.device)
            logits[:, :, y0 : y0 + crop_h, x0 : x0 + crop_w] += window
            count[:, :, y0 : y0 + crop_h, x0 : x0 + crop_w] += 1
    return logits / count


@torch.no_grad()
def predict_probabilities(
    model: nn.Module, images: torch.Tensor, size: tuple[int, int], tta: TestTimeAugmentation
) -> torch.Tensor:
    """(N, C, *size) class probabilities averaged over the views of ``tta``."""
    total = None
    views = 0
    for scale in tta.scales:
        scaled = images
        if scale != 1.0:
            target = (round(images.shape[2] * scale), round(images.shape[3] * scale))
            scaled = F.interpolate(images, size=target, mode="bilinear", align_corners=False)
        for flip in (False, True) if tta.flip else (False,):
            view = scaled.flip(-1) if flip else scaled
            logits = model(view).float() if tta.mode == "whole" else _slide(model, view, tta.crop, tta.stride)
            if flip:
                logits = logits.flip(-1)
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
            probabilities = logits.softmax(dim=1)
            total = probabilities if total is None else total + probabilities
            views += 1
    return total / views
