"""Fold folders written as seg/train.py, tools/pack_cityscapes.py, the reducer and
tools/evaluate.py write them: what tests/test_compare.py compares."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import yaml

from seg.core.cityscapes import CLASS_NAMES

CITIES = ["aachen", "bochum", "bremen", "cologne", "darmstadt", "dusseldorf", "erfurt", "hamburg", "hanover", "jena"]


def manifest(folds: int = 5, selection: tuple[str, ...] = ("ulm",), image_format: str = "png", root: str = "/data/cs"):
    """A manifest.json in seg/data/pack.py's layout: per group its cities, samples, histogram, shards."""

    def group(name: str, split: str, cities: list[str], samples: int, fold: int | None = None) -> dict:
        digest = hashlib.sha256(f"{name}{cities}{samples}{image_format}".encode()).hexdigest()
        entry = {"split": split, "cities": cities, "samples": samples, "class_pixels": [1000] * 19,
                 "ignore_pixels": 50, "shards": [{"name": f"{name}-000000.tar", "samples": samples,
                                                  "bytes": 4096 * samples, "sha256": digest}]}  # fmt: skip
        return entry | ({"fold": fold} if fold is not None else {})

    groups = {
        f"train-fold{k}": group(f"train-fold{k}", "train", CITIES[2 * k : 2 * k + 2], 10 + k, k) for k in range(folds)
    }
    if selection:
        groups["train-selection"] = group("train-selection", "train", list(selection), 4)
    groups["val"] = group("val", "val", ["frankfurt"], 6)
    return {
        "format": "seg.cityscapes-shards",
        "format_version": 1,
        "source": {"root": root, "labels": {"labelIds": 70}},
        "options": {"folds": folds, "fold_mode": "city", "seed": 0, "selection_cities": list(selection),
                    "selection_fraction": 0.0, "splits": ["train", "val"], "shard_size": 268435456,
                    "image_format": image_format, "jpeg_quality": 95 if image_format == "jpg" else None},
        "classes": {"names": list(CLASS_NAMES), "ignore_index": 255},
        "counts": {"train": sum(g["samples"] for g in groups.values() if g["split"] == "train"), "val": 6,
                   "folds": [10 + k for k in range(folds)], "selection": 4 if selection else 0},
        "groups": groups,
    }  # fmt: skip


def write_shards(path: Path, content: dict) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "manifest.json").write_text(json.dumps(content, indent=1) + "\n")
    return path


def per_class(miou: float, seed: int) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    values = {name: float(np.clip(miou + rng.normal(0, 0.15), 0, 1)) for name in CLASS_NAMES}
    values["train"] = math.nan  # a class absent from the fold: ConfusionMatrix.compute's NaN
    return values


def result(miou: float, seed: int) -> dict:
    """An evaluation result as ConfusionMatrix.compute writes it, plus samples and skipped."""
    return {"miou": miou, "fwiou": miou + 0.2, "pixel_accuracy": miou + 0.3, "mean_accuracy": miou + 0.1,
            "iou": per_class(miou, seed), "pixels": 16482, "samples": 10, "skipped": 0}  # fmt: skip


def write_fold(runs: Path, experiment: str, fold: int, final: float, best: float, shards: Path,
               stage: int = 1, finished: bool = True) -> Path:  # fmt: skip
    """stage{s}/fold{k}/ as seg/train.py leaves it: config.yaml, metrics.jsonl (log and
    evaluation records), model.json and summary.json (the last two only when finished)."""
    out = runs / experiment / f"stage{stage}" / f"fold{fold}"
    out.mkdir(parents=True)
    config = {
        "data": {"shards": str(shards), "size": [32, 64], "level": "standard"},
        "model": {"depth": 18, "output_stride": 16},
        "train": {"experiment": experiment, "runs_dir": str(runs), "epochs": 2, "seed": 0},
        "wandb": {"project": "seg", "entity": None, "mode": "disabled", "images": 2},
    }
    (out / "config.yaml").write_text(yaml.safe_dump(config))
    seed = 1000 * stage + 10 * fold + sum(map(ord, experiment))
    evaluations = [(3, best, result(best, seed + 1)), (6, final, result(final, seed))]
    records = []
    for step in range(1, 7):
        records.append({"epoch": step / 3, "step": step, "train/ce": 2.0, "train/dice": 0.9, "train/loss": 1.5,
                        "train/lr": 1e-3, "train/images_per_s": 10.0, "train/images_per_s_per_process": 10.0,
                        "train/memory_mb": 700.0})  # fmt: skip
        for at, _, evaluation in evaluations:
            if at == step:
                records.append({"epoch": step / 3, "step": step} | {f"fold/{k}": v for k, v in evaluation.items()})
    (out / "metrics.jsonl").write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
    if not finished:
        return out
    best_step = 3 if best > final else 6
    sidecar = {"config": config, "fold": fold, "stage": stage, "step": 6, "epoch": 2.0,
               "metrics": {"fold": evaluations[1][2]}, "format": "seg-deeplabv3plus"}  # fmt: skip
    (out / "model.json").write_text(json.dumps(sidecar, indent=1) + "\n")
    summary = {"fold": fold, "stage": stage, "steps": 6, "steps_per_epoch": 3, "init_from": None, "processes": 1,
               "machines": [0], "nodes": [], "best": {"miou": max(best, final), "step": best_step},
               "final": {"fold": evaluations[1][2]}, "skipped_samples": 0, "stopped_early": False,
               "seconds": 45.4}  # fmt: skip
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return out


def write_reduction(runs: Path, experiment: str, folds: list[int], miou: float, shards: Path, stage: int = 1) -> None:
    """reduced/report.json as seg/reduction/reduce.py writes it, and tools/evaluate.py's eval-val/metrics.json
    (on ``shards``' val)."""
    stage_dir = runs / experiment / f"stage{stage}"
    reduced = stage_dir / "reduced"
    reduced.mkdir(parents=True)
    candidates = [{"name": f"fold{k}", "folds": [k], "recalibrated": False} | result(miou - 0.01 * (k + 1), k)
                  for k in folds]  # fmt: skip
    candidates.append({"name": "mean+bn", "folds": folds, "recalibrated": True} | result(miou, 99))
    report = {
        "stage_dir": str(stage_dir),
        "selection": {"group": "train-selection", "is_official_val": False, "samples": 4},
        "weights": "best",
        "folds": {str(k): {"fold_miou": 0.5, "path": str(stage_dir / f"fold{k}" / "best.safetensors")} for k in folds},
        "candidates": [{k: v for k, v in c.items() if k not in ("mean_accuracy", "pixels", "samples", "skipped")}
                       for c in candidates],
        "winner": {"name": "mean+bn", "folds": folds, "miou": miou},
    }  # fmt: skip
    (reduced / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (reduced / "eval-val").mkdir()
    evaluation = result(miou - 0.02, 7) | {"expected": 6, "split": "val", "shards": str(shards),
                                           "model": str(reduced / "model.safetensors"),
                                           "tta": {"mode": "whole", "scales": [1.0], "flip": False}}  # fmt: skip
    (reduced / "eval-val" / "metrics.json").write_text(json.dumps(evaluation, indent=1) + "\n")
