"""An offline report of an experiment: training curves, per-class IoU, folds, reductions, evaluation.

Reads only what the runs leave on disk (``stage{s}/fold{k}/metrics.jsonl`` and
``summary.json``, ``stage{s}/reduced/report.json``, tools/evaluate.py's ``metrics.json``):
no wandb, no network. Writes PNGs and a ``report.md`` that embeds them, as one folder
(default ``runs/<experiment>/report/``) that appears complete or not at all. Pieces that are
not there yet (a fold still running, a stage not reduced) are noted in the report, not fatal.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from seg.core import runs
from seg.core.atomic import atomic_directory
from seg.core.cityscapes import CLASS_NAMES


class ReportError(ValueError):
    """An input that cannot be read, or an output that cannot be written: the message names the file."""


@dataclass
class Fold:
    stage: int
    fold: int
    path: Path
    train: list[dict[str, Any]]  # log records (train/loss, train/lr, ...)
    evals: list[dict[str, Any]]  # evaluation records (fold/miou, fold/iou, optionally val/...)
    summary: dict[str, Any] | None  # None until the fold finishes
    preempted: bool

    @property
    def status(self) -> str:
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


@dataclass
class Stage:
    stage: int
    path: Path
    folds: list[Fold] = field(default_factory=list)
    reduction: dict[str, Any] | None = None  # reduced/report.json

    def winner(self) -> dict[str, Any] | None:
        """The winning candidate's entry of the reduction report."""
        if self.reduction is None:
            return None
        name = self.reduction["winner"]["name"]
        return next((c for c in self.reduction["candidates"] if c["name"] == name), None)

    def out_of_fold(self) -> dict[str, Any] | None:
        """The pooled out-of-fold estimate and the per-fold spread of the finished folds' final
        evaluations (seg.analysis.report.out_of_fold); None before any fold has finished."""
        finished = {f.fold: f.summary for f in self.folds if f.summary is not None}
        if not finished:
            return None
        return out_of_fold({k: (s.get("final") or {}).get("fold") for k, s in finished.items()})

    def best_fold(self) -> Fold | None:
        ranked = [f for f in self.folds if f.best is not None and f.evals]
        return max(ranked, key=lambda f: f.best[0]) if ranked else None


@dataclass
class Evaluation:
    path: Path  # the folder holding metrics.json
    label: str  # that folder, relative to the experiment
    result: dict[str, Any]


@dataclass
class Experiment:
    path: Path
    name: str
    stages: list[Stage]
    evaluations: list[Evaluation]
    notes: list[str]  # what was skipped or is incomplete, for the report


def read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ReportError(f"{path}: not valid JSON ({e}); rerun what wrote it, or delete it") from None
    except OSError as e:
        raise ReportError(f"{path}: cannot read it ({e.strerror})") from None
    if not isinstance(value, dict):
        raise ReportError(f"{path}: expected a JSON object, found {type(value).__name__}")
    return value


def read_metrics(path: Path) -> tuple[list[dict[str, Any]], bool]:
    """The records of a ``metrics.jsonl`` and whether an unterminated last line was left out
    (a fold writing as we read); any other line that is not a record is an error naming it."""
    try:
        text = path.read_text()
    except OSError as e:
        raise ReportError(f"{path}: cannot read it ({e.strerror})") from None
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
            raise ReportError(f"{path}:{number}: not a JSON record ({e.msg}); fix or delete that line") from None
        if not isinstance(record, dict) or "step" not in record or "epoch" not in record:
            raise ReportError(f"{path}:{number}: not a metrics record (no 'step' or 'epoch'); fix or delete that line")
        records.append(record)
    return records, torn


def load_experiment(path: str | Path) -> Experiment:
    """Everything the report shows, read from ``runs/<experiment>/``."""
    path = Path(path)
    if not path.is_dir():
        raise ReportError(f"{path}: not a folder; pass runs/<experiment>")
    run_stages = runs.Experiment(path).stages()
    if not any(fold.metrics.is_file() for run_stage in run_stages for fold in run_stage.folds()):
        raise ReportError(f"{path}: not an experiment folder (no stage*/fold*/metrics.jsonl); pass runs/<experiment>")
    notes: list[str] = []
    stages = []
    for run_stage in run_stages:
        stage = Stage(run_stage.number, run_stage.dir)
        where = run_stage.dir.name
        for run_fold in run_stage.folds():
            name = f"{where}/{run_fold.dir.name}"
            if not run_fold.metrics.is_file():
                notes.append(f"{name}: no metrics.jsonl yet; skipped")
                continue
            records, torn = read_metrics(run_fold.metrics)
            if not records:
                notes.append(f"{name}: metrics.jsonl is empty (nothing logged yet); skipped")
                continue
            summary = read_json(run_fold.summary) if run_fold.summary.is_file() else None
            fold = Fold(
                stage.stage,
                run_fold.number,
                run_fold.dir,
                [r for r in records if "train/loss" in r],
                [r for r in records if "fold/miou" in r],
                summary,
                run_fold.preempted.is_file(),
            )
            stage.folds.append(fold)
            if summary is None:
                state = "preempted, waiting to resume" if fold.preempted else "still running or stopped"
                notes.append(f"{name}: {state} (no summary.json); shown as far as it got (step {records[-1]['step']})")
            if torn:
                notes.append(f"{name}: the last line of metrics.jsonl is incomplete (being written); left out")
            if not fold.evals:
                notes.append(f"{name}: no evaluation yet; no mIoU to show")
        if run_stage.reduced_report.is_file():
            stage.reduction = read_json(run_stage.reduced_report)
        else:
            notes.append(f"{where}: not reduced yet (no reduced/report.json; see tools/reduce_folds.py)")
        stages.append(stage)
    evaluations = []
    for metrics in runs.Experiment(path).evaluations():
        result = read_json(metrics)
        label = metrics.parent.relative_to(path).as_posix()
        if result.get("labelled") is False:
            notes.append(
                f"{label}: {result.get('split', '?')} split, no labels: "
                f"{count(result.get('samples', 0), 'prediction')} exported to {result.get('export')}, no metrics"
            )
            continue
        if "miou" not in result or not isinstance(result.get("iou"), dict):
            notes.append(f"{label}/metrics.json: not an evaluation result of tools/evaluate.py; skipped")
            continue
        evaluations.append(Evaluation(metrics.parent, label, result))
    return Experiment(path, path.resolve().name, stages, evaluations, notes)


# --- the report -----------------------------------------------------------------------------


def write_report(experiment_dir: Path, out: Path | None = None) -> Path:
    """Write the report of ``experiment_dir`` to ``out`` (default ``experiment_dir/report``),
    replacing an earlier report there; returns ``out``."""
    experiment = load_experiment(experiment_dir)
    out = Path(out) if out is not None else runs.Experiment(Path(experiment_dir)).report
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "report.md").is_file())):
        raise ReportError(f"{out}: exists and is not a report folder; choose another --out")
    with atomic_directory(out, overwrite=True) as tmp:
        from seg.results.plots import report_figures  # (seg.results.plots draws from this module's records)

        figures = report_figures(experiment, tmp)
        (tmp / "report.md").write_text(markdown(experiment, figures))
    return out


def markdown(experiment: Experiment, figures: dict[str, str]) -> str:
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
        oof = stage.out_of_fold()
        lines.append(
            f"| {stage.stage} | {done} done of {len(stage.folds)} | {_pct(float(np.mean(bests)) if bests else None)} | "
            f"{f'fold{best_fold.fold}' if best_fold else 'n/a'} | {winner['name'] if winner else 'not reduced'} | "
            f"{_pct(winner['miou'] if winner else None)} | {_pooled_cell(oof)} | {_spread_cell(oof)} |"
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
                    f"| {fold.fold} | {fold.status} | {_pct(best[0] if best else None)} | "
                    f"{best[1] if best else 'n/a'} | {_pct(fold.final_miou)} | {fold.epochs:.2f} | {seconds} |"
                )
            lines.append("")
        else:
            lines += ["No fold has logged anything yet.", ""]
        if stage.out_of_fold() is not None:
            lines += [*out_of_fold_lines(stage.out_of_fold()), ""]
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


def _reduction_lines(stage: Stage) -> list[str]:
    lines = [f"### Stage {stage.stage} reduction", ""]
    if stage.reduction is None:
        return [*lines, "Not reduced yet: no `reduced/report.json`.", ""]
    # the out-of-fold table is shown above, from the folds' own summaries
    report = {k: v for k, v in stage.reduction.items() if k != "out_of_fold"}
    return [*lines, *reduction_summary(report), ""]


def candidate_kind(candidate: dict[str, Any]) -> str:
    """``single fold``, ``soup`` (one model of averaged weights) or ``ensemble`` (the folds'
    probabilities averaged, a forward pass per model); older reports don't record it."""
    if candidate.get("kind"):
        return str(candidate["kind"])
    return "single fold" if len(candidate["folds"]) == 1 else "soup"


def candidate_cost(candidate: dict[str, Any]) -> int:
    """Forward passes per image (per view): one for a single model, one per member for an ensemble."""
    return int(candidate.get("cost", len(candidate["folds"]) if candidate_kind(candidate) == "ensemble" else 1))


def reduction_summary(report: dict[str, Any]) -> list[str]:
    """Where a reduction chose, its winner, the model that seeds the next stage, every
    candidate's selection score and inference cost as a markdown table (the winner in bold),
    and the stage's out-of-fold estimate: for reduced/report.md and the experiment's report."""
    selection, winner = report["selection"], report["winner"]
    where = "the official val split" if selection["is_official_val"] else f"the held-out `{selection['group']}` group"
    lines = [
        f"Chosen on {where} ({count(selection['samples'], 'image')}). Winner: **{winner['name']}** "
        f"(folds {', '.join(map(str, winner['folds']))}), mIoU {_pct(winner['miou'])}.",
    ]
    seed = report.get("seed")
    if seed is not None:
        lines += [
            "",
            f"`reduced/model.safetensors`, the model the next stage starts from: **{seed['name']}** "
            f"(folds {', '.join(map(str, seed['folds']))}), mIoU {_pct(seed['miou'])}. {seed['why']}",
        ]
    if report.get("ensemble"):
        lines += [
            "",
            f"The ensemble's members are listed in `reduced/ensemble.json`: evaluate or predict with it "
            f"(tools/evaluate.py / tools/predict.py `{report['stage_dir']}/reduced/ensemble.json`), "
            f"{report['ensemble']['cost']} forward passes per image and view.",
        ]
    lines += [
        "",
        f"The candidates' scores on {where} (not out-of-fold: the same images for every candidate). Inference "
        "cost: forward passes per image at the selection's settings (whole image, no flip, one scale; flips and "
        "scales multiply it).",
        "",
        "| candidate | folds | BN recalibrated | mIoU | fwIoU | pixel acc. | kind | forward passes per image |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    # Candidates of the same folds are the same model (with 3 folds top3 is the mean, best
    # is one of the folds): said in the table, not left to look like a second result.
    first: dict[tuple[tuple[int, ...], bool, str], str] = {}
    for c in report["candidates"]:
        name = f"**{c['name']}**" if c["name"] == winner["name"] else c["name"]
        kind = candidate_kind(c)
        same_kind = "ensemble" if kind == "ensemble" else "model"
        same = first.setdefault((tuple(sorted(c["folds"])), bool(c["recalibrated"]), same_kind), c["name"])
        if same != c["name"]:
            name += f" (the same model as {same})"
        lines.append(
            f"| {name} | {', '.join(map(str, c['folds']))} | {'yes' if c['recalibrated'] else 'no'} | "
            f"{_pct(c['miou'])} | {_pct(c.get('fwiou'))} | {_pct(c.get('pixel_accuracy'))} | {kind} | "
            f"{candidate_cost(c)} |"
        )
    if report.get("out_of_fold"):
        lines += ["", *out_of_fold_lines(report["out_of_fold"])]
    return lines


# --- the pooled out-of-fold estimate ------------------------------------------------------------

OOF_SOURCES = {
    "final": "each fold's final model on its own held-out fold",
    "best": "each fold's best checkpoint on its own held-out fold (chosen on that fold: leans optimistic)",
}


def out_of_fold(results: dict[int, dict[str, Any] | None], source: str = "final") -> dict[str, Any]:
    """The cross-validation estimate of a stage two ways, from each fold's evaluation on its
    own held-out fold (``results``: fold -> that result, None when there is none):

    - ``pooled``: every held-out image predicted once by the fold model that did not train on
      it, scored as one set: the folds' confusion matrices summed, then mIoU, per-class IoU,
      fwIoU (seg.evaluation.metrics.pooled). Exact whatever the processes of each evaluation (each
      matrix is already the sum over its ranks); ``None`` when a fold's result carries no
      matrix (trained before results recorded it): ``missing`` names those folds.
    - ``mean``/``std``/``min``/``max`` of the per-fold mIoU and fwIoU (``per_fold``): each fold
      weighs the same, however many images and pixels it holds, so with unbalanced folds or
      rare classes the mean differs from the pooled score.
    """
    from seg.evaluation.metrics import pooled

    folds = sorted(results)
    scored = {k: r for k, r in results.items() if isinstance(r, dict) and isinstance(r.get("miou"), int | float)}
    per_fold = {m: {str(k): float(r.get(m, math.nan)) for k, r in sorted(scored.items())} for m in ("miou", "fwiou")}
    record: dict[str, Any] = {"source": source, "describes": OOF_SOURCES.get(source, source), "folds": folds,
                              "per_fold": per_fold}  # fmt: skip
    for name, reduce in (("mean", np.mean), ("min", np.min), ("max", np.max)):
        record[name] = {m: float(reduce(list(v.values()))) if v else math.nan for m, v in per_fold.items()}
    record["std"] = {
        m: float(np.std(list(v.values()), ddof=1)) if len(v) > 1 else math.nan for m, v in per_fold.items()
    }
    missing = [k for k in folds if not isinstance((results[k] or {}).get("confusion"), list)]
    samples = [r.get("samples") for r in scored.values()]
    record["samples"] = sum(samples) if samples and all(isinstance(n, int) for n in samples) else None
    record["missing"] = missing
    if missing or not folds:
        record["pooled"] = None
        record["unavailable"] = (
            f"fold {', '.join(map(str, missing))} {'has' if len(missing) == 1 else 'have'} no confusion matrix in "
            f"{'its' if len(missing) == 1 else 'their'} final result (trained before summaries recorded it, or "
            "unfinished)"
            if missing
            else "no fold result"
        )
    else:
        record["pooled"] = pooled([results[k]["confusion"] for k in folds])
        record["unavailable"] = None
    return record


def stage_out_of_fold(stage_dir: Path, folds: list[int]) -> dict[str, Any]:
    """:func:`out_of_fold` of ``stage_dir/fold{k}/summary.json``'s final evaluation (``final.fold``)."""
    results: dict[int, dict[str, Any] | None] = {}
    stage = runs.Stage.at(stage_dir)
    for k in folds:
        path = stage.fold(k).summary
        final = read_json(path).get("final") if path.is_file() else None
        results[k] = final.get("fold") if isinstance(final, dict) else None
    return out_of_fold(results)


def _pooled_cell(oof: dict[str, Any] | None) -> str:
    if oof is None:
        return "n/a"
    if oof["pooled"] is None:
        return f"unavailable (fold {', '.join(map(str, oof['missing']))})" if oof["missing"] else "n/a"
    return _pct(oof["pooled"]["miou"])


def _spread_cell(oof: dict[str, Any] | None) -> str:
    if oof is None or not oof["per_fold"]["miou"]:
        return "n/a"
    if len(oof["per_fold"]["miou"]) == 1:
        return _pct(oof["mean"]["miou"])
    return f"{_pct(oof['mean']['miou'])} ± {_pct(oof['std']['miou'])}"


def out_of_fold_lines(oof: dict[str, Any]) -> list[str]:
    """The out-of-fold table: the pooled score beside the mean and spread of the per-fold ones."""
    folds = ", ".join(map(str, oof["folds"]))
    images = "n/a" if oof.get("samples") is None else str(oof["samples"])
    n = len(oof["per_fold"]["miou"])

    def spread(metric: str) -> str:
        if n == 0:
            return "n/a"
        text = f"{_pct(oof['mean'][metric])} ± {_pct(oof['std'][metric])}" if n > 1 else _pct(oof["mean"][metric])
        return f"{text} ({_pct(oof['min'][metric])}-{_pct(oof['max'][metric])})" if n > 1 else text

    lines = [
        f"Out-of-fold estimate ({oof['describes']}; every held-out image predicted once by the fold model that "
        "did not train on it). **Pooled**: one confusion matrix over all the held-out images, scored once; "
        f"**mean ± std (range)**: over the {count(n, 'per-fold score')}, each fold weighing the same.",
        "",
        "| out-of-fold estimate | folds | images | mIoU | fwIoU | pixel acc. |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    pooled = oof.get("pooled")
    if pooled is not None:
        lines.append(f"| **pooled** | {folds} | {images} | {_pct(pooled['miou'])} | {_pct(pooled['fwiou'])} | "
                     f"{_pct(pooled['pixel_accuracy'])} |")  # fmt: skip
    else:
        lines.append(f"| pooled: unavailable ({oof['unavailable']}) | {folds} | {images} | n/a | n/a | n/a |")
    spreads = f"{spread('miou')} | {spread('fwiou')}"
    lines.append(f"| mean ± std (range) of the folds | {folds} | {images} | {spreads} | n/a |")
    return lines


def _evaluation_lines(experiment: Experiment) -> list[str]:
    lines = ["## Evaluation", ""]
    if not experiment.evaluations:
        return [*lines, "No evaluation result (tools/evaluate.py's metrics.json) found in the experiment.", ""]
    lines += [
        "The same model scores differently at another input size or with other test-time settings: "
        "compare rows of the same settings. mIoU in percent.",
        "",
        "| result | model | split | images | input size | mode | flip | scales | mIoU | fwIoU | pixel acc. |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
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
            f"{r.get('samples', 'n/a')} | {size} | "
            f"{mode} | {'yes' if tta.get('flip') else 'no'} | {scales} | {_pct(r['miou'])} | "
            f"{_pct(r.get('fwiou'))} | {_pct(r.get('pixel_accuracy'))} |"
        )
    return [*lines, ""]


def final_columns(experiment: Experiment) -> list[tuple[str, dict[str, float]]]:
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


def _final_lines(experiment: Experiment, figures: dict[str, str]) -> list[str]:
    lines = ["## Final model: per-class IoU", ""]
    columns = final_columns(experiment)
    if not columns:
        return [*lines, "No per-class IoU yet (no evaluation, reduction or fold evaluation).", ""]
    lines += [f"| class | {' | '.join(name for name, _ in columns)} |", f"| --- |{' --- |' * len(columns)}"]
    for name in class_order([iou for _, iou in columns]):
        lines.append(f"| {name} | {' | '.join(_pct(iou.get(name)) for _, iou in columns)} |")
    means = [_pct(_nanmean(list(iou.values()))) for _, iou in columns]
    lines.append(f"| **mean** | {' | '.join(means)} |")
    lines.append("")
    if "final" in figures:
        lines += [f"![final per-class IoU]({figures['final']})", ""]
    return lines


def count(number: int, noun: str) -> str:
    """``1 image``, ``2 images``, ``0 images``: for every line a person reads."""
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def _pct(value: float | None) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.2f}"


def _nanmean(values: list[float]) -> float | None:
    kept = [v for v in values if v is not None and not math.isnan(v)]
    return sum(kept) / len(kept) if kept else None


def class_order(ious: list[dict[str, float]]) -> list[str]:
    """Cityscapes' trainId order, then any other class names in the order they come."""
    names = [n for n in CLASS_NAMES if any(n in iou for iou in ious)]
    for iou in ious:
        names += [n for n in iou if n not in names]
    return names
