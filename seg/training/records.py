"""The run's records: what a fold's training is (``Run``: arguments, config, processes,
folder, identity, where its numbers go), its data (``FoldData``), what training changes and
every resumable state saves (``TrainingState``, with its ``Progress``), and the exit codes."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from seg.core.lease import Lease
from seg.core.runs import Fold, MetricsLog
from seg.core.storage import StorageError, writing
from seg.data.augment import DeviceAugment
from seg.data.manifest import FoldSplit
from seg.data.transforms import TrainGeometry
from seg.recipe.schedule import Schedule
from seg.results.tracking import Tracker

EXIT_REQUEUE = 75  # saved on a preemption signal (TERM, USR1): requeue and resume
EXIT_INTERRUPTED = 130  # saved on Ctrl-C (INT): stopped by hand, rerun to resume
EXIT_REFUSED = 2  # a refusal: nothing was written


class StorageFailureError(Exception):
    """A write failed for the disk's sake (full, quota, read-only, forbidden) on some rank:
    every rank raises it at the same point, with that rank's one line."""


@dataclass
class Progress:
    """Where the run is: saved with every resumable state."""

    step: int = 0  # micro-batches done
    best_miou: float = -1.0
    best_step: int = -1
    bad_evals: int = 0
    skipped: int = 0  # unreadable samples skipped (data.on_error=skip)
    final: dict[str, Any] = field(default_factory=dict)  # the latest evaluation: a run resumed at its end reports it
    tracking_id: str = ""  # the wandb run's id, kept by every resume of this run

    def observe(self, miou: float) -> bool:
        """A validation mIoU at this step: whether it is the best so far (then remembered),
        else one more evaluation without (for train.early_stop_patience)."""
        improved = miou > self.best_miou
        if improved:
            self.best_miou, self.best_step, self.bad_evals = miou, self.step, 0
        else:
            self.bad_evals += 1
        return improved

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)


@dataclass
class Run:
    """This fold's run: its arguments and config, the processes (accelerate), its folder, and
    where its numbers go (metrics.jsonl on the main process, the wandb run)."""

    args: argparse.Namespace
    config: Any
    accelerator: Accelerator
    out: Fold  # its folder
    machines: list[tuple[int, str]]  # (machine rank, node name) of every rank
    cuda: bool
    identity: dict[str, Any]  # what this run is (seg/recipe/identity.py), in every state, sidecar and summary
    log: MetricsLog | None = None
    tracker: Tracker | None = None
    lease: Lease | None = None  # the fold's folder is ours (main process)
    made: list[Path] = field(default_factory=list)  # folders the lease created, removed if left empty
    failure: str | None = None  # a write of this rank that failed for the disk's sake, not yet agreed on
    state_bytes: int = 0  # the size of the last state saved, to foresee the next
    warned_disk: bool = False

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def main_process(self) -> bool:
        return self.accelerator.is_main_process

    def record(self, entry: dict[str, Any], progress: Progress, steps_per_epoch: int) -> None:
        entry = {"step": progress.step, "epoch": progress.step / steps_per_epoch, **entry}
        if self.log:
            self.keep_writing(lambda: self.log.write(entry), self.log.path, "appending to")
        self.tracker.log({k: v for k, v in entry.items() if isinstance(v, int | float)}, progress.step)

    def keep_writing(self, write: Callable[[], None], path: Path, doing: str = "writing") -> None:
        """A write of this rank's own: one that fails for the disk's sake is remembered, and
        every rank stops at the next step (``agreed_signal``) with the last complete state."""
        if self.failure is not None:
            return
        try:
            with writing(path, doing):
                write()
        except StorageError as e:
            self.failure = str(e)

    def close(self, together: bool) -> None:
        """Every way out once the processes exist, error or not: the wandb run is finished, the
        lease released, and the process group left; ``together``: after waiting for every rank,
        since a launcher (torchrun) stops the other ranks as soon as one exits non-zero."""
        if self.tracker is not None:
            self.tracker.finish()
        if self.lease is not None:
            self.lease.release()
            for folder in self.made:  # a refused run leaves no folder behind
                try:
                    folder.rmdir()
                except OSError:
                    break
        if together:
            self.accelerator.wait_for_everyone()
        self.accelerator.end_training()


@dataclass
class FoldData:
    """The fold's data: its training and validation groups, how batches are cut and augmented,
    and how many steps the run takes."""

    split: FoldSplit
    geometry: TrainGeometry
    augment: DeviceAugment
    steps_per_epoch: int
    total_steps: int  # micro-batches


@dataclass
class TrainingState:
    """What training changes, step by step (``Run`` is what stays): the model and its
    optimisation, the EMA and the progress, all saved in every resumable state."""

    model: torch.nn.Module  # prepared (DDP when distributed)
    loss_fn: torch.nn.Module
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    ema: torch.optim.swa_utils.AveragedModel | None
    progress: Progress

    @property
    def evaluated(self) -> torch.nn.Module:
        """The model that is evaluated and exported: the EMA when there is one."""
        return self.ema.module if self.ema is not None else self.model
