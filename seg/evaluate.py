"""Exact distributed evaluation of a model over an evaluation loader."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from seg.augment import DeviceAugment
from seg.distributed import all_reduce_sum
from seg.inference import TestTimeAugmentation, predict_probabilities
from seg.metrics import ConfusionMatrix


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    batches: Iterable[dict[str, Any]],
    device: torch.device,
    normalise: DeviceAugment,
    autocast_dtype: torch.dtype | None = None,
    keep: int = 0,
    tta: TestTimeAugmentation | None = None,
    export: Callable[[str, torch.Tensor], None] | None = None,
) -> tuple[ConfusionMatrix, int, list[dict[str, Any]]]:
    """The confusion matrix summed over every rank, the number of samples seen over every
    rank, and up to ``keep`` (image, prediction, label, key) examples of this rank.

    Every rank must call this, even one whose loader is empty: the reduction is collective.
    ``tta`` selects sliding windows, flips and scales; ``export(key, prediction)`` receives
    every prediction (trainIds at the label's size).
    """
    was_training = model.training
    model.eval()
    matrix = ConfusionMatrix(device=device)
    seen = 0
    examples: list[dict[str, Any]] = []
    for batch in batches:
        images = batch["image"].to(device, non_blocking=True)
        labels = batch["label"].to(device, non_blocking=True)
        inputs, _ = normalise(images, train=False)
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            size = tuple(labels.shape[1:])  # predictions are brought to the label's size
            prediction = predict_probabilities(model, inputs, size, tta or TestTimeAugmentation()).argmax(dim=1)
        matrix.update(prediction, labels)
        if export is not None:
            for key, single in zip(batch["key"], prediction, strict=True):
                export(key, single.cpu())
        seen += images.shape[0]
        for i in range(min(images.shape[0], keep - len(examples))):
            examples.append(
                {
                    "image": images[i].cpu(),
                    "prediction": prediction[i].cpu(),
                    "label": labels[i].cpu(),
                    "key": batch["key"][i],
                }
            )
    matrix.reduce()
    total_seen = int(all_reduce_sum(torch.tensor([seen], device=device)).item())
    model.train(was_training)
    return matrix, total_seen, examples
