"""wandb logging from the main process: offline unless an API key is configured.

Runs are grouped by experiment (``group``), typed by stage and fold (``job_type``), named
``{experiment}-s{stage}-f{fold}`` and identified by that name and the fold's experiment key
(seg/identity.py), kept in the fold's states: a resumed or requeued fold continues its run,
another run of the fold (another config, or ``--resume none``) gets its own. Everything
logged here also lands in ``metrics.jsonl``: nothing depends on wandb being reachable;
``wandb sync runs/<experiment>/**/wandb/offline-run-*`` uploads later.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from seg.cityscapes import CLASS_NAMES
from seg.plots import confusion_figure

MODES = ("auto", "online", "offline", "disabled")


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
    def __init__(
        self,
        config: dict[str, Any],
        run_dir: Path,
        stage: int,
        fold: int,
        main_process: bool,
        key: str | None = None,
    ) -> None:
        """``key``: the run's id within the experiment (the fold's run keeps it in its states:
        one wandb run per fold's run, continued by every resume)."""
        # experiment, stage and fold as top-level fields, so the wandb UI can group and filter
        # runs by them across experiments (the nested config keeps every key as well)
        config = {"experiment": config["train"]["experiment"], "stage": stage, "fold": fold, **config}
        job, name = f"stage{stage}-fold{fold}", f"s{stage}-f{fold}"
        self.run = start_run(config, run_dir, job, name, key) if main_process else None

    def log(self, record: dict[str, Any], step: int) -> None:
        if self.run is not None:
            self.run.log(record, step=step)

    def log_evaluation(
        self, prefix: str, result: dict[str, Any], matrix: torch.Tensor, examples: list[dict], step: int
    ) -> None:
        if self.run is None:
            return
        import wandb

        table = wandb.Table(columns=["class", "iou"], data=[[k, v] for k, v in result["iou"].items()])
        record = {
            f"{prefix}/miou": result["miou"],
            f"{prefix}/per_class_iou": table,
            f"{prefix}/confusion": wandb.Image(confusion_figure(matrix.cpu().numpy())),
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


def log_reduction(config: dict[str, Any], stage: int, report: dict[str, Any], out_dir: Path, plot: Path) -> None:
    """A summary run of a stage's fold reduction (main process), in the experiment's group:
    the candidates as a table, the winner as summary fields, the reduction plot as an image.

    Named and identified ``{experiment}-s{stage}-reduce``, so a repeated reduction continues
    its run; nothing is written when the mode is ``disabled``.
    """
    config = {"experiment": config["train"]["experiment"], "stage": stage, "fold": "reduced", **config}
    run = start_run(config, out_dir, f"stage{stage}-reduce", f"s{stage}-reduce")
    if run is None:
        return
    import wandb

    columns = ["name", "folds", "recalibrated", "kind", "forward_passes", "miou", "fwiou", "pixel_accuracy"]
    rows = [
        [c["name"], ", ".join(map(str, c["folds"])), c["recalibrated"], c.get("kind", ""), c.get("cost", 1),
         c["miou"], c["fwiou"], c["pixel_accuracy"]]
        for c in report["candidates"]
    ]  # fmt: skip
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
    run.summary.update(summary)
    run.finish()


def _resize_mask(mask: torch.Tensor, image: torch.Tensor) -> np.ndarray:
    """A label-sized mask brought to the (possibly resized) image's size, nearest."""
    size = image.shape[1:]
    if tuple(mask.shape) != tuple(size):
        mask = torch.nn.functional.interpolate(mask[None, None].float(), size=size, mode="nearest")[0, 0].long()
    return mask.numpy().astype(np.uint8)
