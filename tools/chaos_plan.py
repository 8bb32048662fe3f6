"""tools/chaos.py's chain and its fault plan: the chain's shape (stages, folds, steps, the tiny
training's options), the fault kinds, the seeded plan that draws each fault's kind, target and
moment, and the data and job arguments both chains share."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "demo.yaml")

KINDS = (
    "kill-rank",
    "kill-launcher",
    "scancel-kill",
    "usr1-batch",
    "usr1",
    "preempt",
    "kill-in-save",
    "duplicate",
    "drain",
    "kill-reduce",
)
STAGES, FOLDS, STEPS = 2, 3, 12  # FOLDS: the default (--folds)
# Tiny and quick, every fold saving often: a fault always has a recent state to resume from.
TINY = [
    "data.size=[32,64]", "data.eval_size=null", "data.workers=1", "train.batch_size=2", "train.log_every=1",
    f"train.iters={STEPS}", f"train.eval_every={STEPS // 2}", "train.save_every=2", "wandb.mode=offline",
]  # fmt: skip


@dataclass
class Fault:
    """One planned fault and what became of it."""

    index: int
    kind: str
    stage: int
    fold: int  # the target fold (ignored by kill-reduce and drain's node choice)
    step: int  # fires once the target fold has logged this step
    detail: int  # rank, node or delay, drawn with the rest
    fired: float | None = None  # seconds since the chain's start
    at_step: int | None = None
    target: str = ""
    outcome: str = "not fired"
    recovered: float | None = None  # seconds since the chain's start

    @property
    def lost(self) -> float:
        return (self.recovered - self.fired) if self.fired is not None and self.recovered is not None else 0.0


def plan(seed: int, count: int, kinds: list[str], folds: int = FOLDS) -> list[Fault]:
    """``count`` faults drawn from ``kinds`` by ``seed``: kind, stage, fold, step, detail. Every
    kind is used before any repeats (the short mode covers as many kinds as it has faults)."""
    rng = random.Random(seed)
    order: list[str] = []
    while len(order) < count:
        order += rng.sample(kinds, len(kinds))
    faults = [
        Fault(i, kind, rng.randint(1, STAGES), rng.randrange(folds), rng.randint(1, STEPS - 1), rng.randint(0, 1))
        for i, kind in enumerate(order[:count])
    ]
    return sorted(faults, key=lambda f: (f.stage, f.step, f.index))


def prepare_data(workdir: Path, folds: int = FOLDS) -> Path:
    """Tiny synthetic Cityscapes packed in ``folds`` folds with a selection city; the shards' folder."""
    from seg.core.cli import Size
    from seg.data.pack import Options, pack
    from seg.data.synthetic import make_synthetic

    shards = workdir / f"shards-{folds}-folds"
    if not (shards / "manifest.json").exists():
        root = workdir / "cityscapes"
        cities = {"train": folds + 1, "val": 1, "test": 1}  # a city per fold, and the selection city
        counts = {"train": 16, "val": 2, "test": 0}
        make_synthetic(root, counts=counts, cities=cities, size=Size(32, 64), progress=False, overwrite=True)
        options = Options(folds=folds, splits=("train", "val"), selection_cities=("bochum",))
        pack(root, shards, options, progress=False, overwrite=True)
    return shards


def chain_plan(runs: Path, shards: Path) -> Any:
    from seg.cv import plan as cv_plan

    return cv_plan(
        CONFIG, [f"data.shards={shards}", f"train.runs_dir={runs}", *TINY], STAGES, None, ["--recalibrate", "1"]
    )


PER_ROUND = 8  # faults per chaos chain: one chain of STAGES x FOLDS x STEPS has room for about this many


def target(fault: Fault) -> tuple[int, int | str]:
    """What a fault hits: a stage's fold, or a stage's reduction (kill-reduce)."""
    return (fault.stage, "reduce") if fault.kind == "kill-reduce" else (fault.stage, fault.fold)


def rounds(faults: list[Fault], per_round: int = PER_ROUND) -> list[list[Fault]]:
    """The plan in rounds, a fresh chaos chain for each (one chain has too few moments for many
    faults), each round in the plan's order. Faults that fit in one round run in one chain;
    more are packed in their drawn order, at most ``per_round`` a round and one on each target:
    a second fault on a fold waits for the fold to recover from the first, by when it may have
    passed its step or finished (the first 50-fault run in rounds of 8 drawn in order left 3
    faults unfired so)."""
    ordered = sorted(faults, key=lambda f: f.index)
    batches: list[list[Fault]] = []
    if len(ordered) <= per_round:
        batches.append(ordered)
    else:
        for fault in ordered:
            free = [b for b in batches if len(b) < per_round and target(fault) not in {target(f) for f in b}]
            if free:
                free[0].append(fault)
            else:
                batches.append([fault])
    return [sorted(b, key=lambda f: (f.stage, f.step, f.index)) for b in batches]
