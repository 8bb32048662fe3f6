"""Logging from the main process to the tracking backends: wandb (the default) and TensorBoard.

``tracking.backends`` picks them (``[wandb]``, ``[tensorboard]``, both, or ``[]``);
everything logged here also lands in ``metrics.jsonl``, so nothing depends on a backend.

wandb: offline unless an API key is configured. Runs are grouped by experiment (``group``),
typed by stage and fold (``job_type``), named ``{experiment}-s{stage}-f{fold}`` and
identified by that name and the fold's experiment key (seg/recipe/identity.py), kept in the fold's
states: a resumed or requeued fold continues its run, another run of the fold (another
config, or ``--resume none``) gets its own. ``wandb sync runs/<experiment>/**/wandb/offline-run-*``
uploads later.

TensorBoard: the same scalars through accelerate's ``TensorBoardTracker``, as event files in
``tensorboard/`` beside ``wandb/`` (the fold's folder; the stage's for a reduction), so
``tensorboard --logdir runs/<experiment>`` groups them by the folders' names
(``stage{s}/fold{k}/tensorboard``). A resumed fold hides what the stopped run logged after
the resumed step, as ``metrics.jsonl`` drops it (SummaryWriter's ``purge_step``). MLflow is
not offered: mlflow 3 refuses its file store (``MLFLOW_ALLOW_FILE_STORE``) and its
database store needs the full mlflow (SQLAlchemy, alembic, pandas, ...), no lean extra.
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from PIL import Image

from seg.core.cityscapes import CLASS_NAMES
from seg.results.plots import confusion_figure, pyplot

MODES = ("auto", "online", "offline", "disabled")
BACKENDS = ("wandb", "tensorboard")
DEFAULT_BACKENDS = ["wandb"]
TENSORBOARD = "tensorboard"  # the event files' folder, in the folder the run writes to
# backend -> (the module it imports, the install that brings it)
PACKAGES = {"wandb": ("wandb", "pip install wandb"), "tensorboard": ("tensorboard", "pip install -e '.[tensorboard]'")}


def backends_of(config: dict[str, Any]) -> list[str]:
    """The backends a resolved config asks for (a config saved before ``tracking`` existed: wandb)."""
    return list(config.get("tracking", {}).get("backends", DEFAULT_BACKENDS))


def missing_package(backend: str) -> str | None:
    """What to install for ``backend`` when its package is not importable, else None."""
    module, install = PACKAGES[backend]
    return None if importlib.util.find_spec(module) is not None else f"{module} is not installed ({install})"


def resolve_mode(mode: str) -> str:
    """``auto``: WANDB_MODE if set (job scripts set offline), else online when an API key is
    configured (env or ~/.netrc), else offline."""
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    has_key = bool(os.environ.get("WANDB_API_KEY")) or (netrc.is_file() and "api.wandb.ai" in netrc.read_text())
    return "online" if has_key else "offline"


def start_run(
    config: dict[str, Any], run_dir: Path, job_type: str, suffix: str, key: str | None = None
):  # -> wandb Run | None
    """A run in the experiment's group, named ``{experiment}-{suffix}`` and identified
    ``{experiment}-{key or suffix}`` (so a resumed job continues its run), or None when wandb
    is disabled."""
    settings = config["wandb"]
    mode = resolve_mode(settings["mode"])
    if mode == "disabled":
        return None
    import wandb

    experiment = config["train"]["experiment"]
    name = f"{experiment}-{suffix}"
    return wandb.init(
        project=settings["project"],
        entity=settings["entity"],
        group=experiment,
        job_type=job_type,
        name=name,
        id=re.sub(r"[^A-Za-z0-9_.-]", "-", f"{experiment}-{key or suffix}"),
        resume="allow",
        dir=str(run_dir),
        config=config,
        mode=mode,
    )


class Tracker:
    """A fold's logging (main process): a wandb run and/or TensorBoard event files, as
    ``tracking.backends`` asks. ``resume_step``: the step a resumed run continues from (None
    for a new run), so TensorBoard shows what ``metrics.jsonl`` keeps."""

    def __init__(
        self,
        config: dict[str, Any],
        run_dir: Path,
        stage: int,
        fold: int,
        main_process: bool,
        key: str | None = None,
        resume_step: int | None = None,
    ) -> None:
        """``key``: the wandb run's id within the experiment (the fold's run keeps it in its
        states: one wandb run per fold's run, continued by every resume)."""
        backends = backends_of(config) if main_process else []
        # experiment, stage and fold as top-level fields, so the wandb UI can group and filter
        # runs by them across experiments (the nested config keeps every key as well)
        config = {"experiment": config["train"]["experiment"], "stage": stage, "fold": fold, **config}
        job, name = f"stage{stage}-fold{fold}", f"s{stage}-f{fold}"
        self.run = start_run(config, run_dir, job, name, key) if "wandb" in backends else None
        self.board = start_board(config, run_dir, resume_step) if TENSORBOARD in backends else None

    def log(self, record: dict[str, Any], step: int) -> None:
        if self.run is not None:
            self.run.log(record, step=step)
        if self.board is not None:
            self.board.log(record, step=step)

    def log_evaluation(
        self, prefix: str, result: dict[str, Any], matrix: torch.Tensor, examples: list[dict], step: int
    ) -> None:
        if self.run is None and self.board is None:
            return
        confusion = confusion_figure(matrix.cpu().numpy())
        if self.board is not None:
            # per-class IoU as scalars (wandb gets a table); prediction overlays stay wandb's
            self.board.log({f"{prefix}/iou/{name}": value for name, value in result["iou"].items()}, step=step)
            self.board.writer.add_figure(f"{prefix}/confusion", confusion, global_step=step, close=False)
            self.board.writer.flush()
        if self.run is not None:
            self._wandb_evaluation(prefix, result, confusion, examples, step)
        pyplot().close(confusion)

    def _wandb_evaluation(
        self, prefix: str, result: dict[str, Any], confusion, examples: list[dict], step: int
    ) -> None:
        import wandb

        table = wandb.Table(columns=["class", "iou"], data=[[k, v] for k, v in result["iou"].items()])
        record = {
            f"{prefix}/miou": result["miou"],
            f"{prefix}/per_class_iou": table,
            f"{prefix}/confusion": wandb.Image(confusion),
        }
        labels = dict(enumerate(CLASS_NAMES))
        record[f"{prefix}/predictions"] = [
            wandb.Image(
                example["image"].permute(1, 2, 0).numpy(),
                caption=example["key"],
                masks={
                    "prediction": {
                        "mask_data": _resize_mask(example["prediction"], example["image"]),
                        "class_labels": labels,
                    },
                    "ground_truth": {
                        "mask_data": _resize_mask(example["label"], example["image"]),
                        "class_labels": labels | {255: "ignore"},
                    },
                },
            )
            for example in examples
        ]
        self.run.log(record, step=step)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
        if self.board is not None:
            self.board.finish()


def start_board(config: dict[str, Any], run_dir: Path, resume_step: int | None):  # -> TensorBoardTracker
    """accelerate's TensorBoard tracker writing to ``run_dir/tensorboard``. Events the folder
    already holds from a step after ``resume_step`` (every step, for a new run) are purged
    from TensorBoard's view; a new run also records its resolved config as text."""
    from accelerate.tracking import TensorBoardTracker

    purge = 0 if resume_step is None else resume_step + 1
    board = TensorBoardTracker(TENSORBOARD, run_dir, purge_step=purge)
    board.start()  # on the main process of accelerate's state (the caller's Accelerator; a lone process otherwise)
    if resume_step is None:
        board.writer.add_text("config", f"```\n{yaml.safe_dump(config, sort_keys=False)}```", global_step=0)
    return board


def log_reduction(config: dict[str, Any], stage: int, report: dict[str, Any], out_dir: Path, plot: Path) -> None:
    """A stage's fold reduction (main process), to each backend of ``tracking.backends``:
    the candidates as a table, the winner and the out-of-fold scores as summary fields, the
    reduction plot as an image.

    wandb: a summary run in the experiment's group, named and identified
    ``{experiment}-s{stage}-reduce``, so a repeated reduction continues its run; nothing is
    written when the mode is ``disabled``. TensorBoard: ``out_dir/tensorboard``, the summary
    fields at step ``stage`` (a repeated reduction hides the one before).
    """
    backends = backends_of(config)
    if not backends:
        return
    summary = reduction_summary(report)
    columns = ["name", "folds", "recalibrated", "kind", "forward_passes", "miou", "fwiou", "pixel_accuracy"]
    rows = [
        [c["name"], ", ".join(map(str, c["folds"])), c["recalibrated"], c.get("kind", ""), c.get("cost", 1),
         c["miou"], c["fwiou"], c["pixel_accuracy"]]
        for c in report["candidates"]
    ]  # fmt: skip
    if TENSORBOARD in backends:
        board = start_board(config, out_dir, None)
        board.log(summary, step=stage)  # numbers as scalars, names as text
        table = [f"| {' | '.join(columns)} |", f"|{' --- |' * len(columns)}"]
        table += [f"| {' | '.join(map(str, row))} |" for row in rows]
        board.writer.add_text("reduction/candidates", "\n".join(table), global_step=stage)
        board.writer.add_image("reduction/plot", np.asarray(Image.open(plot).convert("RGB")), stage, dataformats="HWC")
        board.finish()
    if "wandb" in backends:
        _wandb_reduction(config, stage, report, out_dir, plot, summary, columns, rows)


def _wandb_reduction(
    config: dict[str, Any],
    stage: int,
    report: dict[str, Any],
    out_dir: Path,
    plot: Path,
    summary: dict[str, Any],
    columns: list[str],
    rows: list[list[Any]],
) -> None:
    config = {"experiment": config["train"]["experiment"], "stage": stage, "fold": "reduced", **config}
    run = start_run(config, out_dir, f"stage{stage}-reduce", f"s{stage}-reduce")
    if run is None:
        return
    import wandb

    record: dict[str, Any] = {
        "reduction/candidates": wandb.Table(columns=columns, data=rows),
        "reduction/plot": wandb.Image(str(plot)),
    }
    oof = report.get("out_of_fold")
    if oof and oof.get("pooled") is not None:
        record["out_of_fold/pooled_per_class_iou"] = wandb.Table(
            columns=["class", "iou"], data=[[k, v] for k, v in oof["pooled"]["iou"].items()]
        )
    run.log(record)
    run.summary.update(summary)
    run.finish()


def reduction_summary(report: dict[str, Any]) -> dict[str, Any]:
    """A reduction's result as flat fields: the winner, what it chose on, the seed of the next
    stage, the ensemble and the out-of-fold scores."""
    winner, selection = report["winner"], report["selection"]
    summary: dict[str, Any] = {
        "winner/name": winner["name"],
        "winner/folds": ", ".join(map(str, winner["folds"])),
        "winner/miou": winner["miou"],
        "selection/group": selection["group"],
        "selection/is_official_val": selection["is_official_val"],
        "selection/samples": selection["samples"],
    }
    seed = report.get("seed")
    if seed:
        summary |= {"seed/name": seed["name"], "seed/folds": ", ".join(map(str, seed["folds"])),
                    "seed/miou": seed["miou"]}  # fmt: skip
    if report.get("ensemble"):
        summary |= {"ensemble/miou": report["ensemble"]["miou"], "ensemble/forward_passes": report["ensemble"]["cost"]}
    oof = report.get("out_of_fold")
    if oof:
        # which number is which: pooled = one confusion matrix over every held-out image of the
        # folds' final models; mean/std = over the per-fold scores
        summary |= {
            "out_of_fold/source": oof["describes"],
            "out_of_fold/folds": ", ".join(map(str, oof["folds"])),
            "out_of_fold/mean_fold_miou": oof["mean"]["miou"],
            "out_of_fold/std_fold_miou": oof["std"]["miou"],
            "out_of_fold/mean_fold_fwiou": oof["mean"]["fwiou"],
        }
        if oof.get("pooled") is not None:
            summary |= {
                "out_of_fold/pooled_miou": oof["pooled"]["miou"],
                "out_of_fold/pooled_fwiou": oof["pooled"]["fwiou"],
                "out_of_fold/pooled_pixel_accuracy": oof["pooled"]["pixel_accuracy"],
            }
        else:
            summary["out_of_fold/pooled_unavailable"] = oof["unavailable"]
    return summary


def _resize_mask(mask: torch.Tensor, image: torch.Tensor) -> np.ndarray:
    """A label-sized mask brought to the (possibly resized) image's size, nearest."""
    size = image.shape[1:]
    if tuple(mask.shape) != tuple(size):
        mask = torch.nn.functional.interpolate(mask[None, None].float(), size=size, mode="nearest")[0, 0].long()
    return mask.numpy().astype(np.uint8)
