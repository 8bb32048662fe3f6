"""Compare experiments fold by fold: paired statistics over the cross-validation folds.

Reads only what the runs leave on disk, for one stage of each experiment:
``stage{s}/fold{k}/summary.json`` (finished or not, best step, final evaluation),
``metrics.jsonl`` (the evaluation at the best step), ``config.yaml`` (``model.json``'s
config when it is missing: the shards it trained on), the shards' ``manifest.json`` that
the config names, ``stage{s}/reduced/report.json`` and tools/evaluate.py's ``metrics.json``
of the reduced model. The first experiment is the baseline; every other one is paired with
it fold by fold, and refused when the pair is not comparable (other shards, another fold
assignment or selection set, a fold on one side only).

The statistics are computed here, exactly, with the standard library: Student's t through
the regularized incomplete beta function (a continued fraction), its quantile by bisection,
and the Wilcoxon signed-rank test's exact null distribution by counting sign assignments
(a subset-sum count over the doubled ranks, so tied ranks are exact too). The test suite
checks them against scipy.stats, which is not a runtime dependency.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from seg.analysis.report import ReportError, out_of_fold, read_json, read_metrics
from seg.core import runs
from seg.core.atomic import atomic_directory
from seg.core.cityscapes import CLASS_NAMES
from seg.data.manifest import MANIFEST, SELECTION_GROUP, ManifestError, fold_group, load_manifest, location
from seg.data.remote import is_remote
from seg.recipe.identity import NOT_IDENTITY, differences, stage_identity
from seg.results.plots import pyplot, save

CONFIDENCE = 0.95


class CompareError(ValueError):
    """A file that cannot be read or is malformed, or a request that cannot be met: the
    message names the file or the experiments and says why."""


class NotComparableError(CompareError):
    """Two experiments whose folds cannot be paired: different data, fold assignment or
    selection set, or a fold on one side only."""


# --- statistics -------------------------------------------------------------------------------


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b), by its continued fraction
    (modified Lentz), on the side of x where it converges fast."""
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"x = {x} is outside [0, 1]")
    if x == 0.0 or x == 1.0:
        return x
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1) / (a + b + 2):
        return math.exp(log_front) * _beta_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_fraction(b, a, 1.0 - x) / b


def _beta_fraction(a: float, b: float, x: float) -> float:
    tiny, eps = 1e-300, 1e-16
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            return h
    raise ArithmeticError(f"the incomplete beta fraction did not converge (a={a}, b={b}, x={x})")


def t_two_sided_p(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t with ``df`` degrees of freedom: I_{df/(df+t^2)}(df/2, 1/2)."""
    if math.isnan(t):
        return math.nan
    if math.isinf(t):
        return 0.0
    return betainc(df / 2, 0.5, df / (df + t * t))


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom."""
    tail = 0.5 * t_two_sided_p(t, df)
    return 1.0 - tail if t > 0 else tail


def t_ppf(q: float, df: float) -> float:
    """The quantile: the t with P(T <= t) = q (bisection on the tail, to the last bit)."""
    if not 0.0 < q < 1.0:
        raise ValueError(f"q = {q} is outside (0, 1)")
    if q == 0.5:
        return 0.0
    tail = min(q, 1.0 - q)  # solve P(T >= t) = tail for t > 0, without cancellation
    low, high = 0.0, 1.0
    while 0.5 * t_two_sided_p(high, df) > tail:
        low, high = high, 2 * high
    while True:
        middle = 0.5 * (low + high)
        if middle in (low, high):
            break
        if 0.5 * t_two_sided_p(middle, df) > tail:
            low = middle
        else:
            high = middle
    return high if q > 0.5 else -high


def t_interval(values: list[float] | np.ndarray, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The ``confidence`` t-interval of the mean of ``values`` (NaN with fewer than two)."""
    values = np.asarray(values, dtype=float)
    n = len(values)
    if n < 2:
        return math.nan, math.nan
    mean, sem = float(values.mean()), float(values.std(ddof=1)) / math.sqrt(n)
    half = t_ppf(0.5 + confidence / 2, n - 1) * sem
    return mean - half, mean + half


def paired_t_test(candidate: list[float] | np.ndarray, baseline: list[float] | np.ndarray) -> tuple[float, float]:
    """(t, two-sided p) of the paired t-test of candidate - baseline against 0, as
    scipy.stats.ttest_rel: t is +-inf and p 0 when the differences are equal and non-zero,
    both NaN when they are all zero or there are fewer than two."""
    d = np.asarray(candidate, dtype=float) - np.asarray(baseline, dtype=float)
    n = len(d)
    if n < 2:
        return math.nan, math.nan
    mean, sd = float(d.mean()), float(d.std(ddof=1))
    if sd == 0.0:
        return (math.nan, math.nan) if mean == 0.0 else (math.copysign(math.inf, mean), 0.0)
    t = mean / (sd / math.sqrt(n))
    return t, t_two_sided_p(t, n - 1)


def wilcoxon_signed_rank(differences: list[float] | np.ndarray) -> tuple[float, float, int]:
    """(statistic, exact two-sided p, pairs used) of the Wilcoxon signed-rank test.

    As scipy.stats.wilcoxon's default: zero differences are dropped, tied absolute values
    share their mean rank, the statistic is min(W+, W-). The p-value is exact for any n,
    ties included: the null distribution of W+ counts the 2^n sign assignments by subset
    sums of the doubled ranks (integers, also for mean ranks), and p = min(1, 2 * the
    smaller tail). NaN when no difference is non-zero.
    """
    d = np.asarray(differences, dtype=float)
    d = d[d != 0.0]
    n = len(d)
    if n == 0:
        return math.nan, math.nan, 0
    doubled = _doubled_ranks(np.abs(d))
    w_plus2 = int(doubled[d > 0].sum())
    total2 = int(doubled.sum())
    counts = [0] * (total2 + 1)  # counts[s]: sign assignments whose doubled W+ is s
    counts[0] = 1
    for r in doubled.tolist():
        for s in range(total2, r - 1, -1):
            counts[s] += counts[s - r]
    below = sum(counts[: w_plus2 + 1])
    above = sum(counts[w_plus2:])
    p = min(1.0, 2 * min(below, above) / 2**n)
    return min(w_plus2, total2 - w_plus2) / 2, p, n


def _doubled_ranks(values: np.ndarray) -> np.ndarray:
    """Twice the ranks of ``values`` (1-based, ties sharing their mean rank): integers."""
    order = np.argsort(values, kind="stable")
    doubled = np.empty(len(values), dtype=np.int64)
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[order[j + 1]] == values[order[i]]:
            j += 1
        doubled[order[i : j + 1]] = (i + 1) + (j + 1)  # 2 * mean of ranks i+1 .. j+1
        i = j + 1
    return doubled


def smallest_wilcoxon_p(n: int) -> float:
    """The smallest two-sided p the exact signed-rank test can give with ``n`` pairs: 2 / 2^n."""
    return min(1.0, 2.0 / 2**n) if n > 0 else math.nan


def describe(values: list[float]) -> dict[str, Any]:
    """n, mean, standard deviation (n-1) and the 95% t-interval of the mean."""
    array = np.asarray(values, dtype=float)
    n = len(array)
    low, high = t_interval(array)
    return {
        "n": n,
        "mean": float(array.mean()) if n else math.nan,
        "std": float(array.std(ddof=1)) if n > 1 else math.nan,
        "ci": [low, high],
    }


# --- reading the runs -------------------------------------------------------------------------


@dataclass
class Fold:
    fold: int
    path: Path
    status: str  # done, stopped early, in progress, preempted
    config: dict[str, Any] | None
    final: dict[str, Any] | None = None  # {"miou", "fwiou", "iou", "step"} on the held-out fold
    best: dict[str, Any] | None = None  # the same at the best step (chosen by the fold's own mIoU)
    identity: dict[str, Any] | None = None  # summary.json's identity (seg/recipe/identity.py), if recorded

    @property
    def finished(self) -> bool:
        return self.status in ("done", "stopped early")


@dataclass
class Data:
    """The shards an experiment's stage trained on, as far as they can be identified."""

    shards: str  # as the config names it
    manifest_path: Path | str | None  # where its manifest.json was found (a URL for remote shards; None: not found)
    manifest: dict[str, Any] | None
    digest: str | None  # sha256 of the manifest without source.root (see data_identity)


@dataclass
class Experiment:
    path: Path
    label: str
    stage: int
    folds: dict[int, Fold]
    data: Data | None  # None when no fold has a config
    reduction: dict[str, Any] | None  # reduced/report.json
    evaluations: list[tuple[str, dict[str, Any]]]  # (label, metrics.json) of the reduced model
    notes: list[str] = field(default_factory=list)

    def finished(self) -> dict[int, Fold]:
        return {k: f for k, f in self.folds.items() if f.finished}

    def setup(self) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        """(the stage's identity, seg.recipe.identity.stage_identity of its first finished fold that
        recorded one; the first config there is): what the experiment is."""
        identity = next((f.identity for f in self.finished().values() if f.identity is not None), None)
        config = next((f.config for f in self.folds.values() if f.config is not None), None)
        return stage_identity(identity), config


def stages_of(path: Path) -> list[int]:
    return [stage.number for stage in runs.Experiment(path).stages()]


def load(path: str | Path, stage: int, label: str | None = None) -> Experiment:
    """Stage ``stage`` of the experiment at ``path`` (runs/<experiment>)."""
    path = Path(path)
    if not path.is_dir():
        raise CompareError(f"{path}: not a folder; pass runs/<experiment>")
    run_stage = runs.Experiment(path).stage(stage)
    stage_dir = run_stage.dir
    if not stage_dir.is_dir():
        found = ", ".join(map(str, stages_of(path))) or "none"
        raise CompareError(f"{path}: has no stage{stage}/ (its stages: {found})")
    label = label or path.resolve().name
    folds: dict[int, Fold] = {}
    notes: list[str] = []
    for run_fold in run_stage.folds():
        fold = _load_fold(run_fold)
        folds[fold.fold] = fold
        if not fold.finished:
            notes.append(f"{label}: {stage_dir.name}/{run_fold.dir.name} is {fold.status} (no summary.json); left out")
    if not folds:
        raise CompareError(f"{stage_dir}: no fold*/ folder; nothing to compare")
    reduction = None
    report = run_stage.reduced_report
    if report.is_file():
        reduction = _read_json(report)
        _require(report, reduction, "selection", dict)
        _require(report, reduction, "winner", dict)
        _require(report, reduction, "candidates", list)
    experiment = Experiment(path, label, stage, folds, None, reduction, _evaluations(path, stage), notes)
    experiment.data = _data_of(experiment)
    return experiment


def _load_fold(run_fold: runs.Fold) -> Fold:
    fold_dir, number, config_path = run_fold.dir, run_fold.number, run_fold.config
    sidecar = run_fold.weights("model").with_suffix(".json")  # the final weights' sidecar (seg/model/weights.py)
    config = None
    if config_path.is_file():
        try:
            config = yaml.safe_load(config_path.read_text())
        except (yaml.YAMLError, OSError) as e:
            mark = getattr(e, "problem_mark", None)
            why = f"line {mark.line + 1}: {e.problem}" if mark is not None else str(e)
            raise CompareError(f"{config_path}: not a readable YAML config ({why})") from None
        if not isinstance(config, dict):
            raise CompareError(f"{config_path}: expected a mapping, found {type(config).__name__}")
    elif sidecar.is_file():  # the final weights' sidecar carries the config too
        config = _require(sidecar, _read_json(sidecar), "config", dict)
    summary_path = run_fold.summary
    if not summary_path.is_file():
        status = "preempted" if run_fold.preempted.is_file() else "in progress"
        return Fold(number, fold_dir, status, config)
    summary = _read_json(summary_path)
    best = _require(summary_path, summary, "best", dict)
    best_step = _require(summary_path, best, "step", int, "best.step")
    _require(summary_path, best, "miou", (int, float), "best.miou")
    if config is None:
        raise CompareError(f"{fold_dir}: finished (summary.json) but has neither config.yaml nor model.json")
    records = []
    if run_fold.metrics.is_file():
        try:
            records, _ = read_metrics(run_fold.metrics)
        except ReportError as e:
            raise CompareError(str(e)) from None
    evaluations = [r for r in records if "fold/miou" in r]
    final_result = summary.get("final", {}).get("fold") if isinstance(summary.get("final"), dict) else None
    if final_result is not None:
        final = _result(summary_path, final_result, "final.fold") | {"step": summary.get("steps")}
    elif evaluations:  # a summary without its final evaluation: the last one logged
        final = _record_result(run_fold.metrics, evaluations[-1])
    else:
        raise CompareError(f"{summary_path}: no final.fold evaluation, and metrics.jsonl has none either")
    at_best = [r for r in evaluations if r["step"] == best_step]
    if at_best:
        best_result = _record_result(run_fold.metrics, at_best[-1])
    elif final["step"] == best_step:
        best_result = dict(final)
    else:  # only the mIoU is known at the best step
        best_result = {"miou": float(best["miou"]), "fwiou": math.nan, "iou": {}, "step": best_step}
    status = "stopped early" if summary.get("stopped_early") else "done"
    identity = summary.get("identity") if isinstance(summary.get("identity"), dict) else None
    return Fold(number, fold_dir, status, config, final, best_result, identity)


def _result(path: Path, result: Any, where: str) -> dict[str, Any]:
    """{"miou", "fwiou", "iou"} of an evaluation result, checked."""
    if not isinstance(result, dict):
        raise CompareError(f"{path}: {where} is not an evaluation result (a JSON object)")
    miou = _require(path, result, "miou", (int, float), f"{where}.miou")
    iou = _require(path, result, "iou", dict, f"{where}.iou")
    for name, value in iou.items():
        if not isinstance(value, int | float):
            raise CompareError(f"{path}: {where}.iou.{name} is {value!r}, not a number")
    checked = {"miou": float(miou), "fwiou": float(result.get("fwiou", math.nan)), "iou": iou}
    # the confusion matrix (results since the pooled out-of-fold score) and the image count pass through
    return checked | {k: result[k] for k in ("confusion", "samples") if result.get(k) is not None}


def _record_result(path: Path, record: dict[str, Any]) -> dict[str, Any]:
    result = {"miou": record["fold/miou"], "fwiou": record.get("fold/fwiou", math.nan), "iou": record.get("fold/iou"),
              "confusion": record.get("fold/confusion"), "samples": record.get("fold/samples")}  # fmt: skip
    return _result(path, result, f"the evaluation record at step {record['step']}") | {"step": record["step"]}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return read_json(path)
    except ReportError as e:
        raise CompareError(str(e)) from None


def _require(path: Path, mapping: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str = "") -> Any:
    value = mapping.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        found = "missing" if key not in mapping else f"{value!r}"
        raise CompareError(f"{path}: {where or key} is {found}, expected {names}; rerun what wrote it, or delete it")
    return value


def _evaluations(path: Path, stage: int) -> list[tuple[str, dict[str, Any]]]:
    """tools/evaluate.py's results of this stage's reduced model, on the official val."""
    experiment = runs.Experiment(path)
    reduced, model = experiment.stage(stage).reduced, experiment.stage(stage).reduced_model.resolve()
    found = []
    # tools/evaluate.py writes beside the model by default (reduced/eval-<split>/), listed first; a
    # result elsewhere in the experiment counts when its "model" names this stage's reduced model.
    for metrics in sorted(experiment.evaluations(), key=lambda metrics: metrics.parent.parent != reduced):
        result = _read_json(metrics)
        if result.get("ensemble"):  # an ensemble's evaluation is not the reduced model's
            continue
        in_reduced = metrics.parent.parent == reduced
        named = isinstance(result.get("model"), str) and _same_file(result["model"], model, path)
        if not (in_reduced or named) or result.get("split") != "val":
            continue
        found.append((metrics.parent.relative_to(path).as_posix(), _result(metrics, result, "the result")))
    return found


def _same_file(recorded: str, target: Path, experiment: Path) -> bool:
    candidates = (
        [Path(recorded)] if Path(recorded).is_absolute() else [Path.cwd() / recorded, *_roots(experiment, recorded)]
    )
    return any(c.resolve() == target for c in candidates)


def _roots(experiment: Path, relative: str) -> list[Path]:
    return [root / relative for root in _working_directories(experiment, None)]


def _working_directories(experiment: Path, runs_dir: str | None) -> list[Path]:
    """Where the training may have run from: the experiment folder less ``train.runs_dir``
    and the experiment's name (runs/<experiment> -> the repository root), then its parent's parent."""
    resolved = experiment.resolve()
    roots = []
    if runs_dir and not Path(runs_dir).is_absolute():
        root = resolved.parent
        for _ in Path(runs_dir).parts:
            root = root.parent
        roots.append(root)
    roots.append(resolved.parent.parent)
    return list(dict.fromkeys(roots))


def _data_of(experiment: Experiment) -> Data | None:
    """The shards every fold of the stage trained on (refused if they differ)."""
    named = {k: f.config.get("data", {}).get("shards") for k, f in experiment.folds.items() if f.config}
    if not named:
        return None
    for k, shards in named.items():
        if not isinstance(shards, str):
            raise CompareError(
                f"{runs.Fold(experiment.folds[k].path, k).config}: data.shards is {shards!r}, not a path"
            )
    if len(set(named.values())) > 1:
        listing = ", ".join(f"fold{k}: {s}" for k, s in sorted(named.items()))
        raise NotComparableError(
            f"{experiment.label}: the folds of stage{experiment.stage} trained on different shards ({listing})"
        )
    shards = next(iter(named.values()))
    config = next(f.config for f in experiment.folds.values() if f.config)
    return data_identity(shards, experiment.path, config.get("train", {}).get("runs_dir"))


def data_identity(shards: str, experiment: Path, runs_dir: str | None = None) -> Data:
    """Find the manifest of ``shards`` (as config.yaml names it) and hash it.

    A fold's summary.json does not record which data it trained on; its config.yaml names
    the shards folder (``data.shards``), relative to where the training ran when it is not
    absolute. That is tried from here, then from the experiment folder less ``train.runs_dir``
    and the experiment's name (runs/<experiment> -> the repository root). The manifest lists
    every shard's sha256, sample count and fold/selection group, so a sha256 of it identifies
    the data: the canonical JSON of the manifest without ``source.root`` (the folder the tree
    was packed from, which changes no byte of the shards; packing is deterministic, so two
    packs of one tree with the same options hash the same wherever they were made).
    """
    if is_remote(shards):  # read from where training read it; unreachable now: compared as not found
        try:
            manifest = load_manifest(shards)
        except ManifestError:
            return Data(shards, None, None, None)
        return Data(shards, location(shards, MANIFEST), manifest, manifest_digest(manifest))
    candidates = (
        [Path(shards)]
        if Path(shards).is_absolute()
        else [Path.cwd() / shards, *(root / shards for root in _working_directories(experiment, runs_dir))]
    )
    for directory in candidates:
        path = directory / MANIFEST
        if path.is_file():
            manifest = _read_json(path)
            if not isinstance(manifest.get("groups"), dict) or not isinstance(manifest.get("options"), dict):
                raise CompareError(f"{path}: not a seg manifest (no groups or options)")
            return Data(shards, path, manifest, manifest_digest(manifest))
    return Data(shards, None, None, None)


def manifest_digest(manifest: dict[str, Any]) -> str:
    """sha256 of the manifest's canonical JSON, ``source.root`` left out (see data_identity)."""
    content = dict(manifest)
    if isinstance(content.get("source"), dict):
        content["source"] = {k: v for k, v in content["source"].items() if k != "root"}
    return hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# --- comparability ------------------------------------------------------------------------------


def _group_identity(manifest: dict[str, Any], group: str) -> tuple[Any, ...] | None:
    """Which images a group holds, as far as the manifest says: its cities and image count,
    and in random mode also the seeded draw (mode, seed) that picked them. Not the shards'
    bytes: the same images re-encoded are the same assignment, other data (below)."""
    entry = manifest["groups"].get(group)
    if entry is None:
        return None
    options = manifest["options"]
    draw = (options.get("fold_mode"), options.get("seed")) if options.get("fold_mode") == "random" else None
    return entry.get("samples"), tuple(entry.get("cities", [])), draw


def _describe_group(manifest: dict[str, Any], group: str) -> str:
    entry = manifest["groups"].get(group)
    if entry is None:
        return "none"
    options = manifest["options"]
    draw = f" (random draw, seed {options.get('seed')})" if options.get("fold_mode") == "random" else ""
    return f"{entry.get('samples')} images of {', '.join(entry.get('cities', [])) or '?'}{draw}"


def data_differences(a: Experiment, b: Experiment) -> tuple[list[str], list[str]]:
    """(why the folds of ``b`` cannot be paired with ``a``'s, notes on how it was checked)."""
    if a.data is None or b.data is None:
        missing = a if a.data is None else b
        return [
            f"{missing.label}: no fold of stage{missing.stage} has a config.yaml or model.json naming its shards"
        ], []
    da, db = a.data, b.data
    if da.manifest is None or db.manifest is None:
        lost = ", ".join(f"{e.label} ({e.data.shards})" for e in (a, b) if e.data.manifest is None)
        if da.shards == db.shards:
            return [], [
                f"{a.label} vs {b.label}: manifest.json not found for {lost}; same shards path, content not checked"
            ]
        return [
            f"different shards: {a.label} trained on {da.shards}, {b.label} on {db.shards}, and the manifest of "
            f"{lost} is not there to show they hold the same data"
        ], []
    if da.digest == db.digest:
        return [], []
    ma, mb = da.manifest, db.manifest
    why = []
    folds_a, folds_b = ma["options"].get("folds"), mb["options"].get("folds")
    if folds_a != folds_b:
        why.append(f"different fold assignment: {a.label}'s shards have {folds_a} folds, {b.label}'s {folds_b}")
    else:
        for k in range(int(folds_a or 0)):
            if _group_identity(ma, fold_group(k)) != _group_identity(mb, fold_group(k)):
                why.append(
                    f"different fold assignment: fold {k} holds out {_describe_group(ma, fold_group(k))} in "
                    f"{a.label} ({da.shards}) but {_describe_group(mb, fold_group(k))} in {b.label} ({db.shards})"
                )
                break
    if _group_identity(ma, SELECTION_GROUP) != _group_identity(mb, SELECTION_GROUP):
        why.append(
            f"different selection set: {_describe_group(ma, SELECTION_GROUP)} in {a.label}, "
            f"{_describe_group(mb, SELECTION_GROUP)} in {b.label}"
        )
    if not why:  # the same images in the same groups, other bytes (image format, labels, source)
        keys = sorted(
            {
                f"options.{k}"
                for k in set(ma["options"]) | set(mb["options"])
                if ma["options"].get(k) != mb["options"].get(k)
            }
            | {
                f"groups.{g}"
                for g in set(ma["groups"]) | set(mb["groups"])
                if ma["groups"].get(g) != mb["groups"].get(g)
            }
        )
        why.append(
            f"different shards: manifest hash {da.digest[:12]} ({da.manifest_path}) in {a.label} vs {db.digest[:12]} "
            f"({db.manifest_path}) in {b.label}" + (f", differing in {', '.join(keys)}" if keys else "")
        )
    return why, []


def setup_differences(baseline: Experiment, other: Experiment) -> dict[str, Any]:
    """What makes ``other`` another experiment than ``baseline``: seg.recipe.identity's differences
    of their stages' identities (resolved config, start model, data, global batch), else,
    for folds that recorded none, of their configs less what does not change a run."""
    (ia, ca), (ib, cb) = baseline.setup(), other.setup()
    if ia is not None and ib is not None:
        changes, source = differences(ia, ib, may_differ=()), "the folds' recorded identities (summary.json)"
    elif ca is not None and cb is not None:
        ignored = tuple(f"config.{key}" for key in NOT_IDENTITY)
        changes = differences({"config": ca}, {"config": cb}, may_differ=ignored)
        source = "the folds' configs (no identity recorded)"
    else:
        changes, source = [], "nothing: a side has no config"
    return {"baseline": baseline.label, "candidate": other.label, "from": source, "differences": changes}


def describe_setup(entry: dict[str, Any]) -> str:
    """One line for a person: ``B vs A: config.data.level: 'standard' -> 'none'``."""
    what = "; ".join(entry["differences"]) or "no difference in resolved config, start model or data"
    return f"{entry['candidate']} vs {entry['baseline']} (from {entry['from']}): {what}"


def pair_folds(a: Experiment, b: Experiment, allow_missing: bool) -> tuple[list[int], list[str]]:
    """The folds both experiments finished, and notes on what was left out; a fold folder on
    one side only is refused unless ``allow_missing``."""
    notes = []
    only_a, only_b = sorted(set(a.folds) - set(b.folds)), sorted(set(b.folds) - set(a.folds))
    for side, other, only in ((a, b, only_a), (b, a, only_b)):
        if only:
            missing = (
                f"fold {_list(only)} of {side.label} {'is' if len(only) == 1 else 'are'} missing from {other.label}"
            )
            if not allow_missing:
                raise NotComparableError(
                    f"{missing} ({other.path / f'stage{other.stage}'} has folds {_list(sorted(other.folds))}); "
                    f"pass --allow-missing to compare the common folds"
                )
            notes.append(f"{missing}: left out (--allow-missing)")
    common = sorted(set(a.finished()) & set(b.finished()))
    unfinished = sorted((set(a.folds) & set(b.folds)) - set(common))
    if unfinished:
        notes.append(f"{a.label} vs {b.label}: fold {_list(unfinished)} not finished on both sides; left out")
    if not common:
        raise NotComparableError(f"{a.label} and {b.label} have no fold finished on both sides in stage{a.stage}")
    return common, notes


def _list(numbers: list[int]) -> str:
    return ", ".join(map(str, numbers))


# --- the comparison -----------------------------------------------------------------------------


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
            raise CompareError(f"no stage{{s}}/ folder common to {', '.join(map(str, paths))}")
        stage = max(common)
    labels = _labels(paths)
    experiments = [load(p, stage, label) for p, label in zip(paths, labels, strict=True)]
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


def _labels(paths: list[Path]) -> list[str]:
    names = [p.resolve().name for p in paths]
    if len(set(names)) == len(names):
        return names
    return [str(p) for p in paths]  # two experiments of the same name in different runs folders


def _experiment_entry(e: Experiment, metric: str, use: str, notes: list[str]) -> dict[str, Any]:
    folds = []
    for k, fold in sorted(e.folds.items()):
        entry: dict[str, Any] = {"fold": k, "status": fold.status, "path": str(fold.path)}
        if fold.finished:
            entry |= {
                "final": metric_of(fold.final, metric),
                "best": metric_of(fold.best, metric),
                "final_step": fold.final.get("step"),
                "best_step": fold.best.get("step"),
                "used": use,
                "value": metric_of(fold.final if use == "final" else fold.best, metric),
                "iou": (fold.final if use == "final" else fold.best)["iou"],
            }
        folds.append(entry)
    values = [f["value"] for f in folds if "value" in f and not math.isnan(f["value"])]
    absent = [f["fold"] for f in folds if "value" in f and math.isnan(f["value"])]
    if absent:
        notes.append(
            f"{e.label}: {metric_title(metric)} is not defined on fold {_list(absent)} (class absent); left out"
        )
    entry = {
        "label": e.label,
        "path": str(e.path),
        "shards": e.data.shards if e.data else None,
        "manifest": str(e.data.manifest_path) if e.data and e.data.manifest_path else None,
        "manifest_sha256": e.data.digest if e.data else None,
        "folds": folds,
        "summary": describe(values),
        "out_of_fold": _pooled_entry(e, metric, use),
        "reduced": None,
        "evaluations": [{"label": label, "value": metric_of(r, metric)} for label, r in e.evaluations],
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


def _pooled_entry(e: Experiment, metric: str, use: str) -> dict[str, Any]:
    """The pooled out-of-fold value of the finished folds (``use``: their final or best
    evaluation): one confusion matrix over all their held-out images (seg.analysis.report.out_of_fold);
    None with the folds named when a result carries no matrix."""
    finished = e.finished()
    oof = out_of_fold({k: f.final if use == "final" else f.best for k, f in finished.items()}, use)
    return {
        "folds": oof["folds"],
        "value": metric_of(oof["pooled"], metric) if oof["pooled"] is not None else None,
        "samples": oof["samples"],
        "missing": oof["missing"],
    }


def _pair_entry(
    baseline: Experiment, other: Experiment, folds: list[int], metric: str, use: str, notes: list[str]
) -> dict[str, Any]:
    def result(e: Experiment, k: int) -> dict[str, Any]:
        fold = e.folds[k]
        return fold.final if use == "final" else fold.best

    a = {k: metric_of(result(baseline, k), metric) for k in folds}
    b = {k: metric_of(result(other, k), metric) for k in folds}
    used = [k for k in folds if not (math.isnan(a[k]) or math.isnan(b[k]))]
    if len(used) < len(folds):
        notes.append(f"{other.label} vs {baseline.label}: fold {_list(sorted(set(folds) - set(used)))} left out "
                     f"({metric_title(metric)} not defined on one side)")  # fmt: skip
    d = [b[k] - a[k] for k in used]
    t, p_t = paired_t_test([b[k] for k in used], [a[k] for k in used])
    w, p_w, w_n = wilcoxon_signed_rank(d)
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
        "difference": describe(d),
        "t": t,
        "t_df": len(used) - 1,
        "t_p": p_t,
        "wilcoxon": w,
        "wilcoxon_p": p_w,
        "wilcoxon_n": w_n,
        "wilcoxon_smallest_p": smallest_wilcoxon_p(w_n),
        "better_in": sum(x > 0 for x in d),
        "worse_in": sum(x < 0 for x in d),
        "classes": classes,
        "moved_most": [c["class"] for c in moved[:5]],
    }


# --- writing -----------------------------------------------------------------------------------


def pct(value: float | None, signed: bool = False) -> str:
    """A fraction in percent (2 decimals), n/a for None or NaN."""
    if value is None or math.isnan(value):
        return "n/a"
    return f"{100 * value:+.2f}" if signed else f"{100 * value:.2f}"


def _p(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.4f}" if value >= 1e-4 else f"{value:.1e}"


def _ci(interval: list[float], signed: bool = False) -> str:
    low, high = interval
    return "n/a" if math.isnan(low) else f"[{pct(low, signed)}, {pct(high, signed)}]"


def tables(result: dict[str, Any]) -> list[str]:
    """The per-fold, per-experiment and per-pair tables (markdown): what the tool prints."""
    title, use = result["metric_title"], result["use"]
    experiments, pairs = result["experiments"], result["pairs"]
    by_label = {p["candidate"]: p for p in pairs}
    fold_numbers = sorted({f["fold"] for e in experiments for f in e["folds"]})
    header = ["fold"]
    for e in experiments:
        header += [f"{e['label']} final", f"{e['label']} best"]
    header += [f"{p['candidate']} - {p['baseline']}" for p in pairs]
    lines = [
        f"Held-out fold {title} (%) per fold; **bold**: the one compared ({use}). Best is the fold's highest "
        "evaluation, chosen on that same held-out fold, so it leans optimistic; final is the end of training.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + " --- |" * len(header),
    ]
    for k in fold_numbers:
        row = [str(k)]
        for e in experiments:
            fold = next((f for f in e["folds"] if f["fold"] == k), None)
            if fold is None:
                row += ["missing", "missing"]
            elif "value" not in fold:
                row += [fold["status"], fold["status"]]
            else:
                cells = {which: pct(fold[which]) for which in ("final", "best")}
                cells[use] = f"**{cells[use]}**"
                row += [cells["final"], cells["best"]]
        for p in pairs:
            row.append(pct(p["differences"][p["folds"].index(k)], True) if k in p["folds"] else "n/a")
        lines.append("| " + " | ".join(row) + " |")
    lines += [
        "",
        f"Per experiment: **pooled out-of-fold** {title}: one confusion matrix over every held-out image of its "
        f"finished folds ({use} models), scored once; mean, std and 95% CI: over the per-fold {title}s, each fold "
        "weighing the same.",
        "",
        f"| experiment | folds | pooled out-of-fold {title} | mean {title} | std | 95% CI | reduced winner | "
        f"its selection {title} | val {title} |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for e in experiments:
        s, reduced = e["summary"], e["reduced"]
        val = ", ".join(f"{pct(v['value'])} (`{v['label']}`)" for v in e["evaluations"]) or "n/a"
        chosen = f"{pct(reduced['selection'])} ({reduced['selection_group']})" if reduced else "n/a"
        lines.append(
            f"| {e['label']} | {s['n']} | {_pooled_cell(e.get('out_of_fold'))} | {pct(s['mean'])} | {pct(s['std'])} | "
            f"{_ci(s['ci'])} | "
            f"{reduced['winner'] if reduced else 'not reduced'} | {chosen} | {val} |"
        )
    if pairs:
        lines += [
            "",
            f"| vs {result['baseline']} | folds | mean difference | 95% CI | t (df) | p (paired t) | "
            "W | p (Wilcoxon, exact) | better / worse in |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for label, p in by_label.items():
            d = p["difference"]
            t = "n/a" if math.isnan(p["t"]) else f"{p['t']:.3f} ({p['t_df']})"
            w = "n/a" if math.isnan(p["wilcoxon"]) else f"{p['wilcoxon']:g}"
            lines.append(
                f"| {label} | {_list(p['folds'])} | {pct(d['mean'], True)} | {_ci(d['ci'], True)} | {t} | "
                f"{_p(p['t_p'])} | {w} | {_p(p['wilcoxon_p'])} | {p['better_in']} / {p['worse_in']} |"
            )
    return lines


def _pooled_cell(entry: dict[str, Any] | None) -> str:
    if entry is None:
        return "n/a"
    if entry["value"] is None:
        missing = entry["missing"]
        return f"unavailable (fold {_list(missing)}: no confusion matrix)" if missing else "n/a"
    return pct(entry["value"])


def caveat(result: dict[str, Any]) -> list[str]:
    """What the p-values can mean with this few folds, in plain words."""
    if not result["pairs"]:
        return []
    n = max(len(p["folds"]) for p in result["pairs"])
    smallest = smallest_wilcoxon_p(n)
    return [
        f"**How much to read into this:** there are only {n} paired folds. With {n} pairs the exact two-sided "
        f"Wilcoxon test cannot give a p-value below {_p(smallest)} (all {n} differences of one sign)"
        + (", so it can never reach 0.05" if smallest > 0.05 else "")
        + f". The t-test can, but it assumes the fold differences are normal, which {n} values cannot check, and "
        f"one unusual fold moves it a lot; {_interval_freedom(n)}. The folds also share most of their training data, "
        "so they are not independent replicates: the paired interval understates the spread a new dataset would "
        "show. Read the mean difference beside its interval and the per-fold signs, not a p-value threshold.",
    ]


def _interval_freedom(n: int) -> str:
    """What the t-interval of ``n`` paired folds rests on; with one pair there is none (no spread to measure)."""
    if n < 2:
        return "with one fold per side there is no interval and no t-test at all (one difference has no spread)"
    degrees = f"{n - 1} degree{'s' if n != 2 else ''} of freedom"
    return f"its 95% interval has {degrees} (t = {t_ppf(0.975, n - 1):.2f}, not 1.96)"


def markdown(result: dict[str, Any], figures: dict[str, str]) -> str:
    labels = [e["label"] for e in result["experiments"]]
    lines = [
        f"# Comparison: {' vs '.join(labels)} (stage {result['stage']}, {result['metric_title']})",
        "",
        f"Baseline: **{result['baseline']}**. Each fold's model is scored on its own held-out fold group; "
        f"differences are other - baseline on the same fold, in percentage points; intervals are "
        f"{100 * result['confidence']:.0f}% t-intervals over folds.",
        "",
        "| experiment | path | shards | manifest sha256 |",
        "| --- | --- | --- | --- |",
    ]
    for e in result["experiments"]:
        digest = e["manifest_sha256"][:16] if e["manifest_sha256"] else "manifest not found"
        lines.append(f"| {e['label']} | `{e['path']}` | `{e['shards']}` | `{digest}` |")
    lines.append("")
    lines[4:4] = [*difference_lines(result), ""]  # after the baseline: what the numbers are about
    if result["notes"]:
        lines += ["## Skipped or incomplete", "", *(f"- {n}" for n in result["notes"]), ""]
    lines += ["## Results", "", *tables(result), "", *caveat(result), ""]
    for role, title in (("per_fold", "per fold"), ("differences", "differences")):
        if role in figures:
            lines += [f"![{title}]({figures[role]})", ""]
    for p in result["pairs"]:
        lines += [f"## Per class: {p['candidate']} - {p['baseline']}", ""]
        if not p["classes"]:
            lines += ["No per-class IoU on both sides.", ""]
            continue
        ups = [c for c in sorted(p["classes"], key=lambda c: -c["difference"]) if c["difference"] > 0][:3]
        downs = [c for c in sorted(p["classes"], key=lambda c: c["difference"]) if c["difference"] < 0][:3]
        moved = ", ".join(f"{c['class']} {pct(c['difference'], True)}" for c in ups) or "none"
        fell = ", ".join(f"{c['class']} {pct(c['difference'], True)}" for c in downs) or "none"
        lines += [
            f"Moved most: up {moved}; down {fell} (mean IoU difference over folds, points).",
            "",
            f"| class | folds | {p['baseline']} | {p['candidate']} | difference | 95% CI | up / down |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for c in p["classes"]:
            lines.append(
                f"| {c['class']} | {c['n']} | {pct(c['baseline'])} | {pct(c['candidate'])} | "
                f"{pct(c['difference'], True)} | {_ci(c['ci'], True)} | {c['up']} / {c['down']} |"
            )
        lines.append("")
        role = f"classes:{p['candidate']}"
        if role in figures:
            lines += [f"![per-class differences]({figures[role]})", ""]
    return "\n".join(lines).rstrip("\n") + "\n"


def difference_lines(result: dict[str, Any]) -> list[str]:
    """## What differs: each candidate's differences from the baseline, one bullet each."""
    lines = ["## What differs", ""]
    for entry in result.get("differences", []):
        head = f"- **{entry['candidate']}** vs {entry['baseline']} (from {entry['from']}):"
        if not entry["differences"]:
            lines.append(f"{head} no difference in resolved config, start model or data")
            continue
        lines += [head, *(f"  - `{change.split(': ', 1)[0]}`: {change.split(': ', 1)[1]}" for change in
                          entry["differences"])]  # fmt: skip
    return lines


def default_out(result: dict[str, Any], first: Path) -> Path:
    name = "-vs-".join(re.sub(r"[^A-Za-z0-9_.-]", "-", e["label"]) for e in result["experiments"])
    suffix = "" if result["metric"] == "miou" else "-" + result["metric"].replace(":", "-")
    return first.resolve().parent / "comparisons" / f"{name}-stage{result['stage']}{suffix}"


def write(result: dict[str, Any], out: Path) -> dict[str, str]:
    """compare.md, compare.json and the figures into ``out``, as one folder that appears
    complete or not at all (an earlier comparison there is replaced); returns the figures."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "compare.md").is_file())):
        raise CompareError(f"{out}: exists and is not a comparison folder; choose another --out")
    with atomic_directory(out, overwrite=True) as tmp:
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp's 0700 would hide a comparison meant to be shared
        figures = plot_all(result, tmp)
        (tmp / "compare.md").write_text(markdown(result, figures))
        (tmp / "compare.json").write_text(json.dumps(_jsonable(result), indent=1) + "\n")
    return figures


def _jsonable(value: Any) -> Any:
    """NaN and infinities as null: compare.json is strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


# --- figures -----------------------------------------------------------------------------------


def plot_all(result: dict[str, Any], out: Path) -> dict[str, str]:
    figures = {"per_fold": save(plot_per_fold(result), out / "per_fold.png")}
    if result["pairs"]:
        figures["differences"] = save(plot_differences(result), out / "differences.png")
    for i, p in enumerate(result["pairs"]):
        if p["classes"]:
            name = "per_class.png" if len(result["pairs"]) == 1 else f"per_class_{i + 1}.png"
            figures[f"classes:{p['candidate']}"] = save(plot_classes(p), out / name)
    return figures


def plot_per_fold(result: dict[str, Any]) -> Any:
    plt = pyplot()
    figure, axes = plt.subplots(figsize=(7, 4.5), layout="constrained")
    for i, e in enumerate(result["experiments"]):
        folds = [f for f in e["folds"] if "value" in f and not math.isnan(f["value"])]
        colour = plt.get_cmap("tab10")(i % 10)
        axes.plot([f["fold"] for f in folds], [100 * f["value"] for f in folds], "o-", color=colour, label=e["label"])
        mean = e["summary"]["mean"]
        if not math.isnan(mean):
            axes.axhline(100 * mean, color=colour, ls="--", lw=1, alpha=0.7)
    axes.set_xticks(sorted({f["fold"] for e in result["experiments"] for f in e["folds"]}))
    axes.set(
        xlabel="fold",
        ylabel=f"held-out {result['metric_title']} (%), {result['use']}",
        title=f"stage {result['stage']}: per fold (dashed: mean over folds)",
    )
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    return figure


def plot_differences(result: dict[str, Any]) -> Any:
    plt = pyplot()
    pairs = result["pairs"]
    figure, axes = plt.subplots(figsize=(max(5, 1.8 * len(pairs) + 3), 4.5), layout="constrained")
    for x, p in enumerate(pairs):
        d = np.array(p["differences"]) * 100
        jitter = np.linspace(-0.12, 0.12, len(d)) if len(d) > 1 else np.zeros(len(d))
        axes.scatter(x + jitter, d, color="grey", zorder=3, label="per fold" if x == 0 else None)
        for xi, di, k in zip(x + jitter, d, p["folds"], strict=True):
            axes.annotate(str(k), (xi, di), textcoords="offset points", xytext=(4, 2), fontsize=7)
        mean, (low, high) = p["difference"]["mean"], p["difference"]["ci"]
        if not math.isnan(low):
            axes.errorbar(x + 0.3, 100 * mean, yerr=[[100 * (mean - low)], [100 * (high - mean)]], fmt="o",
                          color="black", capsize=6, label="mean, 95% t-interval" if x == 0 else None)  # fmt: skip
        else:
            axes.plot(x + 0.3, 100 * mean, "o", color="black")
    axes.axhline(0, color="black", lw=0.8)
    axes.set_xlim(-0.6, len(pairs) - 0.3)
    axes.set_xticks(range(len(pairs)), [f"{p['candidate']}\n- {p['baseline']}" for p in pairs])
    axes.set(ylabel=f"{result['metric_title']} difference (points)", title="paired differences over folds")
    axes.grid(axis="y", alpha=0.3)
    axes.legend(fontsize=8)
    return figure


def plot_classes(pair: dict[str, Any]) -> Any:
    """Per class: the mean IoU difference over folds as a bar, each fold's as a dot."""
    plt = pyplot()
    classes = pair["classes"]
    names = [c["class"] for c in classes]
    values = np.array([100 * c["difference"] for c in classes])
    figure, axes = plt.subplots(figsize=(max(7, 0.5 * len(names) + 2), 4.5), layout="constrained")
    axes.bar(names, values, color=["#2f7d32" if v >= 0 else "#c62828" for v in values], label="mean over folds")
    for x, c in enumerate(classes):
        axes.scatter([x] * len(c["differences"]), 100 * np.array(c["differences"]), s=10, color="black", zorder=3,
                     label="one fold" if x == 0 else None)  # fmt: skip
    axes.axhline(0, color="black", lw=0.8)
    axes.tick_params(axis="x", rotation=60)
    for label in axes.get_xticklabels():
        label.set_ha("right")
    axes.set(
        ylabel="IoU difference (points)",
        title=f"per-class IoU: {pair['candidate']} - {pair['baseline']} on the same folds",
    )
    axes.grid(axis="y", alpha=0.3)
    axes.legend(fontsize=8)
    return figure


# --- wandb -------------------------------------------------------------------------------------


def log_to_wandb(result: dict[str, Any], out: Path, figures: dict[str, str], settings: dict[str, Any]) -> str | None:
    """One run (job_type ``compare``) in a group named after the compared experiments, with
    the tables and figures, under ``out/wandb/``; offline unless WANDB_MODE says otherwise or
    an API key is configured (seg.results.tracking's ``auto``). Returns the mode, None if disabled."""
    from seg.results.tracking import resolve_mode

    mode = resolve_mode("auto")
    if mode == "disabled":
        return None
    import wandb

    labels = [e["label"] for e in result["experiments"]]
    group = "compare-" + "-vs-".join(labels)
    suffix = "" if result["metric"] == "miou" else "-" + result["metric"].replace(":", "-")
    name = f"{group}-s{result['stage']}{suffix}"
    run = wandb.init(
        project=settings.get("project") or "seg",
        entity=settings.get("entity"),
        group=re.sub(r"[^A-Za-z0-9_.-]", "-", group),
        job_type="compare",
        name=name,
        id=re.sub(r"[^A-Za-z0-9_.-]", "-", name),
        resume="allow",
        dir=str(out),
        mode=mode,
        config={
            "experiments": labels,
            "paths": [e["path"] for e in result["experiments"]],
            "baseline": result["baseline"],
            "stage": result["stage"],
            "metric": result["metric"],
            "use": result["use"],
            "differences": {d["candidate"]: d["differences"] for d in result.get("differences", [])},
        },
    )
    fold_rows = [
        [e["label"], f["fold"], f["status"], f.get("final"), f.get("best"), f.get("value")]
        for e in result["experiments"]
        for f in e["folds"]
    ]
    experiment_rows = [
        [e["label"], e["summary"]["n"], (e.get("out_of_fold") or {}).get("value"), e["summary"]["mean"],
         e["summary"]["std"], *e["summary"]["ci"], e["reduced"]["selection"] if e["reduced"] else None]
        for e in result["experiments"]
    ]  # fmt: skip
    pair_rows = [
        [p["candidate"], p["baseline"], len(p["folds"]), p["difference"]["mean"], *p["difference"]["ci"], p["t"],
         p["t_p"], p["wilcoxon"], p["wilcoxon_p"]]
        for p in result["pairs"]
    ]  # fmt: skip
    class_rows = [
        [p["candidate"], c["class"], c["n"], c["baseline"], c["candidate"], c["difference"]]
        for p in result["pairs"]
        for c in p["classes"]
    ]
    difference_rows = [
        [d["candidate"], d["baseline"], *change.split(": ", 1)] for d in result.get("differences", [])
        for change in d["differences"]
    ]  # fmt: skip
    record = {
        "compare/differences": wandb.Table(columns=["candidate", "baseline", "key", "change"], data=difference_rows),
        "compare/per_fold": wandb.Table(
            columns=["experiment", "fold", "status", "final", "best", "used"], data=_jsonable(fold_rows)
        ),
        "compare/experiments": wandb.Table(
            columns=[
                "experiment",
                "folds",
                "pooled_out_of_fold",
                "mean",
                "std",
                "ci_low",
                "ci_high",
                "reduced_selection",
            ],
            data=_jsonable(experiment_rows),
        ),
        "compare/pairs": wandb.Table(
            columns=[
                "candidate",
                "baseline",
                "folds",
                "mean_difference",
                "ci_low",
                "ci_high",
                "t",
                "t_p",
                "wilcoxon",
                "wilcoxon_p",
            ],
            data=_jsonable(pair_rows),
        ),
        "compare/classes": wandb.Table(
            columns=["candidate", "class", "folds", "baseline_iou", "candidate_iou", "difference"],
            data=_jsonable(class_rows),
        ),
    }
    for role, file in figures.items():
        record[f"compare/figures/{role.replace(':', '/')}"] = wandb.Image(str(out / file))
    run.log(record)
    for p in result["pairs"]:
        run.summary.update(
            _jsonable(
                {
                    f"{p['candidate']}/mean_difference": p["difference"]["mean"],
                    f"{p['candidate']}/t_p": p["t_p"],
                    f"{p['candidate']}/wilcoxon_p": p["wilcoxon_p"],
                }
            )
        )
    run.finish()
    return mode


def wandb_settings(path: Path, stage: int) -> dict[str, Any]:
    """The baseline's wandb project and entity, from its first fold's config."""
    for fold in runs.Experiment(path).stage(stage).folds():
        if fold.config.is_file():
            config = yaml.safe_load(fold.config.read_text())
            return (config or {}).get("wandb", {}) or {}
    return {}
