"""The optimizer of a config's ``optim`` section: the backbone and the head as two parameter
groups, the backbone's rate scaled by ``optim.backbone_lr_mult``.

Always torch's fused kernels (one kernel over every parameter, CPU and CUDA alike): torch's
default is the per-tensor loop on the CPU (Adam 4.3x slower for R34 on a 2-core CPU) and
foreach on CUDA (tools/bench_optimizer.py measures the three); the fused result differs from
theirs in the last bits. A state saved by another implementation resumes with it
(load_state_dict restores each group's ``fused`` and ``foreach``), so its run stays the same run.
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
