#!/usr/bin/env python
"""The optimizer step of the study's model in torch's three implementations: the per-tensor
loop (torch's default on the CPU), foreach (its default on CUDA) and fused (what
seg/recipe/optim.py builds, everywhere): ms per step, and how far each one's parameters end
from the loop's after the same steps.

    python tools/bench_optimizer.py [--depth 34] [--optimizers adam adamw sgd] [--steps 10]

Every row is seg.recipe.optim.from_config's optimizer for the config's ``optim`` defaults
(two parameter groups, the rate and decay the study uses), with its groups switched to the
implementation; the gradients are the same seeded tensors in every row.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from omegaconf import OmegaConf

from seg.core.cli import at_least
from seg.model.deeplab import DeepLabV3Plus
from seg.recipe.config import OptimConfig
from seg.recipe.optim import OPTIMIZERS, from_config

IMPLEMENTATIONS = {"loop": {"foreach": False, "fused": False}, "foreach": {"foreach": True, "fused": False},
                   "fused": {"foreach": None, "fused": True}}  # fmt: skip


def measure(name: str, implementation: str, depth: int, steps: int, device: torch.device) -> dict[str, object]:
    """One row: ``steps`` timed steps after one untimed; the parameters after them."""
    torch.manual_seed(0)
    model = DeepLabV3Plus(depth=depth).to(device)
    optimizer = from_config(OmegaConf.structured(OptimConfig(name=name)), model)
    for group in optimizer.param_groups:
        group.update(IMPLEMENTATIONS[implementation])
    params = [p for group in optimizer.param_groups for p in group["params"]]
    generator = torch.Generator(device).manual_seed(1)
    grads = [torch.randn(p.shape, generator=generator, device=device) * 1e-2 for p in params]
    elapsed = 0.0
    for step in range(steps + 1):
        for p, g in zip(params, grads, strict=True):
            p.grad = g * (1 + step)
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed += (time.perf_counter() - started) if step else 0.0
    return {"optimizer": name, "implementation": implementation, "ms_per_step": round(1000 * elapsed / steps, 1),
            "params": [p.detach().clone() for p in params]}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=34, choices=(18, 34, 50, 101))
    parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=list(OPTIMIZERS))
    parser.add_argument("--steps", type=at_least(1), default=10)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"optimizer step of R{args.depth}-DeepLabV3+ on {where}, {args.steps} steps")
    print(f"{'optimizer':<9} {'implementation':<14} {'ms/step':>8} {'vs loop':>8}  largest difference from the loop")
    for name in args.optimizers:
        rows = [measure(name, impl, args.depth, args.steps, device) for impl in IMPLEMENTATIONS]
        loop = rows[0]
        for row in rows:
            gap = max((a - b).abs().max().item() for a, b in zip(row["params"], loop["params"], strict=True))
            speed = loop["ms_per_step"] / max(row["ms_per_step"], 1e-3)
            print(f"{name:<9} {row['implementation']:<14} {row['ms_per_step']:>8} {speed:>7.1f}x  {gap:.2g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
