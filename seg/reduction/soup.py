"""Reducing a stage's fold models to one: best, mean, top-k mean, greedy soup, and BN
recalibration of an averaged model.

Parameters are averaged in float64 and cast back to their dtype; integer buffers (BN's
``num_batches_tracked``) are averaged the same way and rounded, as the study did. Models of
different architectures, class counts or runs (seg/recipe/identity.py: another config, stage, start
model, data or global batch) are refused, naming the difference.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from seg.core.runs import Stage
from seg.model.weights import WeightsError, read_model_file
from seg.recipe.identity import FOLDS_MAY_DIFFER, describe_changes, differences

# Config sections that must agree for weights to be averaged (the model's shape and classes).
MUST_MATCH = ("model.depth", "model.output_stride", "model.aspp_pool_norm")


@dataclass
class FoldModel:
    fold: int
    path: Path
    state: dict[str, torch.Tensor]
    sidecar: dict[str, Any]

    @property
    def miou(self) -> float:
        return float(self.sidecar["metrics"]["fold"]["miou"])


def load_fold_models(stage_dir: str | Path, folds: Iterable[int], weights: str = "best") -> list[FoldModel]:
    """Each fold's ``{weights}.safetensors`` with its sidecar (seg.model.weights.read_model_file),
    checked against each other."""
    stage = Stage.at(stage_dir)
    models = []
    for fold in folds:
        path = stage.fold(fold).weights(weights)
        if not path.is_file() or not path.with_suffix(".json").is_file():
            raise WeightsError(f"{path}: fold {fold} has no {weights} weights (did its training finish?)")

        def has_metrics(sidecar: dict[str, Any], fold: int = fold, path: Path = path) -> None:
            if not isinstance((sidecar.get("metrics") or {}).get("fold"), dict):
                raise WeightsError(
                    f"{path.with_suffix('.json')}: fold {fold} has no fold-validation metrics (its run ended "
                    f"without a final evaluation); rerun its training command to finish it"
                )

        state, sidecar = read_model_file(path, check=has_metrics)
        models.append(FoldModel(fold, path, state, sidecar))
    check_compatible(models)
    return models


def _select(config: dict[str, Any], key: str) -> Any:
    value: Any = config
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def check_compatible(models: list[FoldModel]) -> None:
    """Refuse models that cannot be averaged, naming the first difference."""
    if not models:
        raise WeightsError("no fold models to reduce")
    reference = models[0]
    for other in models[1:]:
        for key in MUST_MATCH:
            a, b = _select(reference.sidecar["config"], key), _select(other.sidecar["config"], key)
            if a != b:
                raise WeightsError(f"folds {reference.fold} and {other.fold} differ in {key}: {a!r} vs {b!r}")
        ours, theirs = reference.sidecar.get("identity"), other.sidecar.get("identity")
        changes = differences(ours, theirs, FOLDS_MAY_DIFFER) if ours is not None and theirs is not None else []
        if changes:  # e.g. a fold trained with another learning rate or start model: not one experiment
            raise WeightsError(
                f"folds {reference.fold} and {other.fold} were trained as different runs "
                f"({describe_changes(changes)}): "
                f"train them with the same settings (seg/recipe/identity.py says what counts) before reducing them"
            )
        missing = reference.state.keys() ^ other.state.keys()
        if missing:
            raise WeightsError(
                f"folds {reference.fold} and {other.fold} differ in their keys, e.g. {sorted(missing)[0]!r}"
            )
        for name, tensor in reference.state.items():
            theirs = other.state[name]
            if tensor.shape != theirs.shape or tensor.dtype != theirs.dtype:
                raise WeightsError(
                    f"folds {reference.fold} and {other.fold} differ in {name}: "
                    f"{tuple(tensor.shape)} {tensor.dtype} vs {tuple(theirs.shape)} {theirs.dtype} "
                    f"(another class count or architecture?)"
                )


def average(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The element-wise mean, computed in float64; integer tensors rounded back to integers."""
    if not states:
        raise ValueError("nothing to average")
    result = {}
    for name, first in states[0].items():
        mean = torch.stack([s[name].to(torch.float64) for s in states]).mean(0)
        if first.is_floating_point():
            result[name] = mean.to(first.dtype)
        else:
            result[name] = mean.round().to(first.dtype)
    return result


def greedy_soup(models: list[FoldModel], score: Callable[[list[FoldModel]], float]) -> tuple[list[FoldModel], float]:
    """Wortsman et al.'s greedy soup: in order of each fold's own selection score, keep a
    model in the soup when adding it does not lower the selection score of the soup (the
    mean of its models, which ``score`` evaluates). It starts from the fold that scores best
    on the selection set, so it never scores below any single fold."""
    singles = [score([m]) for m in models]
    order = sorted(range(len(models)), key=lambda i: -singles[i])
    soup, best = [models[order[0]]], singles[order[0]]
    for i in order[1:]:
        value = score([*soup, models[i]])
        if value >= best:
            soup, best = [*soup, models[i]], value
    return soup, best


def recalibrate_batchnorm(model: nn.Module, batches: Iterable[torch.Tensor], seed: int = 0) -> None:
    """Re-estimate every BatchNorm's running statistics over ``batches`` (normalised images)
    as a cumulative average (torch's ``update_bn``): averaged weights and averaged
    statistics don't match, so an averaged model needs its own. Only BN buffers change.

    The model runs in train mode, dropout on as in training (the decoder's BN sees the ASPP's
    dropped-out features): its masks are drawn from torch's generators seeded with ``seed``,
    and those are restored after, so a recalibration is the same in every run."""
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        torch.optim.swa_utils.update_bn(batches, model)
