"""seg/recipe/schedule.py: warm-up, poly, cosine, plateau, per-group multipliers, and its state across a resume."""

import math

import pytest
import torch

from seg.recipe.config import ScheduleConfig
from seg.recipe.schedule import Schedule


def optimizer(lr: float = 1.0, backbone_mult: float = 0.1) -> torch.optim.Optimizer:
    backbone, head = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    return torch.optim.SGD([{"params": [backbone], "lr": lr * backbone_mult}, {"params": [head], "lr": lr}], lr=lr)


def lrs(schedule: Schedule, steps: int) -> list[float]:
    """The head's lr before each of ``steps`` optimizer steps."""
    values = []
    for _ in range(steps):
        values.append(schedule.lr())
        schedule.step()
    return values


def test_constant_with_linear_warm_up_from_the_ratio():
    schedule = Schedule(optimizer(2.0), "constant", total_steps=10, warmup_steps=4, warmup_ratio=0.1)
    expected = [2.0 * (0.1 + 0.9 * t / 4) for t in range(4)] + [2.0] * 6
    assert lrs(schedule, 10) == pytest.approx(expected)


def test_poly_decays_to_its_floor_and_stays_there():
    schedule = Schedule(optimizer(), "poly", total_steps=10, power=0.9, min_lr_ratio=0.05)
    values = lrs(schedule, 13)
    assert values[:11] == pytest.approx([0.95 * (1 - t / 10) ** 0.9 + 0.05 for t in range(11)])
    assert values[10:] == pytest.approx([0.05] * 3)  # past the end: the floor


def test_cosine_by_hand_and_each_group_keeps_its_multiplier():
    opt = optimizer(1.0, backbone_mult=0.1)
    schedule = Schedule(opt, "cosine", total_steps=8, min_lr_ratio=0.1)
    for t in range(9):
        factor = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t / 8))
        assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.1 * factor, factor])
        schedule.step()


def test_warm_up_multiplies_the_shape():
    schedule = Schedule(optimizer(), "poly", total_steps=10, warmup_steps=2, warmup_ratio=0.5, power=1.0,
                        min_lr_ratio=0.0)  # fmt: skip
    assert lrs(schedule, 3) == pytest.approx([0.5 * 1.0, 0.75 * 0.9, 1.0 * 0.8])


def test_plateau_scales_down_after_patience_evaluations_without_improvement():
    schedule = Schedule(optimizer(), "plateau", total_steps=100, plateau_factor=0.5, plateau_patience=2)
    schedule.observe(improved=True)
    assert schedule.lr() == 1.0
    schedule.observe(improved=False)
    schedule.observe(improved=False)
    assert schedule.lr() == 1.0
    schedule.observe(improved=False)
    assert schedule.lr() == 0.5  # 3 without improvement: past patience
    schedule.observe(improved=True)
    assert schedule.lr() == 0.5  # an improvement keeps the scale
    schedule.step()
    assert schedule.lr() == 0.5  # the scale holds across steps


def test_other_schedules_observe_without_changing_the_lr():
    schedule = Schedule(optimizer(), "cosine", total_steps=10, plateau_patience=0)
    schedule.observe(improved=True)
    for _ in range(3):
        schedule.observe(improved=False)
    assert schedule.lr() == 1.0


def test_an_unknown_name_is_refused():
    with pytest.raises(ValueError, match="choose from constant, poly, cosine, plateau"):
        Schedule(optimizer(), "step", total_steps=10)


def test_from_config_reads_the_schedule_section():
    section = ScheduleConfig(name="poly", warmup_iters=3, warmup_ratio=0.2, power=2.0, min_lr_ratio=0.0,
                             plateau_factor=0.1, plateau_patience=7)  # fmt: skip
    schedule = Schedule.from_config(optimizer(), section, total_steps=30)
    assert (schedule.name, schedule.total, schedule.warmup_steps, schedule.warmup_ratio) == ("poly", 30, 3, 0.2)
    assert (schedule.power, schedule.min_lr_ratio, schedule.plateau_factor, schedule.plateau_patience) == (
        2.0,
        0.0,
        0.1,
        7,
    )


@pytest.mark.parametrize("name", ["constant", "poly", "cosine", "plateau"])
def test_a_resumed_schedule_continues_as_one_never_stopped(name):
    def build() -> tuple[torch.optim.Optimizer, Schedule]:
        opt = optimizer(1.0)
        return opt, Schedule(opt, name, total_steps=20, warmup_steps=3, plateau_patience=1, plateau_factor=0.5)

    def run(schedule: Schedule, steps: range) -> list[float]:
        values = []
        for t in steps:
            schedule.step()
            if t % 3 == 0:
                schedule.observe(improved=t == 0)  # stalls from the second evaluation on
            values.append(schedule.lr())
        return values

    _, whole = build()
    expected = run(whole, range(20))
    _, first = build()
    before = run(first, range(10))
    state = first.state_dict()
    opt, resumed = build()  # a fresh process: a new optimizer at the base lr
    resumed.load_state_dict(state)
    assert opt.param_groups[-1]["lr"] == pytest.approx(before[-1])  # applied on load, before any step
    assert [*before, *run(resumed, range(10, 20))] == pytest.approx(expected)
    assert resumed.state_dict() == whole.state_dict()
