"""Reduce a stage's fold models to one, choosing on a selection set that is not the test.

Candidates: each single fold, ``best`` (highest fold-validation mIoU), ``mean`` (all folds),
``topk`` (mean of the k best), ``greedy`` (soup grown while the selection mIoU does not
drop); each averaged one also with BN recalibration; and ``ensemble``, the folds'
probabilities averaged at prediction time (one forward pass per fold). Every candidate is
evaluated exactly (across all processes) on the selection set: the packed
``train-selection`` group by default, the official val only when asked (the report then
says so). ``runs/<experiment>/stage{s}/reduced/`` gets the model that seeds the next stage
(the winner; when the ensemble wins, the best single-model candidate, or ``--seed-from``'s
choice), ``ensemble.json`` (the ensemble's members), a report with every candidate's score
and inference cost and the stage's pooled out-of-fold estimate, a markdown table and a plot.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from seg.core.atomic import atomic_directory, remove_leftovers
from seg.core.cli import at_least
from seg.core.lease import LeaseHeldError, acquire
from seg.core.runs import Stage
from seg.core.storage import StorageError, check_writable, writing
from seg.data.manifest import SELECTION_GROUP, ManifestError, load_manifest, manifest_sha256
from seg.evaluation.ensemble import write_ensemble_file
from seg.evaluation.out_of_fold import stage_out_of_fold
from seg.model.weights import WeightsError, export_weights
from seg.recipe.identity import stage_identity
from seg.reduction.candidates import (
    BEST_SINGLE,
    Candidate,
    Choice,
    Reducer,
    Say,
    Scores,
    candidates_of,
    recalibrated_candidates,
    score_candidates,
    single_model_names,
)
from seg.reduction.lineage import model_digest, replaced_seed_warning
from seg.reduction.soup import FoldModel, load_fold_models
from seg.results.plots import reduction_figure
from seg.results.tables import reduction_lines
from seg.results.tracking import log_reduction

STRATEGIES = ("best", "mean", "topk", "greedy", "ensemble")
SELECTION_WORDS = {"selection": "selection-set mIoU", "val": "official-val mIoU"}


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """tools/reduce_folds.py's options; ``./launch cv --reduce "..."`` parses them with these
    too, so a bad option fails before a chain is submitted."""
    parser.add_argument(
        "--shards", help="packed dataset: a folder, http(s):// or s3:// URL (default: the one the folds trained on)"
    )
    parser.add_argument("--folds", type=int, nargs="+", help="folds to reduce (default: every fold*/)")
    parser.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES))
    parser.add_argument("--k", type=at_least(1), default=3, help="topk: how many best folds to average (default 3)")
    parser.add_argument(
        "--recalibrate",
        type=at_least(0),
        default=0,
        metavar="BATCHES",
        help="also try each average with BN statistics re-estimated over this many batches",
    )
    parser.add_argument(
        "--select-on",
        choices=tuple(SELECTION_WORDS),
        default="selection",
        help="selection: the packed held-out subset (default); val: the official val split",
    )
    parser.add_argument(
        "--seed-from",
        default=BEST_SINGLE,
        metavar="CANDIDATE",
        help="the model written to reduced/model.safetensors, which the next stage starts from: best-single "
        "(default: the winner, or the best single-model candidate when the ensemble wins) or a candidate's name "
        "(greedy, mean+bn, fold2, ...)",
    )
    parser.add_argument(
        "--weights",
        choices=("best", "model"),
        default="best",
        help="each fold's best (by fold mIoU, default) or final weights",
    )
    return parser


def selection_group(
    manifest: dict[str, Any], shards: str | Path, select_on: str, option: str = "--select-on val"
) -> str:
    """The packed group that chooses the reduced model; ``option``: how the caller's command
    line asks for the official val instead."""
    if select_on == "selection":
        if SELECTION_GROUP not in manifest["groups"]:
            raise ManifestError(
                f"{shards} has no selection subset ({SELECTION_GROUP}): pack with --selection-cities, "
                f"or pass {option} (the report will say the official val chose the model)"
            )
        return SELECTION_GROUP
    if select_on == "val":
        return "val"
    raise ValueError(f"select_on {select_on!r}: selection or val")


def options_record(
    strategies: tuple[str, ...] | list[str],
    k: int,
    recalibrate: int,
    select_on: str,
    weights: str,
    seed_from: str,
    folds: list[int],
    shards: str,
) -> dict[str, Any]:
    """What a reduction was asked for, as its report records it: the chain compares it before
    it calls a stage reduced (seg/cv.py)."""
    return {
        "strategies": sorted(strategies),
        "k": k,
        "recalibrate": recalibrate,
        "select_on": select_on,
        "weights": weights,
        "seed_from": seed_from,
        "folds": sorted(folds),
        "shards": str(shards),
    }


def reduce_stage(
    stage_dir: str | Path,
    shards: str | Path | None = None,
    folds: list[int] | None = None,
    strategies: tuple[str, ...] = STRATEGIES,
    k: int = 3,
    recalibrate_batches: int = 0,
    select_on: str = "selection",
    weights: str = "best",
    accelerator: Accelerator | None = None,
    seed_from: str = BEST_SINGLE,
) -> dict[str, Any]:
    """Reduce ``stage_dir/fold*/`` to ``stage_dir/reduced/``; returns the report. One reduction
    of a stage at a time: the main process holds the stage's reduce lease (seg/core/lease.py)
    throughout, and every rank raises what refused it (LeaseHeldError, StorageError)."""
    stage = Stage.at(stage_dir)
    if not stage.dir.exists():  # a mistyped path: refused before the lease would make its folders (a file: below)
        raise WeightsError(f"{stage.dir}: no such folder; pass runs/<experiment>/stage{{s}}, the folder holding fold*/")
    accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available())
    lease, refusal = None, None
    if accelerator.is_main_process:
        try:
            check_writable(stage.dir)
            lease = acquire(stage.reduce_lease, f"reduction of {stage.dir}")
            remove_leftovers(stage.dir, stage.reduced.name)  # of a reduction killed mid-write
        except (LeaseHeldError, StorageError) as e:
            refusal = e
    refused = next((r for r in gather_object([refusal]) if r), None)
    if refused is not None:
        raise refused
    try:
        arguments = (shards, folds, strategies, k, recalibrate_batches, select_on, weights, accelerator, seed_from)
        return _reduce_stage(stage, *arguments)
    finally:
        if lease is not None:
            lease.release()


def _reduce_stage(
    stage: Stage,
    shards: str | Path | None,
    folds: list[int] | None,
    strategies: tuple[str, ...],
    k: int,
    recalibrate_batches: int,
    select_on: str,
    weights: str,
    accelerator: Accelerator,
    seed_from: str,
) -> dict[str, Any]:
    """The reduction under the lease: the candidates built, scored on the selection set, the
    winner and the next stage's seed chosen, the report made, and ``reduced/`` written."""
    folds = requested_folds(stage, folds, strategies, seed_from)
    check_seed_from(seed_from, folds, strategies, k, recalibrate_batches > 0)
    models = load_fold_models(stage.dir, folds, weights)
    config = models[0].sidecar["config"]
    given = shards is not None
    shards = str(shards or config["data"]["shards"])
    manifest_sha = check_same_pack(models, shards, given)
    group = selection_group(load_manifest(shards), shards, select_on)
    scores = Scores(Reducer(accelerator, config, shards, group))
    say = Say(accelerator, SELECTION_WORDS[select_on])  # the log says what the report says chose the model

    candidates = score_candidates(candidates_of(models, strategies, k), models, strategies, scores, say)
    if recalibrate_batches > 0:
        candidates += recalibrated_candidates(candidates, scores, recalibrate_batches, folds, say)
    choice = Choice.of(candidates, seed_from)
    options = options_record(strategies, k, recalibrate_batches, select_on, weights, seed_from, folds, shards)
    report = reduction_report(stage, options, group, models, candidates, choice, folds, manifest_sha)
    if accelerator.is_main_process:
        replaced = model_digest(stage.reduced_model)  # what a next stage may have started from
        write_reduced(stage, scores, report, models, candidates, choice)
        # A summary run in the experiment's wandb group, beside the folds' runs (not inside
        # reduced/, which a repeated reduction replaces).
        log_reduction(config, models[0].sidecar["stage"], report, stage.dir, stage.reduction_figure)
        say.outcome(report, choice, stage)
        if warning := replaced_seed_warning(stage, replaced):
            print(warning, file=sys.stderr, flush=True)
    accelerator.wait_for_everyone()
    return report


def requested_folds(stage: Stage, folds: list[int] | None, strategies: tuple[str, ...], seed_from: str) -> list[int]:
    """The folds to reduce (default: every fold*/ of the stage), once the request is possible."""
    if folds is None:
        folds = [fold.number for fold in stage.folds()]
    if not folds:
        raise WeightsError(f"{stage.dir}: no fold*/ folders")
    unknown = sorted(set(strategies) - set(STRATEGIES))
    if unknown:
        raise ValueError(f"strategy {unknown[0]!r}: choose from {', '.join(STRATEGIES)}")
    if seed_from == "ensemble":
        raise ValueError("--seed-from ensemble: a stage starts from one model, and the ensemble is several; "
                         f"name a single-model candidate, or {BEST_SINGLE}")  # fmt: skip
    return folds


def check_same_pack(models: list[FoldModel], shards: str, given: bool) -> str:
    """The sha256 of ``shards``' manifest, refused when the folds' identities recorded another:
    another pack's selection set may hold their training images. Compared by content, so any
    location of the same pack (another folder, a URL) passes."""
    now = manifest_sha256(shards)
    recorded = ((models[0].sidecar.get("identity") or {}).get("data") or {}).get("manifest_sha256")
    if recorded is not None and now != recorded:
        what = f"--shards {shards}" if given else f"data.shards {shards} (the folds' own, repacked since)"
        raise ManifestError(
            f"{what}: its manifest.json has sha256 {now}, but the folds trained on sha256 {recorded} (their "
            f"identity): another pack's selection set may hold their training images; pass the pack they trained "
            f"on as --shards (any copy or URL of it), or train the folds on this one"
        )
    return now


def check_seed_from(seed_from: str, folds: list[int], strategies: tuple[str, ...], k: int, recalibrate: bool) -> None:
    """Refuse a --seed-from that names no candidate of this reduction before any is scored."""
    names = single_model_names(folds, strategies, k, recalibrate)
    if seed_from != BEST_SINGLE and seed_from not in names:
        raise ValueError(f"--seed-from {seed_from}: not a single-model candidate of this reduction "
                         f"({', '.join(names)}), or {BEST_SINGLE}")  # fmt: skip


# --- reporting ----------------------------------------------------------------------------------------


def reduction_report(
    stage: Stage,
    options: dict[str, Any],
    group: str,
    models: list[FoldModel],
    candidates: list[Candidate],
    choice: Choice,
    folds: list[int],
    manifest_sha: str,
) -> dict[str, Any]:
    """report.json's content: the options, the selection set and the pack it is of (its
    manifest's sha256), every candidate's scores and cost, the winner, the seed and why, the
    ensemble's members, the out-of-fold estimate."""
    winner, seed = choice.winner, choice.seed
    ensemble = next((c for c in candidates if c.ensemble), None)
    return {
        "stage_dir": str(stage.dir),
        "options": options,
        "selection": {"group": group, "is_official_val": group == "val", "samples": winner.result["samples"]},
        "shards": {"path": options["shards"], "manifest_sha256": manifest_sha},
        "weights": options["weights"],
        "folds": {m.fold: {"fold_miou": m.miou, "path": str(m.path)} for m in models},
        "candidates": [
            {
                "name": c.name,
                "folds": c.folds,
                "recalibrated": c.recalibrated,
                "miou": c.result["miou"],
                "fwiou": c.result["fwiou"],
                "pixel_accuracy": c.result["pixel_accuracy"],
                "iou": c.result["iou"],
                "kind": c.kind,
                "cost": c.cost,
            }
            for c in candidates
        ],
        "winner": {"name": winner.name, "folds": winner.folds, "miou": winner.result["miou"]},
        "seed": {
            "name": seed.name,
            "folds": seed.folds,
            "miou": seed.result["miou"],
            "why": choice.why,
            "seed_from": choice.seed_from,
        },
        "ensemble": None
        if ensemble is None
        else {
            "file": stage.reduced_ensemble.name,
            "members": [str(m.path) for m in ensemble.models],
            "cost": ensemble.cost,
            "miou": ensemble.result["miou"],
        },
        "out_of_fold": stage_out_of_fold(stage.dir, folds),
    }


# --- writing ------------------------------------------------------------------------------------------


def write_reduced(
    stage: Stage,
    scores: Scores,
    report: dict[str, Any],
    models: list[FoldModel],
    candidates: list[Candidate],
    choice: Choice,
) -> None:
    """``reduced/`` as one atomic folder (main process): the seed's model with its sidecar,
    the ensemble's file, report.json, the markdown table and the figure."""
    seed, weights = choice.seed, report["weights"]
    ensemble = next((c for c in candidates if c.ensemble), None)
    reducer = scores.reducer
    with writing(stage.reduced), atomic_directory(stage.reduced, overwrite=True) as tmp:
        reducer.model.load_state_dict(scores.weights(seed.models, seed.recalibrated))
        sidecar = {
            "config": reducer.config,
            "stage": models[0].sidecar["stage"],
            "reduction": {k: v for k, v in report["seed"].items() if k in ("name", "folds", "miou")}
            | {"selection_winner": choice.winner.name},
            "selection": report["selection"],
            "metrics": {"selection": seed.result},
            "identity": stage_identity(models[0].sidecar.get("identity")),
        }
        export_weights(reducer.model, tmp / stage.reduced_model.name, sidecar)
        if ensemble is not None:
            content = write_ensemble_file(
                stage.reduced_ensemble,
                [m.path for m in ensemble.models],
                {"folds": ensemble.folds, "weights": weights, "selection": report["selection"],
                 "metrics": {"selection": ensemble.result}},
            )  # fmt: skip
            (tmp / stage.reduced_ensemble.name).write_text(json.dumps(content, indent=1) + "\n")
        (tmp / stage.reduced_report.name).write_text(json.dumps(report, indent=1) + "\n")
        (tmp / stage.reduced_markdown.name).write_text(reduction_markdown(report))
        reduction_figure(models[0].sidecar["stage"], stage.dir, report, tmp / stage.reduction_figure.name)


def reduction_markdown(report: dict[str, Any]) -> str:
    return "\n".join([f"# Fold reduction: {report['stage_dir']}", "", *reduction_lines(report)]) + "\n"
