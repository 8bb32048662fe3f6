"""An offline report of an experiment: training curves, per-class IoU, folds, reductions, evaluation.

Reads only what the runs leave on disk (``stage{s}/fold{k}/metrics.jsonl`` and
``summary.json``, ``stage{s}/reduced/report.json``, tools/evaluate.py's ``metrics.json``):
no wandb, no network. Writes PNGs and a ``report.md`` that embeds them, as one folder
(default ``runs/<experiment>/report/``) that appears complete or not at all. Pieces that are
not there yet (a fold still running, a stage not reduced) are noted in the report, not fatal.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from seg.core import runs
from seg.core.atomic import atomic_directory
from seg.evaluation.out_of_fold import out_of_fold
from seg.reduction.lineage import fold_list, model_digest, next_stage, short, started_from
from seg.results.plots import report_figures
from seg.results.records import (
    EvaluationRecord,
    ExperimentRecord,
    FoldRecord,
    RecordError,
    StageRecord,
    class_order,
    final_columns,
    read_experiment,
)
from seg.results.tables import count, out_of_fold_lines, percent, reduction_lines


class ReportError(ValueError):
    """An input that cannot be read, or an output that cannot be written: the message names the file."""


def load_experiment(path: str | Path) -> ExperimentRecord:
    """Everything the report shows, read from ``runs/<experiment>/`` (seg.results.records):
    the folds that logged something, the evaluation results with metrics, and notes on what
    was left out or is incomplete."""
    path = Path(path)
    if not path.is_dir():
        raise ReportError(f"{path}: not a folder; pass runs/<experiment>")
    run_stages = runs.Experiment(path).stages()
    if not any(fold.metrics.is_file() for run_stage in run_stages for fold in run_stage.folds()):
        raise ReportError(f"{path}: not an experiment folder (no stage*/fold*/metrics.jsonl); pass runs/<experiment>")
    try:
        experiment = read_experiment(path)
    except RecordError as e:
        raise ReportError(str(e)) from None
    for stage in experiment.stages:
        stage.folds = [fold for fold in stage.folds if _shown(fold, experiment.notes)]
        if stage.reduction is None:
            where = f"{stage.path.name}: not reduced yet"
            experiment.notes.append(f"{where} (no reduced/report.json; see tools/reduce_folds.py)")
    experiment.evaluations = [e for e in experiment.evaluations if _scored(e, experiment.notes)]
    return experiment


def _shown(fold: FoldRecord, notes: list[str]) -> bool:
    """Whether the report shows ``fold``; notes what it lacks."""
    name = f"{fold.path.parent.name}/{fold.path.name}"
    if not fold.run.metrics.is_file():
        notes.append(f"{name}: no metrics.jsonl yet; skipped")
        return False
    if not fold.log:
        notes.append(f"{name}: metrics.jsonl is empty (nothing logged yet); skipped")
        return False
    if fold.summary is None:
        state = "preempted, waiting to resume" if fold.preempted else "still running or stopped"
        notes.append(f"{name}: {state} (no summary.json); shown as far as it got (step {fold.log[-1]['step']})")
    if fold.torn:
        notes.append(f"{name}: the last line of metrics.jsonl is incomplete (being written); left out")
    if not fold.evals:
        notes.append(f"{name}: no evaluation yet; no mIoU to show")
    return True


def _scored(evaluation: EvaluationRecord, notes: list[str]) -> bool:
    """Whether ``evaluation`` has metrics to show; notes what it is otherwise."""
    result, label = evaluation.result, evaluation.label
    if result.get("labelled") is False:
        notes.append(
            f"{label}: {result.get('split', '?')} split, no labels: "
            f"{count(result.get('samples', 0), 'prediction')} exported to {result.get('export')}, no metrics"
        )
        return False
    if "miou" not in result or not isinstance(result.get("iou"), dict):
        notes.append(f"{label}/metrics.json: not an evaluation result of tools/evaluate.py; skipped")
        return False
    return True


# --- the report -----------------------------------------------------------------------------


def write_report(experiment_dir: Path, out: Path | None = None) -> Path:
    """Write the report of ``experiment_dir`` to ``out`` (default ``experiment_dir/report``),
    replacing an earlier report there; returns ``out``."""
    experiment = load_experiment(experiment_dir)
    out = Path(out) if out is not None else runs.Experiment(Path(experiment_dir)).report
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "report.md").is_file())):
        raise ReportError(f"{out}: exists and is not a report folder; choose another --out")
    with atomic_directory(out, overwrite=True) as tmp:
        figures = report_figures(experiment, tmp)
        (tmp / "report.md").write_text(report_markdown(experiment, figures))
    return out


def report_markdown(experiment: ExperimentRecord, figures: dict[str, str]) -> str:
    """The report; ``figures`` maps a figure's role to its file name in the report folder."""
    lines = [
        f"# Experiment report: {experiment.name}",
        "",
        f"From the metrics.jsonl, summary.json and reduced/report.json files under `{experiment.path}`. "
        "Fold mIoU is measured on each fold's held-out group, a reduction's on its selection set, "
        "so the two are not directly comparable.",
        "",
    ]
    if experiment.notes:
        lines += ["## Skipped or incomplete", "", *(f"- {note}" for note in experiment.notes), ""]

    lines += [
        "## Overview",
        "",
        "Out-of-fold mIoU: the finished folds' final models, each on its own held-out fold; **pooled**: one "
        "confusion matrix over all their held-out images, **mean ± std**: over the per-fold scores.",
        "",
        "| stage | folds | mean best fold mIoU | best fold | reduced winner | winner selection mIoU | "
        "pooled out-of-fold mIoU | mean ± std fold mIoU (final) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for stage in experiment.stages:
        bests = [f.best[0] for f in stage.folds if f.best is not None]
        done = sum(f.summary is not None for f in stage.folds)
        best_fold = stage.best_fold()
        winner = stage.reduction["winner"] if stage.reduction else None
        oof = finished_out_of_fold(stage)
        mean_best = percent(float(np.mean(bests)) if bests else None)
        lines.append(
            f"| {stage.stage} | {done} done of {len(stage.folds)} | {mean_best} | "
            f"{f'fold{best_fold.fold}' if best_fold else 'n/a'} | {winner['name'] if winner else 'not reduced'} | "
            f"{percent(winner['miou'] if winner else None)} | {_pooled_cell(oof)} | {_spread_cell(oof)} |"
        )
    lines.append("")
    for role, title in (("by_stage", "mIoU per fold and stage"), ("fold_miou", "fold mIoU during training")):
        if role in figures:
            lines += [f"![{title}]({figures[role]})", ""]

    for stage in experiment.stages:
        lines += [f"## Stage {stage.stage}", ""]
        if stage.folds:
            lines += [
                "| fold | status | best mIoU | best step | final mIoU | epochs | seconds |",
                "| --- | --- | --- | --- | --- | --- | --- |",
            ]
            for fold in stage.folds:
                best = fold.best
                seconds = "n/a" if fold.seconds is None else f"{fold.seconds:.0f}"
                lines.append(
                    f"| {fold.fold} | {fold.status} | {percent(best[0] if best else None)} | "
                    f"{best[1] if best else 'n/a'} | {percent(fold.final_miou)} | {fold.epochs:.2f} | {seconds} |"
                )
            lines.append("")
        else:
            lines += ["No fold has logged anything yet.", ""]
        if (oof := finished_out_of_fold(stage)) is not None:
            lines += [*out_of_fold_lines(oof), ""]
        if f"training{stage.stage}" in figures:
            lines += [f"![stage {stage.stage} training]({figures[f'training{stage.stage}']})", ""]
        lines += _reduction_lines(stage)

    if "iou_history" in figures:
        lines += [
            "## Per-class IoU during training",
            "",
            "Fold-validation IoU per class at each evaluation, for the best fold of each stage.",
            "",
            f"![per-class IoU history]({figures['iou_history']})",
            "",
        ]
    if "reduction" in figures:
        lines += ["## Reduction comparison", "", f"![reduction candidates]({figures['reduction']})", ""]
    lines += _evaluation_lines(experiment)
    lines += _final_lines(experiment, figures)
    return "\n".join(lines).rstrip("\n") + "\n"


def finished_out_of_fold(stage: StageRecord) -> dict[str, Any] | None:
    """The pooled out-of-fold estimate and the per-fold spread of the finished folds' final
    evaluations (seg.evaluation.out_of_fold); None before any fold has finished."""
    results = stage.final_fold_results()
    return out_of_fold(results) if results else None


def _reduction_lines(stage: StageRecord) -> list[str]:
    lines = [f"### Stage {stage.stage} reduction", ""]
    if stage.reduction is None:
        return [*lines, "Not reduced yet: no `reduced/report.json`.", ""]
    # the out-of-fold table is shown above, from the folds' own summaries
    report = {k: v for k, v in stage.reduction.items() if k != "out_of_fold"}
    lineage, elsewhere = _next_stage_lines(stage, report)
    if elsewhere:  # reduction_lines would say the next stage starts from today's model: it did not
        report.pop("seed", None)
    return [*lines, *reduction_lines(report), "", *lineage, *_selection_shards_lines(stage)]


def _next_stage_lines(stage: StageRecord, report: dict[str, Any]) -> tuple[list[str], bool]:
    """What the next stage's folds started from, by the sha256 their identities record, against
    today's ``reduced/model.safetensors``: (lines, whether some started from another model)."""
    run_stage = runs.Stage(stage.path, stage.stage)
    after, current = next_stage(run_stage), model_digest(run_stage.reduced_model)
    starts = started_from(after) if after is not None else {}
    if not starts or current is None:
        return [], False
    other = {k: model for k, model in starts.items() if model != current}
    if not other:
        return [f"{after.dir.name}'s folds {fold_list(list(starts))} started from it ({short(current)}, as their "
                "identities record).", ""], False  # fmt: skip
    seed = report.get("seed") or report["winner"]
    models = ", ".join(sorted({short(model) for model in other.values()}))
    return [
        f"`reduced/model.safetensors` is now **{seed['name']}** (folds {fold_list(seed['folds'])}), mIoU "
        f"{percent(seed['miou'])}, {short(current)}; {seed.get('why', '')} **{after.dir.name} did not start from "
        f"it**: its folds {fold_list(list(other))} started from {models} (their identities; an earlier reduction "
        f"of this stage, replaced since, or another model), and {after.dir.name} descends from that.",
        "",
    ], True


def trained_manifests(stage: StageRecord) -> set[str]:
    """The manifest sha256s the stage's finished folds recorded in their identities (summary.json)."""
    return {f.manifest_sha256 for f in stage.finished() if f.manifest_sha256}


def _selection_shards_lines(stage: StageRecord) -> list[str]:
    """Which pack's selection set chose the reduced model, flagged when the folds trained on another."""
    reduction = stage.reduction or {}
    shards = reduction.get("shards") or {}
    path = shards.get("path") or (reduction.get("options") or {}).get("shards")
    if path is None:
        return []
    sha, trained = shards.get("manifest_sha256"), trained_manifests(stage)
    line = f"Chosen on the shards `{path}` (manifest sha256 {f'`{sha}`' if sha else 'not recorded'})."
    if sha and trained and sha not in trained:
        line += (
            f" **Not the pack the folds trained on** (sha256 {', '.join(f'`{t}`' for t in sorted(trained))}): "
            "its selection set may hold their training images; reduce again on their pack."
        )
    return [line, ""]


def _pooled_cell(oof: dict[str, Any] | None) -> str:
    if oof is None:
        return "n/a"
    if oof["pooled"] is None:
        return f"unavailable (fold {', '.join(map(str, oof['missing']))})" if oof["missing"] else "n/a"
    return percent(oof["pooled"]["miou"])


def _spread_cell(oof: dict[str, Any] | None) -> str:
    if oof is None or not oof["per_fold"]["miou"]:
        return "n/a"
    if len(oof["per_fold"]["miou"]) == 1:
        return percent(oof["mean"]["miou"])
    return f"{percent(oof['mean']['miou'])} ± {percent(oof['std']['miou'])}"


def _evaluation_lines(experiment: ExperimentRecord) -> list[str]:
    lines = ["## Evaluation", ""]
    if not experiment.evaluations:
        return [*lines, "No evaluation result (tools/evaluate.py's metrics.json) found in the experiment.", ""]
    lines += [
        "The same model scores differently at another input size or with other test-time settings: "
        "compare rows of the same shards and settings. mIoU in percent.",
        "",
    ]
    packs = {_shards_cell(e.result) for e in experiment.evaluations}
    if len(packs) > 1:  # another pack's split holds other images: those scores are not comparable
        lines += [f"**The rows are on {len(packs)} different shards** ({', '.join(sorted(packs))}): scores of "
                  "different images, comparable only between rows of the same shards.", ""]  # fmt: skip
    lines += [
        "| result | model | split | images | shards | input size | mode | flip | scales | mIoU | fwIoU | pixel acc. |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for evaluation in experiment.evaluations:
        r = evaluation.result
        # settings: tools/evaluate.py's record; tta: what an older one wrote beside it
        tta = r.get("settings") or r.get("tta", {})
        scales = ", ".join(f"{s:g}" for s in tta.get("scales", [])) or "n/a"
        size = tta.get("input_size", "not recorded")
        mode = tta.get("mode", "n/a")
        if mode == "slide" and isinstance(tta.get("crop"), str):  # the window used, WIDTHxHEIGHT
            mode = f"slide {tta['crop']} (stride {tta['stride']})"
        lines.append(
            f"| `{evaluation.label}` | `{r.get('model', 'n/a')}` | {r.get('split', 'n/a')} | "
            f"{r.get('samples', 'n/a')} | {_shards_cell(r)} | {size} | "
            f"{mode} | {'yes' if tta.get('flip') else 'no'} | {scales} | {percent(r['miou'])} | "
            f"{percent(r.get('fwiou'))} | {percent(r.get('pixel_accuracy'))} |"
        )
    return [*lines, ""]


def _shards_cell(result: dict[str, Any]) -> str:
    """The shards an evaluation ran on: its path, with its manifest's sha256 when it records it."""
    sha = result.get("manifest_sha256")
    return f"`{result.get('shards', 'not recorded')}`" + (f" ({sha[:12]})" if isinstance(sha, str) else "")


def _final_lines(experiment: ExperimentRecord, figures: dict[str, str]) -> list[str]:
    lines = ["## Final model: per-class IoU", ""]
    columns = final_columns(experiment)
    if not columns:
        return [*lines, "No per-class IoU yet (no evaluation, reduction or fold evaluation).", ""]
    lines += [f"| class | {' | '.join(name for name, _ in columns)} |", f"| --- |{' --- |' * len(columns)}"]
    for name in class_order([iou for _, iou in columns]):
        lines.append(f"| {name} | {' | '.join(percent(iou.get(name)) for _, iou in columns)} |")
    means = [percent(_nanmean(list(iou.values()))) for _, iou in columns]
    lines.append(f"| **mean** | {' | '.join(means)} |")
    lines.append("")
    if "final" in figures:
        lines += [f"![final per-class IoU]({figures['final']})", ""]
    return lines


def _nanmean(values: list[float]) -> float | None:
    kept = [v for v in values if v is not None and not math.isnan(v)]
    return sum(kept) / len(kept) if kept else None
