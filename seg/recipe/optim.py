"""The optimizer of a config's ``optim`` section: the backbone and the head as two parameter
groups, the backbone's rate scaled by ``optim.backbone_lr_mult``.

Always torch's fused kernels (one kernel over every parameter, CPU and CUDA alike): on the CPU
torch's default is the per-tensor loop, and the fused Adam step is 4-5x faster
(tools/bench_train.py --optimizer); its result differs from the loop's in the last bit. A
state saved by the loop resumes with it (load_state_dict restores each group's ``fused``).
"""

from __future__ import annotations

from typing import Any

import torch

OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}


def from_config(optim: Any, model: torch.nn.Module) -> torch.optim.Optimizer:
    backbone = [p for n, p in model.named_parameters() if n.startswith("backbone.")]
    head = [p for n, p in model.named_parameters() if not n.startswith("backbone.")]
    groups = [{"params": backbone, "lr": optim.lr * optim.backbone_lr_mult}, {"params": head, "lr": optim.lr}]
    if optim.name not in OPTIMIZERS:
        raise ValueError(f"optimizer {optim.name!r}: choose from {', '.join(OPTIMIZERS)}")
    if optim.name == "sgd":
        return torch.optim.SGD(
            groups, lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay, fused=True
        )
    return OPTIMIZERS[optim.name](groups, lr=optim.lr, weight_decay=optim.weight_decay, fused=True)
