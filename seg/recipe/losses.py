"""Segmentation losses, computed in fp32 whatever the autocast dtype of the logits.

Every term carries gradient to the logits (the study's own smoothed CE computed its
log-probabilities under no_grad, so that term never trained; its Dice counted absent
classes as zero). Each loss returns a scalar; ``CombinedLoss`` also returns its parts.

``from_config`` builds the configured loss (``config.loss``): adding a loss touches this
module only.

``distributed=True`` makes CE and Dice exact across processes: CE divides by the global
count of valid (weighted) pixels, Dice uses global per-class sums, and the per-rank values
are scaled so that DDP's gradient averaging yields the one-process gradient of the whole
global batch (``seg.core.distributed``). OHEM stays per process, as in mmseg.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from seg.core.cityscapes import IGNORE_INDEX
from seg.core.distributed import all_reduce_sum, at_least_fp32, world_size


def cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    ignore_index: int = IGNORE_INDEX,
    distributed: bool = False,
) -> torch.Tensor:
    """torch's cross entropy: class weights, ignored pixels, label smoothing (1 - s on the
    true class, s / C spread over all classes); the mean over the valid pixels (weighted by
    their class's weight), zero when there is none."""
    logits, target = at_least_fp32(logits), target.long()
    total = F.cross_entropy(
        logits, target, weight, ignore_index=ignore_index, label_smoothing=label_smoothing, reduction="sum"
    )
    # torch's own mean is this sum over the same count, but with class weights and smoothing it
    # counts through masked_select, which waits for the device every step; an all-ignored batch
    # would give 0 / 0 there
    valid = target != ignore_index
    if weight is None:
        count = valid.sum().to(logits.dtype)
    else:
        count = torch.where(valid, weight[torch.where(valid, target, 0)], 0).sum()
    if not distributed or world_size() == 1:
        return total / count.clamp(min=1e-12)
    # globally: the sum of all ranks over the count of all ranks
    return total * world_size() / all_reduce_sum(count.to(logits.dtype)).clamp(min=1e-12)


def dice_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
    smooth: float = 1.0,
    distributed: bool = False,
) -> torch.Tensor:
    """1 - mean Dice over the classes present in ``target``; softmax probabilities vs one-hot
    targets on valid pixels, per class (2 * intersection + smooth) / (sum_p + sum_t + smooth)."""
    probs = at_least_fp32(logits).softmax(dim=1)
    valid = (target != ignore_index).unsqueeze(1)
    # The one-hot target as a boolean comparison, broadcast (an ignored pixel is no class's):
    # F.one_hot's int64 tensor, permuted and cast to the probabilities' dtype, moved 8 + 4 bytes
    # a pixel and class: Dice 1.8x slower (tools/bench_loss.py, CPU, batch 2 at 1024x512).
    classes = torch.arange(logits.shape[1], device=target.device).view(1, -1, 1, 1)
    onehot = target.unsqueeze(1) == classes
    dims = (0, 2, 3)
    intersection = torch.where(onehot, probs, 0).sum(dims)
    probs_sum, target_sum = torch.where(valid, probs, 0).sum(dims), onehot.sum(dims).to(probs.dtype)
    sums = torch.stack([intersection, probs_sum, target_sum])
    if distributed:  # the global sums
        sums = all_reduce_sum(sums, grad=True)
    intersection, probs_sum, target_sum = sums
    dice = (2 * intersection + smooth) / (probs_sum + target_sum + smooth)
    # The mean over the present classes without asking the host which they are (present.any()
    # or dice[present] would wait for the device every step); no valid pixel: zero, attached.
    present = (target_sum > 0).to(dice.dtype)
    count = present.sum()
    # Distributed, every rank holds the global value; the all-reduce's backward sums the
    # ranks' gradients (x world) and DDP's averaging divides by world: the exact gradient.
    return torch.where(count > 0, 1.0 - (dice * present).sum() / count.clamp(min=1), dice.sum() * 0.0)


def ohem_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    threshold: float = 0.7,
    min_kept: int = 100_000,
    weight: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Cross entropy over the hard pixels only (mmseg's OHEMPixelSampler): those whose
    probability of the true class is below ``threshold``, and at least ``min_kept`` of the
    hardest when fewer are below it."""
    logits = at_least_fp32(logits)
    target = target.long()
    valid = target != ignore_index
    losses = F.cross_entropy(logits, target, weight=weight, ignore_index=ignore_index, reduction="none")
    if not valid.any():
        return losses.sum() * 0.0
    with torch.no_grad():
        true_prob = logits.softmax(dim=1).gather(1, torch.where(valid, target, 0).unsqueeze(1)).squeeze(1)
        sorted_prob = true_prob[valid].sort().values
        kth = sorted_prob[min(min_kept, sorted_prob.numel() - 1)]  # as mmseg: strictly below the bar
        kept = valid & (true_prob < torch.clamp(kth, min=threshold))
    if not kept.any():
        return losses.sum() * 0.0
    if weight is None:
        return losses[kept].mean()
    return losses[kept].sum() / weight[target[kept]].sum()


class CombinedLoss(nn.Module):
    """alpha * CE (smoothed, weighted) + (1 - alpha) * Dice; ``alpha=1`` is plain CE, ``alpha=0``
    plain Dice (the other term neither computed nor reported)."""

    def __init__(
        self,
        alpha: float = 0.6,
        label_smoothing: float = 0.1,
        class_weights: torch.Tensor | None = None,
        ignore_index: int = IGNORE_INDEX,
        distributed: bool = False,
    ) -> None:
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha {alpha}: must be within [0, 1]")
        self.alpha, self.label_smoothing, self.ignore_index = alpha, label_smoothing, ignore_index
        self.distributed = distributed
        self.register_buffer("class_weights", class_weights, persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = at_least_fp32(logits)  # once for both terms: autocast's bf16 logits are 4 bytes a value here
        # a term of weight 0 is not computed (mmseg's recipes: plain CE, no Dice at full resolution)
        terms: dict[str, tuple[float, torch.Tensor]] = {}
        if self.alpha > 0:
            smoothing, weights = self.label_smoothing, self.class_weights
            ce = cross_entropy(logits, target, weights, smoothing, self.ignore_index, self.distributed)
            terms["ce"] = (self.alpha, ce)
        if self.alpha < 1:
            dice = dice_loss(logits, target, self.ignore_index, distributed=self.distributed)
            terms["dice"] = (1.0 - self.alpha, dice)
        total = sum(weight * value for weight, value in terms.values())
        return total, {name: value.detach() for name, (_, value) in terms.items()}


class OHEMLoss(nn.Module):
    """``ohem_cross_entropy`` as a loss module: returns the value and its one part."""

    def __init__(
        self,
        threshold: float = 0.7,
        min_kept: int = 100_000,
        class_weights: torch.Tensor | None = None,
        ignore_index: int = IGNORE_INDEX,
    ) -> None:
        super().__init__()
        self.threshold, self.min_kept, self.ignore_index = threshold, min_kept, ignore_index
        self.register_buffer("class_weights", class_weights, persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        value = ohem_cross_entropy(logits, target, self.threshold, self.min_kept, self.class_weights, self.ignore_index)
        return value, {"ohem": value.detach()}


class WithAuxiliary(nn.Module):
    """The loss of a model with mmseg's auxiliary head: in training such a model returns
    ``(logits, aux_logits)``; the configured loss of the logits plus ``weight`` x the cross
    entropy of the auxiliary logits (mmseg's ``auxiliary_head.loss_decode``: plain CE, no
    class weights or smoothing). Plain logits (no auxiliary head) pass to the loss as they are."""

    def __init__(self, loss: nn.Module, weight: float, ignore_index: int = IGNORE_INDEX, distributed: bool = False):
        super().__init__()
        self.loss, self.weight, self.ignore_index, self.distributed = loss, weight, ignore_index, distributed

    def forward(
        self, logits: torch.Tensor | tuple[torch.Tensor, torch.Tensor], target: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if not isinstance(logits, tuple):
            return self.loss(logits, target)
        logits, aux_logits = logits
        total, parts = self.loss(logits, target)
        aux = cross_entropy(aux_logits, target, ignore_index=self.ignore_index, distributed=self.distributed)
        return total + self.weight * aux, {**parts, "aux_ce": aux.detach()}


LOSSES = ("combined", "ce", "ohem")
CLASS_WEIGHTS = ("inverse", "inverse-sqrt", "log")  # or None: unweighted


def from_config(
    loss: Any, class_pixels: list[list[int]] | None = None, distributed: bool = False, aux_weight: float | None = None
) -> nn.Module:
    """The loss of a config's ``loss`` section. ``class_pixels``: the training groups'
    per-class pixel counts (the manifest's), summed into class weights when
    ``loss.class_weights`` names a kind. ``aux_weight``: the weight of an auxiliary head's
    cross entropy (``model.aux_weight`` when ``model.aux_head``; :class:`WithAuxiliary`)."""
    main = _main_loss(loss, class_pixels, distributed)
    return main if aux_weight is None else WithAuxiliary(main, aux_weight, distributed=distributed)


def _main_loss(loss: Any, class_pixels: list[list[int]] | None, distributed: bool) -> nn.Module:
    weights = None
    if loss.class_weights:
        weights = class_weights_from_pixels(torch.tensor(class_pixels).sum(0), loss.class_weights)
    if loss.name == "combined":
        return CombinedLoss(loss.alpha, loss.label_smoothing, weights, distributed=distributed)
    if loss.name == "ce":
        return CombinedLoss(1.0, loss.label_smoothing, weights, distributed=distributed)
    if loss.name == "ohem":  # per process, as in mmseg
        return OHEMLoss(loss.ohem_threshold, loss.ohem_min_kept, weights)
    raise ValueError(f"loss {loss.name!r}: choose from {', '.join(LOSSES)}")


def class_weights_from_pixels(pixels: list[int] | torch.Tensor, kind: str = "inverse-sqrt") -> torch.Tensor:
    """Class weights from per-class pixel counts (the manifest's ``class_pixels``), mean 1.

    ``inverse``: 1 / frequency; ``inverse-sqrt``: 1 / sqrt(frequency), gentler; ``log``:
    ENet's 1 / ln(1.02 + frequency). Classes with no pixels get the largest weight seen.
    """
    counts = torch.as_tensor(pixels, dtype=torch.float64)
    frequency = counts / counts.sum()
    if kind == "inverse":
        weights = 1.0 / frequency
    elif kind == "inverse-sqrt":
        weights = 1.0 / frequency.sqrt()
    elif kind == "log":
        weights = 1.0 / torch.log(1.02 + frequency)
    else:
        raise ValueError(f"class weight kind {kind!r}: choose from {', '.join(CLASS_WEIGHTS)}")
    finite = torch.isfinite(weights)
    weights[~finite] = weights[finite].max() if finite.any() else 1.0
    return (weights / weights.mean()).float()
