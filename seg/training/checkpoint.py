"""Evaluation and resumable states: the fold's validation, the best weights, states saved
only once every rank wrote its part (a full disk stops every rank at the same step), and resume."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from seg.core.atomic import atomic_write_bytes, plain_modes
from seg.core.runs import INTERRUPTION, latest_state, prune_states, state_name
from seg.core.storage import EXIT_STORAGE, NoRoomError, StorageError, free_bytes, megabytes, writing
from seg.data.loader import eval_loader_of
from seg.evaluation.evaluate import evaluate
from seg.model.weights import export_weights
from seg.training.outputs import sidecar
from seg.training.records import FoldData, Run, StorageFailureError, TrainingState


def evaluate_and_checkpoint(run: Run, data: FoldData, training: TrainingState) -> bool:
    """Evaluate; on a better fold mIoU export the best weights; save a resumable state.
    Returns whether to stop early (train.early_stop_patience evaluations without a better one)."""
    progress, patience = training.progress, run.config.train.early_stop_patience
    progress.final = validate(run, data, training)
    miou = progress.final["fold"]["miou"]
    improved = progress.observe(miou)
    training.schedule.observe(improved)
    if improved and run.main_process:
        weights, path = run.accelerator.unwrap_model(training.evaluated), run.out.weights("best")
        run.keep_writing(lambda: export_weights(weights, path, sidecar(run, data, progress, progress.final)), path)
    if run.main_process:
        print(f"step {progress.step}: fold mIoU {100 * miou:.1f}% (best {100 * progress.best_miou:.1f}%)", flush=True)
    save_state(run, progress.step, {state_name(progress.best_step)})
    if patience and progress.bad_evals >= patience:
        if run.main_process:
            print(f"early stop: no better fold mIoU in {patience} evaluations", flush=True)
        return True
    return False


def evaluation_model(run: Run, training: TrainingState) -> torch.nn.Module:
    """The evaluated model without its DDP wrapper, every rank holding rank 0's buffers.

    DDP's forward broadcasts rank 0's buffers, a collective, at every call: ranks given
    unequal numbers of images (one per batch, e.g. 5 over 2 ranks) would wait on each other
    forever, one in that broadcast and the other in the metrics' all-reduce (found by
    tools/chaos.py). The buffers are broadcast once here instead, as DDP's first forward did;
    an evaluation changes none of them."""
    model = run.accelerator.unwrap_model(training.evaluated)
    if model is not training.evaluated:  # wrapped: distributed
        for buffer in model.buffers():
            torch.distributed.broadcast(buffer, 0)
    return model


def validate(run: Run, data: FoldData, training: TrainingState) -> dict[str, Any]:
    """The metrics on the fold's validation group (and on val with train.eval_val), recorded."""
    config = run.config
    autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.train.precision)
    results = {}
    groups = {"fold": [data.split.val_group]} | ({"val": ["val"]} if config.train.eval_val else {})
    model = evaluation_model(run, training)
    for name, group in groups.items():
        loader, expected = eval_loader_of(config.data, group, run.rank, run.world, run.cuda)
        started = time.perf_counter()
        matrix, seen, examples = evaluate(model, loader, run.device, data.augment, autocast, config.wandb.images)
        result = matrix.compute()
        result["samples"], result["skipped"] = seen, expected - seen
        results[name] = result
        entry = {f"{name}/{k}": v for k, v in result.items() if k != "iou"} | {f"{name}/iou": result["iou"]}
        # the chain check's phase (tools/chain_check.py): in metrics.jsonl only, not in the result
        # that states and sidecars keep (a resumed run's states equal an undisturbed run's, bitwise)
        entry[f"{name}/seconds"] = time.perf_counter() - started
        run.record(entry, training.progress, data.steps_per_epoch)
        run.tracker.log_evaluation(name, result, matrix.matrix, examples, training.progress.step)
    return results


def save_state(run: Run, step: int, keep: set[str], stopped: str | None = None) -> Path:
    """A resumable state with the run's identity, renamed into place only once every rank has
    written its part. A write that fails for the disk's sake on any rank (or one foreseen not
    to fit) stops every rank with StorageFailureError, the previous states untouched.
    ``stopped``: why the run stops here (a state off the schedule, marked ``INTERRUPTION``:
    removed once a newer state exists)."""
    accelerator, out, main = run.accelerator, run.out, run.main_process
    final = out.checkpoints / state_name(step)
    if final.exists():
        return final
    tmp = out.checkpoints / f".{final.name}.partial"

    def prepare() -> None:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        if run.state_bytes and free_bytes(tmp) < run.state_bytes:  # writing it would fill the disk for nothing
            raise NoRoomError(tmp, run.state_bytes)

    def complete() -> None:
        atomic_write_bytes(tmp / "identity.json", (json.dumps(run.identity, indent=1) + "\n").encode())
        if stopped:
            note = f"saved when the run was {stopped} at step {step}; removed once a newer state exists\n"
            atomic_write_bytes(tmp / INTERRUPTION, note.encode())
        plain_modes(tmp)  # readable by the team like every other output (accelerate's safetensors are 0600)
        os.replace(tmp, final)
        prune_states(out.dir, run.config.train.keep_last, keep)

    try:
        agreed_write(run, prepare if main else None, tmp, "saving the state to")
        agreed_write(run, lambda: accelerator.save_state(str(tmp)), tmp, "saving the state to")
        agreed_write(run, complete if main else None, tmp, "saving the state to")
    except StorageFailureError:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)  # its space back, for the next attempt
        raise
    if main:
        run.state_bytes = sum(f.stat().st_size for f in final.rglob("*") if f.is_file())
        warn_if_disk_fills(run, final)
    return final


def agreed_write(run: Run, write: Callable[[], None] | None, path: Path, doing: str) -> None:
    """``write`` on this rank (None: nothing here), then every rank learns whether any rank's
    write (or an earlier one, ``run.failure``) failed for the disk's sake: all raise
    StorageFailureError with the first such line, or all go on. Any other error is raised as it is."""
    problem = run.failure
    if problem is None and write is not None:
        try:
            with writing(path, doing):
                write()
        except StorageError as e:
            problem = str(e)
    first = next((p for p in gather_object([problem]) if p), None)
    if first is not None:
        raise StorageFailureError(first)


def warn_if_disk_fills(run: Run, state: Path) -> None:
    """Once per run: a line when fewer than two more states fit on the disk (the next save
    writes before it prunes), so a full disk is a warning before it is an error."""
    free = free_bytes(state)
    if free < 2 * run.state_bytes and not run.warned_disk:
        run.warned_disk = True
        print(
            f"warning: {megabytes(free)} free on the disk of {state.parent}, a state takes "
            f"{megabytes(run.state_bytes)}: room for {free // max(run.state_bytes, 1)} more; free space, or the "
            f"run stops at a save that does not fit (keeping the last complete state)",
            file=sys.stderr,
            flush=True,
        )


def load_state(accelerator: Accelerator, state: Path) -> str | None:
    """Load a resumable state into everything registered; or why it can't be."""
    try:
        accelerator.load_state(str(state))
    except (RuntimeError, ValueError, OSError, KeyError) as e:
        return f"cannot resume from {state} ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
    return None


def stopped_on_storage(run: Run, problem: str) -> int:
    """The one line of a write that failed for the disk's sake, with the state a rerun resumes from."""
    if run.main_process:
        state = latest_state(run.out.dir)
        resume = f"rerun the same command to resume from {state}" if state else "rerun the same command to start"
        print(f"error: {problem}; {resume}; exit {EXIT_STORAGE}", file=sys.stderr, flush=True)
    return EXIT_STORAGE
