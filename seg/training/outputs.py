"""A finished fold's outputs: the final weights with their sidecar, summary.json, the
``done:`` line."""

from __future__ import annotations

import json
import time
from typing import Any

from seg.core.atomic import atomic_write_bytes
from seg.model.weights import export_weights
from seg.recipe.config import to_dict
from seg.training.records import FoldData, Progress, Run, TrainingState


def sidecar(run: Run, data: FoldData, progress: Progress, metrics: dict[str, Any]) -> dict[str, Any]:
    """What a weights file's JSON sidecar says about it."""
    return {
        "config": to_dict(run.config),
        "fold": run.args.fold,
        "stage": run.args.stage,
        "step": progress.step,
        "epoch": progress.step / data.steps_per_epoch,
        "metrics": metrics,
        "identity": run.identity,
    }


def write_outputs(run: Run, data: FoldData, training: TrainingState, stopped_early: bool, started: float) -> None:
    """The final weights and summary.json (main process), and the ``done:`` line."""
    progress, args, out = training.progress, run.args, run.out
    final = run.accelerator.unwrap_model(training.evaluated)
    export_weights(final, out.weights("model"), sidecar(run, data, progress, progress.final))
    summary = {
        "fold": args.fold,
        "stage": args.stage,
        "steps": progress.step,
        "steps_per_epoch": data.steps_per_epoch,
        "init_from": args.init_from,
        "identity": run.identity,
        "processes": run.world,
        "machines": sorted({rank for rank, _ in run.machines}),
        "nodes": sorted({name for _, name in run.machines}),
        "best": {"miou": progress.best_miou, "step": progress.best_step},
        "final": progress.final,
        "skipped_samples": progress.skipped,
        "stopped_early": stopped_early,
        "seconds": time.time() - started,
    }
    atomic_write_bytes(out.summary, (json.dumps(summary, indent=1) + "\n").encode())
    print(f"done: {out.dir} (best fold mIoU {100 * progress.best_miou:.1f}% at step {progress.best_step})", flush=True)
