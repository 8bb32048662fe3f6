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
"""

# ruff: noqa: E402 (the signal handlers are installed before the heavy imports)
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `accelerate launch seg/train.py` from a checkout without install: make `seg` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from seg.core.signals import Drill, Signals

# Caught from here on, before the imports that take seconds: a signal during them is not lost.
EARLY_SIGNALS = Signals().install() if __name__ == "__main__" else None

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from omegaconf import OmegaConf
from tqdm import tqdm

from seg.core.atomic import atomic_write_bytes, plain_modes
from seg.core.distributed import all_reduce_sum, convert_sync_batchnorm
from seg.core.launch import launcher_problem
from seg.core.lease import Lease, LeaseHeldError, acquire
from seg.core.runs import Experiment, Fold, MetricsLog, is_state, latest_state, prune_states, state_name
from seg.core.storage import (
    EXIT_STORAGE,
    NoRoomError,
    StorageError,
    free_bytes,
    megabytes,
    storage_problem,
    writable_problem,
    writing,
)
from seg.data.augment import DeviceAugment, cut_on_device
from seg.data.loader import DataError, eval_loader_of, packed_size, shards_of, train_loader
from seg.data.manifest import FoldSplit, ManifestError
from seg.data.remote import RemoteError
from seg.data.transforms import TrainGeometry
from seg.evaluation.evaluate import evaluate
from seg.model.deeplab import from_config
from seg.model.weights import WeightsError, export_weights, load_backbone, load_weights
from seg.recipe import losses, optim
from seg.recipe.config import ConfigError, load_config, to_dict
from seg.recipe.identity import (
    SCRATCH,
    describe,
    differences,
    experiment_key,
    finished_run,
    fold_identity,
    read_identity,
    run_length,
)
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
class Fit:
    """What training changes: the model and its optimisation, the EMA and the progress, all
    saved in every resumable state."""

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
    """The recipe: configuration, processes, data, model, resume, the loop, the outputs."""
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
    error = refusal(args, config)
    identity, split = planned_identity(args, config) if not error else (None, None)
    done, error = earlier_run(args, out, identity) if identity and not error else (None, error)
    if error:
        return say_refusal(error)
    if done is not None:
        return say_complete(out, done)
    if problem := writable_problem(out.dir):
        return say_refusal(f"{out.dir}: {problem}", EXIT_STORAGE)

    run, together = start(args, config, out, identity or {}), False
    try:  # from here on, every way out goes through run.close; refusals are taken by all ranks together
        if code := refused_together(run.accelerator, *take_lease(run)):
            return code
        # again, now that no one else writes here (no identity: the manifest's own error follows)
        done, error = earlier_run(args, out, identity) if identity else (None, None)
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
        fit = optimisation(run, data, model)
        progress = fit.progress

        state = None if args.resume == "none" else latest_state(out.dir) if args.resume == "auto" else Path(args.resume)
        if state is not None:
            if code := refused_together(run.accelerator, load_state(run.accelerator, state)):
                return code
            if run.main_process:
                print(f"resumed from {state} at step {progress.step}", flush=True)
        if code := refused_together(run.accelerator, *open_records(run, progress, resumed=state is not None)):
            return code

        # The loop: every rank first learns whether any rank was signalled, and all stop at the same step.
        patience = config.train.early_stop_patience
        stopped_early = bool(patience and progress.bad_evals >= patience)  # resumed after its early stop
        exit_code, _ = agreed_signal(run, signals)  # signalled during start-up: stop before the first step
        loader = training_loader(run, data, start_epoch=progress.step // data.steps_per_epoch)
        batches = stream_at(loader, progress.step % data.steps_per_epoch) if not exit_code else iter(())
        bar = progress_bar(run, data.total_steps, progress.step)
        started, window, drill = time.time(), Window(), Drill(os.environ.get("SEG_DRILL"))
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
                loss, parts = one_step(run, data, fit, batch)
                progress.step += 1
                window.steps += 1
                bar.update()
                if progress.step % config.train.log_every == 0 or progress.step == data.total_steps:
                    log_step(run, data, fit, loss, parts, window, bar)
                every = config.train.eval_every * (1 if config.train.iters else data.steps_per_epoch)
                if progress.step % every == 0 or progress.step == data.total_steps:
                    stopped_early = evaluate_and_checkpoint(run, data, fit)
                if config.train.save_every and progress.step % config.train.save_every == 0:
                    save_state(run, progress.step, {state_name(progress.best_step)})
                drill.after(progress.step, run.rank)
            if not exit_code and not progress.final:  # resumed at the end from a state that lacks it
                progress.final = validate(run, data, fit)
        except (DataError, RemoteError, FloatingPointError) as e:  # RemoteError: a remote shard, after its retries
            print(f"error (rank {run.rank}): {e}", file=sys.stderr, flush=True)
            return 1
        except StorageFailureError as e:  # every rank is here, at the same step
            together = True
            return stopped_on_storage(run, str(e))
        finally:
            bar.close()

        together = True  # a normal end or a signal: every rank is here
        if exit_code == 0 and run.main_process:
            try:
                with writing(out.dir, "writing the outputs to"):
                    write_outputs(run, data, fit, stopped_early, started)
            except StorageError as e:
                return stopped_on_storage(run, str(e))
        return preempted_exit_code() if exit_code == EXIT_REQUEUE else exit_code
    finally:
        run.close(together)


# --- configuration: decided from the config and the fold's files alone ------------------------


def say_refusal(error: str, code: int = EXIT_REFUSED) -> int:
    """A refusal before the process group: every rank takes it, rank 0 alone says it (one line
    under a launcher too, whose own summary of the failed ranks follows)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"error: {error}", file=sys.stderr, flush=True)
    return code


def say_complete(out: Fold, summary: dict[str, Any]) -> int:
    if int(os.environ.get("RANK", "0")) == 0:
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


def planned_identity(args: argparse.Namespace, config: Any) -> tuple[dict[str, Any] | None, FoldSplit | None]:
    """What this run is (seg/recipe/identity.py), and the fold's split it read; (None, None) when the
    manifest can't be read (the run then refuses with the manifest's own error)."""
    try:
        split = FoldSplit.of(config.data.shards, args.fold)
        processes = int(os.environ.get("WORLD_SIZE", "1"))
        return fold_identity(config, args.stage, split, args.init_from, processes), split
    except (ManifestError, OSError, KeyError):
        return None, None


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
            return None, f"{out.dir} finished as another run ({describe(changes)}): {way_out}"
        if summary is not None:
            return summary, None
    state = None if args.resume == "none" else latest_state(out.dir) if args.resume == "auto" else Path(args.resume)
    recorded = read_identity(state / "identity.json") if state is not None else None
    changes = differences(recorded, identity) if recorded is not None else []
    if changes:
        return None, f"cannot resume from {state}: it is another run ({describe(changes)}); {way_out}"
    return None, None


# --- processes, and refusals taken by every rank together ---------------------------------------


def start(args: argparse.Namespace, config: Any, out: Fold, identity: dict[str, Any]) -> Run:
    """The processes (gloo on the CPU), the fold's folder with the resolved config, the seeds."""
    cuda = torch.cuda.is_available()
    accelerator = Accelerator(
        cpu=not cuda,  # accelerate must be told: gloo on the CPU
        mixed_precision=config.train.precision,
        gradient_accumulation_steps=config.train.grad_accum,
        step_scheduler_with_optimizer=False,
        dynamo_backend="inductor" if config.train.compile else "no",
    )
    # fixed input sizes: let cuDNN time its kernels once (the GPU check measures with it on)
    torch.backends.cudnn.benchmark = cuda and not config.train.deterministic
    set_seed(config.train.seed + accelerator.process_index, deterministic=config.train.deterministic)
    # Where each rank runs, for the summary: torchrun's GROUP_RANK is the machine rank, and the
    # node is Slurm's name for it (the host name outside Slurm).
    node = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
    machines = gather_object([(int(os.environ.get("GROUP_RANK", 0)), node)])
    return Run(args, config, accelerator, out, machines, cuda, identity)


def take_lease(run: Run) -> tuple[str | None, int]:
    """The fold's lease (main process): one training writes a fold's folder at a time, across
    nodes too (seg/core/lease.py). (None, 0), or why not and the exit code."""
    if not run.main_process:
        return None, 0
    folder = run.out.dir
    run.made = [p for p in (folder, *folder.parents) if not p.exists()]
    try:
        run.lease = acquire(run.out.lease, f"training of stage {run.args.stage} fold {run.args.fold}")
    except LeaseHeldError as e:
        return str(e), EXIT_REFUSED
    except OSError as e:
        return storage_problem(e, run.out.lease, "taking the lease") or str(e), EXIT_STORAGE
    return None, 0


def open_fold_folder(run: Run) -> tuple[str | None, int]:
    """The fold's folder with the resolved config, once nothing refused the run: a refused
    command leaves no folder behind (a stray ``fold5/`` would reach the reducer and the report)."""
    if run.main_process:
        try:
            atomic_write_bytes(run.out.config, OmegaConf.to_yaml(run.config).encode())
            run.out.preempted.unlink(missing_ok=True)  # an earlier attempt's
        except OSError as e:
            return storage_problem(e, run.out.config) or str(e), EXIT_STORAGE
        print(OmegaConf.to_yaml(run.config), flush=True)
    return None, 0


def open_records(run: Run, progress: Progress, resumed: bool) -> tuple[str | None, int]:
    """metrics.jsonl (main process; on resume, cut back to the resumed step) and the wandb run:
    one per fold's run, its id kept in the progress so that every resume continues it."""
    if not run.main_process:
        run.tracker = Tracker(to_dict(run.config), run.out.dir, run.args.stage, run.args.fold, False)
        return None, 0
    try:
        run.log = MetricsLog(run.out.metrics, progress.step if resumed else None)
    except OSError as e:
        return storage_problem(e, run.out.metrics) or str(e), EXIT_STORAGE
    if not progress.tracking_id:  # a new run: named after the fold and what it is (a restart gets its own)
        restart = f"-r{int(time.time())}" if run.args.resume == "none" else ""
        progress.tracking_id = f"s{run.args.stage}-f{run.args.fold}-{experiment_key(run.identity)}{restart}"
    resume_step = progress.step if resumed else None  # TensorBoard hides what metrics.jsonl drops
    args = run.args
    run.tracker = Tracker(
        to_dict(run.config), run.out.dir, args.stage, args.fold, True, progress.tracking_id, resume_step
    )
    return None, 0


def refused_together(accelerator: Accelerator, error: str | None, code: int = EXIT_REFUSED) -> int:
    """Every rank's verdict to every rank: on an error of any rank, the main process prints
    the first one and every rank returns its exit code (and leaves the process group through
    Run.close), none left waiting at a barrier; 0 when no rank has one."""
    first = next((pair for pair in gather_object([(error, code) if error else None]) if pair), None)
    if first and accelerator.is_main_process:
        print(f"error: {first[0]}", file=sys.stderr, flush=True)
    return first[1] if first else 0


def stopped_on_storage(run: Run, problem: str) -> int:
    """The one line of a write that failed for the disk's sake, with the state a rerun resumes from."""
    if run.main_process:
        state = latest_state(run.out.dir)
        resume = f"rerun the same command to resume from {state}" if state else "rerun the same command to start"
        print(f"error: {problem}; {resume}; exit {EXIT_STORAGE}", file=sys.stderr, flush=True)
    return EXIT_STORAGE


# --- data ---------------------------------------------------------------------------------------


def fold_data(run: Run, split: FoldSplit | None) -> tuple[FoldData | None, str | None]:
    """The fold's groups and geometry, checked against the manifest; or why they can't be used.
    ``split``: the fold's split as read at the start (None: it couldn't be; read it for the error)."""
    data = run.config.data
    try:
        split = split or FoldSplit.of(data.shards, run.args.fold)
        geometry = TrainGeometry.from_config(data)
        error = geometry.source_problem(packed_size(split.manifest))
        if run.main_process and not error:  # presence; sizes (under on_error=raise) or sha256 (data.checksums)
            groups = [*split.train_groups, split.val_group]
            shards_of(data.shards, groups, data.checksums, sizes=data.on_error == "raise")
    except ManifestError as e:
        error = str(e)
    if error:
        return None, error
    augment = DeviceAugment(data.level, data.channels_last).to(run.device)
    per_epoch, total = run_length(run.config, split, run.world)
    return FoldData(split, geometry, augment, per_epoch, total), None


def training_loader(run: Run, data: FoldData, start_epoch: int) -> torch.utils.data.DataLoader:
    """The fold's training stream from ``start_epoch``, the same on every rank whatever its restarts."""
    config = run.config
    return train_loader(
        data.split,
        data.geometry,
        config.train.batch_size,
        run.rank,
        run.world,
        config.data.workers,
        config.train.seed,
        start_epoch=start_epoch,
        shuffle_buffer=config.data.shuffle_buffer,
        on_error=config.data.on_error,
        pin_memory=run.cuda,
        checksums=False,
        geometry_on_device=config.data.geometry_on_device,
        cache=config.data.cache_dir,
    )


def stream_at(loader: torch.utils.data.DataLoader, position: int) -> Iterator[dict[str, Any]]:
    """The loader's stream, ``position`` batches into the epoch: where a stopped run left it."""
    batches = iter(loader)
    for _ in range(position):
        next(batches)
    return batches


# --- model and optimisation ---------------------------------------------------------------------


def load_model(run: Run) -> tuple[torch.nn.Module, str | None]:
    """The network with its starting weights (a previous stage's model, or ImageNet weights for
    the backbone); or why those weights don't fit."""
    config = run.config
    model = from_config(config.model, training=True)  # with model.aux_head's head
    try:
        if run.args.init_from not in (None, SCRATCH):
            load_weights(model, run.args.init_from, config.model)
        elif config.model.pretrained:
            missing, unexpected = load_backbone(model, config.model.pretrained)
            if run.main_process:
                print(f"backbone weights: missing {missing or 'none'}, unexpected {unexpected or 'none'}")
    except (WeightsError, RuntimeError) as e:
        return model, str(e).split("\n\t")[0]
    return model, None


def optimisation(run: Run, data: FoldData, model: torch.nn.Module) -> Fit:
    """Synchronised BatchNorm, the loss, optimizer, schedule and EMA, prepared by accelerate
    and registered for its checkpoints with the progress."""
    config, accelerator = run.config, run.accelerator
    if config.model.sync_bn and run.world > 1:
        model = convert_sync_batchnorm(model, run.cuda)
    if config.data.channels_last:
        model = model.to(memory_format=torch.channels_last)
    aux_weight = config.model.aux_weight if config.model.aux_head else None
    loss_fn = losses.from_config(config.loss, data.split.class_pixels(), run.world > 1, aux_weight).to(run.device)
    optimizer = optim.from_config(config.optim, model)
    schedule = Schedule.from_config(optimizer, config.schedule, data.total_steps // config.train.grad_accum)
    model, optimizer = accelerator.prepare(model, optimizer)
    ema = None
    if config.train.ema_decay:
        ema = torch.optim.swa_utils.AveragedModel(
            accelerator.unwrap_model(model),
            multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(config.train.ema_decay),
            use_buffers=True,
        )
    progress = Progress()
    accelerator.register_for_checkpointing(schedule, progress, *([ema] if ema is not None else []))
    return Fit(model, loss_fn, optimizer, schedule, ema, progress)


# --- resume -------------------------------------------------------------------------------------


def load_state(accelerator: Accelerator, state: Path) -> str | None:
    """Load a resumable state into everything registered; or why it can't be."""
    try:
        accelerator.load_state(str(state))
    except (RuntimeError, ValueError, OSError, KeyError) as e:
        return f"cannot resume from {state} ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
    return None


# --- one training step --------------------------------------------------------------------------


def one_step(run: Run, data: FoldData, fit: Fit, batch: dict[str, Any]) -> tuple[torch.Tensor, dict]:
    """One batch: to the device, cut there (data.geometry_on_device), augmented, trained on;
    the schedule and the EMA follow every optimizer step."""
    device = run.device
    images, labels = batch["image"].to(device, non_blocking=True), batch["label"].to(device, non_blocking=True)
    if run.config.data.geometry_on_device:
        images, labels = cut_on_device(images, labels, batch["window"], batch["flip"], data.geometry.size)
    images, labels = data.augment(images, labels)
    try:
        loss, parts, stepped = train_step(
            fit.model, images, labels, fit.loss_fn, fit.optimizer, run.accelerator, run.config.optim.clip_grad_norm
        )
    except FloatingPointError:
        step = fit.progress.step
        raise FloatingPointError(
            f"loss is NaN or inf at step {step} (epoch {step / data.steps_per_epoch:.2f}): "
            f"lower optim.lr, check the data, or use train.precision=bf16 instead of fp16"
        ) from None
    if stepped:
        fit.schedule.step()
        if fit.ema is not None:
            fit.ema.update_parameters(run.accelerator.unwrap_model(fit.model))
    return loss, parts


def train_step(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    loss_fn: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    accelerator: Accelerator,
    clip_grad_norm: float | None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], bool]:
    """One micro-batch: forward, loss (fp32), backward, and on the last micro-batch of an
    accumulation the clipped optimizer step. Returns (loss, parts, whether it stepped).
    Every rank checks that its loss is finite before any collective backward."""
    with accelerator.accumulate(model):
        with accelerator.autocast():
            logits = model(images)
        loss, parts = loss_fn(logits, labels)
        bad = all_reduce_sum(torch.tensor([0.0 if torch.isfinite(loss) else 1.0], device=loss.device))
        if bad.item() > 0:
            raise FloatingPointError("the loss is not finite")
        accelerator.backward(loss)
        if accelerator.sync_gradients and clip_grad_norm:
            accelerator.clip_grad_norm_(model.parameters(), clip_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        stepped = accelerator.sync_gradients and not accelerator.optimizer_step_was_skipped
    return loss.detach(), parts, stepped


WAIT_WARNING = 0.10  # a data-wait share above this for WAIT_LOGS log steps in a row is said once
WAIT_LOGS = 3


@dataclass
class Window:
    """The steps since the last log line, for images per second and the share of the time
    spent waiting for the loader; and whether that share has been too high for a while."""

    start: float = field(default_factory=time.time)
    steps: int = 0
    waited: float = 0.0  # seconds blocked on the loader
    slow_logs: int = 0  # log steps in a row above WAIT_WARNING
    warned: bool = False

    def too_slow(self, wait_share: float) -> bool:
        """Whether to say now that the loader holds training back: the share has been above
        WAIT_WARNING for WAIT_LOGS log steps in a row (said once a run)."""
        self.slow_logs = self.slow_logs + 1 if wait_share > WAIT_WARNING else 0
        if self.slow_logs >= WAIT_LOGS and not self.warned:
            self.warned = True
            return True
        return False


def progress_bar(run: Run, total: int, initial: int) -> tqdm:
    """A tqdm bar on a terminal (main process); elsewhere a line per log step instead."""
    disable = not (run.main_process and sys.stderr.isatty())
    return tqdm(
        total=total, initial=initial, disable=disable, desc=f"fold {run.args.fold}", unit="step", dynamic_ncols=True
    )


def log_step(
    run: Run, data: FoldData, fit: Fit, loss: torch.Tensor, parts: dict[str, torch.Tensor], window: Window, bar: tqdm
) -> None:
    """The loss and its parts averaged over the ranks, the lr, images/s and memory: recorded,
    and shown on the bar or as a line."""
    config, progress = run.config, fit.progress
    if run.cuda:  # the queued kernels end before the clock is read: here only, so the steps between run freely
        torch.cuda.synchronize(run.device)
    waited = torch.tensor(window.waited, device=loss.device)
    values = all_reduce_sum(torch.stack([loss, *parts.values(), waited]).float()) / run.world
    seconds = max(time.time() - window.start, 1e-9)
    per_process = window.steps * config.train.batch_size / seconds
    wait_share = min(values[-1].item() / seconds, 1.0)  # the ranks' mean
    entry = {
        "train/loss": values[0].item(),
        "train/lr": fit.schedule.lr(),
        "train/images_per_s": per_process * run.world,
        "train/images_per_s_per_process": per_process,
        "train/data_wait_s": values[-1].item(),
        "train/data_wait_share": wait_share,
        "train/memory_mb": memory_mb(run.device),
    }
    entry |= {f"train/{k}": v.item() for k, v in zip(parts, values[1:-1], strict=True)}
    run.record(entry, progress, data.steps_per_epoch)
    bar.set_postfix(loss=f"{entry['train/loss']:.4f}", lr=f"{entry['train/lr']:.2e}", data_wait=f"{wait_share:.0%}")
    if run.main_process and bar.disable:
        print(
            f"step {progress.step}/{data.total_steps} loss {entry['train/loss']:.4f} "
            f"lr {entry['train/lr']:.2e} {entry['train/images_per_s']:.1f} img/s, data wait {wait_share:.0%}",
            flush=True,
        )
    if window.too_slow(wait_share) and run.main_process:
        print(
            f"warning: training waited for data {wait_share:.0%} of the time in {WAIT_LOGS} log steps in a row: "
            f"pack the shards at the training size (tools/pack_cityscapes.py --resize WxH), set "
            f"data.geometry_on_device=true, raise data.workers, or pack JPEG (--image-format jpg)",
            file=sys.stderr,
            flush=True,
        )
    window.start, window.steps, window.waited = time.time(), 0, 0.0


def memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --- evaluate and checkpoint --------------------------------------------------------------------


def evaluate_and_checkpoint(run: Run, data: FoldData, fit: Fit) -> bool:
    """Evaluate; on a better fold mIoU export the best weights; save a resumable state.
    Returns whether to stop early (train.early_stop_patience evaluations without a better one)."""
    progress, patience = fit.progress, run.config.train.early_stop_patience
    progress.final = validate(run, data, fit)
    miou = progress.final["fold"]["miou"]
    improved = progress.observe(miou)
    fit.schedule.observe(improved)
    if improved and run.main_process:
        weights, path = run.accelerator.unwrap_model(fit.evaluated), run.out.weights("best")
        run.keep_writing(lambda: export_weights(weights, path, sidecar(run, data, progress, progress.final)), path)
    if run.main_process:
        print(f"step {progress.step}: fold mIoU {100 * miou:.1f}% (best {100 * progress.best_miou:.1f}%)", flush=True)
    save_state(run, progress.step, {state_name(progress.best_step)})
    if patience and progress.bad_evals >= patience:
        if run.main_process:
            print(f"early stop: no better fold mIoU in {patience} evaluations", flush=True)
        return True
    return False


def validate(run: Run, data: FoldData, fit: Fit) -> dict[str, Any]:
    """The metrics on the fold's validation group (and on val with train.eval_val), recorded."""
    config = run.config
    autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.train.precision)
    results = {}
    groups = {"fold": [data.split.val_group]} | ({"val": ["val"]} if config.train.eval_val else {})
    for name, group in groups.items():
        loader, expected = eval_loader_of(config.data, group, run.rank, run.world, run.cuda)
        matrix, seen, examples = evaluate(
            fit.evaluated, loader, run.device, data.augment, autocast, config.wandb.images
        )
        result = matrix.compute()
        result["samples"], result["skipped"] = seen, expected - seen
        results[name] = result
        entry = {f"{name}/{k}": v for k, v in result.items() if k != "iou"} | {f"{name}/iou": result["iou"]}
        run.record(entry, fit.progress, data.steps_per_epoch)
        run.tracker.log_evaluation(name, result, matrix.matrix, examples, fit.progress.step)
    return results


def save_state(run: Run, step: int, keep: set[str]) -> Path:
    """A resumable state with the run's identity, renamed into place only once every rank has
    written its part. A write that fails for the disk's sake on any rank (or one foreseen not
    to fit) stops every rank with StorageFailureError, the previous states untouched."""
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


# --- preempt ------------------------------------------------------------------------------------


def agreed_signal(run: Run, signals: Signals, skipped: float = 0.0) -> tuple[int, float]:
    """One small all-reduce: the exit code every rank takes for the signals any rank caught
    (0: go on; a preemption outranks a Ctrl-C), and the samples skipped on all ranks. A write
    of any rank that failed for the disk's sake stops every rank here (StorageFailureError)."""
    flags = [float(signals.preempted), float(signals.interrupted), skipped, float(run.failure is not None)]
    preempted, interrupted, skipped, failed = all_reduce_sum(torch.tensor(flags, device=run.device)).tolist()
    if failed:
        agreed_write(run, None, run.out.dir, "")  # every rank raises the failed rank's line
    return (EXIT_REQUEUE if preempted else EXIT_INTERRUPTED if interrupted else 0), skipped


def stop_on_signal(run: Run, progress: Progress, code: int) -> None:
    """Every rank, at the same step: save (when there is a step to save), write the PREEMPTED
    marker for a requeue, and say so: a line per rank on preemption, one line on Ctrl-C."""
    accelerator, out, saved = run.accelerator, run.out, progress.step > 0
    if saved:
        save_state(run, progress.step, {state_name(progress.best_step)})
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


# --- the outputs --------------------------------------------------------------------------------


def write_outputs(run: Run, data: FoldData, fit: Fit, stopped_early: bool, started: float) -> None:
    """The final weights and summary.json (main process), and the ``done:`` line."""
    progress, args, out = fit.progress, run.args, run.out
    final = run.accelerator.unwrap_model(fit.evaluated)
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


if __name__ == "__main__":
    sys.exit(main())
