"""Run state on disk: resumable states, metric records (the weights files: seg/weights.py).

``runs/<experiment>/stage{s}/fold{k}/``
    config.yaml                the resolved config
    checkpoints/step-NNNNNNNN/ resumable states (accelerate's save_state), last N plus best
    best.safetensors (+ .json) weights of the best fold-validation mIoU, with a sidecar
    model.safetensors (+ .json) final weights
    metrics.jsonl              one record per log step and per evaluation
    summary.json               written at the end
    PREEMPTED                  the step and state of a preemption, until the fold resumes

A resumable state is written to a hidden temporary folder and renamed into place when every
rank has finished writing, and an old one is renamed to a hidden name before it is deleted,
so a folder named ``step-*`` is always complete; ``latest_state`` ignores anything else and
``prune_states`` removes the leftovers of a kill.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from seg.atomic import atomic_write_bytes

STATE = re.compile(r"^step-(\d{8})$")
# Written beside the state on preemption, removed when the fold resumes: launchers such as
# torchrun report a child's 75 as their own exit code 1, so job scripts look for this file.
PREEMPTED = "PREEMPTED"


def run_dir(runs: str | Path, experiment: str, stage: int, fold: int) -> Path:
    return Path(runs) / experiment / f"stage{stage}" / f"fold{fold}"


def state_name(step: int) -> str:
    return f"step-{step:08d}"


def latest_state(directory: Path) -> Path | None:
    """The newest complete resumable state under ``directory/checkpoints``."""
    states = sorted(p for p in (directory / "checkpoints").glob("step-*") if STATE.match(p.name) and p.is_dir())
    return states[-1] if states else None


def is_state(path: Path) -> bool:
    """Whether ``path`` looks like a resumable state written by seg/train.py (accelerate's
    ``save_state`` with the run's progress registered)."""
    return path.is_dir() and (path / "custom_checkpoint_0.pkl").is_file()


def prune_states(directory: Path, keep_last: int, keep: set[str]) -> None:
    """Delete resumable states beyond the newest ``keep_last``, sparing the names in ``keep``,
    and the leftovers of a killed save or prune (hidden ``.step-*`` folders). Only the main
    process, with no save in flight. Each state is renamed out of the way first: a kill
    mid-delete leaves a hidden leftover, never a torn ``step-*``."""
    checkpoints = directory / "checkpoints"
    states = sorted(p for p in checkpoints.glob("step-*") if STATE.match(p.name))
    for state in states[: max(len(states) - keep_last, 0)]:
        if state.name not in keep:
            doomed = state.with_name(f".{state.name}.deleting")
            shutil.rmtree(doomed, ignore_errors=True)
            state.rename(doomed)
    for leftover in checkpoints.glob(".step-*"):
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
