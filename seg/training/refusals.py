"""Refusals: what makes a run impossible or unnecessary, decided from the config and the
fold's files alone before any process group exists (rank 0 alone says it), and once the
processes exist, the verdict every rank takes together."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from seg.core.cli import format_size
from seg.core.launch import launcher_problem
from seg.core.lease import clear_if_gone
from seg.core.runs import Experiment, Fold, is_state, latest_state
from seg.core.signals import Drill
from seg.data.loader import steps_per_epoch
from seg.data.manifest import FoldSplit, ManifestError
from seg.data.workers import AUTO, workers_problem
from seg.recipe.config import size_swapped
from seg.recipe.identity import SCRATCH, describe_changes, differences, finished_run, fold_identity, read_identity
from seg.training.records import EXIT_REFUSED, Run


def say_refusal(error: str, code: int = EXIT_REFUSED) -> int:
    """A refusal before the process group: every rank takes it, rank 0 alone says it (one line
    under a launcher too, whose own summary of the failed ranks follows)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"error: {error}", file=sys.stderr, flush=True)
    return code


def say_complete(out: Fold, summary: dict[str, Any]) -> int:
    """A finished fold: said, and the lease of a writer killed after its last write removed."""
    if int(os.environ.get("RANK", "0")) == 0:
        if left := clear_if_gone(out.lease):
            print(left, flush=True)
        print(f"{out.dir} is complete (step {summary['steps']}, the same run); nothing to do", flush=True)
    return 0


def refusal(args: argparse.Namespace, config: Any) -> str | None:
    """What makes the run impossible, found before any process group or wandb run exists."""
    if args.stage < 1:
        return f"--stage {args.stage}: stages count from 1 (stage s > 1 starts from stage s-1's reduced model)"
    if args.fold < 0:
        return f"--fold {args.fold}: folds count from 0"
    if args.stage > 1 and not args.init_from:
        previous = Experiment.named(config.train.runs_dir, config.train.experiment).stage(args.stage - 1)
        return (
            f"--stage {args.stage} without --init-from: a later stage starts from the previous stage's "
            f"reduced model (--init-from {previous.reduced_model}); "
            f"--init-from {SCRATCH} trains it from the config's backbone weights instead"
        )
    if args.init_from not in (None, SCRATCH) and not Path(args.init_from).is_file():
        return f"--init-from {args.init_from}: no such file (a seg .safetensors model, or {SCRATCH})"
    if config.train.precision == "fp16" and not torch.cuda.is_available():
        return "config key 'train.precision': fp16 needs a GPU; use bf16 on the CPU"
    world = int(os.environ.get("WORLD_SIZE", "1"))  # set by torchrun / accelerate launch
    if "WORLD_SIZE" not in os.environ and (problem := launcher_problem()):
        return problem
    per_norm = config.train.batch_size * (world if config.model.sync_bn else 1)
    if per_norm == 1 and config.model.aspp_pool_norm:
        return (
            f"config key 'train.batch_size': 1 image per BatchNorm ({world} process(es), model.sync_bn="
            f"{config.model.sync_bn}) leaves the ASPP image-pooling BatchNorm one value per channel; "
            f"set model.aspp_pool_norm=false (or use 2+ processes with model.sync_bn=true)"
        )
    try:
        Drill(os.environ.get("SEG_DRILL"))
    except ValueError as e:
        return str(e)
    if args.resume not in ("auto", "none") and not is_state(Path(args.resume)):
        return (
            f"--resume {args.resume}: not a resumable state (a runs/.../checkpoints/step-NNNNNNNN folder); "
            f"pass auto, none or such a folder"
        )
    return None


def planned_identity(
    args: argparse.Namespace, config: Any
) -> tuple[dict[str, Any], FoldSplit, None] | tuple[None, None, str]:
    """What this run is (seg/recipe/identity.py) and the fold's split it read, or why they can't
    be known: the manifest's own error (read once: a remote one that failed its round of tries
    is not tried again later), or the start model's."""
    try:
        split = FoldSplit.of(config.data.shards, args.fold)
        processes = int(os.environ.get("WORLD_SIZE", "1"))
        return fold_identity(config, args.stage, split, args.init_from, processes), split, None
    except (ManifestError, OSError) as e:
        return None, None, str(e)
    except KeyError as e:  # a manifest of another layout than the one it says it is
        return None, None, f"{config.data.shards}: its manifest has no {e} entry: repack it (tools/pack_cityscapes.py)"


def workers_beyond_epoch(asked: int | str, config: Any, split: FoldSplit | None) -> str | None:
    """An explicit ``data.workers`` beyond the batches a process takes an epoch: each worker
    yields whole batches, so the epoch would stretch to a multiple of the workers (10000
    workers: an epoch of 10000 steps), each worker a process with its own memory."""
    if asked == AUTO or split is None:
        return None
    world = int(os.environ.get("WORLD_SIZE", "1"))
    batches = steps_per_epoch(split.train_samples, config.train.batch_size, world, 1)
    if int(asked) <= batches:
        return None
    stretched = steps_per_epoch(split.train_samples, config.train.batch_size, world, int(asked))
    return (
        f"config key 'data.workers': {asked} is more than the {batches} batches a process takes an epoch "
        f"({split.train_samples} training samples, batch {config.train.batch_size}, {world} process(es)): "
        f"the epoch would stretch to {stretched} steps; set at most {batches}, or {AUTO}"
    )


def earlier_run(args: argparse.Namespace, out: Fold, identity: dict[str, Any]) -> tuple[dict | None, str | None]:
    """What the fold's folder already holds, from its files alone (nothing loaded, no process
    group): (its summary, None) when it is this very run, finished; (None, why) when it holds
    a finished run or a state to resume that is another experiment; (None, None) otherwise.
    Read before the process group exists, the summary cannot be this run's own: no rank
    writes one before every rank joined."""
    way_out = (
        "rerun with the settings it had, start over with --resume none (the fold's outputs are "
        "replaced), or train into another folder with train.experiment=NAME"
    )
    if args.resume == "auto":
        summary, changes = finished_run(out, identity)
        if changes:
            return None, f"{out.dir} finished as another run ({describe_changes(changes)}): {way_out}"
        if summary is not None:
            return summary, None
    state = None if args.resume == "none" else latest_state(out.dir) if args.resume == "auto" else Path(args.resume)
    recorded = read_identity(state / "identity.json") if state is not None else None
    changes = differences(recorded, identity) if recorded is not None else []
    if changes:
        return None, f"cannot resume from {state}: it is another run ({describe_changes(changes)}); {way_out}"
    return None, None


def size_against_shards(config: Any, split: FoldSplit | None) -> str | None:
    """A data.size lying the other way than the frames of shards packed at a size (--resize):
    portrait crops of landscape frames train without a word and score badly."""
    resize = split.manifest["options"].get("resize") if split is not None else None
    if not resize:
        return None
    frames = [resize["height"], resize["width"]]
    what = f"the shards' frame size ({format_size(frames)}, packed with --resize)"
    swapped = size_swapped(list(config.data.size), frames, what)
    return f"config key 'data.size': {swapped}" if swapped else None


def no_optimizer_step(config: Any, identity: dict[str, Any] | None) -> str | None:
    """A train.grad_accum beyond the micro-batches of the whole run: it would end without one
    optimizer step, its model the initial one."""
    if identity is None or identity["schedule"]["total_steps"] > 0:
        return None
    train, per_epoch = config.train, identity["schedule"]["steps_per_epoch"]
    batches = train.epochs * per_epoch
    return (
        f"config key 'train.grad_accum': {train.grad_accum} micro-batches a step is more than the run's {batches} "
        f"({train.epochs} epoch(s) of {per_epoch}): no optimizer step would run; set at most {batches}, or more "
        "train.epochs"
    )


def refused_together(accelerator: Accelerator, error: str | None, code: int = EXIT_REFUSED) -> int:
    """Every rank's verdict to every rank: on an error of any rank, the main process prints
    the first one and every rank returns its exit code (and leaves the process group through
    Run.close), none left waiting at a barrier; 0 when no rank has one."""
    first = next((pair for pair in gather_object([(error, code) if error else None]) if pair), None)
    if first and accelerator.is_main_process:
        print(f"error: {first[0]}", file=sys.stderr, flush=True)
    return first[1] if first else 0


def workers_disagree(run: Run) -> str | None:
    """Ranks whose data.workers resolved differently (an `auto` on unequal cores) are one refusal."""
    return workers_problem(gather_object([run.config.data.workers]))
