"""The training loop: batches until the run's length, an early stop, or a signal; every rank
learns at each step whether any rank was signalled (or failed a write), so all stop at the
same step."""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from seg.core.runs import state_name
from seg.core.signals import Drill, Signals
from seg.training.checkpoint import evaluate_and_checkpoint, save_state, validate
from seg.training.parts import stream_at, training_loader
from seg.training.preempt import agreed_signal, stop_on_signal
from seg.training.records import FoldData, Run, TrainingState
from seg.training.step import LogWindow, log_step, progress_bar, train_on_batch

MANY_EVALUATIONS = 100  # mmseg's iteration recipes evaluate about 10 times (val_interval 8000 of 80000)


def evaluations_warning(train: Any, total_steps: int) -> str | None:
    """With train.iters, train.eval_every counts iterations: an eval_every written for epochs
    (the study's 1) evaluates, and saves a state, at nearly every iteration."""
    evaluations = total_steps // train.eval_every
    if not train.iters or evaluations <= MANY_EVALUATIONS:
        return None
    return (
        f"train.eval_every {train.eval_every} counts iterations when train.iters is set: {evaluations} "
        f"evaluations, a state saved at each; set train.eval_every (mmseg's val_interval, e.g. {train.iters // 10})"
    )


def train_loop(run: Run, data: FoldData, training: TrainingState, signals: Signals) -> tuple[int, bool]:
    """Train from ``training.progress`` on: log, evaluate, checkpoint and save as the config
    says. Returns the exit code every rank takes (0, or a signal's: the state is saved then)
    and whether the run stopped early (train.early_stop_patience)."""
    config, progress = run.config, training.progress
    patience = config.train.early_stop_patience
    stopped_early = bool(patience and progress.bad_evals >= patience)  # resumed after its early stop
    exit_code, _ = agreed_signal(run, signals)  # signalled during start-up: stop before the first step
    loader = training_loader(run, data, start_epoch=progress.step // data.steps_per_epoch)
    batches = stream_at(loader, progress.step % data.steps_per_epoch) if not exit_code else iter(())
    bar = progress_bar(run, data.total_steps, progress.step)
    window, drill = LogWindow(), Drill(os.environ.get("SEG_DRILL"))
    every = config.train.eval_every * (1 if config.train.iters else data.steps_per_epoch)
    if run.main_process and progress.step == 0 and (warning := evaluations_warning(config.train, data.total_steps)):
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    try:
        if exit_code:
            stop_on_signal(run, progress, exit_code)
        while not exit_code and not stopped_early and progress.step < data.total_steps:
            waiting = time.perf_counter()
            batch = next(batches)
            window.waited += time.perf_counter() - waiting
            exit_code, skipped = agreed_signal(run, signals, float(batch["skipped"].sum()))
            if exit_code:  # this batch is not trained on; a resumed run draws it again
                stop_on_signal(run, progress, exit_code)
                break
            progress.skipped += int(skipped)
            loss, parts = train_on_batch(run, data, training, batch)
            progress.step += 1
            window.steps += 1
            bar.update()
            if progress.step % config.train.log_every == 0 or progress.step == data.total_steps:
                log_step(run, data, training, loss, parts, window, bar)
            if progress.step % every == 0 or progress.step == data.total_steps:
                stopped_early = evaluate_and_checkpoint(run, data, training)
            if config.train.save_every and progress.step % config.train.save_every == 0:
                save_state(run, progress.step, {state_name(progress.best_step)})
            drill.after(progress.step, run.rank)
        if not exit_code and not progress.final:  # resumed at the end from a state that lacks it
            progress.final = validate(run, data, training)
    finally:
        bar.close()
    return exit_code, stopped_early
