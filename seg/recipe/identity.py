"""A fold's identity: what makes its run the experiment it is, and how two runs differ.

Recorded in every resumable state (``identity.json``), in ``summary.json`` and in the weights'
sidecars. seg/train.py refuses to resume or to call "complete" a fold whose recorded identity
differs from the run asked for, the chain (seg/cv.py) asks the same before skipping a fold,
and the reducer refuses folds of one stage that are not one experiment.

    config     the resolved config, less what does not change the result (``NOT_IDENTITY``)
    stage      the stage of the chain
    init_from  the start model: its path, and its content as "sha256:..." (or "scratch")
    data       the sha256 of the shards' manifest (the data, its folds and class counts)
    batch      processes, per-process batch, gradient accumulation and the global batch
    schedule   steps per epoch and the run's length in micro-batches
    loader     the loader workers the run's first start chose (``data.workers: auto`` resolves
               to it ever after, seg.recipe.config.resolve_auto: the count shapes the training stream)
    code       the code's version (git commit), recorded and not compared: a fix of the
               tool does not make finished folds another experiment

Two runs are one experiment when they differ at most in where they run: the processes and
per-process batch making up one global batch (``MAY_DIFFER``), the start model's path (its
content is compared), the code, and the loader workers (an explicit ``data.workers`` may
change between a run's starts, as it always could).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import subprocess
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from seg.core.runs import Fold, latest_state
from seg.data.loader import steps_per_epoch
from seg.data.manifest import FoldSplit, manifest_sha256, sha256_file
from seg.data.workers import resolve_workers
from seg.recipe.config import Config, resolve_auto

SCRATCH = "scratch"  # --init-from scratch: a later stage trained from the config's backbone weights

# Config keys that change how a run is watched, where it is written or how fast it reads,
# not what it trains. data.workers changes the schedule's length only through the rounding
# of steps per epoch, which ``schedule`` records; data.shards is the folder, ``data`` its content.
NOT_IDENTITY = (
    "wandb",
    "tracking",
    "stages",  # the resolved config has this stage's entry applied
    "train.experiment",
    "train.runs_dir",
    "train.log_every",
    "train.save_every",
    "train.keep_last",
    "train.compile",
    "data.workers",
    "data.checksums",
    "data.channels_last",
    "data.shards",
    "data.cache_dir",
    "train.batch_size",  # in ``batch``
    "train.grad_accum",
)
# What two runs of one experiment may differ in (dotted keys of the identity).
MAY_DIFFER = ("code", "init_from.path", "batch.processes", "batch.per_process", "batch.grad_accum", "loader")
# ...and two folds of one stage, besides: each is its own fold, with its own number of training samples.
FOLDS_MAY_DIFFER = (*MAY_DIFFER, "fold", "schedule")
# Entries identities gained after runs had recorded theirs: compared only where both sides have one.
ADDED_LATER = ("fold",)


def total_steps(config: DictConfig, per_epoch: int) -> int:
    """Micro-batches the run takes: train.iters optimizer steps, or train.epochs epochs in whole
    optimizer steps (accumulation runs on across epochs; the last micro-batches, fewer than
    train.grad_accum, would make no step, so they are not taken)."""
    train = config.train
    if train.iters:
        return train.iters * train.grad_accum
    return train.epochs * per_epoch // train.grad_accum * train.grad_accum


def run_length(config: DictConfig, split: FoldSplit, processes: int) -> tuple[int, int]:
    """(steps per epoch, total micro-batches) of training ``split`` with ``processes`` processes."""
    workers = resolve_workers(config.data.workers)  # a run resolves auto before (seg.recipe.config.resolve_auto)
    per_epoch = steps_per_epoch(split.train_samples, config.train.batch_size, processes, workers)
    return per_epoch, total_steps(config, per_epoch)


@functools.cache
def code_version() -> str:
    """The git commit of this checkout (``+dirty`` with uncommitted changes), else the
    installed package's version."""
    repo = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True)
        if commit.returncode == 0:
            status = subprocess.run(
                ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no", "--", "seg"],
                capture_output=True,
                text=True,
            )
            return commit.stdout.strip() + ("+dirty" if status.stdout.strip() else "")
    except OSError:  # no git
        pass
    try:
        return f"seg {importlib.metadata.version('seg')}"
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _without(tree: dict[str, Any], dotted: tuple[str, ...]) -> dict[str, Any]:
    tree = json.loads(json.dumps(tree))  # a deep copy
    for key in dotted:
        *parents, last = key.split(".")
        node = tree
        for part in parents:
            node = node.get(part, {})
        node.pop(last, None)
    return tree


def fold_identity(
    config: DictConfig, stage: int, split: FoldSplit, init_from: str | None, processes: int
) -> dict[str, Any]:
    """The identity of training ``split``'s fold of ``stage`` with this config and start model
    over ``processes`` processes. Hashes the manifest and the start model (every rank does, as
    it decides before any process group exists); raises OSError when they can't be read."""
    per_epoch, total = run_length(config, split, processes)
    train = config.train
    scratch = init_from in (None, SCRATCH)
    model = SCRATCH if scratch else f"sha256:{sha256_file(init_from)}"
    start = {"path": None if scratch else init_from, "model": model}
    return {
        "config": _without(OmegaConf.to_container(config, resolve=True), NOT_IDENTITY),
        "stage": stage,
        "fold": split.fold,  # another fold's state holds a model that trained on this fold's held-out images
        "init_from": start,
        "data": {"manifest_sha256": manifest_sha256(config.data.shards)},
        "batch": {
            "processes": processes,
            "per_process": train.batch_size,
            "grad_accum": train.grad_accum,
            "global": processes * train.batch_size * train.grad_accum,
        },
        "schedule": {"steps_per_epoch": per_epoch, "total_steps": total},
        "loader": {"workers": resolve_workers(config.data.workers)},
        "code": code_version(),
    }


def experiment_key(identity: dict[str, Any]) -> str:
    """Eight hex digits that name the experiment an identity belongs to: the same for every
    run that may resume it (what ``MAY_DIFFER`` leaves out), another for another experiment."""
    core = json.dumps(_without(identity, MAY_DIFFER), sort_keys=True)
    return hashlib.sha256(core.encode()).hexdigest()[:8]


def stage_identity(fold_identity: dict[str, Any] | None) -> dict[str, Any] | None:
    """What every fold of a stage shares (the reducer checks they do): a fold's identity less
    what may differ between folds. The reduced model's sidecar records it."""
    return _without(fold_identity, FOLDS_MAY_DIFFER) if fold_identity is not None else None


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        flat: dict[str, Any] = {}
        for key, value in tree.items():
            flat |= _flat(value, f"{prefix}{key}.")
        return flat or {prefix.rstrip("."): {}}
    return {prefix.rstrip("."): tree}


@functools.cache
def _schema_defaults() -> dict[str, Any]:
    """The config schema's defaults, keyed as an identity's (``config.model.stem``, ...)."""
    return _flat({"config": OmegaConf.to_container(OmegaConf.structured(Config))})


def differences(
    recorded: dict[str, Any],
    wanted: dict[str, Any],
    may_differ: tuple[str, ...] = MAY_DIFFER,
) -> list[str]:
    """What differs between two identities, beyond ``may_differ``, as ``key: recorded -> wanted``.
    A config key one side lacks counts as the schema's default: a run recorded before a key
    existed ran as its default does (a new option is no new experiment); an entry of
    ``ADDED_LATER`` one side lacks is not compared (that run did not record it)."""
    a, b, defaults = _flat(recorded), _flat(wanted), _schema_defaults()

    def allowed(key: str) -> bool:
        return any(key == k or key.startswith(f"{k}.") for k in may_differ)

    def value(side: dict[str, Any], key: str) -> Any:
        return side.get(key, defaults.get(key, "(absent)"))

    def compared(key: str) -> bool:
        return not allowed(key) and (key not in ADDED_LATER or (key in a and key in b))

    return [
        f"{key}: {value(a, key)!r} -> {value(b, key)!r}"
        for key in sorted(a.keys() | b.keys())
        if compared(key) and value(a, key) != value(b, key)
    ]


def describe_changes(changes: list[str], most: int = 4) -> str:
    """The first ``most`` differences on one line, and how many more."""
    more = f" (and {len(changes) - most} more)" if len(changes) > most else ""
    return "; ".join(changes[:most]) + more


def read_identity(path: Path) -> dict[str, Any] | None:
    """The identity recorded in ``path`` (a state's identity.json, or a summary/sidecar with an
    ``identity`` key), or None when it has none (written by an older seg)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if path.name == "identity.json":
        return record
    return record.get("identity") if isinstance(record, dict) else None


def recorded_workers(fold: Fold, resume: str = "auto") -> int | None:
    """The loader workers recorded by the run a start of ``fold`` continues (``resume`` as
    seg/train.py takes it): the newest state's, else the finished run's summary; None for a
    new run (and for one recorded before the count was)."""
    if resume == "none":
        return None
    state = latest_state(fold.dir) if resume == "auto" else Path(resume)
    paths = [state / "identity.json"] if state is not None else []
    paths += [fold.summary] if resume == "auto" else []
    for path in paths:
        workers = ((read_identity(path) or {}).get("loader") or {}).get("workers")
        if isinstance(workers, int):
            return workers
    return None


def finished_run(fold: Fold, identity: dict[str, Any]) -> tuple[dict[str, Any] | None, list[str]]:
    """What the ``fold``'s folder holds, from its files alone: (its summary, []) when it is a finished
    run of ``identity``; (None, the differences) when it finished as another run; (None, [])
    when it has no finished run (nothing yet, in progress, or preempted). A summary written
    before identities were recorded is compared by its length alone."""
    summary_path = fold.summary
    if not summary_path.is_file() or fold.preempted.exists():
        return None, []
    try:
        summary = json.loads(summary_path.read_text())
    except (OSError, json.JSONDecodeError):
        return None, []
    recorded = summary.get("identity")
    changes = differences(recorded, identity) if recorded is not None else []
    if changes:
        return None, changes
    done = summary.get("stopped_early") or summary.get("steps", -1) >= identity["schedule"]["total_steps"]
    return (summary if done else None), []


def config_as_run(config: DictConfig, fold: Fold, resume: str = "auto") -> DictConfig:
    """The config a start of ``fold`` runs with on this machine, its ``auto`` values chosen
    (seg.recipe.config.resolve_auto): the loader workers its run recorded at its first start
    (``resume`` as seg/train.py takes it), channels_last with CUDA."""
    return resolve_auto(config, torch.cuda.is_available(), recorded_workers(fold, resume))
