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
import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from seg.analysis.report import reduction_summary, stage_out_of_fold
from seg.core.atomic import atomic_directory
from seg.core.distributed import convert_sync_batchnorm
from seg.core.lease import LeaseHeldError, acquire
from seg.core.runs import Stage
from seg.core.storage import StorageError, check_writable, writing
from seg.data.augment import DeviceAugment
from seg.data.loader import TrainStream, eval_loader_of, shards_of
from seg.data.manifest import SELECTION_GROUP, ManifestError, fold_group, load_manifest
from seg.data.transforms import TrainGeometry
from seg.evaluation.ensemble import Ensemble, write_ensemble_file
from seg.evaluation.evaluate import evaluate
from seg.model.deeplab import from_config
from seg.model.weights import WeightsError, export_weights
from seg.recipe.identity import stage_identity
from seg.reduction.soup import FoldModel, average, greedy_soup, load_fold_models, recalibrate_batchnorm
from seg.results.plots import reduction_figure
from seg.results.tracking import log_reduction

STRATEGIES = ("best", "mean", "topk", "greedy", "ensemble")
BEST_SINGLE = "best-single"  # --seed-from's default
SELECTION_WORDS = {"selection": "selection-set mIoU", "val": "official-val mIoU"}


def _at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value}: at least {minimum}")
        return value

    return parse


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """tools/reduce_folds.py's options; ``./launch cv --reduce "..."`` parses them with these
    too, so a bad option fails before a chain is submitted."""
    parser.add_argument(
        "--shards", help="packed dataset: a folder, http(s):// or s3:// URL (default: the one the folds trained on)"
    )
    parser.add_argument("--folds", type=int, nargs="+", help="folds to reduce (default: every fold*/)")
    parser.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES))
    parser.add_argument("--k", type=_at_least(1), default=3, help="topk: how many best folds to average (default 3)")
    parser.add_argument(
        "--recalibrate",
        type=_at_least(0),
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


def selection_group(manifest: dict[str, Any], shards: str | Path, select_on: str) -> str:
    """The packed group that chooses the reduced model."""
    if select_on == "selection":
        if SELECTION_GROUP not in manifest["groups"]:
            raise ManifestError(
                f"{shards} has no selection subset ({SELECTION_GROUP}): pack with --selection-cities, "
                f"or pass --select-on val (the report will say the official val chose the model)"
            )
        return SELECTION_GROUP
    if select_on == "val":
        return "val"
    raise ValueError(f"select_on {select_on!r}: selection or val")


@dataclass
class Candidate:
    name: str
    models: list[FoldModel]  # averaged (one model: itself)
    recalibrated: bool = False
    result: dict[str, Any] = field(default_factory=dict)
    ensemble: bool = False  # the models' probabilities averaged at prediction time, not their weights

    @property
    def folds(self) -> list[int]:
        return [m.fold for m in self.models]

    @property
    def kind(self) -> str:
        return "ensemble" if self.ensemble else "single fold" if len(self.models) == 1 else "soup"

    @property
    def cost(self) -> int:
        """Forward passes per image and view."""
        return len(self.models) if self.ensemble else 1


class Reducer:
    """Scores weights on the selection set and recalibrates BN, on every process."""

    def __init__(self, accelerator: Accelerator, config: dict[str, Any], shards: str, group: str) -> None:
        self.accelerator, self.config, self.shards, self.group = accelerator, config, shards, group
        self.model = from_config(config["model"])
        if accelerator.num_processes > 1:  # recalibration statistics over every process's batches
            self.model = convert_sync_batchnorm(self.model, accelerator.device.type == "cuda")
        self.model.to(accelerator.device)
        self.normalise = DeviceAugment("none").to(accelerator.device)

    def score(self, state: dict[str, torch.Tensor]) -> dict[str, Any]:
        """The selection metrics of these weights."""
        self.model.load_state_dict(state)
        return self._score(self.model)

    def _score(self, model: torch.nn.Module) -> dict[str, Any]:
        accelerator = self.accelerator
        # Every candidate is scored on every selection sample: one that can't be read stops the
        # reduction, whatever data.on_error let training skip.
        data = {**self.config["data"], "on_error": "raise"}
        loader, _ = eval_loader_of(
            data, [self.group], accelerator.process_index, accelerator.num_processes, shards=self.shards
        )
        matrix, seen, _ = evaluate(model, loader, accelerator.device, self.normalise)
        return matrix.compute() | {"samples": seen}

    def score_ensemble(self, states: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
        """The selection score of the models' averaged probabilities (seg.evaluation.ensemble.Ensemble)."""
        members = []
        for state in states:
            member = from_config(self.config["model"])
            member.load_state_dict(state)
            members.append(member)
        ensemble = Ensemble(members).to(self.accelerator.device).eval()
        return self._score(ensemble)

    def recalibrate(self, state: dict[str, torch.Tensor], batches: int, folds: list[int]) -> dict[str, torch.Tensor]:
        self.model.load_state_dict(state)
        data, train = self.config["data"], self.config["train"]
        geometry = TrainGeometry(data["geometry"], tuple(data["size"]), "none", base_size=tuple(data["base_size"]))
        shards = shards_of(self.shards, [fold_group(k) for k in folds], checksums=False, cache=data.get("cache_dir"))
        stream = TrainStream(
            shards,
            geometry,
            samples_per_epoch=batches * train["batch_size"],
            seed=train["seed"],
            rank=self.accelerator.process_index,
        )
        loader = torch.utils.data.DataLoader(stream, batch_size=train["batch_size"])
        device = self.accelerator.device
        images = (self.normalise(b["image"].to(device), train=False)[0] for b in itertools.islice(loader, batches))
        recalibrate_batchnorm(self.model, images)
        return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}


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
    accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available())
    stage = Stage.at(stage_dir)
    lease, refusal = None, None
    if accelerator.is_main_process:
        try:
            check_writable(stage.dir)
            lease = acquire(stage.reduce_lease, f"reduction of {stage.dir}")
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
    stage_dir = stage.dir
    if folds is None:
        folds = [fold.number for fold in stage.folds()]
    if not folds:
        raise WeightsError(f"{stage_dir}: no fold*/ folders")
    unknown = sorted(set(strategies) - set(STRATEGIES))
    if unknown:
        raise ValueError(f"strategy {unknown[0]!r}: choose from {', '.join(STRATEGIES)}")
    if seed_from == "ensemble":
        raise ValueError("--seed-from ensemble: a stage starts from one model, and the ensemble is several; "
                         f"name a single-model candidate, or {BEST_SINGLE}")  # fmt: skip
    models = load_fold_models(stage_dir, folds, weights)
    config = models[0].sidecar["config"]
    shards = str(shards or config["data"]["shards"])
    group = selection_group(load_manifest(shards), shards, select_on)
    reducer = Reducer(accelerator, config, shards, group)
    scored = SELECTION_WORDS[select_on]  # the log says what the report says chose the model

    def log(message: str) -> None:
        if accelerator.is_main_process:
            print(message, flush=True)

    # Each distinct set of folds is evaluated (and recalibrated) once: ``best`` is one of the
    # folds, top-k of k folds is the mean, the greedy soup is one of the soups it tried.
    results: dict[tuple[tuple[int, ...], bool], dict[str, Any]] = {}
    recalibrated_states: dict[tuple[int, ...], dict[str, torch.Tensor]] = {}

    def score_of(folds: list[int], state: Callable[[], dict[str, torch.Tensor]], bn: bool = False) -> dict[str, Any]:
        key = (tuple(sorted(folds)), bn)
        if key not in results:
            results[key] = reducer.score(state())
        return results[key]

    def mean_of(chosen: list[FoldModel]) -> Callable[[], dict[str, torch.Tensor]]:
        return lambda: chosen[0].state if len(chosen) == 1 else average([m.state for m in chosen])

    ranked = sorted(models, key=lambda m: -m.miou)
    candidates = [Candidate(f"fold{m.fold}", [m]) for m in models]
    if "best" in strategies:
        candidates.append(Candidate("best", [ranked[0]]))
    if "mean" in strategies:
        candidates.append(Candidate("mean", models))
    if "topk" in strategies:
        candidates.append(Candidate(f"top{min(k, len(ranked))}", ranked[:k]))
    for candidate in candidates:
        candidate.result = score_of(candidate.folds, mean_of(candidate.models))
        log(f"{candidate.name:>8}: {scored} {100 * candidate.result['miou']:.1f}")
    if "greedy" in strategies:
        soup, _ = greedy_soup(models, lambda chosen: score_of([m.fold for m in chosen], mean_of(chosen))["miou"])
        greedy = Candidate("greedy", soup)
        greedy.result = score_of(greedy.folds, mean_of(soup))
        candidates.append(greedy)
        log(f"  greedy: folds {greedy.folds}, {scored} {100 * greedy.result['miou']:.1f}")
    if "ensemble" in strategies:
        ensemble = Candidate("ensemble", models, ensemble=True)
        ensemble.result = reducer.score_ensemble([m.state for m in models])
        candidates.append(ensemble)
        log(f"ensemble: folds {ensemble.folds} ({ensemble.cost} forward passes), {scored} "
            f"{100 * ensemble.result['miou']:.1f}")  # fmt: skip
    if recalibrate_batches > 0:
        for candidate in [c for c in candidates if len(c.models) > 1 and not c.ensemble]:
            key = tuple(sorted(candidate.folds))
            if key not in recalibrated_states:
                averaged = average([m.state for m in candidate.models])
                recalibrated_states[key] = reducer.recalibrate(averaged, recalibrate_batches, folds)
            recalibrated = Candidate(f"{candidate.name}+bn", candidate.models, recalibrated=True)
            recalibrated.result = score_of(candidate.folds, lambda key=key: recalibrated_states[key], bn=True)
            candidates.append(recalibrated)
            log(f"{recalibrated.name:>8}: {scored} {100 * recalibrated.result['miou']:.1f}")

    reduced = [c for c in candidates if not c.name.startswith("fold")]
    winner = max(reduced or candidates, key=lambda c: c.result["miou"])
    seed, why = seed_candidate(candidates, winner, seed_from)
    ensemble_candidate = next((c for c in candidates if c.ensemble), None)
    report = {
        "stage_dir": str(stage_dir),
        "options": options_record(strategies, k, recalibrate_batches, select_on, weights, seed_from, folds, shards),
        "selection": {"group": group, "is_official_val": group == "val", "samples": winner.result["samples"]},
        "weights": weights,
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
            "why": why,
            "seed_from": seed_from,
        },
        "ensemble": None
        if ensemble_candidate is None
        else {
            "file": stage.reduced_ensemble.name,
            "members": [str(m.path) for m in ensemble_candidate.models],
            "cost": ensemble_candidate.cost,
            "miou": ensemble_candidate.result["miou"],
        },
        "out_of_fold": stage_out_of_fold(stage_dir, folds),
    }
    if accelerator.is_main_process:
        with writing(stage.reduced), atomic_directory(stage.reduced, overwrite=True) as tmp:
            seeding = recalibrated_states[tuple(sorted(seed.folds))] if seed.recalibrated else None
            reducer.model.load_state_dict(seeding or mean_of(seed.models)())
            sidecar = {
                "config": config,
                "stage": models[0].sidecar["stage"],
                "reduction": {k: v for k, v in report["seed"].items() if k in ("name", "folds", "miou")}
                | {"selection_winner": winner.name},
                "selection": report["selection"],
                "metrics": {"selection": seed.result},
                "identity": stage_identity(models[0].sidecar.get("identity")),
            }
            export_weights(reducer.model, tmp / stage.reduced_model.name, sidecar)
            if ensemble_candidate is not None:
                content = write_ensemble_file(
                    stage.reduced_ensemble,
                    [m.path for m in ensemble_candidate.models],
                    {"folds": ensemble_candidate.folds, "weights": weights, "selection": report["selection"],
                     "metrics": {"selection": ensemble_candidate.result}},
                )  # fmt: skip
                (tmp / stage.reduced_ensemble.name).write_text(json.dumps(content, indent=1) + "\n")
            (tmp / stage.reduced_report.name).write_text(json.dumps(report, indent=1) + "\n")
            (tmp / stage.reduced_markdown.name).write_text(markdown(report))
            reduction_figure(models[0].sidecar["stage"], stage_dir, report, tmp / stage.reduction_figure.name)
        # A summary run in the experiment's wandb group, beside the folds' runs (not inside
        # reduced/, which a repeated reduction replaces).
        log_reduction(config, models[0].sidecar["stage"], report, stage_dir, stage.reduction_figure)
        log(f"winner: {winner.name} (folds {winner.folds}), {scored} {100 * winner.result['miou']:.1f}")
        log(f"seeds the next stage: {seed.name} (folds {seed.folds}), {scored} {100 * seed.result['miou']:.1f} "
            f"-> {stage.reduced_model}; {why}")  # fmt: skip
        oof = report["out_of_fold"]
        pooled = "unavailable: " + oof["unavailable"] if oof["pooled"] is None else f"{100 * oof['pooled']['miou']:.1f}"
        log(f"out-of-fold mIoU (final models): pooled {pooled}; per-fold mean {100 * oof['mean']['miou']:.1f}")
    accelerator.wait_for_everyone()
    return report


def seed_candidate(candidates: list[Candidate], winner: Candidate, seed_from: str) -> tuple[Candidate, str]:
    """The candidate whose single model seeds the next stage, and why (for the report)."""
    if seed_from != BEST_SINGLE:
        chosen = next((c for c in candidates if c.name == seed_from), None)
        if chosen is None or chosen.ensemble:
            names = ", ".join(c.name for c in candidates if not c.ensemble)
            raise ValueError(f"--seed-from {seed_from}: not a single-model candidate of this reduction ({names})")
        return chosen, f"Chosen with --seed-from {seed_from} (the selection winner is {winner.name})."
    if not winner.ensemble:
        return winner, "The selection winner."
    singles = [c for c in candidates if not c.ensemble and not c.name.startswith("fold")]
    singles = singles or [c for c in candidates if not c.ensemble]
    if not singles:
        raise ValueError("only the ensemble was evaluated: add a single-model strategy (best, mean, topk, greedy)")
    best = max(singles, key=lambda c: c.result["miou"])
    return best, (
        f"The ensemble won the selection ({100 * winner.result['miou']:.2f} against "
        f"{100 * best.result['miou']:.2f}), but a stage starts from one model, so the next stage starts from the "
        f"best single-model candidate on the selection set ({winner.cost} forward passes per image for the "
        "ensemble, 1 for it); --seed-from CANDIDATE chooses another."
    )


def markdown(report: dict[str, Any]) -> str:
    return "\n".join([f"# Fold reduction: {report['stage_dir']}", "", *reduction_summary(report)]) + "\n"
