"""The one reader of what runs leave on disk (the layout: seg/core/runs.py): each fold's
``metrics.jsonl`` (written by runs.MetricsLog), ``summary.json``, ``config.yaml`` and
``PREEMPTED``, a stage's ``reduced/report.json``, and tools/evaluate.py's ``metrics.json``
files, as three records: :class:`FoldRecord`, :class:`StageRecord`, :class:`ExperimentRecord`
(with :class:`EvaluationRecord`). The report, the comparison and the reduction all read
through it, so a fold's status, its best and final evaluation mean the same everywhere.

A file that cannot be read, or holds something else than what seg writes there, raises
:class:`RecordError` naming the file (and the line or key).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml

from seg.core import runs
from seg.core.cityscapes import CLASS_NAMES


class RecordError(ValueError):
    """A run's file that cannot be read or is malformed: the message names the file and what to do."""


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``."""
    try:
        value = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise RecordError(f"{path}: not valid JSON ({e}); rerun what wrote it, or delete it") from None
    except OSError as e:
        raise RecordError(f"{path}: cannot read it ({e.strerror})") from None
    if not isinstance(value, dict):
        raise RecordError(f"{path}: expected a JSON object, found {type(value).__name__}")
    return value


def read_metrics(path: Path) -> tuple[list[dict[str, Any]], bool]:
    """The records of a ``metrics.jsonl`` and whether an unterminated last line was left out
    (a fold writing as we read); any other line that is not a record is an error naming it."""
    try:
        text = path.read_text()
    except OSError as e:
        raise RecordError(f"{path}: cannot read it ({e.strerror})") from None
    lines = text.split("\n")
    records, torn = [], False
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if number == len(lines):  # no newline after it yet: being appended
                torn = True
                break
            raise RecordError(f"{path}:{number}: not a JSON record ({e.msg}); fix or delete that line") from None
        if not isinstance(record, dict) or "step" not in record or "epoch" not in record:
            raise RecordError(f"{path}:{number}: not a metrics record (no 'step' or 'epoch'); fix or delete that line")
        records.append(record)
    return records, torn


def read_config(path: Path) -> dict[str, Any]:
    """A fold's resolved ``config.yaml``."""
    try:
        config = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, OSError) as e:
        mark = getattr(e, "problem_mark", None)
        why = f"line {mark.line + 1}: {e.problem}" if mark is not None else str(e)
        raise RecordError(f"{path}: not a readable YAML config ({why})") from None
    if not isinstance(config, dict):
        raise RecordError(f"{path}: expected a mapping, found {type(config).__name__}")
    return config


def require(path: Path, mapping: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str = "") -> Any:
    """``mapping[key]`` when it is a ``kind`` (never a bool), else a RecordError naming ``path`` and the key."""
    value = mapping.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        found = "missing" if key not in mapping else f"{value!r}"
        raise RecordError(f"{path}: {where or key} is {found}, expected {names}; rerun what wrote it, or delete it")
    return value


def checked_result(path: Path, result: Any, where: str) -> dict[str, Any]:
    """{"miou", "fwiou", "iou"} of an evaluation result (ConfusionMatrix.compute's), checked;
    its confusion matrix and image count pass through when it has them."""
    if not isinstance(result, dict):
        raise RecordError(f"{path}: {where} is not an evaluation result (a JSON object)")
    miou = require(path, result, "miou", (int, float), f"{where}.miou")
    iou = require(path, result, "iou", dict, f"{where}.iou")
    for name, value in iou.items():
        if not isinstance(value, int | float):
            raise RecordError(f"{path}: {where}.iou.{name} is {value!r}, not a number")
    checked = {"miou": float(miou), "fwiou": float(result.get("fwiou", math.nan)), "iou": iou}
    return checked | {k: result[k] for k in ("confusion", "samples") if result.get(k) is not None}


@dataclass
class FoldRecord:
    """One fold's run as its folder holds it: ``metrics.jsonl``'s records (``log``), the
    ``summary.json`` written at its end (None until then), whether it waits for a requeue."""

    stage: int | None
    fold: int | None
    path: Path
    log: list[dict[str, Any]]  # every metrics.jsonl record: log steps (train/...) and evaluations (fold/...)
    summary: dict[str, Any] | None
    preempted: bool = False
    torn: bool = False  # metrics.jsonl's last line was being written and is left out

    @property
    def run(self) -> runs.Fold:
        return runs.Fold(self.path, self.fold)

    @property
    def train(self) -> list[dict[str, Any]]:
        """The log steps' records (train/loss, train/lr, ...)."""
        return [r for r in self.log if "train/loss" in r]

    @property
    def evals(self) -> list[dict[str, Any]]:
        """The evaluation records (fold/miou, fold/iou, optionally val/...)."""
        return [r for r in self.log if "fold/miou" in r]

    @property
    def finished(self) -> bool:
        return self.summary is not None

    @property
    def status(self) -> str:
        """done, stopped early, preempted (waiting to resume) or in progress."""
        if self.summary is not None:
            return "stopped early" if self.summary.get("stopped_early") else "done"
        return "preempted" if self.preempted else "in progress"

    @property
    def best(self) -> tuple[float, int] | None:
        """(best fold mIoU, its step): the summary's, else the first maximum of the records."""
        if self.summary is not None and self.summary.get("best", {}).get("step", -1) >= 0:
            return float(self.summary["best"]["miou"]), int(self.summary["best"]["step"])
        if not self.evals:
            return None
        record = max(self.evals, key=lambda r: r["fold/miou"])  # max keeps the first of equals
        return float(record["fold/miou"]), int(record["step"])

    @property
    def final_miou(self) -> float | None:
        return float(self.evals[-1]["fold/miou"]) if self.evals else None

    @property
    def epochs(self) -> float:
        return max((float(r["epoch"]) for r in self.train + self.evals), default=0.0)

    @property
    def seconds(self) -> float | None:
        return None if self.summary is None or "seconds" not in self.summary else float(self.summary["seconds"])

    @property
    def identity(self) -> dict[str, Any] | None:
        """The run's identity (seg/recipe/identity.py) as summary.json records it, if it does."""
        identity = (self.summary or {}).get("identity")
        return identity if isinstance(identity, dict) else None

    @property
    def manifest_sha256(self) -> str | None:
        """The sha256 of the manifest the run trained on, as its identity records it (compare and
        report pair experiments and reductions by it, whatever is at the shards' path now)."""
        sha = ((self.identity or {}).get("data") or {}).get("manifest_sha256")
        return sha if isinstance(sha, str) else None

    @property
    def final_fold_result(self) -> dict[str, Any] | None:
        """summary.json's evaluation of the final model on the held-out fold (``final.fold``), unchecked."""
        final = (self.summary or {}).get("final")
        return final.get("fold") if isinstance(final, dict) else None

    @cached_property
    def config(self) -> dict[str, Any] | None:
        """The resolved config: ``config.yaml``, else the final weights' sidecar's; None without either."""
        run = self.run
        sidecar = run.weights("model").with_suffix(".json")  # seg/model/weights.py's sidecar
        if run.config.is_file():
            return read_config(run.config)
        if sidecar.is_file():
            return require(sidecar, read_json(sidecar), "config", dict)
        return None

    @cached_property
    def final_evaluation(self) -> dict[str, Any]:
        """The finished fold's final evaluation on its held-out fold, checked, with its step:
        summary.json's ``final.fold``, else the last evaluation logged."""
        path = self.run.summary
        if self.final_fold_result is not None:
            return checked_result(path, self.final_fold_result, "final.fold") | {"step": self.summary.get("steps")}
        if self.evals:
            return self._record_result(self.evals[-1])
        raise RecordError(f"{path}: no final.fold evaluation, and metrics.jsonl has none either")

    @cached_property
    def best_evaluation(self) -> dict[str, Any]:
        """The finished fold's evaluation at its best step (chosen by its own held-out mIoU),
        checked: the record logged there, else the final one when that is the best, else the
        mIoU alone."""
        path = self.run.summary
        best = require(path, self.summary, "best", dict)
        step = require(path, best, "step", int, "best.step")
        require(path, best, "miou", (int, float), "best.miou")
        at_best = [r for r in self.evals if r["step"] == step]
        if at_best:
            return self._record_result(at_best[-1])
        final = self.final_evaluation
        if final["step"] == step:
            return dict(final)
        return {"miou": float(best["miou"]), "fwiou": math.nan, "iou": {}, "step": step}

    def _record_result(self, record: dict[str, Any]) -> dict[str, Any]:
        result = {"miou": record["fold/miou"], "fwiou": record.get("fold/fwiou", math.nan),
                  "iou": record.get("fold/iou"), "confusion": record.get("fold/confusion"),
                  "samples": record.get("fold/samples")}  # fmt: skip
        where = f"the evaluation record at step {record['step']}"
        return checked_result(self.run.metrics, result, where) | {"step": record["step"]}


@dataclass
class StageRecord:
    """A stage's folds and its reduction's report (``reduced/report.json``, None until reduced)."""

    stage: int | None
    path: Path
    folds: list[FoldRecord] = field(default_factory=list)
    reduction: dict[str, Any] | None = None

    def fold(self, k: int) -> FoldRecord | None:
        return next((f for f in self.folds if f.fold == k), None)

    def finished(self) -> list[FoldRecord]:
        return [f for f in self.folds if f.finished]

    def final_fold_results(self, folds: list[int] | None = None) -> dict[int, dict[str, Any] | None]:
        """Fold -> its summary's final evaluation on its held-out fold (None when it has none):
        for ``folds``, by default the finished ones. What the out-of-fold estimate pools."""
        chosen = [f.fold for f in self.finished()] if folds is None else folds
        return {k: (record.final_fold_result if (record := self.fold(k)) else None) for k in chosen}

    def winner(self) -> dict[str, Any] | None:
        """The winning candidate's entry of the reduction report."""
        if self.reduction is None:
            return None
        name = self.reduction["winner"]["name"]
        return next((c for c in self.reduction["candidates"] if c["name"] == name), None)

    def best_fold(self) -> FoldRecord | None:
        ranked = [f for f in self.folds if f.best is not None and f.evals]
        return max(ranked, key=lambda f: f.best[0]) if ranked else None


@dataclass
class EvaluationRecord:
    """tools/evaluate.py's ``metrics.json``."""

    path: Path  # the folder holding metrics.json
    label: str  # that folder, relative to the experiment
    result: dict[str, Any]


@dataclass
class ExperimentRecord:
    path: Path
    name: str
    stages: list[StageRecord]
    evaluations: list[EvaluationRecord]
    notes: list[str] = field(default_factory=list)  # what a reader left out or found incomplete


def read_fold(fold: runs.Fold, stage: int | None) -> FoldRecord:
    """A fold folder's record: whatever of its files are there."""
    log, torn = read_metrics(fold.metrics) if fold.metrics.is_file() else ([], False)
    summary = read_json(fold.summary) if fold.summary.is_file() else None
    return FoldRecord(stage, fold.number, fold.dir, log, summary, fold.preempted.is_file(), torn)


def read_stage(stage: runs.Stage) -> StageRecord:
    """A stage folder's record: every numbered fold folder and the reduction report if there is one."""
    reduction = None
    if stage.reduced_report.is_file():
        reduction = read_json(stage.reduced_report)
        for key, kind in (("selection", dict), ("winner", dict), ("candidates", list)):
            require(stage.reduced_report, reduction, key, kind)
    return StageRecord(stage.number, stage.dir, [read_fold(f, stage.number) for f in stage.folds()], reduction)


def read_evaluations(experiment: runs.Experiment) -> list[EvaluationRecord]:
    """Every tools/evaluate.py result in the experiment (runs.Experiment.evaluations)."""
    return [
        EvaluationRecord(path.parent, path.parent.relative_to(experiment.dir).as_posix(), read_json(path))
        for path in experiment.evaluations()
    ]


def read_experiment(path: Path) -> ExperimentRecord:
    """``runs/<experiment>``: every stage and every evaluation result."""
    experiment = runs.Experiment(path)
    stages = [read_stage(stage) for stage in experiment.stages()]
    return ExperimentRecord(path, path.resolve().name, stages, read_evaluations(experiment))


def class_order(ious: list[dict[str, float]]) -> list[str]:
    """Cityscapes' trainId order, then any other class names in the order they come."""
    names = [n for n in CLASS_NAMES if any(n in iou for iou in ious)]
    for iou in ious:
        names += [n for n in iou if n not in names]
    return names


def final_columns(experiment: ExperimentRecord) -> list[tuple[str, dict[str, float]]]:
    """Per-class IoU of the final model, from every source there is: each evaluation result,
    the last reduction's winner (selection set); failing both, the last stage's best fold."""
    columns = [(f"{e.label} ({e.result.get('split', '?')})", e.result["iou"]) for e in experiment.evaluations]
    reduced = [s for s in experiment.stages if s.winner() is not None]
    if reduced:
        stage = reduced[-1]
        columns.append((f"stage {stage.stage} winner {stage.winner()['name']} (selection)", stage.winner()["iou"]))
    if not columns:
        for stage in reversed(experiment.stages):
            fold = stage.best_fold()
            if fold is not None:
                at_best = [r for r in fold.evals if r["step"] == fold.best[1]]
                record = at_best[0] if at_best else max(fold.evals, key=lambda r: r["fold/miou"])
                columns.append((f"stage {stage.stage} fold {fold.fold} best (fold val)", record.get("fold/iou", {})))
                break
    return columns


def candidate_kind(candidate: dict[str, Any]) -> str:
    """A reduction candidate's ``single fold``, ``soup`` (one model of averaged weights) or
    ``ensemble`` (the folds' probabilities averaged, a forward pass per model); older reports
    don't record it."""
    if candidate.get("kind"):
        return str(candidate["kind"])
    return "single fold" if len(candidate["folds"]) == 1 else "soup"


def candidate_cost(candidate: dict[str, Any]) -> int:
    """Forward passes per image (per view): one for a single model, one per member for an ensemble."""
    return int(candidate.get("cost", len(candidate["folds"]) if candidate_kind(candidate) == "ensemble" else 1))
