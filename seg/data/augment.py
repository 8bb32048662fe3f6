"""Photometric augmentation and normalisation, batched on the training device.

CPU workers hand over uint8 batches (4x less to copy than float); here each sample of the
batch draws its own photometric ops (kornia, with the study's probabilities) and the batch
is normalised with the ImageNet statistics. The advanced level's elastic deformation is
geometric, so it moves image and label together with one displacement field.
"""

from __future__ import annotations

import kornia.augmentation as K
import torch
import torch.nn.functional as F
from torch import nn

from seg.data.transforms import LEVELS

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def photometric_ops(level: str) -> list[nn.Module]:
    """The photometric ops per level of the DeepLabV3+ study this project reproduces, on [0, 1] images."""
    if level not in LEVELS:
        raise ValueError(f"augmentation level {level!r}: choose from {', '.join(LEVELS)}")
    if level == "none":
        return []
    ops: list[nn.Module] = [
        K.RandomGaussianBlur((5, 5), (0.1, 1.5), p=0.3),
        K.RandomGamma((0.8, 1.25), p=0.25),
        K.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, p=0.5),
    ]
    if level == "advanced":
        ops += [
            K.RandomChannelShuffle(p=0.1),
            K.RandomGrayscale(p=0.1),
            K.RandomGaussianBlur((7, 7), (0.5, 2.0), p=0.15),
            K.RandomSharpness(0.5, p=0.1),
            K.RandomRGBShift(0.08, 0.08, 0.08, p=0.1),  # per-channel colour balance
            K.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.05, p=0.15),
            K.RandomGaussianNoise(std=0.03, p=0.1),
        ]
    return ops


def elastic(
    images: torch.Tensor, labels: torch.Tensor, alpha: float = 0.03, sigma: float = 0.08
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gentle elastic deformation with reflected borders: one smooth displacement field per
    sample moves the image (bilinear) and the label (nearest) together.

    kornia's RandomElasticTransform resamples only images, so labels would lose alignment.
    ``alpha``: displacement as a fraction of the image size; ``sigma``: smoothness, ditto.
    """
    n, _, h, w = images.shape
    coarse = max(round(1 / sigma), 2)  # a coarse random grid, upsampled = a smooth field
    field = torch.randn(n, 2, coarse, coarse, device=images.device) * (2 * alpha)
    field = F.interpolate(field, size=(h, w), mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
    ys, xs = torch.meshgrid(
        torch.linspace(-1, 1, h, device=images.device), torch.linspace(-1, 1, w, device=images.device), indexing="ij"
    )
    grid = torch.stack((xs, ys), dim=-1).unsqueeze(0) + field
    moved = F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=True)
    moved_labels = F.grid_sample(
        labels.unsqueeze(1).float(), grid, mode="nearest", padding_mode="reflection", align_corners=True
    )
    return moved, moved_labels.squeeze(1).to(labels.dtype)


def cut_on_device(
    images: torch.Tensor, labels: torch.Tensor, windows: torch.Tensor, flips: torch.Tensor, size: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``seg.data.transforms.cut`` and its flip, on the training device: each sample's window of
    whole uint8 frames ((N, H, W, 3) images as decoded, (N, H, W) labels) resized to ``size``
    (H, W) into (N, 3, H, W) images and (N, H, W) labels, image bilinear with antialiasing (as
    Pillow), label nearest (pixel centres, as Pillow), padded with 0 / 255 outside the frame.

    The window is cut at whole source pixels (Pillow's box is sub-pixel), so the two paths
    differ by at most half a source pixel of shift; image and label always share the cut.
    """
    height, width = size
    images = images.permute(0, 3, 1, 2)  # the layout change costs the device, not the workers
    out_images = torch.zeros(images.shape[0], 3, height, width, dtype=torch.uint8, device=images.device)
    out_labels = torch.full((labels.shape[0], height, width), 255, dtype=labels.dtype, device=labels.device)
    source_h, source_w = images.shape[2:]
    for i, (x0, y0, x1, y1) in enumerate(windows.tolist()):
        sx, sy = width / (x1 - x0), height / (y1 - y0)  # output pixels per source pixel
        cx0, cy0 = max(round(x0), 0), max(round(y0), 0)  # the window clipped to the frame
        cx1, cy1 = min(round(x1), source_w), min(round(y1), source_h)
        ox0, oy0 = max(round((cx0 - x0) * sx), 0), max(round((cy0 - y0) * sy), 0)  # where it lands
        ow, oh = min(round((cx1 - cx0) * sx), width - ox0), min(round((cy1 - cy0) * sy), height - oy0)
        if ow <= 0 or oh <= 0 or cx1 <= cx0 or cy1 <= cy0:
            continue
        crop = images[i : i + 1, :, cy0:cy1, cx0:cx1].float()
        resized = F.interpolate(crop, size=(oh, ow), mode="bilinear", align_corners=False, antialias=True)
        out_images[i, :, oy0 : oy0 + oh, ox0 : ox0 + ow] = resized[0].round_().clamp_(0, 255).to(torch.uint8)
        label_crop = labels[i : i + 1, None, cy0:cy1, cx0:cx1].float()
        label = F.interpolate(label_crop, size=(oh, ow), mode="nearest-exact")
        out_labels[i, oy0 : oy0 + oh, ox0 : ox0 + ow] = label[0, 0].to(labels.dtype)
    # a boolean index would ask the device which samples (nonzero): flip all, keep where asked
    flipped = flips.to(images.device, non_blocking=True).bool().view(-1, 1, 1)
    out_labels = torch.where(flipped, out_labels.flip(-1), out_labels)
    return torch.where(flipped.unsqueeze(1), out_images.flip(-1), out_images), out_labels


class DeviceAugment(nn.Module):
    """uint8 (N, 3, H, W) images and (N, H, W) labels in; normalised float images and
    long labels out. ``train=False`` only normalises."""

    def __init__(self, level: str = "standard", channels_last: bool = False) -> None:
        super().__init__()
        self.level = level
        self.ops = nn.ModuleList(photometric_ops(level))
        self.channels_last = channels_last
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @torch.no_grad()
    def forward(
        self, images: torch.Tensor, labels: torch.Tensor | None = None, train: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = images.float().div_(255.0)
        if train and self.level != "none":
            for op in self.ops:
                x = op(x)
            if self.level == "advanced":
                x, labels = self.blend_and_deform(x, labels)
            x = x.clamp_(0.0, 1.0)
        x = (x - self.mean) / self.std
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, None if labels is None else labels.long()

    BLEND_P, DEFORM_P = 0.05, 0.1

    def blend_and_deform(
        self, x: torch.Tensor, labels: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The advanced level's last two ops, each on the samples it draws: a blend with a
        recoloured copy (BLEND_P), the elastic deformation of image and label (DEFORM_P). The
        samples are drawn on the host (torch's CPU generator, as kornia draws its parameters):
        drawn on the device, choosing them (``any``, a boolean index) would wait every step for
        the work queued before."""
        blend = torch.nonzero(torch.rand(x.shape[0]) < self.BLEND_P).flatten()
        if len(blend):
            index = blend.to(x.device, non_blocking=True)
            picked = x.index_select(0, index)
            recoloured = K.ColorJitter(0.4, 0.4, 0.4, 0.1, p=1.0)(picked)
            weight = (torch.rand(len(blend), 1, 1, 1) * 0.5).to(x.device, non_blocking=True)
            x = x.index_copy(0, index, (1 - weight) * picked + weight * recoloured)
        deform = torch.nonzero(torch.rand(x.shape[0]) < self.DEFORM_P).flatten()
        if len(deform) and labels is not None:
            index = deform.to(x.device, non_blocking=True)
            moved, moved_labels = elastic(x.index_select(0, index), labels.index_select(0, index))
            x, labels = x.index_copy(0, index, moved), labels.index_copy(0, index, moved_labels)
        return x, labels
