"""Signals agreed by every rank: preemption (save, mark, requeue) and Ctrl-C (save, stop)
at the same step on every rank."""

from __future__ import annotations

import json
import os
import time

import torch

from seg.core.atomic import atomic_write_bytes
from seg.core.distributed import all_reduce_sum
from seg.core.runs import state_name
from seg.core.signals import Signals
from seg.training.checkpoint import agreed_write, save_state
from seg.training.records import EXIT_INTERRUPTED, EXIT_REQUEUE, Progress, Run


def agreed_signal(run: Run, signals: Signals, skipped: float = 0.0) -> tuple[int, float]:
    """One small all-reduce: the exit code every rank takes for the signals any rank caught
    (0: go on; a preemption outranks a Ctrl-C), and the samples skipped on all ranks. A write
    of any rank that failed for the disk's sake stops every rank here (StorageFailureError)."""
    flags = [float(signals.preempted), float(signals.interrupted), skipped, float(run.failure is not None)]
    # One process has nothing to agree with: its flags stay on the host. On a GPU, reading them
    # back from the device would wait, every step, for the queued work of the step before.
    device = run.device if run.world > 1 else torch.device("cpu")
    preempted, interrupted, skipped, failed = all_reduce_sum(torch.tensor(flags, device=device)).tolist()
    if failed:
        agreed_write(run, None, run.out.dir, "")  # every rank raises the failed rank's line
    return (EXIT_REQUEUE if preempted else EXIT_INTERRUPTED if interrupted else 0), skipped


def stop_on_signal(run: Run, progress: Progress, code: int) -> None:
    """Every rank, at the same step: save (when there is a step to save), write the PREEMPTED
    marker for a requeue, and say so: a line per rank on preemption, one line on Ctrl-C."""
    accelerator, out, saved = run.accelerator, run.out, progress.step > 0
    if saved:
        stopped = "preempted" if code == EXIT_REQUEUE else "interrupted"
        save_state(run, progress.step, {state_name(progress.best_step)}, stopped=stopped)
    what = f"state saved at step {progress.step}" if saved else "nothing to save before the first step"
    if code == EXIT_REQUEUE:
        if accelerator.is_main_process:
            state = state_name(progress.step) if saved else None
            marker = {"step": progress.step, "state": state, "time": time.time()}
            atomic_write_bytes(out.preempted, (json.dumps(marker) + "\n").encode())
        print(f"rank {accelerator.process_index}: preempted, {what}; exit {preempted_exit_code()}", flush=True)
    elif accelerator.is_main_process:
        print(f"interrupted: {what} in {out.dir}; rerun the same command to resume; exit {code}", flush=True)


def preempted_exit_code() -> int:
    """EXIT_REQUEUE, or what SEG_PREEMPTED_EXIT asks for: slurm/fold.sh asks for 0, since a
    launcher (torchrun) reports a child's 75 as a failure with a traceback, and the script
    reads the PREEMPTED marker instead."""
    return int(os.environ.get("SEG_PREEMPTED_EXIT", EXIT_REQUEUE))
