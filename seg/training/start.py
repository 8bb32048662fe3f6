"""Starting a fold's run: the processes (accelerate), the fold's lease, its folder with the
resolved config, and its records (metrics.jsonl, the wandb run)."""

from __future__ import annotations

import argparse
import os
import socket
import time
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from omegaconf import OmegaConf

from seg.core.atomic import atomic_write_bytes, remove_leftovers
from seg.core.lease import LeaseHeldError, acquire
from seg.core.runs import Fold, MetricsLog, remove_state_leftovers
from seg.core.storage import EXIT_STORAGE, storage_problem
from seg.recipe.config import to_dict
from seg.recipe.identity import experiment_key
from seg.results.tracking import Tracker
from seg.training.records import EXIT_REFUSED, Progress, Run


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
            # an earlier attempt killed mid-write: its temporary files (the lease makes them no one's now)
            remove_leftovers(run.out.dir)
            remove_state_leftovers(run.out.dir)
            atomic_write_bytes(run.out.config, OmegaConf.to_yaml(run.config).encode())
            run.out.preempted.unlink(missing_ok=True)  # an earlier attempt's
        except OSError as e:
            return storage_problem(e, run.out.config) or str(e), EXIT_STORAGE
        print(OmegaConf.to_yaml(run.config), flush=True)
        batch = run.identity["batch"]  # the learning rate goes with it: a recipe's is for its global batch
        print(f"global batch {batch['global']} = {batch['processes']} process(es) x train.batch_size "
              f"{batch['per_process']} x train.grad_accum {batch['grad_accum']}", flush=True)  # fmt: skip
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
