"""Learning-rate schedules stepped per optimizer step, with linear warm-up.

One small class instead of torch's schedulers because the plateau rule (halve on a stalled
validation mIoU) must compose with per-iteration warm-up and per-group multipliers, which
torch's ReduceLROnPlateau (it rewrites the optimizer's lr in place) and LambdaLR can't do
together. The lr of group g at step t is
``base_lr * mult_g * warmup(t) * shape(t) * plateau_scale``.
"""

from __future__ import annotations

import math
from typing import Any

import torch

SCHEDULES = ("constant", "poly", "cosine", "plateau")


class Schedule:
    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        name: str,
        total_steps: int,
        warmup_steps: int = 0,
        warmup_ratio: float = 0.1,
        power: float = 0.9,
        min_lr_ratio: float = 0.05,
        plateau_factor: float = 0.5,
        plateau_patience: int = 5,
    ) -> None:
        if name not in SCHEDULES:
            raise ValueError(f"schedule {name!r}: choose from {', '.join(SCHEDULES)}")
        self.optimizer, self.name, self.total = optimizer, name, max(total_steps, 1)
        self.warmup_steps, self.warmup_ratio, self.power, self.min_lr_ratio = (
            warmup_steps, warmup_ratio, power, min_lr_ratio,
        )  # fmt: skip
        self.plateau_factor, self.plateau_patience = plateau_factor, plateau_patience
        self.base = [group["lr"] for group in optimizer.param_groups]
        self.step_count = 0
        self.plateau_scale, self.bad_evals = 1.0, 0  # evaluations in a row without a better mIoU
        self.apply()

    @classmethod
    def from_config(cls, optimizer: torch.optim.Optimizer, schedule: Any, total_steps: int) -> Schedule:
        """The schedule of a config's ``schedule`` section over ``total_steps`` optimizer steps."""
        return cls(
            optimizer,
            schedule.name,
            total_steps,
            schedule.warmup_iters,
            schedule.warmup_ratio,
            schedule.power,
            schedule.min_lr_ratio,
            schedule.plateau_factor,
            schedule.plateau_patience,
        )

    def factor(self, step: int) -> float:
        warmup = 1.0
        if step < self.warmup_steps:
            warmup = self.warmup_ratio + (1 - self.warmup_ratio) * step / self.warmup_steps
        progress = min(step / self.total, 1.0)
        if self.name == "poly":
            shape = (1 - self.min_lr_ratio) * (1 - progress) ** self.power + self.min_lr_ratio
        elif self.name == "cosine":
            shape = self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        else:
            shape = 1.0
        return warmup * shape * self.plateau_scale

    def apply(self) -> None:
        for group, base in zip(self.optimizer.param_groups, self.base, strict=True):
            group["lr"] = base * self.factor(self.step_count)

    def step(self) -> None:
        self.step_count += 1
        self.apply()

    def observe(self, improved: bool) -> None:
        """After an evaluation: whether the validation mIoU improved on the best so far (the
        trainer's progress keeps the best). On ``plateau``, past ``patience`` evaluations in a
        row without, the lr is scaled down and the count starts again."""
        if improved:
            self.bad_evals = 0
            return
        self.bad_evals += 1
        if self.name == "plateau" and self.bad_evals > self.plateau_patience:
            self.plateau_scale *= self.plateau_factor
            self.bad_evals = 0
            self.apply()

    def lr(self) -> float:
        return self.optimizer.param_groups[-1]["lr"]

    def state_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("step_count", "plateau_scale", "bad_evals", "base")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("step_count", "plateau_scale", "bad_evals", "base"):  # a state of an older seg also had "best"
            setattr(self, key, state[key])
        self.apply()
