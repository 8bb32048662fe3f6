"""The whole system on this machine, small: ``./launch demo``.

Makes a synthetic Cityscapes (official layout), packs it into fold-grouped shards, runs the
cross-validation chain (2 stages x 3 folds, 2 processes each through accelerate, each stage
reduced to the model that seeds the next), evaluates the final model on the val split,
writes the report, and prints where everything is and the final mIoU beside chance.

A rerun keeps what is finished (the chain skips complete folds and reductions); delete
runs/demo to start over.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from seg.core.cli import at_least
from seg.cv import REPO, plan, run_local
from seg.data.manifest import ManifestError
from seg.recipe.config import ConfigError

CONFIG = "configs/demo.yaml"
DATA, SHARDS = Path("data/synthetic"), Path("shards/synthetic")


def step(title: str, command: list[str]) -> int:
    """Run one step of the demo; its exit status (the step printed its own error)."""
    started = time.time()
    print(f"\n== {title}\n$ {' '.join(command)}", flush=True)
    if code := subprocess.run(command).returncode:
        print(f"error: the demo's step '{title}' failed (exit {code})", file=sys.stderr)
        return code
    print(f"== {title}: {time.time() - started:.0f} s", flush=True)
    return 0


def chance_miou(class_pixels: np.ndarray) -> float:
    """The expected mIoU of labels drawn at random with the true class frequencies p:
    per class IoU = p^2 / (2p - p^2) = p / (2 - p), averaged over the classes present."""
    p = class_pixels[class_pixels > 0] / class_pixels.sum()
    return float(np.mean(p / (2 - p)))


def reduction_line(stage: int, report: dict) -> str:
    """One stage's reduction for the closing summary: the selection winner, the ensemble, the
    model that seeds the next stage, and the out-of-fold estimate (pooled beside the mean)."""
    by_name = {c["name"]: c for c in report["candidates"]}
    winner, seed = report["winner"], report.get("seed") or report["winner"]
    parts = [f"stage {stage}: selection mIoU winner {winner['name']} {100 * winner['miou']:.1f}%"]
    if "ensemble" in by_name:
        ensemble = by_name["ensemble"]
        parts.append(f"ensemble {100 * ensemble['miou']:.1f}% ({ensemble['cost']} passes/image)")
    parts.append(f"next stage from {seed['name']} {100 * seed['miou']:.1f}%")
    oof = report.get("out_of_fold")
    if oof:
        pooled = "n/a" if oof["pooled"] is None else f"{100 * oof['pooled']['miou']:.1f}%"
        parts.append(f"out-of-fold mIoU pooled {pooled}, fold mean {100 * oof['mean']['miou']:.1f}%")
    return "; ".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # counts checked as they are read, before the data is made again: a mistyped one costs nothing
    parser.add_argument("--stages", type=at_least(1), default=2)
    parser.add_argument("--folds", type=at_least(2), default=3)
    parser.add_argument("--processes", type=at_least(1), default=2, help="processes per fold")
    args = parser.parse_args(argv)
    os.chdir(REPO)  # the paths below are the repository's
    started = time.time()
    python = sys.executable

    data_steps = [
        ("synthetic Cityscapes", [python, "tools/make_synthetic.py", str(DATA), "--size", "512x256", "--train", "60",
                                  "--train-cities", "10", "--val", "20", "--test", "6", "--overwrite"]),
        # dusseldorf (6 frames) is held out of every fold: the reduction chooses on it, not on val.
        ("pack into shards", [python, "tools/pack_cityscapes.py", str(DATA), "--out", str(SHARDS), "--folds",
                              str(args.folds), "--selection-cities", "dusseldorf", "--overwrite"]),
        ("verify shards", [python, "tools/pack_cityscapes.py", "--verify", str(SHARDS)]),
    ]  # fmt: skip
    for title, command in data_steps:
        if code := step(title, command):
            return code

    chain_started = time.time()
    try:
        chain = plan(CONFIG, [], args.stages, args.folds, ["--recalibrate", "5"])
    except (ConfigError, ManifestError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"\n== cross-validation: {args.stages} stages x {args.folds} folds x {args.processes} processes", flush=True)
    if code := run_local(chain, args.processes):
        return code
    print(f"== cross-validation: {time.time() - chain_started:.0f} s", flush=True)

    experiment = chain.experiment
    final = experiment.stage(args.stages).reduced_model
    evaluation = experiment.dir / "evaluation"
    # The demo trains and evaluates resized to 192x96 (configs/demo.yaml: data.eval_size).
    if code := step("evaluate on val", [python, "tools/evaluate.py", str(final), "--split", "val", "--input-size",
                                        "192x96", "--out", str(evaluation)]):  # fmt: skip
        return code
    if code := step("report", [python, "tools/report.py", str(experiment.dir)]):
        return code

    result = json.loads((evaluation / "metrics.json").read_text())
    manifest = json.loads((SHARDS / "manifest.json").read_text())
    chance = chance_miou(np.array(manifest["groups"]["val"]["class_pixels"], dtype=float))
    stages = [reduction_line(stage, json.loads(experiment.stage(stage).reduced_report.read_text()))
              for stage in range(1, args.stages + 1)]  # fmt: skip
    print(f"""
demo done in {time.time() - started:.0f} s
  shards        {SHARDS}/ (manifest.json)
  runs          {experiment.dir}/stage*/fold*/ (metrics.jsonl, best.safetensors, summary.json)
  reductions    {experiment.dir}/stage*/reduced/ (report.md: every candidate, the ensemble's cost)
{chr(10).join(f"                {line}" for line in stages)}
  final model   {final}
  evaluation    {evaluation}/ (metrics.md and plots)
  report        {experiment.dir}/report/report.md
  logs          {experiment.logs}/
  wandb         offline runs of the folds and reductions; upload them later with
                wandb sync {experiment.dir}/stage*/{{fold*/,}}wandb/offline-run-*

final mIoU on the synthetic val ({result["samples"]} images): {100 * result["miou"]:.1f}%
  (chance: {100 * chance:.1f}%, labels drawn at random with the val class frequencies)""")
    return 0


if __name__ == "__main__":
    sys.exit(main())
