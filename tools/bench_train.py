#!/usr/bin/env python
"""Training throughput of a config as seg/train.py runs it: steps/s, images/s per process
and in total, peak memory per process.

    python tools/bench_train.py configs/demo.yaml --processes 1 2
    python tools/bench_train.py configs/study.yaml --steps 3 --size 2048x1024 train.batch_size=2

Runs fold 0 for --steps optimizer steps on a synthetic Cityscapes (made and packed in a
temporary folder, at --size) and reads the numbers back from metrics.jsonl. The first
step is left out (start-up). Extra key=value arguments override the config.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from omegaconf import OmegaConf

from seg.core.cli import format_size, parse_size
from seg.core.launch import launch_command
from seg.core.runs import Experiment
from seg.data.pack import Options, pack
from seg.data.synthetic import make_synthetic

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps timed (plus one warm-up)")
    parser.add_argument("--size", type=parse_size, default="512x256", help="synthetic frame size")
    parser.add_argument("--frames", type=int, default=24)
    args = parser.parse_intermixed_args()  # overrides may follow the options

    scratch = Path(tempfile.mkdtemp(prefix="bench-train-"))
    try:
        root = scratch / "cityscapes"
        make_synthetic(root, counts={"train": args.frames, "val": 2, "test": 0},
                       cities={"train": 6, "val": 1, "test": 1}, size=args.size, workers=2,
                       progress=False)  # fmt: skip
        pack(root, scratch / "shards", Options(splits=("train", "val")), workers=2, progress=False)
        print(f"{args.config} {' '.join(args.overrides)}; {args.frames} synthetic frames at {format_size(args.size)}")
        print(f"{'processes':>9} {'steps/s':>8} {'img/s/process':>14} {'img/s total':>12} {'peak MB/process':>16}")
        for processes in args.processes:
            runs = scratch / f"runs{processes}"
            script = [str(REPO / "seg" / "train.py"), "--config", args.config, "--fold", "0"]
            command = [*launch_command(processes), *script,
                       f"data.shards={scratch / 'shards'}", f"train.runs_dir={runs}", f"train.iters={args.steps + 1}",
                       "train.log_every=1", "train.eval_every=1000000", "wandb.mode=disabled", "data.checksums=false",
                       *args.overrides]  # fmt: skip
            done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
            if done.returncode != 0:
                sys.exit(f"training failed:\n{done.stderr[-3000:]}")
            (fold,) = [f for e in runs.iterdir() if (f := Experiment(e).stage(1).fold(0)).metrics.is_file()]
            records = [json.loads(line) for line in fold.metrics.read_text().splitlines()]
            steps = [r for r in records if "train/loss" in r][1:]  # without the warm-up step
            per_process = sum(r["train/images_per_s_per_process"] for r in steps) / len(steps)
            batch_size = OmegaConf.load(fold.config).train.batch_size
            memory = max(r["train/memory_mb"] for r in steps)
            rates = f"{per_process / batch_size:>8.3f} {per_process:>14.2f} {per_process * processes:>12.2f}"
            print(f"{processes:>9} {rates} {memory:>16.0f}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
