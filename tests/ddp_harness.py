"""One training step of the real parts (SyncBN, distributed losses, DDP through accelerate,
exact metrics) on a fixed global batch, each rank taking its contiguous share.

    python tests/ddp_harness.py OUT.pt [float64]                                  # 1 process
    accelerate launch --multi_gpu --num_processes 2 tests/ddp_harness.py OUT.pt   # 2 processes

Rank 0 saves the loss, the gradients, the BN running statistics and the confusion matrix.
Dropout is off: its masks are drawn per rank, so they cannot match a single process. In
float64 the comparison shows the arithmetic is the same; in float32 both sides carry
rounding noise of their own (ASPP's pooled branch normalises 4 values per channel here,
which amplifies it: even one process in fp32 differs from fp64 by up to 7% on some
gradients).
"""

import sys
from pathlib import Path

# run as a script (`python tests/ddp_harness.py`, and under a launcher) from a checkout: make `seg` importable
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from accelerate import Accelerator

from seg.core.distributed import all_reduce_sum, convert_sync_batchnorm
from seg.evaluation.metrics import ConfusionMatrix
from seg.model.deeplab import DeepLabV3Plus
from seg.recipe.losses import CombinedLoss

GLOBAL_BATCH = 4


def main() -> None:
    accelerator = Accelerator(cpu=True)
    rank, world = accelerator.process_index, accelerator.num_processes
    torch.manual_seed(0)
    dtype = getattr(torch, sys.argv[2]) if len(sys.argv) > 2 else torch.float32
    model = DeepLabV3Plus(18, 8).to(dtype)
    model.aspp.project[1].p = 0.0
    if world > 1:
        model = convert_sync_batchnorm(model, cuda=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    model, optimizer = accelerator.prepare(model, optimizer)

    generator = torch.Generator().manual_seed(1)
    images = torch.randn(GLOBAL_BATCH, 3, 32, 64, generator=generator).to(dtype)
    labels = torch.randint(0, 19, (GLOBAL_BATCH, 32, 64), generator=generator)
    labels[:, :4] = 255
    labels[0, 4:, :32] = 255  # uneven valid pixels per rank: the CE denominator must be global
    share = GLOBAL_BATCH // world
    images, labels = images[rank * share : (rank + 1) * share], labels[rank * share : (rank + 1) * share]

    weights = torch.linspace(0.5, 1.5, 19, dtype=dtype)
    loss_fn = CombinedLoss(alpha=0.6, label_smoothing=0.1, class_weights=weights, distributed=world > 1)
    loss, parts = loss_fn(model(images), labels)
    accelerator.backward(loss)
    reported = all_reduce_sum(torch.stack([loss, parts["ce"], parts["dice"]]).detach()) / world

    model.eval()
    matrix = ConfusionMatrix()
    with torch.no_grad():
        matrix.update(model(images).argmax(1), labels)
    matrix.reduce()

    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        torch.save(
            {
                "loss": reported,
                "grads": {n: p.grad.clone() for n, p in unwrapped.named_parameters()},
                "buffers": {n: b.clone() for n, b in unwrapped.named_buffers()},
                "matrix": matrix.matrix.clone(),
                "world": world,
            },
            sys.argv[1],
        )
    accelerator.end_training()


if __name__ == "__main__":
    main()
