"""Fold ensembles: several models' class probabilities averaged at prediction time.

:class:`Ensemble` is an ``nn.Module`` whose output is the log of its members' mean softmax,
so seg.evaluation.inference.predict_probabilities (whole image, sliding windows, flips, scales) and
seg.evaluation.evaluate run it unchanged: their softmax of it gives back the mean of the members'
probabilities at the network's output, and every view costs one forward pass per member.
An ensemble of one model is that model (its logits pass through untouched).

Members are named by model files, by ``reduced/ensemble.json`` (written by
tools/reduce_folds.py), or by a stage folder (``runs/<experiment>/stage{s}``: its
``reduced/ensemble.json`` when there is one, else every ``fold*/best.safetensors``).
Members must share the architecture and the evaluation size of their configs.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from seg.core.runs import Stage
from seg.model.weights import WeightsError, load_model

ENSEMBLE_FORMAT = "seg.ensemble"
# What members must agree on: the network's shape (as seg.reduction.soup.MUST_MATCH) and the input size
# they were validated and selected at (the tools' default input size).
MEMBERS_MATCH = ("model.depth", "model.output_stride", "model.aspp_pool_norm", "data.eval_size")


class Ensemble(nn.Module):
    """log(mean over members of softmax(member(x))), computed in float32 as a log-sum-exp."""

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one model")
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.members) == 1:
            return self.members[0](x)
        total = None
        for member in self.members:
            log_p = member(x).float().log_softmax(dim=1)
            total = log_p if total is None else torch.logaddexp(total, log_p)
        return total - math.log(len(self.members))


def _select(config: dict[str, Any], key: str) -> Any:
    value: Any = config
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def write_ensemble_file(path: Path, members: list[Path], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The content of an ``ensemble.json`` naming ``members`` relative to its folder."""
    relative = [os.path.relpath(Path(m).resolve(), Path(path).resolve().parent) for m in members]
    return {"format": ENSEMBLE_FORMAT, "members": relative, **(extra or {})}


def resolve_members(paths: Sequence[str | Path]) -> list[Path]:
    """The model files that ``paths`` name: several files as they are; one ensemble.json as its
    members; one stage folder (holding fold*/) as its reduced/ensemble.json, else its folds'
    best weights; one model file (or anything else, refused by load_model) as itself."""
    paths = [Path(p) for p in paths]
    if not paths:
        raise WeightsError("no model given")
    if len(paths) > 1:
        for path in paths:
            if path.is_dir() or (path.suffix == ".json" and _is_ensemble_file(path)):
                raise WeightsError(f"{path}: give a stage folder or an ensemble.json alone, not among model files")
        return paths
    path = paths[0]
    if path.is_file() and path.suffix == ".json":
        if _is_ensemble_file(path):
            return read_ensemble_file(path)
        # not a sidecar (no model beside it) and no JSON: an ensemble.json cut short, say so (not "pass the model")
        if not path.with_suffix(".safetensors").is_file() and (problem := _json_problem(path)):
            raise WeightsError(f"{path}: {problem}; an ensemble.json is written whole by tools/reduce_folds.py")
    stage = Stage.at(path)
    folds = stage.folds()
    if folds:
        if stage.reduced_ensemble.is_file():
            return read_ensemble_file(stage.reduced_ensemble)
        missing = [fold for fold in folds if not fold.weights("best").is_file()]
        if missing:
            raise WeightsError(
                f"{path}: {missing[0].dir} has no {missing[0].weights('best').name} (did its training finish?)"
            )
        return [fold.weights("best") for fold in folds]
    return paths


def _is_ensemble_file(path: Path) -> bool:
    try:
        return json.loads(path.read_text()).get("format") == ENSEMBLE_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _json_problem(path: Path) -> str | None:
    """Why ``path`` is not readable JSON, or None."""
    try:
        json.loads(path.read_text())
    except (OSError, ValueError) as e:
        return f"not readable JSON ({e})"
    return None


def read_ensemble_file(path: Path) -> list[Path]:
    """The member files an ensemble.json names (relative to its folder)."""
    try:
        content = json.loads(path.read_text())
        members = [path.parent / m for m in content["members"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise WeightsError(f"{path}: not a readable ensemble file ({type(e).__name__}: {e})") from None
    if not members:
        raise WeightsError(f"{path}: names no member")
    return members


def load_models(paths: Sequence[str | Path]) -> tuple[nn.Module, dict[str, Any], list[Path]]:
    """The model ``paths`` name (see :func:`resolve_members`), eval mode on the CPU: one model
    file gives that model, several an :class:`Ensemble`; with the first member's sidecar (and,
    for an ensemble, ``ensemble``: the member files) and the member files. Members whose
    configs differ in architecture or evaluation size are refused, naming the difference."""
    members = resolve_members(paths)
    loaded = [load_model(m) for m in members]
    reference, first = loaded[0][1], members[0]
    for (_, sidecar), path in zip(loaded[1:], members[1:], strict=True):
        for key in MEMBERS_MATCH:
            a, b = _select(reference.get("config", {}), key), _select(sidecar.get("config", {}), key)
            if a != b:
                raise WeightsError(f"{first} and {path} differ in {key}: {a!r} vs {b!r}; an ensemble needs the same")
    if len(loaded) == 1:
        return loaded[0][0], reference, members
    sidecar = dict(reference) | {"ensemble": [str(m) for m in members]}
    return Ensemble([model for model, _ in loaded]).eval(), sidecar, members
