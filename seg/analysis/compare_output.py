"""A comparison's outputs (seg/analysis/compare.py's result): the tables the tool prints,
compare.md and compare.json with the figures (seg.results.plots), and a wandb run through
seg.results.tracking."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from seg.analysis.comparability import CompareError, fold_list
from seg.analysis.statistics import smallest_wilcoxon_p, t_quantile
from seg.core import runs
from seg.core.atomic import atomic_directory
from seg.results.plots import comparison_figures
from seg.results.records import read_config
from seg.results.tables import percent
from seg.results.tracking import resolve_mode, start_wandb, wandb_id


def p_value_text(value: float) -> str:
    """A p-value: 4 decimals, small ones in scientific notation, n/a for NaN."""
    return "n/a" if math.isnan(value) else f"{value:.4f}" if value >= 1e-4 else f"{value:.1e}"


def interval_text(interval: list[float], signed: bool = False) -> str:
    """``[low, high]`` in percent, n/a without an interval."""
    low, high = interval
    return "n/a" if math.isnan(low) else f"[{percent(low, signed)}, {percent(high, signed)}]"


def comparison_tables(result: dict[str, Any]) -> list[str]:
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
                cells = {which: percent(fold[which]) for which in ("final", "best")}
                cells[use] = f"**{cells[use]}**"
                row += [cells["final"], cells["best"]]
        for p in pairs:
            row.append(percent(p["differences"][p["folds"].index(k)], True) if k in p["folds"] else "n/a")
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
        val = ", ".join(f"{percent(v['value'])} (`{v['label']}`)" for v in e["evaluations"]) or "n/a"
        chosen = f"{percent(reduced['selection'])} ({reduced['selection_group']})" if reduced else "n/a"
        lines.append(
            f"| {e['label']} | {s['n']} | {_pooled_cell(e.get('out_of_fold'))} | {percent(s['mean'])} | "
            f"{percent(s['std'])} | "
            f"{interval_text(s['ci'])} | "
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
                f"| {label} | {fold_list(p['folds'])} | {percent(d['mean'], True)} | {interval_text(d['ci'], True)} | "
                f"{t} | {p_value_text(p['t_p'])} | {w} | {p_value_text(p['wilcoxon_p'])} | "
                f"{p['better_in']} / {p['worse_in']} |"
            )
    return lines


def _pooled_cell(entry: dict[str, Any] | None) -> str:
    if entry is None:
        return "n/a"
    if entry["value"] is None:
        missing = entry["missing"]
        return f"unavailable (fold {fold_list(missing)}: no confusion matrix)" if missing else "n/a"
    return percent(entry["value"])


def caveat(result: dict[str, Any]) -> list[str]:
    """What the p-values can mean with this few folds, in plain words."""
    if not result["pairs"]:
        return []
    n = max(len(p["folds"]) for p in result["pairs"])
    smallest = smallest_wilcoxon_p(n)
    return [
        f"**How much to read into this:** there are only {n} paired folds. With {n} pairs the exact two-sided "
        f"Wilcoxon test cannot give a p-value below {p_value_text(smallest)} (all {n} differences of one sign)"
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
    return f"its 95% interval has {degrees} (t = {t_quantile(0.975, n - 1):.2f}, not 1.96)"


def comparison_markdown(result: dict[str, Any], figures: dict[str, str]) -> str:
    """compare.md: what differs, the tables, the caveat, the figures, the per-class differences."""
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
    lines += ["## Results", "", *comparison_tables(result), "", *caveat(result), ""]
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
        moved = ", ".join(f"{c['class']} {percent(c['difference'], True)}" for c in ups) or "none"
        fell = ", ".join(f"{c['class']} {percent(c['difference'], True)}" for c in downs) or "none"
        lines += [
            f"Moved most: up {moved}; down {fell} (mean IoU difference over folds, points).",
            "",
            f"| class | folds | {p['baseline']} | {p['candidate']} | difference | 95% CI | up / down |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for c in p["classes"]:
            lines.append(
                f"| {c['class']} | {c['n']} | {percent(c['baseline'])} | {percent(c['candidate'])} | "
                f"{percent(c['difference'], True)} | {interval_text(c['ci'], True)} | {c['up']} / {c['down']} |"
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
    name = "-vs-".join(wandb_id(e["label"]) for e in result["experiments"])
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
        figures = comparison_figures(result, tmp)
        (tmp / "compare.md").write_text(comparison_markdown(result, figures))
        (tmp / "compare.json").write_text(json.dumps(strict_json(result), indent=1) + "\n")
    return figures


def strict_json(value: Any) -> Any:
    """NaN and infinities as null: compare.json is strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [strict_json(v) for v in value]
    return value


# --- wandb -------------------------------------------------------------------------------------


def log_to_wandb(result: dict[str, Any], out: Path, figures: dict[str, str], settings: dict[str, Any]) -> str | None:
    """One run (job_type ``compare``) in a group named after the compared experiments, with
    the tables and figures, under ``out/wandb/``; offline unless WANDB_MODE says otherwise or
    an API key is configured (seg.results.tracking's ``auto``). Returns the mode, None if disabled."""
    labels = [e["label"] for e in result["experiments"]]
    group = "compare-" + "-vs-".join(labels)
    suffix = "" if result["metric"] == "miou" else "-" + result["metric"].replace(":", "-")
    name = f"{group}-s{result['stage']}{suffix}"
    config = {
        "experiments": labels,
        "paths": [e["path"] for e in result["experiments"]],
        "baseline": result["baseline"],
        "stage": result["stage"],
        "metric": result["metric"],
        "use": result["use"],
        "differences": {d["candidate"]: d["differences"] for d in result.get("differences", [])},
    }
    mode = resolve_mode("auto")
    settings = {"project": settings.get("project"), "entity": settings.get("entity"), "mode": mode}
    run = start_wandb(settings, out, wandb_id(group), "compare", name, name, config)
    if run is None:
        return None
    import wandb

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
            columns=["experiment", "fold", "status", "final", "best", "used"], data=strict_json(fold_rows)
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
            data=strict_json(experiment_rows),
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
            data=strict_json(pair_rows),
        ),
        "compare/classes": wandb.Table(
            columns=["candidate", "class", "folds", "baseline_iou", "candidate_iou", "difference"],
            data=strict_json(class_rows),
        ),
    }
    for role, file in figures.items():
        record[f"compare/figures/{role.replace(':', '/')}"] = wandb.Image(str(out / file))
    run.log(record)
    for p in result["pairs"]:
        run.summary.update(
            strict_json(
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
            return read_config(fold.config).get("wandb", {}) or {}
    return {}
