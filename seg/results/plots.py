"""Every figure the project draws: an experiment's report, a reduction, an evaluation, and
the confusion matrix logged to wandb. matplotlib runs here on its file-only backend (Agg),
set in :func:`pyplot` and nowhere else; it is imported on the first figure, so a module that
only may draw (training, through seg.results.tracking) does not pay for it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from seg.analysis.report import Experiment, Stage, class_order, count, final_columns
from seg.core.cityscapes import CLASS_NAMES, PALETTE


def pyplot():  # -> the matplotlib.pyplot module, on the file-only backend
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(figure: Any, path: Path) -> str:
    """Write ``figure`` to ``path`` (100 dpi) and close it; returns the file name."""
    figure.savefig(path, dpi=100)
    pyplot().close(figure)
    return path.name


def fold_colour(fold: int) -> Any:
    # One colour per fold number in every figure, so fold k reads the same everywhere.
    return pyplot().get_cmap("tab10")(fold % 10)


# --- an experiment's report (seg/analysis/report.py) ----------------------------------------------------


def report_figures(experiment: Experiment, out: Path) -> dict[str, str]:
    """Draw every figure there is data for into ``out``; returns role -> file name."""
    figures: dict[str, str] = {}
    for stage in experiment.stages:
        if any(f.train for f in stage.folds):
            figures[f"training{stage.stage}"] = save(plot_training(stage), out / f"stage{stage.stage}_training.png")
    evaluated = [s for s in experiment.stages if any(f.evals for f in s.folds)]
    if evaluated:
        figures["fold_miou"] = save(plot_fold_miou(evaluated), out / "fold_miou.png")
        figures["iou_history"] = save(plot_iou_history(evaluated), out / "iou_history.png")
    if evaluated or any(s.reduction for s in experiment.stages):
        figures["by_stage"] = save(plot_by_stage(experiment.stages), out / "miou_by_stage.png")
    reduced = [s for s in experiment.stages if s.reduction is not None]
    if reduced:
        figures["reduction"] = save(plot_reductions(reduced), out / "reduction.png")
    columns = final_columns(experiment)
    if columns:
        figures["final"] = save(plot_final(columns), out / "final_per_class_iou.png")
    return figures


def plot_training(stage: Stage) -> Any:
    plt = pyplot()
    figure, (loss, lr) = plt.subplots(1, 2, figsize=(12, 4), layout="constrained")
    for fold in stage.folds:
        if not fold.train:
            continue
        epochs, colour = [r["epoch"] for r in fold.train], fold_colour(fold.fold)
        # markers: a fold of one log record (a 1-epoch fold) is a point, which a bare line never draws
        loss.plot(epochs, [r["train/loss"] for r in fold.train], "o-", ms=3, color=colour, label=f"fold {fold.fold}")
        if all("train/lr" in r for r in fold.train):
            lr.plot(epochs, [r["train/lr"] for r in fold.train], "o-", ms=3, color=colour, label=f"fold {fold.fold}")
    loss.set(title=f"stage {stage.stage}: training loss", xlabel="epoch", ylabel="loss")
    lr.set(title=f"stage {stage.stage}: learning rate (head)", xlabel="epoch", ylabel="learning rate")
    lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    for axes in (loss, lr):
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    return figure


def plot_fold_miou(stages: list[Stage]) -> Any:
    plt = pyplot()
    figure, panels = plt.subplots(
        1, len(stages), figsize=(max(6, 5 * len(stages)), 4), sharey=True, squeeze=False, layout="constrained"
    )
    for axes, stage in zip(panels[0], stages, strict=True):
        for fold in stage.folds:
            if not fold.evals:
                continue
            colour = fold_colour(fold.fold)
            epochs = [r["epoch"] for r in fold.evals]
            axes.plot(
                epochs, [100 * r["fold/miou"] for r in fold.evals], "o-", ms=3, color=colour, label=f"fold {fold.fold}"
            )
            best = max(fold.evals, key=lambda r: r["fold/miou"])
            axes.plot(best["epoch"], 100 * best["fold/miou"], "*", ms=12, color=colour, mec="black", mew=0.5)
            val = [r for r in fold.evals if "val/miou" in r]
            if val:
                axes.plot(
                    [r["epoch"] for r in val],
                    [100 * r["val/miou"] for r in val],
                    "s--",
                    ms=3,
                    color=colour,
                    label=f"fold {fold.fold} (official val)",
                )
        axes.set(title=f"stage {stage.stage} (star: best)", xlabel="epoch")
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    panels[0][0].set_ylabel("fold-validation mIoU (%)")
    return figure


def plot_iou_history(stages: list[Stage]) -> Any:
    plt = pyplot()
    folds = [s.best_fold() for s in stages]
    names = class_order([r.get("fold/iou", {}) for f in folds for r in f.evals])
    widths = [max(len(f.evals), 3) for f in folds]
    figure, panels = plt.subplots(
        1,
        len(folds),
        figsize=(3 + sum(0.35 * w + 1.5 for w in widths), 6),
        sharey=True,
        squeeze=False,
        layout="constrained",
        gridspec_kw={"width_ratios": widths},
    )
    cmap = plt.get_cmap("viridis").with_extremes(bad="lightgrey")
    image = None
    for axes, fold in zip(panels[0], folds, strict=True):
        matrix = np.array([[r.get("fold/iou", {}).get(n, math.nan) for r in fold.evals] for n in names], dtype=float)
        image = axes.imshow(
            np.ma.masked_invalid(100 * matrix), aspect="auto", cmap=cmap, vmin=0, vmax=100, interpolation="nearest"
        )
        ticks = np.unique(np.linspace(0, len(fold.evals) - 1, min(len(fold.evals), 10)).round().astype(int))
        axes.set_xticks(ticks, [f"{fold.evals[i]['epoch']:.3g}" for i in ticks], fontsize=7)
        axes.set(title=f"stage {fold.stage}, fold {fold.fold} (best)", xlabel="epoch of the evaluation")
    panels[0][0].set_yticks(range(len(names)), names, fontsize=8)
    figure.colorbar(image, ax=panels[0].tolist(), label="fold-validation IoU (%), grey: class absent")
    return figure


def plot_by_stage(stages: list[Stage]) -> Any:
    plt = pyplot()
    groups = []  # per stage: (label, value, colour, legend label, is the reduced winner)
    for stage in stages:
        bars = [
            (f"{100 * f.best[0]:.1f}", 100 * f.best[0], fold_colour(f.fold), f"fold {f.fold} (best, fold val)", False)
            for f in stage.folds
            if f.best is not None
        ]
        if stage.reduction is not None:
            winner = stage.reduction["winner"]
            bars.append(
                (
                    f"{winner['name']}\n{100 * winner['miou']:.1f}",
                    100 * winner["miou"],
                    "white",
                    "reduced winner (selection set)",
                    True,
                )
            )
        groups.append(bars)
    width = 0.8 / max(max(len(g) for g in groups), 2)
    figure, axes = plt.subplots(figsize=(max(7, 0.5 * sum(len(g) for g in groups) + 4), 4.5), layout="constrained")
    labelled: set[str] = set()
    for x, bars in enumerate(groups):
        for slot, (text, value, colour, label, reduced) in enumerate(bars):
            drawn = axes.bar(
                x + width * (slot - (len(bars) - 1) / 2),
                value,
                width,
                color=colour,
                edgecolor="black" if reduced else None,
                hatch="//" if reduced else None,
                label=None if label in labelled else label,
            )
            axes.bar_label(drawn, labels=[text], fontsize=7)
            labelled.add(label)
    axes.set_xticks(range(len(stages)), [f"stage {s.stage}" for s in stages])
    axes.set(ylabel="mIoU (%)", title="best mIoU per fold and stage, and the reduced model")
    axes.margins(y=0.15)
    axes.grid(axis="y", alpha=0.3)
    axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    return figure


def plot_reductions(stages: list[Stage]) -> Any:
    plt = pyplot()
    from matplotlib.patches import Patch

    kinds = {"single fold": "#9aa5b1", "reduction": "#2f6fb0", "winner": "#d9822b"}
    most = max(len(s.reduction["candidates"]) for s in stages)
    figure, panels = plt.subplots(
        len(stages), 1, figsize=(max(7, 0.8 * most + 3), 3.8 * len(stages)), squeeze=False, layout="constrained"
    )
    for axes, stage in zip(panels[:, 0], stages, strict=True):
        report = stage.reduction
        names = [c["name"] for c in report["candidates"]]
        values = [100 * c["miou"] for c in report["candidates"]]
        kind = [
            "winner" if n == report["winner"]["name"] else "single fold" if n.startswith("fold") else "reduction"
            for n in names
        ]
        # an ensemble's label says its cost: forward passes per image
        labels = [c["name"] + (f" ({c['cost']}x)" if c.get("cost", 1) > 1 else "") for c in report["candidates"]]
        bars = axes.bar(labels, values, color=[kinds[k] for k in kind])
        axes.bar_label(bars, fmt="%.2f", fontsize=7)
        # From zero, so that bar heights compare; the value on each bar shows the small gaps.
        axes.set_ylim(0, math.ceil(max(values) * 1.1) + 1)
        selection = report["selection"]
        where = "official val" if selection["is_official_val"] else selection["group"]
        axes.set(
            ylabel="selection mIoU (%)",
            title=f"stage {stage.stage} reduction, chosen on {where} ({count(selection['samples'], 'image')})",
        )
        axes.tick_params(axis="x", rotation=45)
        axes.grid(axis="y", alpha=0.3)
        axes.legend(
            handles=[Patch(color=c, label=k) for k, c in kinds.items()],
            fontsize=8,
            loc="upper left",
            bbox_to_anchor=(1.01, 1),
        )
    return figure


def plot_final(columns: list[tuple[str, dict[str, float]]]) -> Any:
    plt = pyplot()
    names = class_order([iou for _, iou in columns])
    width = 0.8 / len(columns)
    figure, axes = plt.subplots(figsize=(12, 4.5), layout="constrained")
    for i, (label, iou) in enumerate(columns):
        values = [100 * iou.get(n, math.nan) for n in names]
        axes.bar(np.arange(len(names)) - 0.4 + width * (i + 0.5), np.nan_to_num(values), width, label=label)
    axes.set_xticks(range(len(names)), names, rotation=60, ha="right")
    axes.set(ylabel="IoU (%)", title="final model: per-class IoU", ylim=(0, 100))
    axes.grid(axis="y", alpha=0.3)
    axes.legend(fontsize=8)
    return figure


# --- a reduction (seg/reduction/reduce.py) ---------------------------------------------------------------


def reduction_figure(stage: int, stage_dir: Path, report: dict[str, Any], path: Path) -> None:
    """A stage's reduction report as the experiment report draws it: every candidate's
    selection mIoU, the winner marked."""
    save(plot_reductions([Stage(stage, stage_dir, reduction=report)]), path)


# --- an evaluation (tools/evaluate.py) and wandb (seg/results/tracking.py) -----------------------------


def evaluation_figures(result: dict[str, Any], matrix: np.ndarray, out: Path, settings: str) -> None:
    """``per_class_iou.png``, ``confusion.png`` and ``frequency_vs_iou.png`` in ``out``;
    ``settings`` (seg.evaluation.evaluate.describe_settings) goes into the first one's title."""
    plt = pyplot()
    iou = np.array([result["iou"][name] for name in CLASS_NAMES])
    figure, axes = plt.subplots(figsize=(10, 4))
    axes.bar(CLASS_NAMES, np.nan_to_num(100 * iou))
    axes.set_ylabel("IoU (%)")
    axes.set_title(f"per-class IoU, mIoU {100 * result['miou']:.2f}% ({settings})")
    axes.tick_params(axis="x", rotation=90)
    figure.tight_layout()
    save(figure, out / "per_class_iou.png")
    save(confusion_figure(matrix), out / "confusion.png")
    save(frequency_figure(iou, matrix.sum(1) / max(matrix.sum(), 1)), out / "frequency_vs_iou.png")


def frequency_figure(iou: np.ndarray, frequency: np.ndarray) -> object:
    """IoU against each class's share of the labelled pixels (log x), every class named:
    each name goes to the first of a ring of offsets around its point where it overlaps no
    name placed before it (rare classes crowd together at the left), with a thin line back
    to its point when it had to move away."""
    plt = pyplot()
    figure, axes = plt.subplots(figsize=(7, 5.5))
    present = frequency > 0
    x = 100 * np.where(present, frequency, np.nan)
    y = 100 * np.nan_to_num(iou)
    axes.scatter(x, y, s=14)
    axes.set_xscale("log")
    axes.set(xlabel="share of labelled pixels (%), log scale", ylabel="IoU (%)", ylim=(-5, 105))
    if present.any():
        axes.set_xlim(np.nanmin(x) / 3, np.nanmax(x) * 3)
    absent = [CLASS_NAMES[i] for i in range(len(CLASS_NAMES)) if not present[i]]
    axes.set_title("per-class IoU against class frequency" + (f"\nnot in these labels: {', '.join(absent)}" if absent
                   else ""), fontsize=9)  # fmt: skip
    figure.tight_layout()
    renderer = figure.canvas.get_renderer()
    near = [(4, 2), (4, -10), (-4, 2), (-4, -10)]
    ring = ((0, 12), (0, -12), (14, 0), (-14, 0), (12, 12), (12, -12), (-12, 12), (-12, -12))
    rings = [(dx * r, dy * r) for r in range(1, 7) for dx, dy in ring]
    placed: list[object] = []
    for i in sorted(np.flatnonzero(present), key=lambda i: -x[i]):
        chosen, box = near[0], None
        for dx, dy in near + rings:
            trial = axes.annotate(CLASS_NAMES[i], (x[i], y[i]), xytext=(dx, dy), textcoords="offset points",
                                  fontsize=7, ha="left" if dx >= 0 else "right")  # fmt: skip
            extent = trial.get_window_extent(renderer)
            trial.remove()
            inside = figure.bbox.contains(extent.x0, extent.y0) and figure.bbox.contains(extent.x1, extent.y1)
            if inside and not any(extent.overlaps(other) for other in placed):
                chosen, box = (dx, dy), extent
                break
        line = {"arrowprops": {"arrowstyle": "-", "lw": 0.4, "color": "grey"}} if chosen not in near else {}
        text = axes.annotate(CLASS_NAMES[i], (x[i], y[i]), xytext=chosen, textcoords="offset points", fontsize=7,
                             ha="left" if chosen[0] >= 0 else "right", **line)  # fmt: skip
        placed.append(box if box is not None else text.get_window_extent(renderer))
    return figure


def confusion_figure(matrix: np.ndarray):  # -> matplotlib Figure
    """The row-normalised confusion matrix as a figure, saying so: each row (a true class) is
    the share of that class's labelled pixels predicted as each class (its diagonal: recall)."""
    plt = pyplot()
    rows = matrix.sum(1, keepdims=True)
    normalised = np.divide(matrix, rows, out=np.zeros_like(matrix, dtype=float), where=rows > 0)
    figure, axes = plt.subplots(figsize=(8, 7))
    image = axes.imshow(normalised, vmin=0, vmax=1, cmap="Blues")
    axes.set_xticks(range(len(CLASS_NAMES)), CLASS_NAMES, rotation=90, fontsize=7)
    axes.set_yticks(range(len(CLASS_NAMES)), CLASS_NAMES, fontsize=7)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title("confusion matrix, normalised per true class (each row sums to 1)", fontsize=10)
    figure.colorbar(image, label="share of the true class's pixels (row-normalised)")
    figure.tight_layout()
    return figure


# --- a prediction overlay (tools/predict.py --legend) ------------------------------------------


def overlay_with_legend(overlay: np.ndarray, prediction: np.ndarray) -> np.ndarray:
    """(H, W', 3) uint8: the overlay ``overlay`` (H, W, 3) at its own pixels, with a legend of
    the classes ``prediction`` (H, W trainIds) shows, each in its palette colour, beside it on
    the right, largest share first."""
    plt = pyplot()
    from matplotlib.patches import Patch

    height, width = prediction.shape
    counts = np.bincount(prediction.ravel(), minlength=256)[: len(CLASS_NAMES)]
    shown = sorted(np.flatnonzero(counts), key=lambda i: -counts[i])
    dpi = 100
    legend_width = 190  # pixels: the longest class name at 8 points
    figure = plt.figure(figsize=((width + legend_width) / dpi, max(height, 14 * len(shown) + 20) / dpi), dpi=dpi)
    axes = figure.add_axes((0, 1 - height / (figure.get_figheight() * dpi), width / (figure.get_figwidth() * dpi),
                            height / (figure.get_figheight() * dpi)))  # fmt: skip
    axes.imshow(overlay, interpolation="nearest")
    axes.set_axis_off()
    handles = [
        Patch(color=PALETTE[i] / 255, label=f"{CLASS_NAMES[i]} {100 * counts[i] / counts.sum():.0f}%") for i in shown
    ]
    figure.legend(handles=handles, loc="upper right", fontsize=8, frameon=False, borderaxespad=0.3)
    figure.canvas.draw()
    pixels = np.asarray(figure.canvas.buffer_rgba())[..., :3].copy()
    plt.close(figure)
    return pixels
