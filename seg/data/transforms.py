"""Input geometry on the CPU: one source window per sample, resized once.

Every geometric step of the study's recipes (resize to H x W, random up-scaling, random
crop, the standard recipe's random scale + crop) picks a window of the source image; the
window is resized to the output size in one PIL call (image bilinear, label nearest), then
flipped. Image and label always share the window, so they stay aligned; outside the
source, the image is padded with 0 and the label with 255 (ignored). Photometric
augmentation runs batched on the training device (``seg.data.augment``), so workers only
decode, pick a window and resize.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from seg.core.cityscapes import IGNORE_INDEX, NUM_CLASSES
from seg.core.cli import format_size

GEOMETRIES = ("resize", "scale-crop")
LEVELS = ("none", "standard", "advanced")


@dataclass(frozen=True)
class TrainGeometry:
    """How a training sample is cut from its source image.

    ``resize``: the study's way: the whole image resized to ``size``; at the standard and
    advanced levels, random up-scaling 1.0-1.2 (p 0.5, up only: a smaller window, so no
    padding) and a random crop (p 0.4, a window of 0.7-1.0 of each side) shrink the window.
    ``scale-crop``: the standard recipe (mmseg): scale the image to ``base_size`` times a
    ratio drawn from ``scale_range``, cut a ``size`` crop where no class covers more than
    ``cat_max_ratio`` of the labelled pixels (10 tries), pad with 255.
    Both flip horizontally with p 0.5 except at level ``none``.
    """

    mode: str = "resize"
    size: tuple[int, int] = (512, 1024)  # (H, W)
    level: str = "standard"
    base_size: tuple[int, int] = (1024, 2048)
    scale_range: tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 0.75
    upscale: tuple[float, float] = (1.0, 1.2)
    upscale_p: float = 0.5
    crop: tuple[float, float] = (0.7, 1.0)
    crop_p: float = 0.4
    flip_p: float = 0.5

    def __post_init__(self) -> None:
        if self.mode not in GEOMETRIES:
            raise ValueError(f"geometry {self.mode!r}: choose from {', '.join(GEOMETRIES)}")
        if self.level not in LEVELS:
            raise ValueError(f"augmentation level {self.level!r}: choose from {', '.join(LEVELS)}")

    @classmethod
    def from_config(cls, data: Any) -> TrainGeometry:
        """The training geometry of a config's ``data`` section."""
        return cls(data.geometry, tuple(data.size), data.level, base_size=tuple(data.base_size))

    def source_problem(self, packed: tuple[int, int] | None) -> str | None:
        """Why frames stored at ``packed`` (H, W; None: their original resolution) don't fit
        this geometry, or None. Shards packed at the training size serve ``resize`` at that
        very size only: anything else would be a silent second rescale."""
        if packed is None:
            return None
        stored = format_size(packed)
        if self.mode == "scale-crop":
            return (
                f"the shards' train split is stored at {stored} (packed with --resize), but geometry scale-crop "
                f"scales frames against data.base_size {format_size(self.base_size)} of the original "
                f"resolution: pack without --resize"
            )
        if tuple(packed) != tuple(self.size):
            return (
                f"the shards' train split is stored at {stored} (packed with --resize), but data.size is "
                f"{format_size(self.size)}: set data.size=[{packed[0]},{packed[1]}], or pack at your training size"
            )
        return None


def cut(
    image: Image.Image, label: Image.Image, window: tuple[float, float, float, float], size: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Resize ``window`` (x0, y0, x1, y1 in source pixels) of image and label to ``size`` (H, W).

    Parts of the window outside the source become 0 in the image and 255 in the label.
    """
    height, width = size
    x0, y0, x1, y1 = window
    if x0 >= 0 and y0 >= 0 and x1 <= image.width and y1 <= image.height:  # the usual case: no padding
        return (
            np.asarray(image.resize((width, height), Image.BILINEAR, box=window)),
            np.asarray(label.resize((width, height), Image.NEAREST, box=window)),
        )
    sx, sy = width / (x1 - x0), height / (y1 - y0)  # output pixels per source pixel
    # The window clipped to the source, and where that lands in the output.
    cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x1, image.width), min(y1, image.height)
    ox0, oy0 = round((cx0 - x0) * sx), round((cy0 - y0) * sy)
    ow, oh = min(round((cx1 - cx0) * sx), width - ox0), min(round((cy1 - cy0) * sy), height - oy0)
    out_image = np.zeros((height, width, 3), dtype=np.uint8)
    out_label = np.full((height, width), IGNORE_INDEX, dtype=np.uint8)
    if ow > 0 and oh > 0:
        box = (cx0, cy0, cx1, cy1)
        out_image[oy0 : oy0 + oh, ox0 : ox0 + ow] = np.asarray(image.resize((ow, oh), Image.BILINEAR, box=box))
        out_label[oy0 : oy0 + oh, ox0 : ox0 + ow] = np.asarray(label.resize((ow, oh), Image.NEAREST, box=box))
    return out_image, out_label


def _cat_max_ok(label: Image.Image, window: tuple[float, float, float, float], ratio: float) -> bool:
    """mmseg's check: no single class covers more than ``ratio`` of the window's labelled pixels
    (the part of the window inside the image: padding is ignored)."""
    x0, y0, x1, y1 = window
    box = (max(round(x0), 0), max(round(y0), 0), min(round(x1), label.width), min(round(y1), label.height))
    counts = np.bincount(np.asarray(label.crop(box)).ravel(), minlength=256)[:NUM_CLASSES]
    return len(np.flatnonzero(counts)) > 1 and counts.max() / counts.sum() < ratio


def train_window(
    geometry: TrainGeometry, label: Image.Image, rng: np.random.Generator
) -> tuple[float, float, float, float]:
    """The source window of one training sample."""
    width, height = label.size
    if geometry.mode == "resize":
        scale = 1.0
        if geometry.level != "none":
            if rng.random() < geometry.upscale_p:
                scale /= rng.uniform(*geometry.upscale)
            if rng.random() < geometry.crop_p:
                scale *= rng.uniform(*geometry.crop)
        w, h = width * scale, height * scale
        x0, y0 = rng.uniform(0, width - w), rng.uniform(0, height - h)
        return (x0, y0, x0 + w, y0 + h)
    # scale-crop: a size-crop of the image scaled to base_size * ratio, in source pixels.
    ratio = rng.uniform(*geometry.scale_range)
    scale = min(geometry.base_size[0] * ratio / height, geometry.base_size[1] * ratio / width)
    h, w = geometry.size[0] / scale, geometry.size[1] / scale
    for _ in range(10):
        x0, y0 = rng.uniform(0, max(width - w, 0)), rng.uniform(0, max(height - h, 0))
        window = (x0, y0, x0 + w, y0 + h)
        if geometry.cat_max_ratio >= 1 or _cat_max_ok(label, window, geometry.cat_max_ratio):
            break
    return window


def train_params(
    geometry: TrainGeometry, label: Image.Image, rng: np.random.Generator
) -> tuple[tuple[float, float, float, float], bool]:
    """A sample's source window and whether it is flipped: every random draw of its geometry,
    in one order, so the CPU and device paths see the same stream."""
    window = train_window(geometry, label, rng)
    return window, bool(geometry.level != "none" and rng.random() < geometry.flip_p)


def train_sample(
    image: Image.Image, label: Image.Image, geometry: TrainGeometry, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """One training sample: (3, H, W) uint8 image and (H, W) uint8 label tensors."""
    window, flip = train_params(geometry, label, rng)
    image_array, label_array = cut(image, label, window, geometry.size)
    if flip:
        image_array, label_array = image_array[:, ::-1], label_array[:, ::-1]
    # One copy each, into (3, H, W) and (H, W) tensors that own their memory.
    return (
        torch.from_numpy(np.ascontiguousarray(image_array.transpose(2, 0, 1))),
        torch.from_numpy(np.array(label_array)),
    )


def decoded_sample(
    image: np.ndarray, label: np.ndarray, geometry: TrainGeometry, rng: np.random.Generator
) -> dict[str, torch.Tensor]:
    """A training sample for geometry on the device (``seg.data.augment.cut_on_device``): the whole
    decoded frame as it came from the decoder ((H, W, 3) image, (H, W) label: no copy, no
    transpose here), its window (x0, y0, x1, y1) and flip; the worker only decodes and draws."""
    window, flip = train_params(geometry, Image.fromarray(label), rng)  # "L" shares the array's memory
    return {
        "image": torch.from_numpy(image),
        "label": torch.from_numpy(label),
        "window": torch.tensor(window, dtype=torch.float64),
        "flip": torch.tensor(flip),
    }


def eval_sample(
    image: Image.Image, label: Image.Image | None, size: tuple[int, int] | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """An evaluation sample: the image at full resolution or resized to ``size`` (H, W);
    the label is never resized (predictions are brought back to its size)."""
    if size is not None and (image.height, image.width) != tuple(size):
        image = image.resize((size[1], size[0]), Image.BILINEAR)
    image_tensor = torch.from_numpy(np.asarray(image.convert("RGB")).transpose(2, 0, 1).copy())
    label_tensor = None if label is None else torch.from_numpy(np.asarray(label).copy())
    return image_tensor, label_tensor
