#!/usr/bin/env python
"""The training losses at the study's size: forward + backward of each one on the logits a
step gives them (19 classes at the training input size, ignored pixels included), ms per
call and, on CUDA, the peak memory above the logits.

    python tools/bench_loss.py [--batch 8] [--size 1024x512] [--precision bf16] [--steps 5]

Rows: the softmax alone (the floor under every term below: each computes one, in fp32),
the study's smoothed, class-weighted cross entropy, its Dice, the two combined as training
builds them (seg.recipe.losses.CombinedLoss, alpha 0.6), and mmseg's OHEM cross entropy.
Logits are bf16 by default on CUDA (autocast's output) and fp32 on the CPU; every loss
computes in fp32 either way. tools/gpu_check.py runs ``measure_losses`` for its table.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from seg.core.cityscapes import IGNORE_INDEX, NUM_CLASSES
from seg.core.cli import Size, at_least, format_size, parse_size
from seg.core.distributed import at_least_fp32
from seg.recipe.losses import CombinedLoss, OHEMLoss, cross_entropy, dice_loss

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def losses(device: torch.device) -> dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    weights = torch.linspace(0.5, 2.0, NUM_CLASSES, device=device)  # class weights, as a fold has them
    combined = CombinedLoss(0.6, 0.1, weights).to(device)
    ohem = OHEMLoss(class_weights=weights).to(device)
    return {
        "softmax alone": lambda logits, target: at_least_fp32(logits).softmax(dim=1).sum(),
        "cross entropy": lambda logits, target: cross_entropy(logits, target, weights, label_smoothing=0.1),
        "dice": dice_loss,
        "combined (study)": lambda logits, target: combined(logits, target)[0],
        "ohem": lambda logits, target: ohem(logits, target)[0],
    }


def inputs(batch: int, size: tuple[int, int], dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Seeded logits and targets: every class present, the top tenth of each image ignored
    (Cityscapes' ego vehicle and borders are ignored pixels too)."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(batch, NUM_CLASSES, *size, generator=generator).to(device, dtype)
    target = torch.randint(0, NUM_CLASSES, (batch, *size), generator=generator)
    target[:, : size[0] // 10] = IGNORE_INDEX
    return logits.requires_grad_(True), target.to(device)


def where(device: torch.device) -> str:
    """The device as a result names it: the GPU's name, or the CPU's threads."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"


def measure_losses(
    batch: int, size: tuple[int, int], precision: str, device: torch.device, steps: int = 5
) -> list[dict[str, Any]]:
    """Each loss's forward + backward, ``steps`` timed calls after one untimed. A loss that
    runs out of memory or breaks is reported in its row (``error``), not raised: the GPU
    check's other tables still come."""
    cuda = device.type == "cuda"
    measured = losses(device)
    rows: list[dict[str, Any]] = [{"loss": name, "batch": batch, "size": format_size(size), "logits": precision,
                                   "device": where(device)} for name in measured]  # fmt: skip
    try:
        logits, target = inputs(batch, size, PRECISIONS[precision], device)
    except Exception as e:  # no room for the batch itself (torch.cuda.OutOfMemoryError): every row says so
        return [row | {"error": one_line(e)} for row in rows]
    for row, loss in zip(rows, measured.values(), strict=True):
        try:
            row |= time_loss(loss, logits, target, steps, cuda)
        except Exception as e:  # torch.cuda.OutOfMemoryError is one
            row["error"] = one_line(e)
        finally:
            logits.grad = None
    return rows


def one_line(error: Exception) -> str:
    return f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:200]}"


def time_loss(
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    logits: torch.Tensor,
    target: torch.Tensor,
    steps: int,
    cuda: bool,
) -> dict[str, float]:
    def call() -> None:
        logits.grad = None
        loss(logits, target).backward()

    call()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if cuda else 0
    started = time.perf_counter()
    for _ in range(steps):
        call()
    if cuda:
        torch.cuda.synchronize()
    timed = {"ms": round(1000 * (time.perf_counter() - started) / steps, 2)}
    if cuda:
        timed["peak_memory_gib"] = round((torch.cuda.max_memory_allocated() - base) / 2**30, 2)
    return timed


def format_losses(rows: list[dict[str, Any]]) -> str:
    first = rows[0]
    lines = [f"loss forward + backward, batch {first['batch']} at {first['size']}, {first['logits']} logits, "
             f"on {first['device']}",
             f"{'loss':<18} {'ms':>9} {'peak GiB':>9}"]  # fmt: skip
    for r in rows:
        measured = f"{r['ms']:>9} {r.get('peak_memory_gib', '-'):>9}" if "ms" in r else f"  {r['error']}"
        lines.append(f"{r['loss']:<18} {measured}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=at_least(1), default=None, help="default 8 on CUDA, 2 on the CPU")
    parser.add_argument("--size", type=parse_size, default=Size(512, 1024), help="WIDTHxHEIGHT (default 1024x512)")
    parser.add_argument("--precision", choices=list(PRECISIONS), help="the logits' dtype (default bf16 on CUDA)")
    parser.add_argument("--steps", type=at_least(1), default=5)
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    batch = args.batch if args.batch is not None else (8 if cuda else 2)
    device = torch.device("cuda" if cuda else "cpu")
    precision = args.precision or ("bf16" if cuda else "fp32")
    rows = measure_losses(batch, tuple(args.size), precision, device, args.steps)
    print(format_losses(rows))
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
