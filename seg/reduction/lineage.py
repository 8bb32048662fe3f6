"""Which model the next stage's folds started from, by content: each fold's identity records its
start model's sha256 (seg/recipe/identity.py, ``init_from.model``), so a stage reduced again
after the next one trained can say whose folds started from the model it replaced, and the
report what they started from, rather than assuming today's ``reduced/model.safetensors``."""

from __future__ import annotations

import json
from pathlib import Path

from seg.core.runs import Experiment, Stage
from seg.data.manifest import sha256_file


def model_digest(path: Path) -> str | None:
    """``sha256:...`` of a model file, as an identity records a start model; None when it is not there."""
    return f"sha256:{sha256_file(path)}" if path.is_file() else None


def next_stage(stage: Stage) -> Stage | None:
    """The stage after ``stage`` in its experiment, when its folder exists."""
    if stage.number is None:
        return None
    after = Experiment(stage.dir.parent).stage(stage.number + 1)
    return after if after.dir.is_dir() else None


def started_from(stage: Stage) -> dict[int, str]:
    """Fold -> the start model (``sha256:...``) its identity records: summary.json's when it
    finished, else a sidecar's (best.json, model.json) of a fold still training."""
    found = {}
    for fold in stage.folds():
        sidecars = [fold.weights(which).with_suffix(".json") for which in ("best", "model")]
        for record in (fold.summary, *sidecars):
            model = _start_model(record)
            if model is not None:
                found[fold.number] = model
                break
    return found


def _start_model(record: Path) -> str | None:
    try:
        identity = json.loads(record.read_text()).get("identity")
    except (OSError, ValueError, AttributeError):  # absent, torn or not a JSON object: says nothing
        return None
    model = ((identity or {}).get("init_from") or {}).get("model") if isinstance(identity, dict) else None
    return model if isinstance(model, str) else None


def short(digest: str) -> str:
    """``sha256:`` and the first 12 hex digits: enough to tell two models apart in a line."""
    return digest[: len("sha256:") + 12]


def fold_list(folds: list[int]) -> str:
    return ", ".join(map(str, sorted(folds)))


def replaced_seed_warning(stage: Stage, replaced: str | None) -> str | None:
    """A line when folds of the next stage started from the reduced model ``replaced`` (its
    digest before this reduction wrote another): they no longer descend from ``reduced/``."""
    after, now = next_stage(stage), model_digest(stage.reduced_model)
    if after is None or replaced is None or replaced == now:
        return None
    folds = [k for k, model in started_from(after).items() if model == replaced]
    if not folds:
        return None
    return (
        f"warning: {after.dir.name}'s folds {fold_list(folds)} started from the reduced model this reduction "
        f"replaced ({short(replaced)}), not from {stage.reduced_model} now ({short(now or '?')}): train them again "
        f"from it (--init-from {stage.reduced_model}), or know that {after.dir.name} descends from the earlier "
        "reduction (the report names both)"
    )
