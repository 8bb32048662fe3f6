"""Exact segmentation metrics: a confusion matrix summed over pixels, batches and ranks.

Definitions are the Cityscapes benchmark's: pixels labelled 255 don't count; a class's
IoU is TP / (TP + FP + FN); mIoU averages the classes that occur in the label or the
prediction; frequency-weighted IoU weights each class's IoU by its share of labelled
pixels. The matrix is accumulated on the device and reduced across ranks by summation, so
the numbers are the same for any number of processes (a rank with no samples adds zeros,
but must still take part in the reduction).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from seg.core.cityscapes import CLASS_NAMES, IGNORE_INDEX, NUM_CLASSES


class ConfusionMatrix:
    """``matrix[t, p]``: pixels of true class t predicted as p (int64, on ``device``)."""

    def __init__(self, num_classes: int = NUM_CLASSES, device: torch.device | str = "cpu") -> None:
        self.num_classes = num_classes
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    @torch.no_grad()
    def update(self, prediction: torch.Tensor, target: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> None:
        """Add a batch: ``prediction`` and ``target`` of the same shape, class indices."""
        if prediction.shape != target.shape:
            raise ValueError(f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} differ")
        valid = target != ignore_index
        target, prediction = target[valid].long(), prediction[valid].long()
        if target.numel() and (target.max() >= self.num_classes or prediction.max() >= self.num_classes):
            raise ValueError(f"class index outside 0..{self.num_classes - 1} (and {ignore_index} ignored)")
        index = target * self.num_classes + prediction
        self.matrix += torch.bincount(index, minlength=self.num_classes**2).view(self.num_classes, -1)

    def reduce(self) -> None:
        """Sum the matrices of all ranks (every rank must call this, with or without data)."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(self.matrix, op=dist.ReduceOp.SUM)

    def compute(self) -> dict:
        """Per-class IoU (NaN for classes in neither label nor prediction), mIoU, fwIoU,
        pixel accuracy and mean class accuracy, as Python floats, and the matrix itself
        (``confusion``: rows true class, columns predicted, as lists of ints) so that results
        of disjoint image sets can be pooled exactly (:func:`pooled`)."""
        m = self.matrix.double().cpu()
        tp = m.diag()
        gt = m.sum(1)  # labelled pixels per class
        union = gt + m.sum(0) - tp
        iou = torch.where(union > 0, tp / union.clamp(min=1), torch.tensor(float("nan"), dtype=torch.float64))
        total = gt.sum()
        present = gt > 0

        def nanmean(x: torch.Tensor) -> float:
            return float(x[~x.isnan()].mean()) if (~x.isnan()).any() else float("nan")

        return {
            "miou": nanmean(iou),
            "fwiou": float((gt[present] / total * iou[present]).sum()) if total > 0 else float("nan"),
            "pixel_accuracy": float(tp.sum() / total) if total > 0 else float("nan"),
            "mean_accuracy": float((tp[present] / gt[present]).mean()) if present.any() else float("nan"),
            "iou": {name: float(v) for name, v in zip(self.names(), iou, strict=True)},
            "pixels": int(total),
            "confusion": self.matrix.cpu().tolist(),
        }

    @classmethod
    def from_counts(cls, counts: list[list[int]] | torch.Tensor) -> ConfusionMatrix:
        """A matrix from its counts (``compute()``'s ``confusion``), checked to be square non-negative integers."""
        matrix = torch.as_tensor(counts)
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.is_floating_point() or (matrix < 0).any():
            shape = tuple(matrix.shape)
            raise ValueError(f"a confusion matrix is a square table of counts, not {shape} {matrix.dtype}")
        result = cls(matrix.shape[0])
        result.matrix += matrix.to(torch.int64)
        return result

    def names(self) -> tuple[str, ...]:
        return CLASS_NAMES if self.num_classes == NUM_CLASSES else tuple(map(str, range(self.num_classes)))


def pooled(matrices: list[list[list[int]] | torch.Tensor]) -> dict:
    """The metrics of the union of disjoint image sets from their confusion matrices: the
    matrices summed, then scored once (mIoU is a ratio of sums, so this is not the mean of
    their mIoUs). What every image predicted once would give in a single evaluation."""
    if not matrices:
        raise ValueError("no confusion matrix to pool")
    total = ConfusionMatrix.from_counts(matrices[0])
    for counts in matrices[1:]:
        other = ConfusionMatrix.from_counts(counts)
        if other.num_classes != total.num_classes:
            raise ValueError(f"confusion matrices of {total.num_classes} and {other.num_classes} classes")
        total.matrix += other.matrix
    return total.compute()
