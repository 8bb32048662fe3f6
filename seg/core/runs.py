"""The run folder: where every file of an experiment lives, and the run state on disk
(resumable states, metric records; the weights files themselves: seg/model/weights.py).

``runs/<experiment>/``                     :class:`Experiment`
    logs/                                  the chain's logs (seg/cv.py): stage{s}-fold{k}.log, stage{s}-reduce.log
    report/                                seg/analysis/report.py's report
    stage{s}/                              :class:`Stage`
        fold{k}/                           :class:`Fold`
            config.yaml                    the resolved config
            checkpoints/step-NNNNNNNN/     resumable states (accelerate's save_state), last N plus best
            best.safetensors (+ .json)     weights of the best fold-validation mIoU, with a sidecar
            model.safetensors (+ .json)    final weights
            metrics.jsonl                  one record per log step and per evaluation
            summary.json                   written at the end
            PREEMPTED                      the step and state of a preemption, until the fold resumes
            .lease                         held while a training writes here (seg/core/lease.py)
        reduced/                           seg/reduction/reduce.py's: model.safetensors (+ .json), ensemble.json,
                                           report.json, report.md, reduction.png
        .reduce.lease, .chain.lease        held while a reduction, a local chain works on the stage

Every module asks these objects for a path instead of spelling it, and a folder's name is
parsed back to its number here only (:func:`stage_number`, :func:`fold_number`).

A resumable state is written to a hidden temporary folder and renamed into place when every
rank has finished writing, and an old one is renamed to a hidden name before it is deleted,
so a folder named ``step-*`` is always complete; ``latest_state`` ignores anything else and
``prune_states`` removes the leftovers of a kill.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from seg.core.atomic import atomic_write_bytes

STATE = re.compile(r"^step-(\d{8})$")
# Written beside the state on preemption, removed when the fold resumes: launchers such as
# torchrun report a child's 75 as their own exit code 1, so job scripts look for this file.
PREEMPTED = "PREEMPTED"


CHECKPOINTS = "checkpoints"
# In a state saved when a run was stopped (preempted, interrupted): once a newer state exists it
# is removed (prune_states), so a fold's states end the same whatever stopped it on the way.
INTERRUPTION = "interruption"
REDUCED = "reduced"
LEASE = ".lease"  # one writer at a time (seg/core/lease.py)
_STAGE = re.compile(r"^stage(\d+)$")
_FOLD = re.compile(r"^fold(\d+)$")


def stage_number(name: str) -> int | None:
    """``stage2`` -> 2; None for any other name."""
    match = _STAGE.match(name)
    return int(match[1]) if match else None


def fold_number(name: str) -> int | None:
    """``fold3`` -> 3; None for any other name (``fold_x``, ``fold3.tmp``, ``reduced``)."""
    match = _FOLD.match(name)
    return int(match[1]) if match else None


def _numbered(parent: Path, number: Callable[[str], int | None]) -> list[tuple[int, Path]]:
    """(number, folder) of the sub-folders whose name ``number`` parses, in numeric order."""
    found = [(number(p.name), p) for p in parent.iterdir() if p.is_dir()] if parent.is_dir() else []
    return sorted(((n, p) for n, p in found if n is not None), key=lambda found: found[0])


@dataclass(frozen=True)
class Fold:
    """``runs/<experiment>/stage{s}/fold{k}/``: one fold's run (seg/train.py)."""

    dir: Path
    number: int | None = None  # None: a folder given by hand whose name says no number

    @classmethod
    def at(cls, path: str | Path) -> Fold:
        """The fold folder ``path``, numbered by its name when that is ``fold{k}``."""
        return cls(Path(path), fold_number(Path(path).name))

    @property
    def config(self) -> Path:
        return self.dir / "config.yaml"

    @property
    def summary(self) -> Path:
        return self.dir / "summary.json"

    @property
    def metrics(self) -> Path:
        return self.dir / "metrics.jsonl"

    @property
    def preempted(self) -> Path:
        return self.dir / PREEMPTED

    @property
    def checkpoints(self) -> Path:
        return self.dir / CHECKPOINTS

    @property
    def lease(self) -> Path:
        """Held by the training that writes this folder."""
        return self.dir / LEASE

    def weights(self, which: Literal["best", "model"] = "best") -> Path:
        """``best.safetensors`` (the best fold-validation mIoU) or ``model.safetensors`` (final)."""
        return self.dir / f"{which}.safetensors"


@dataclass(frozen=True)
class Stage:
    """``runs/<experiment>/stage{s}/``: a stage's folds and their reduction (seg/reduction/reduce.py)."""

    dir: Path
    number: int | None = None  # None: a folder given by hand whose name says no number

    @classmethod
    def at(cls, path: str | Path) -> Stage:
        """The stage folder ``path``, numbered by its name when that is ``stage{s}``."""
        return cls(Path(path), stage_number(Path(path).name))

    def fold(self, k: int) -> Fold:
        return Fold(self.dir / f"fold{k}", k)

    def folds(self) -> list[Fold]:
        """The numbered fold folders present, in numeric order (not ``fold_x``, nor files)."""
        return [Fold(p, k) for k, p in _numbered(self.dir, fold_number)]

    @property
    def reduced(self) -> Path:
        return self.dir / REDUCED

    @property
    def reduce_lease(self) -> Path:
        """Held by the reduction that writes ``reduced/`` (beside it: ``reduced/`` is replaced whole)."""
        return self.dir / f".reduce{LEASE}"

    @property
    def chain_lease(self) -> Path:
        """Held by a local chain (seg/cv.py) while it runs this stage's folds and reduction."""
        return self.dir / f".chain{LEASE}"

    @property
    def reduced_model(self) -> Path:
        """The reduced model: the one that seeds the next stage."""
        return self.reduced / "model.safetensors"

    @property
    def reduced_ensemble(self) -> Path:
        return self.reduced / "ensemble.json"

    @property
    def reduced_report(self) -> Path:
        return self.reduced / "report.json"

    @property
    def reduced_markdown(self) -> Path:
        return self.reduced / "report.md"

    @property
    def reduction_figure(self) -> Path:
        return self.reduced / "reduction.png"


@dataclass(frozen=True)
class Experiment:
    """``runs/<experiment>/``: every stage of an experiment, and the chain's logs."""

    dir: Path

    @classmethod
    def named(cls, runs_dir: str | Path, name: str) -> Experiment:
        """``runs_dir/name`` (the config's ``train.runs_dir`` and ``train.experiment``)."""
        return cls(Path(runs_dir) / name)

    @property
    def name(self) -> str:
        return self.dir.name

    def stage(self, s: int) -> Stage:
        return Stage(self.dir / f"stage{s}", s)

    def stages(self) -> list[Stage]:
        """The numbered stage folders present, in numeric order."""
        return [Stage(p, s) for s, p in _numbered(self.dir, stage_number)]

    @property
    def logs(self) -> Path:
        return self.dir / "logs"

    def fold_log(self, stage: int, fold: int | str, job: str = "") -> Path:
        """A chain's log of a fold's run, ``logs/stage{s}-fold{k}.log``; under Slurm ``fold`` and
        ``job`` are sbatch's patterns (``%a``, ``%A``): ``logs/stage{s}-fold%a-%A.log``."""
        return self.logs / f"stage{stage}-fold{fold}{f'-{job}' if job else ''}.log"

    def reduce_log(self, stage: int, job: str = "") -> Path:
        """A chain's log of a stage's reduction, ``logs/stage{s}-reduce[-{job}].log``."""
        return self.logs / f"stage{stage}-reduce{f'-{job}' if job else ''}.log"

    @property
    def report(self) -> Path:
        """seg/analysis/report.py's default output folder."""
        return self.dir / "report"

    def evaluations(self) -> list[Path]:
        """tools/evaluate.py's ``metrics.json`` files in the experiment: in its default folder
        beside a fold's or a reduced model (``eval-*/``), or in an --out of the experiment's own
        (``eval*/``, possibly one level deeper)."""
        patterns = (
            "eval*/metrics.json",
            "eval*/*/metrics.json",
            f"stage*/{REDUCED}/eval*/metrics.json",
            "stage*/fold*/eval*/metrics.json",
        )
        return sorted({found for pattern in patterns for found in self.dir.glob(pattern)})


def state_name(step: int) -> str:
    return f"step-{step:08d}"


def latest_state(directory: Path) -> Path | None:
    """The newest complete resumable state under ``directory/checkpoints``."""
    states = sorted(p for p in (directory / CHECKPOINTS).glob("step-*") if STATE.match(p.name) and p.is_dir())
    return states[-1] if states else None


def state_step(state: Path) -> int:
    """The step a state folder (``step-NNNNNNNN``) was saved at."""
    return int(STATE.match(state.name)[1])


def is_state(path: Path) -> bool:
    """Whether ``path`` looks like a resumable state written by seg/train.py (accelerate's
    ``save_state`` with the run's progress registered)."""
    return path.is_dir() and (path / "custom_checkpoint_0.pkl").is_file()


def prune_states(directory: Path, keep_last: int, keep: set[str]) -> None:
    """Delete the states saved when a run was stopped (``INTERRUPTION``) once a newer state
    exists, then the states beyond the newest ``keep_last``, sparing the names in ``keep``;
    and the leftovers of a killed save or prune (hidden ``.step-*`` folders). Only the main
    process, with no save in flight. Each state is renamed out of the way first: a kill
    mid-delete leaves a hidden leftover, never a torn ``step-*``."""
    checkpoints = directory / CHECKPOINTS
    states = sorted(p for p in checkpoints.glob("step-*") if STATE.match(p.name))
    superseded = [state for state in states[:-1] if (state / INTERRUPTION).exists()]
    scheduled = [state for state in states if state not in superseded]
    for state in superseded + scheduled[: max(len(scheduled) - keep_last, 0)]:
        if state.name not in keep:
            doomed = state.with_name(f".{state.name}.deleting")
            shutil.rmtree(doomed, ignore_errors=True)
            state.rename(doomed)
    remove_state_leftovers(directory)


def remove_state_leftovers(directory: Path) -> None:
    """Remove the hidden ``.step-*`` folders a killed save or prune left under
    ``directory/checkpoints`` (the fold's one writer only: a save in flight looks the same)."""
    for leftover in (directory / CHECKPOINTS).glob(".step-*"):
        shutil.rmtree(leftover, ignore_errors=True)


class MetricsLog:
    """Append-only ``metrics.jsonl`` (main process); on resume, records after the resumed
    step are dropped, so a resumed run's log reads as if it had never stopped."""

    def __init__(self, path: Path, resume_step: int | None = None) -> None:
        self.path = path
        if resume_step is not None and path.exists():
            kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= resume_step]
            atomic_write_bytes(path, "".join(f"{line}\n" for line in kept).encode())
        elif resume_step is None and path.exists():
            path.unlink()

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")


def working_directories(experiment: Path, runs_dir: str | None) -> list[Path]:
    """Where the training may have run from: the experiment folder less ``train.runs_dir``
    and the experiment's name (runs/<experiment> -> the repository root), then its parent's parent."""
    resolved = experiment.resolve()
    roots = []
    if runs_dir and not Path(runs_dir).is_absolute():
        root = resolved.parent
        for _ in Path(runs_dir).parts:
            root = root.parent
        roots.append(root)
    roots.append(resolved.parent.parent)
    return list(dict.fromkeys(roots))
