"""Train one fold of one stage.

    accelerate launch [--num_processes N ...] seg/train.py --config configs/X.yaml --fold k \\
        [--stage s] [--init-from runs/X/stage{s-1}/reduced/model.safetensors] [key=value ...]
    torchrun --nproc_per_node N seg/train.py ...      python seg/train.py ... (one process)

On a machine without CUDA it runs on the CPU over gloo. State goes to
``runs/<experiment>/stage{s}/fold{k}/`` (see seg/core/runs.py). On SIGTERM or SIGUSR1
every rank stops at the same step, the state is saved, a PREEMPTED file is written in the
fold's folder, and every rank exits with EXIT_REQUEUE (75); a job script turns either into
a requeue, and ``--resume auto`` (the default) continues from the newest complete state.
SIGINT (Ctrl-C) stops and saves the same way, without the marker, and exits
EXIT_INTERRUPTED (130). The handlers are installed before anything else (seg/core/signals.py):
a signal during start-up stops the run before its first step. Data workers ignore all three.

This script is the recipe; its phases, records and helpers are seg/training/'s modules.
"""

# ruff: noqa: E402 (the signal handlers are installed before the heavy imports)
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # `accelerate launch seg/train.py` from a checkout without install: make `seg` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from seg.core.signals import Signals

# Caught from here on, before the imports that take seconds: a signal during them is not lost.
EARLY_SIGNALS = Signals().install() if __name__ == "__main__" else None

from seg.core.runs import Experiment, latest_state
from seg.core.storage import EXIT_STORAGE, StorageError, writable_problem, writing
from seg.data.loader import DataError
from seg.data.remote import RemoteError
from seg.recipe.config import ConfigError, load_config
from seg.recipe.identity import SCRATCH, config_as_run
from seg.training.checkpoint import load_state, stopped_on_storage
from seg.training.loop import train_loop
from seg.training.outputs import write_outputs
from seg.training.parts import fold_data, load_model, optimisation
from seg.training.preempt import preempted_exit_code
from seg.training.records import EXIT_REQUEUE, StorageFailureError
from seg.training.refusals import (
    earlier_run,
    no_optimizer_step,
    planned_identity,
    refusal,
    refused_together,
    say_complete,
    say_refusal,
    size_against_shards,
    workers_beyond_epoch,
    workers_disagree,
)
from seg.training.start import open_fold_folder, open_records, start, take_lease


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="experiment YAML (configs/)")
    parser.add_argument("--fold", type=int, required=True, help="the fold to train (validates on its group)")
    parser.add_argument("--stage", type=int, default=1)
    parser.add_argument(
        "--init-from",
        help=f"weights to start from (a reduced model of the previous stage; needed by a stage > 1), "
        f"or {SCRATCH!r}: a later stage from the config's backbone weights",
    )
    parser.add_argument("--resume", default="auto", help="auto (newest complete state, if any) | none | a state folder")
    parser.add_argument(
        "--print-run-dir", action="store_true", help="print the fold's folder and exit (for job scripts)"
    )
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. train.epochs=5 data.workers=4")
    return parser.parse_intermixed_args(argv)  # overrides may come before or after the options


def main(argv: list[str] | None = None) -> int:
    signals = (EARLY_SIGNALS or Signals()).install()
    try:
        return train(parse_args(argv), signals)
    finally:
        if EARLY_SIGNALS is None:  # a caller in the same process gets its handlers back; a
            signals.restore()  # script keeps them to its end: a launcher's TERM as it leaves is no crash


def train(args: argparse.Namespace, signals: Signals) -> int:
    """The recipe: configuration (seg/training/refusals.py), processes (start.py), data, model
    and optimisation (parts.py), resume (checkpoint.py), the loop (loop.py), the outputs."""
    # Configuration: a refusal or a finished fold is decided before any process group exists,
    # by every rank from the files alone; rank 0 alone says it.
    try:
        config = load_config(args.config, args.overrides, args.stage)
    except ConfigError as e:
        return say_refusal(str(e))
    out = Experiment.named(config.train.runs_dir, config.train.experiment).stage(args.stage).fold(args.fold)
    if args.print_run_dir:
        print(out.dir)
        return 0
    asked_workers = config.data.workers  # before auto is chosen for the machine
    config = config_as_run(config, out, args.resume)
    error = refusal(args, config)
    identity, split, error = planned_identity(args, config) if not error else (None, None, error)
    error = error or workers_beyond_epoch(asked_workers, config, split) or no_optimizer_step(config, identity)
    error = error or size_against_shards(config, split)
    done, error = earlier_run(args, out, identity) if identity and not error else (None, error)
    if error:
        return say_refusal(error)
    if done is not None:
        return say_complete(out, done)
    if problem := writable_problem(out.dir):
        return say_refusal(f"{out.dir}: {problem}", EXIT_STORAGE)

    run, together = start(args, config, out, identity or {}), False
    try:  # from here on, every way out goes through run.close; refusals are taken by all ranks together
        if code := refused_together(run.accelerator, workers_disagree(run)):
            return code
        if code := refused_together(run.accelerator, *take_lease(run)):
            return code
        done, error = earlier_run(args, out, identity)  # again, now that no one else writes here
        if error or done is not None:
            together = True
            return refused_together(run.accelerator, error) or (say_complete(out, done) if run.main_process else 0)
        data, error = fold_data(run, split)
        if code := refused_together(run.accelerator, error):
            return code
        model, error = load_model(run)
        if code := refused_together(run.accelerator, error):
            return code
        if code := refused_together(run.accelerator, *open_fold_folder(run)):
            return code
        training = optimisation(run, data, model)
        progress = training.progress

        state = None if args.resume == "none" else latest_state(out.dir) if args.resume == "auto" else Path(args.resume)
        if state is not None:
            if code := refused_together(run.accelerator, load_state(run.accelerator, state)):
                return code
            if run.main_process:
                print(f"resumed from {state} at step {progress.step}", flush=True)
        if code := refused_together(run.accelerator, *open_records(run, progress, resumed=state is not None)):
            return code

        # The loop (seg/training/loop.py): every rank stops at the same step, on a signal too.
        started = time.time()
        try:
            exit_code, stopped_early = train_loop(run, data, training, signals)
        except (DataError, RemoteError, FloatingPointError) as e:  # RemoteError: a remote shard, after its retries
            print(f"error (rank {run.rank}): {e}", file=sys.stderr, flush=True)
            return 1
        except StorageFailureError as e:  # every rank is here, at the same step
            together = True
            return stopped_on_storage(run, str(e))

        together = True  # a normal end or a signal: every rank is here
        if exit_code == 0 and run.main_process:
            try:
                with writing(out.dir, "writing the outputs to"):
                    write_outputs(run, data, training, stopped_early, started)
            except StorageError as e:
                return stopped_on_storage(run, str(e))
        return preempted_exit_code() if exit_code == EXIT_REQUEUE else exit_code
    finally:
        run.close(together)


if __name__ == "__main__":
    sys.exit(main())
