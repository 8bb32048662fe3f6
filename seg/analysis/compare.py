"""Compare experiments fold by fold: paired statistics over the cross-validation folds.

Reads, through seg.results.records, one stage of each experiment: ``stage{s}/fold{k}/``'s
summary.json (finished or not, best step, final evaluation), metrics.jsonl (the evaluation
at the best step) and config.yaml (``model.json``'s config when it is missing: the shards
it trained on), the shards' ``manifest.json`` that the config names,
``stage{s}/reduced/report.json`` and tools/evaluate.py's ``metrics.json`` of the reduced
model. The first experiment is the baseline; every other one is paired with it fold by
fold, and refused when the pair is not comparable (seg/analysis/comparability.py). The
statistics are scipy.stats' (seg/analysis/statistics.py); compare_output.py writes and
logs the result.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from seg.analysis.comparability import (
    ComparedStage,
    CompareError,
    NotComparableError,
    Shards,
    data_differences,
    fold_list,
    other_shards,
    pair_folds,
    setup_differences,
    shards_identity,
)
from seg.analysis.statistics import (
    CONFIDENCE,
    mean_and_interval,
    paired_t_test,
    smallest_wilcoxon_p,
    t_interval,
    wilcoxon_signed_rank,
)
from seg.core import runs
from seg.core.cityscapes import CLASS_NAMES
from seg.evaluation.evaluate import describe_settings
from seg.evaluation.out_of_fold import out_of_fold
from seg.results.records import FoldRecord, RecordError, checked_result, read_evaluations, read_stage

__all__ = ["CompareError", "NotComparableError", "compare", "read_compared_stage"]


def stages_of(path: Path) -> list[int]:
    return [stage.number for stage in runs.Experiment(path).stages()]


def read_compared_stage(path: str | Path, stage: int, label: str | None = None) -> ComparedStage:
    """Stage ``stage`` of the experiment at ``path`` (runs/<experiment>), every file it needs
    checked: a file that cannot be read is a CompareError naming it."""
    path = Path(path)
    if not path.is_dir():
        raise CompareError(f"{path}: not a folder; pass runs/<experiment>")
    run_stage = runs.Experiment(path).stage(stage)
    if not run_stage.dir.is_dir():
        found = ", ".join(map(str, stages_of(path))) or "none"
        raise CompareError(f"{path}: has no stage{stage}/ (its stages: {found})")
    label = label or path.resolve().name
    try:
        record = read_stage(run_stage)
        notes = []
        for fold in record.folds:
            if fold.finished:
                _check(fold)
            else:
                where = f"{run_stage.dir.name}/{fold.path.name}"
                notes.append(f"{label}: {where} is {fold.status} (no summary.json); left out")
        if not record.folds:
            raise CompareError(f"{run_stage.dir}: no fold*/ folder; nothing to compare")
        compared = ComparedStage(path, label, record, None, [], notes)
        compared.shards = _shards_of(compared)
        compared.evaluations = _evaluations(compared)
    except RecordError as e:
        raise CompareError(str(e)) from None
    return compared


def _check(fold: FoldRecord) -> None:
    """A finished fold's config, final and best evaluations, read now so that a bad file stops the comparison."""
    if fold.config is None:
        raise CompareError(f"{fold.path}: finished (summary.json) but has neither config.yaml nor model.json")
    _ = fold.final_evaluation, fold.best_evaluation  # read and checked (cached for the comparison)


def _evaluations(compared: ComparedStage) -> list[tuple[str, dict[str, Any]]]:
    """tools/evaluate.py's results of this stage's reduced model, on the official val of the pack
    its folds trained on; one on another pack's val (other images: its score sits beside no other)
    is noted and left out."""
    path, stage = compared.path, compared.stage
    experiment = runs.Experiment(path)
    reduced, model = experiment.stage(stage).reduced, experiment.stage(stage).reduced_model.resolve()
    found = []
    # tools/evaluate.py writes beside the model by default (reduced/eval-<split>/), listed first; a
    # result elsewhere in the experiment counts when its "model" names this stage's reduced model.
    for evaluation in sorted(read_evaluations(experiment), key=lambda e: e.path.parent != reduced):
        metrics, result = evaluation.path / "metrics.json", evaluation.result
        if result.get("ensemble"):  # an ensemble's evaluation is not the reduced model's
            continue
        in_reduced = metrics.parent.parent == reduced
        named = isinstance(result.get("model"), str) and _same_file(result["model"], model, path)
        if not (in_reduced or named) or result.get("split") != "val":
            continue
        why = other_shards(result, compared.shards, path) if compared.shards is not None else None
        if why is not None:
            compared.notes.append(
                f"{compared.label}: {evaluation.label} is on other shards ({why}); left out of val mIoU"
            )
            continue
        checked = checked_result(metrics, result, "the result")
        if isinstance(result.get("settings"), dict):  # what the score depends on besides the model and images
            try:
                checked["settings"] = describe_settings(result["settings"])
            except KeyError as e:
                raise CompareError(f"{metrics}: settings has no {e}; rerun tools/evaluate.py to rewrite it") from None
        found.append((evaluation.label, checked))
    return found


def _unlike_evaluations(experiments: list[ComparedStage]) -> list[str]:
    """A note when the experiments' val evaluations share no test-time setting (input size, mode,
    flip, scales): the same model scores differently under each, so their val mIoU set side by
    side would compare the settings as much as the experiments."""
    settings = {e.label: {r["settings"] for _, r in e.evaluations if "settings" in r} for e in experiments}
    evaluated = {label: found for label, found in settings.items() if found}
    if len(evaluated) < 2 or set.intersection(*evaluated.values()):
        return []
    each = "; ".join(f"{label}: {' | '.join(sorted(found))}" for label, found in evaluated.items())
    return [
        f"the val evaluations share no test-time setting ({each}): their val mIoU are not comparable with each "
        "other; evaluate each reduced model the same way (tools/evaluate.py --input-size, --mode, --flip, --scales)"
    ]


def _same_file(recorded: str, target: Path, experiment: Path) -> bool:
    candidates = (
        [Path(recorded)] if Path(recorded).is_absolute() else [Path.cwd() / recorded, *_roots(experiment, recorded)]
    )
    return any(c.resolve() == target for c in candidates)


def _roots(experiment: Path, relative: str) -> list[Path]:
    return [root / relative for root in runs.working_directories(experiment, None)]


def _shards_of(experiment: ComparedStage) -> Shards | None:
    """The shards every fold of the stage trained on (refused if they differ)."""
    named = {k: f.config.get("data", {}).get("shards") for k, f in experiment.folds.items() if f.config}
    if not named:
        return None
    for k, shards in named.items():
        if not isinstance(shards, str):
            raise CompareError(f"{experiment.folds[k].run.config}: data.shards is {shards!r}, not a path")
    if len(set(named.values())) > 1:
        listing = ", ".join(f"fold{k}: {s}" for k, s in sorted(named.items()))
        raise NotComparableError(
            f"{experiment.label}: the folds of stage{experiment.stage} trained on different shards ({listing})"
        )
    shards = next(iter(named.values()))
    config = next(f.config for f in experiment.folds.values() if f.config)
    found = shards_identity(shards, experiment.path, config.get("train", {}).get("runs_dir"))
    found.recorded = _recorded_manifest(experiment)
    return found


def _recorded_manifest(experiment: ComparedStage) -> str | None:
    """The manifest sha256 the finished folds' identities recorded when they trained (None when
    none did; refused when they differ): what they trained on, whatever is at the path now."""
    recorded = {k: f.manifest_sha256 for k, f in experiment.finished().items() if f.manifest_sha256}
    if len(set(recorded.values())) > 1:
        listing = ", ".join(f"fold{k}: {sha[:12]}" for k, sha in sorted(recorded.items()))
        raise NotComparableError(
            f"{experiment.label}: the folds of stage{experiment.stage} trained on different shards "
            f"(manifest sha256 {listing}, recorded in their summary.json)"
        )
    return next(iter(recorded.values()), None)


# --- the comparison -----------------------------------------------------------------------------


def used_evaluation(fold: FoldRecord, use: str) -> dict[str, Any]:
    """A finished fold's evaluation that the comparison uses: its ``final`` or its ``best``."""
    return fold.final_evaluation if use == "final" else fold.best_evaluation


def metric_of(result: dict[str, Any] | None, metric: str) -> float:
    """``miou``, ``fwiou`` or ``class:NAME`` (that class's IoU) of a result; NaN if absent."""
    if result is None:
        return math.nan
    if metric.startswith("class:"):
        return float(result.get("iou", {}).get(metric.removeprefix("class:"), math.nan))
    return float(result.get(metric, math.nan))


def check_metric(metric: str) -> str:
    if metric in ("miou", "fwiou"):
        return metric
    if metric.startswith("class:") and metric.removeprefix("class:") in CLASS_NAMES:
        return metric
    raise CompareError(f"--metric {metric}: use miou, fwiou or class:NAME with NAME one of {', '.join(CLASS_NAMES)}")


def metric_title(metric: str) -> str:
    return {"miou": "mIoU", "fwiou": "fwIoU"}.get(metric, f"IoU of {metric.removeprefix('class:')}")


def compare(
    paths: list[str | Path],
    stage: int | None = None,
    metric: str = "miou",
    use: str = "final",
    allow_missing: bool = False,
) -> dict[str, Any]:
    """Everything the comparison shows, as plain data (what compare.json holds). The first of
    ``paths`` is the baseline. Raises CompareError (NotComparableError for pairs that can't be
    paired) naming the file or the reason."""
    metric = check_metric(metric)
    if use not in ("final", "best"):
        raise CompareError(f"--use {use}: use final or best")
    if len(paths) < 2:
        raise CompareError("give at least two experiments (runs/A runs/B ...); the first is the baseline")
    paths = [Path(p) for p in paths]
    resolved = [p.resolve() for p in paths]
    for i, p in enumerate(resolved):
        if p in resolved[:i]:
            raise CompareError(f"{paths[i]}: given twice")
    for p in paths:
        if not p.is_dir():
            raise CompareError(f"{p}: not a folder; pass runs/<experiment>")
    if stage is None:
        common = set(stages_of(paths[0]))
        for p in paths[1:]:
            common &= set(stages_of(p))
        if not common:
            raise CompareError(
                f"no stage{{s}}/ folder common to {', '.join(map(str, paths))}: pass runs/<experiment> folders "
                f"(those holding stage{{s}}/){_stage_folder_hint(paths)}"
            )
        stage = max(common)
    labels = _labels(paths)
    experiments = [read_compared_stage(p, stage, label) for p, label in zip(paths, labels, strict=True)]
    notes = [note for e in experiments for note in e.notes]
    for e in experiments:
        if not e.finished():
            states = ", ".join(f"fold{k}: {f.status}" for k, f in sorted(e.folds.items()))
            raise CompareError(
                f"{e.path / f'stage{stage}'}: no fold has finished ({states}); compare finished stages (--stage)"
            )

    baseline = experiments[0]
    pairs_of = []
    for other in experiments[1:]:
        why, checked = data_differences(baseline, other)
        if why:
            raise NotComparableError(f"{baseline.label} and {other.label} are not comparable: {'; '.join(why)}")
        notes += checked
        folds, left_out = pair_folds(baseline, other, allow_missing)
        notes += left_out
        pairs_of.append((other, folds))
    reductions = [e.reduction["selection"].get("group") if e.reduction else None for e in experiments]
    if len({r for r in reductions if r is not None}) > 1:
        notes.append(
            "the reduced models were chosen on different sets ("
            + ", ".join(f"{e.label}: {r}" for e, r in zip(experiments, reductions, strict=True) if r)
            + "): their selection scores are not comparable with each other"
        )

    notes += _unlike_evaluations(experiments)

    per_experiment = [_experiment_entry(e, metric, use, notes) for e in experiments]
    pairs = [_pair_entry(baseline, other, folds, metric, use, notes) for other, folds in pairs_of]
    return {
        "stage": stage,
        "metric": metric,
        "metric_title": metric_title(metric),
        "use": use,
        "confidence": CONFIDENCE,
        "baseline": baseline.label,
        # first: what the statistics below are about
        "differences": [setup_differences(baseline, other) for other, _ in pairs_of],
        "experiments": per_experiment,
        "pairs": pairs,
        "notes": notes,
    }


def _stage_folder_hint(paths: list[Path]) -> str:
    """How to name the experiments when stage folders were given instead (runs/A/stage1 -> runs/A --stage 1)."""
    given = [(p, runs.stage_number(p.resolve().name)) for p in paths]
    if not all(number is not None for _, number in given):
        return ""
    stages = {number for _, number in given}
    flag = f" --stage {stages.pop()}" if len(stages) == 1 else ""
    return f", e.g. {' '.join(str(p.parent) for p, _ in given)}{flag}"


def _labels(paths: list[Path]) -> list[str]:
    names = [p.resolve().name for p in paths]
    if len(set(names)) == len(names):
        return names
    return [str(p) for p in paths]  # two experiments of the same name in different runs folders


def _experiment_entry(e: ComparedStage, metric: str, use: str, notes: list[str]) -> dict[str, Any]:
    folds = []
    for k, fold in sorted(e.folds.items()):
        entry: dict[str, Any] = {"fold": k, "status": fold.status, "path": str(fold.path)}
        if fold.finished:
            entry |= {
                "final": metric_of(fold.final_evaluation, metric),
                "best": metric_of(fold.best_evaluation, metric),
                "final_step": fold.final_evaluation.get("step"),
                "best_step": fold.best_evaluation.get("step"),
                "used": use,
                "value": metric_of(used_evaluation(fold, use), metric),
                "iou": used_evaluation(fold, use)["iou"],
            }
        folds.append(entry)
    values = [f["value"] for f in folds if "value" in f and not math.isnan(f["value"])]
    absent = [f["fold"] for f in folds if "value" in f and math.isnan(f["value"])]
    if absent:
        notes.append(
            f"{e.label}: {metric_title(metric)} is not defined on fold {fold_list(absent)} (class absent); left out"
        )
    entry = {
        "label": e.label,
        "path": str(e.path),
        "shards": e.shards.path if e.shards else None,
        "manifest": str(e.shards.manifest_path) if e.shards and e.shards.manifest_path else None,
        "manifest_sha256": e.shards.digest if e.shards else None,
        "recorded_manifest_sha256": e.shards.recorded if e.shards else None,
        "folds": folds,
        "summary": mean_and_interval(values),
        "out_of_fold": _pooled_entry(e, metric, use),
        "reduced": None,
        "evaluations": [
            {"label": label, "value": metric_of(r, metric), "settings": r.get("settings")} for label, r in e.evaluations
        ],
    }
    if e.reduction is not None:
        winner = e.reduction["winner"]
        candidate = next((c for c in e.reduction["candidates"] if c.get("name") == winner.get("name")), winner)
        selection = e.reduction["selection"]
        entry["reduced"] = {
            "winner": winner.get("name"),
            "selection_group": selection.get("group"),
            "selection_samples": selection.get("samples"),
            "selection": metric_of(candidate, metric),
        }
    return entry


def _pooled_entry(e: ComparedStage, metric: str, use: str) -> dict[str, Any]:
    """The pooled out-of-fold value of the finished folds (``use``: their final or best
    evaluation): one confusion matrix over all their held-out images (seg.evaluation.out_of_fold);
    None with the folds named when a result carries no matrix."""
    finished = e.finished()
    oof = out_of_fold({k: used_evaluation(f, use) for k, f in finished.items()}, use)
    return {
        "folds": oof["folds"],
        "value": metric_of(oof["pooled"], metric) if oof["pooled"] is not None else None,
        "samples": oof["samples"],
        "missing": oof["missing"],
    }


def _pair_entry(
    baseline: ComparedStage, other: ComparedStage, folds: list[int], metric: str, use: str, notes: list[str]
) -> dict[str, Any]:
    def result(e: ComparedStage, k: int) -> dict[str, Any]:
        return used_evaluation(e.folds[k], use)

    a = {k: metric_of(result(baseline, k), metric) for k in folds}
    b = {k: metric_of(result(other, k), metric) for k in folds}
    used = [k for k in folds if not (math.isnan(a[k]) or math.isnan(b[k]))]
    if len(used) < len(folds):
        notes.append(f"{other.label} vs {baseline.label}: fold {fold_list(sorted(set(folds) - set(used)))} left out "
                     f"({metric_title(metric)} not defined on one side)")  # fmt: skip
    d = [b[k] - a[k] for k in used]
    t, p_t = paired_t_test([b[k] for k in used], [a[k] for k in used])
    w, p_w, w_n, how = wilcoxon_signed_rank(d)
    if how != "exact":
        notes.append(
            f"{other.label} vs {baseline.label}: {w_n} fold differences with ties: the Wilcoxon p is scipy's "
            "normal approximation, not exact (counting every sign assignment takes too long)"
        )
    classes = []
    names = [n for n in CLASS_NAMES if any(n in result(e, k)["iou"] for e in (baseline, other) for k in used)]
    for name in names:
        rows = [
            (result(baseline, k)["iou"].get(name, math.nan), result(other, k)["iou"].get(name, math.nan)) for k in used
        ]
        rows = [(x, y) for x, y in rows if not (math.isnan(x) or math.isnan(y))]
        if not rows:
            continue
        diffs = [y - x for x, y in rows]
        low, high = t_interval(diffs)
        classes.append({
            "class": name,
            "n": len(rows),
            "baseline": float(np.mean([x for x, _ in rows])),
            "candidate": float(np.mean([y for _, y in rows])),
            "difference": float(np.mean(diffs)),
            "ci": [low, high],
            "differences": diffs,
            "up": sum(x > 0 for x in diffs),
            "down": sum(x < 0 for x in diffs),
        })  # fmt: skip
    moved = sorted(classes, key=lambda c: -abs(c["difference"]))
    return {
        "baseline": baseline.label,
        "candidate": other.label,
        "folds": used,
        "baseline_values": [a[k] for k in used],
        "candidate_values": [b[k] for k in used],
        "differences": d,
        "difference": mean_and_interval(d),
        "t": t,
        "t_df": len(used) - 1,
        "t_p": p_t,
        "wilcoxon": w,
        "wilcoxon_p": p_w,
        "wilcoxon_n": w_n,
        "wilcoxon_method": how,
        "wilcoxon_smallest_p": smallest_wilcoxon_p(w_n),
        "better_in": sum(x > 0 for x in d),
        "worse_in": sum(x < 0 for x in d),
        "classes": classes,
        "moved_most": [c["class"] for c in moved[:5]],
    }
