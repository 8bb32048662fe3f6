"""The lines a person reads about results: counts and percentages, a reduction's candidate
table and a stage's out-of-fold table, in markdown. The reduction writes them into
``reduced/report.md``, the experiment's report shows the same lines (seg/analysis/report.py)."""

from __future__ import annotations

import math
from typing import Any

from seg.results.records import candidate_cost, candidate_kind


def count(number: int, noun: str) -> str:
    """``1 image``, ``2 images``, ``0 images``: for every line a person reads."""
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def percent(value: float | None, signed: bool = False) -> str:
    """A fraction in percent (2 decimals), n/a for None or NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{100 * value:+.2f}" if signed else f"{100 * value:.2f}"


def reduction_lines(report: dict[str, Any]) -> list[str]:
    """Where a reduction chose, its winner, the model that seeds the next stage, every
    candidate's selection score and inference cost as a markdown table (the winner in bold),
    and the stage's out-of-fold estimate: for reduced/report.md and the experiment's report."""
    selection, winner = report["selection"], report["winner"]
    where = "the official val split" if selection["is_official_val"] else f"the held-out `{selection['group']}` group"
    lines = [
        f"Chosen on {where} ({count(selection['samples'], 'image')}). Winner: **{winner['name']}** "
        f"(folds {', '.join(map(str, winner['folds']))}), mIoU {percent(winner['miou'])}.",
    ]
    seed = report.get("seed")
    if seed is not None:
        lines += [
            "",
            f"`reduced/model.safetensors`, the model the next stage starts from: **{seed['name']}** "
            f"(folds {', '.join(map(str, seed['folds']))}), mIoU {percent(seed['miou'])}. {seed['why']}",
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
            f"{percent(c['miou'])} | {percent(c.get('fwiou'))} | {percent(c.get('pixel_accuracy'))} | {kind} | "
            f"{candidate_cost(c)} |"
        )
    if report.get("out_of_fold"):
        lines += ["", *out_of_fold_lines(report["out_of_fold"])]
    return lines


def out_of_fold_lines(oof: dict[str, Any]) -> list[str]:
    """The out-of-fold table (seg.evaluation.out_of_fold's record): the pooled score beside
    the mean and spread of the per-fold ones."""
    folds = ", ".join(map(str, oof["folds"]))
    images = "n/a" if oof.get("samples") is None else str(oof["samples"])
    n = len(oof["per_fold"]["miou"])

    def spread(metric: str) -> str:
        if n == 0:
            return "n/a"
        mean, std = percent(oof["mean"][metric]), percent(oof["std"][metric])
        text = f"{mean} ± {std}" if n > 1 else mean
        return f"{text} ({percent(oof['min'][metric])}-{percent(oof['max'][metric])})" if n > 1 else text

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
        lines.append(f"| **pooled** | {folds} | {images} | {percent(pooled['miou'])} | {percent(pooled['fwiou'])} | "
                     f"{percent(pooled['pixel_accuracy'])} |")  # fmt: skip
    else:
        lines.append(f"| pooled: unavailable ({oof['unavailable']}) | {folds} | {images} | n/a | n/a | n/a |")
    spreads = f"{spread('miou')} | {spread('fwiou')}"
    lines.append(f"| mean ± std (range) of the folds | {folds} | {images} | {spreads} | n/a |")
    return lines
