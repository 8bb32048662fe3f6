"""Test-time inference: whole image or sliding window, with flip and multi-scale averaging.

Class probabilities are accumulated at the label's size and averaged over every view
(scales x flips), as mmseg does; the prediction is their argmax.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from seg.core.cli import format_size, parse_size

OVERLAP = 2 / 3  # the default stride as a share of the window: mmseg's (window 1024x512, stride 683x341)


def default_stride(window: tuple[int, int]) -> tuple[int, int]:
    """The stride of a sliding window (H, W) that overlaps its neighbours by a third (mmseg's)."""
    return (max(1, round(window[0] * OVERLAP)), max(1, round(window[1] * OVERLAP)))


@dataclass(frozen=True)
class TestTimeAugmentation:
    """How a model predicts an image. In slide mode ``crop`` is the window (H, W) and ``stride``
    its step; left None they are decided by :meth:`fitted` (the model's training size, 2/3 of
    the window), as mmseg's ``test_cfg`` takes the training crop."""

    __test__ = False  # not a pytest test class, despite its name
    mode: str = "whole"  # whole | slide
    crop: tuple[int, int] | None = None  # slide: window (H, W) at each scale
    stride: tuple[int, int] | None = None  # slide: step (H, W)
    scales: tuple[float, ...] = (1.0,)
    flip: bool = False

    def __post_init__(self) -> None:
        if self.mode not in ("whole", "slide"):
            raise ValueError(f"mode {self.mode!r}: whole or slide")
        if self.mode == "whole" and (self.crop is not None or self.stride is not None):
            raise ValueError("--crop and --stride are the sliding window's: add --mode slide, or leave them out")
        if self.stride is not None:
            check_stride(self.stride, self.crop, "--crop")
        for scale in self.scales:
            if not (math.isfinite(scale) and scale > 0):  # 0 or nan fails only once the model and data are loaded
                raise ValueError(
                    f"--scales {scale:g}: each scale must be a finite factor above 0, "
                    f"typically 0.5 to 2 (mmseg's multi-scale test: 0.5 0.75 1.0 1.25 1.5 1.75)"
                )

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """The command-line options of a tool that predicts (tools/evaluate.py, tools/predict.py)."""
        parser.add_argument("--mode", choices=("whole", "slide"), default=cls.mode)
        parser.add_argument(
            "--crop", type=parse_size, help="slide window WIDTHxHEIGHT (default: the model's training size, data.size)"
        )
        parser.add_argument(
            "--stride", type=parse_size, help="slide step WIDTHxHEIGHT (default: 2/3 of the window, as mmseg)"
        )
        parser.add_argument("--flip", action="store_true", help="also predict the mirrored image")
        parser.add_argument("--scales", type=float, nargs="+", default=list(cls.scales))

    @classmethod
    def from_arguments(cls, args: argparse.Namespace, parser: argparse.ArgumentParser) -> TestTimeAugmentation:
        """The options of :meth:`add_arguments`; a combination that means nothing is refused in
        one line (exit 2), before any model or data is loaded."""
        try:
            return cls(args.mode, _tuple(args.crop), _tuple(args.stride), tuple(args.scales), args.flip)
        except ValueError as e:
            parser.exit(2, f"error: {e}\n")

    def fitted(
        self, model_size: tuple[int, int] | None, input_size: tuple[int, int] | None
    ) -> tuple[TestTimeAugmentation, str | None]:
        """This with the window decided: ``crop`` or else ``model_size`` (the model's training
        size), ``stride`` or else 2/3 of the window; a window larger than a fixed ``input_size``
        (H, W at scale 1) is clipped to it. Returns it and a line saying what was clipped, if any."""
        if self.mode != "slide":
            return self, None
        crop = self.crop or model_size
        if crop is None:
            raise ValueError("--mode slide needs --crop WIDTHxHEIGHT: the model's config has no data.size")
        if self.stride is not None:
            check_stride(self.stride, crop, "--crop" if self.crop else "the model's training size, data.size")
        clipped = None
        if input_size is not None and (crop[0] > input_size[0] or crop[1] > input_size[1]):
            inside = (min(crop[0], input_size[0]), min(crop[1], input_size[1]))
            single = " (a single window: the same as --mode whole)" if inside == tuple(input_size) else ""
            clipped = (f"slide window {format_size(crop)} is larger than the {format_size(input_size)} input: "
                       f"clipped to {format_size(inside)}{single}")  # fmt: skip
            crop = inside
        stride = default_stride(crop)
        if self.stride is not None:
            # a stride that fitted the window may not fit the clipped one: clipped with it, so windows still meet
            stride = (min(self.stride[0], crop[0]), min(self.stride[1], crop[1]))
            if clipped and stride != tuple(self.stride):
                clipped += f"; --stride {format_size(self.stride)} clipped with it to {format_size(stride)}"
        return replace(self, crop=tuple(crop), stride=tuple(stride)), clipped


def check_stride(stride: tuple[int, int], window: tuple[int, int] | None, window_from: str) -> None:
    """ValueError unless ``stride`` (H, W) is at least 1 and at most ``window`` (when known) on
    each axis: a longer step leaves pixels between windows that no window predicts (0/0 logits)."""
    if min(stride) < 1:
        raise ValueError(f"--stride {format_size(stride)}: each side must be at least 1")
    if window is not None and (stride[0] > window[0] or stride[1] > window[1]):
        raise ValueError(
            f"--stride {format_size(stride)} is longer than the slide window {format_size(window)} ({window_from}): "
            f"the windows would leave pixels unpredicted; give a stride of at most {format_size(window)}"
        )


def _tuple(size: tuple[int, int] | None) -> tuple[int, int] | None:
    return tuple(size) if size is not None else None


def slide_windows(height: int, width: int, crop: tuple[int, int], stride: tuple[int, int]) -> tuple[int, int, int, int]:
    """The sliding windows over a (height, width) image: (rows, columns, window height, window width)."""
    crop_h, crop_w = min(crop[0], height), min(crop[1], width)
    rows = max(height - crop_h + stride[0] - 1, 0) // stride[0] + 1
    cols = max(width - crop_w + stride[1] - 1, 0) // stride[1] + 1
    return rows, cols, crop_h, crop_w


def _slide(model: nn.Module, image: torch.Tensor, crop: tuple[int, int], stride: tuple[int, int]) -> torch.Tensor:
    """Logits of overlapping windows, averaged where they overlap (mmseg's slide_inference)."""
    check_stride(stride, crop, "crop")  # uncovered pixels would come out as class 0, silently
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
            # (at least a pixel: a tiny scale of a small image would round to nothing)
            target = (max(1, round(images.shape[2] * scale)), max(1, round(images.shape[3] * scale)))
            scaled = F.interpolate(images, size=target, mode="bilinear", align_corners=False)
        for flip in (False, True) if tta.flip else (False,):
            view = scaled.flip(-1) if flip else scaled
            if tta.mode == "whole":
                logits = model(view).float()
            else:
                if tta.crop is None or tta.stride is None:
                    raise ValueError("slide mode without a window: decide it with TestTimeAugmentation.fitted")
                logits = _slide(model, view, tta.crop, tta.stride)
            if flip:
                logits = logits.flip(-1)
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
            probabilities = logits.softmax(dim=1)
            total = probabilities if total is None else total + probabilities
            views += 1
    return total / views
