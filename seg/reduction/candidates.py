"""A reduction's candidates: built from the fold models (each fold, ``best``, ``mean``,
``topk``), scored on the selection set on every process (``Reducer``, ``Scores``, each
distinct set of folds once; the greedy soup grown on the scores, the ensemble, the
BN-recalibrated soups), and the choice of the winner and of the model that seeds the next stage."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate import Accelerator

from seg.core.distributed import convert_sync_batchnorm
from seg.core.runs import Stage
from seg.data.augment import DeviceAugment
from seg.data.loader import TrainStream, eval_loader_of, shards_of
from seg.data.manifest import fold_group
from seg.data.transforms import TrainGeometry
from seg.evaluation.ensemble import Ensemble
from seg.evaluation.evaluate import evaluate
from seg.model.deeplab import from_config
from seg.reduction.soup import FoldModel, average, greedy_soup, recalibrate_batchnorm

BEST_SINGLE = "best-single"  # --seed-from's default


class Say:
    """The reduction's lines on the main process, each score named as the report names it."""

    def __init__(self, accelerator: Accelerator, scored: str) -> None:
        self.main, self.scored = accelerator.is_main_process, scored

    def __call__(self, message: str) -> None:
        if self.main:
            print(message, flush=True)

    def outcome(self, report: dict[str, Any], choice: Choice, stage: Stage) -> None:
        """The winner, the next stage's seed and the out-of-fold estimate."""
        winner, seed, scored = choice.winner, choice.seed, self.scored
        self(f"winner: {winner.name} (folds {winner.folds}), {scored} {100 * winner.result['miou']:.1f}%")
        self(f"seeds the next stage: {seed.name} (folds {seed.folds}), {scored} {100 * seed.result['miou']:.1f}% "
             f"-> {stage.reduced_model}; {choice.why}")  # fmt: skip
        oof = report["out_of_fold"]
        pooled = f"{100 * oof['pooled']['miou']:.1f}%" if oof["pooled"] else "unavailable: " + oof["unavailable"]
        self(f"out-of-fold mIoU (final models): pooled {pooled}; per-fold mean {100 * oof['mean']['miou']:.1f}%")


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


def topk_name(k: int, folds: int) -> str:
    return f"top{min(k, folds)}"


def single_model_names(folds: list[int], strategies: tuple[str, ...], k: int, recalibrate: bool) -> list[str]:
    """The single-model candidates a reduction of ``folds`` can have, known before any score:
    what --seed-from may name (the greedy soup's size comes with the scores: up to every fold)."""
    soups = [(name, size) for strategy, name, size in (("mean", "mean", len(folds)),
             ("topk", topk_name(k, len(folds)), min(k, len(folds))), ("greedy", "greedy", len(folds)))
             if strategy in strategies]  # fmt: skip
    names = [f"fold{k}" for k in folds] + (["best"] if "best" in strategies else []) + [name for name, _ in soups]
    return names + [f"{name}+bn" for name, size in soups if recalibrate and has_bn_twin(size)]


def has_bn_twin(models: int, ensemble: bool = False) -> bool:
    """Whether a candidate of ``models`` fold models is scored again with its BatchNorm
    recalibrated (``NAME+bn``): a soup of several is; a fold alone keeps the statistics it
    trained with, and the ensemble runs each fold's own."""
    return models > 1 and not ensemble


def candidates_of(models: list[FoldModel], strategies: tuple[str, ...], k: int) -> list[Candidate]:
    """Every fold alone, then the soups whose folds are known before any score: ``best``,
    ``mean``, ``topk`` (the greedy soup and the ensemble come with the scores)."""
    ranked = sorted(models, key=lambda m: -m.miou)
    candidates = [Candidate(f"fold{m.fold}", [m]) for m in models]
    if "best" in strategies:
        candidates.append(Candidate("best", [ranked[0]]))
    if "mean" in strategies:
        candidates.append(Candidate("mean", models))
    if "topk" in strategies:
        candidates.append(Candidate(topk_name(k, len(ranked)), ranked[:k]))
    return candidates


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
        recalibrate_batchnorm(self.model, images, seed=train["seed"] + self.accelerator.process_index)
        return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}


class Scores:
    """The selection scores, each distinct set of folds evaluated (and recalibrated) once:
    ``best`` is one of the folds, top-k of k folds is the mean, the greedy soup is one of
    the soups it tried."""

    def __init__(self, reducer: Reducer) -> None:
        self.reducer = reducer
        self.results: dict[tuple[tuple[int, ...], bool], dict[str, Any]] = {}
        self.recalibrated: dict[tuple[int, ...], dict[str, torch.Tensor]] = {}

    def of(self, models: list[FoldModel], recalibrated: bool = False) -> dict[str, Any]:
        """The selection metrics of these models' weights averaged (BN recalibrated: of the
        recalibrated average, made first with ``recalibrate``)."""
        key = (tuple(sorted(m.fold for m in models)), recalibrated)
        if key not in self.results:
            self.results[key] = self.reducer.score(self.weights(models, recalibrated))
        return self.results[key]

    def weights(self, models: list[FoldModel], recalibrated: bool = False) -> dict[str, torch.Tensor]:
        """The candidate's weights: a fold's own, the average in the models' order, or the
        recalibrated average."""
        if recalibrated:
            return self.recalibrated[tuple(sorted(m.fold for m in models))]
        return models[0].state if len(models) == 1 else average([m.state for m in models])

    def recalibrate(self, models: list[FoldModel], batches: int, folds: list[int]) -> None:
        """BatchNorm's statistics of these models' average, recomputed on ``batches`` of the folds' training data."""
        key = tuple(sorted(m.fold for m in models))
        if key not in self.recalibrated:
            averaged = average([m.state for m in models])
            self.recalibrated[key] = self.reducer.recalibrate(averaged, batches, folds)


def score_candidates(
    candidates: list[Candidate], models: list[FoldModel], strategies: tuple[str, ...], scores: Scores, say: Say
) -> list[Candidate]:
    """``candidates`` scored, then the greedy soup (grown on the scores) and the ensemble
    (its members' probabilities averaged), each said as it is scored."""
    for candidate in candidates:
        candidate.result = scores.of(candidate.models)
        say(f"{candidate.name:>8}: {say.scored} {100 * candidate.result['miou']:.1f}%")
    if "greedy" in strategies:
        soup, _ = greedy_soup(models, lambda chosen: scores.of(chosen)["miou"])
        greedy = Candidate("greedy", soup)
        greedy.result = scores.of(soup)
        candidates.append(greedy)
        say(f"  greedy: folds {greedy.folds}, {say.scored} {100 * greedy.result['miou']:.1f}%")
    if "ensemble" in strategies:
        ensemble = Candidate("ensemble", models, ensemble=True)
        ensemble.result = scores.reducer.score_ensemble([m.state for m in models])
        candidates.append(ensemble)
        say(f"ensemble: folds {ensemble.folds} ({ensemble.cost} forward passes), {say.scored} "
            f"{100 * ensemble.result['miou']:.1f}%")  # fmt: skip
    return candidates


def recalibrated_candidates(
    candidates: list[Candidate], scores: Scores, batches: int, folds: list[int], say: Say
) -> list[Candidate]:
    """Every soup again with its BatchNorm recalibrated (``NAME+bn``), scored."""
    recalibrated = []
    for candidate in [c for c in candidates if has_bn_twin(len(c.models), c.ensemble)]:
        scores.recalibrate(candidate.models, batches, folds)
        again = Candidate(f"{candidate.name}+bn", candidate.models, recalibrated=True)
        again.result = scores.of(candidate.models, recalibrated=True)
        recalibrated.append(again)
        say(f"{again.name:>8}: {say.scored} {100 * again.result['miou']:.1f}%")
    return recalibrated


@dataclass
class Choice:
    """The selection's winner among the reduced candidates, and the single model that seeds
    the next stage (the winner, unless it is the ensemble or --seed-from names another), with why."""

    winner: Candidate
    seed: Candidate
    why: str
    seed_from: str

    @classmethod
    def of(cls, candidates: list[Candidate], seed_from: str) -> Choice:
        reduced = [c for c in candidates if not c.name.startswith("fold")]
        winner = max(reduced or candidates, key=lambda c: c.result["miou"])
        seed, why = seed_candidate(candidates, winner, seed_from)
        return cls(winner, seed, why, seed_from)


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
        f"The ensemble won the selection ({100 * winner.result['miou']:.2f}% against "
        f"{100 * best.result['miou']:.2f}%), but a stage starts from one model, so the next stage starts from the "
        f"best single-model candidate on the selection set ({winner.cost} forward passes per image for the "
        "ensemble, 1 for it); --seed-from CANDIDATE chooses another."
    )
