#!/usr/bin/env python
"""The study's chain on this machine, measured: how long would the whole experiment take here?

    ./launch gpu-check --chain [--json FILE]        # on a machine with CUDA: about 3 minutes
    python tools/chain_check.py --tiny [--json FILE]   # anywhere: a tiny chain (the test suite runs it)

1. A full-size synthetic Cityscapes (2048x1024 frames), packed the recipe's way: the train
   split at the training size (--resize 1024x512), val at full size.
2. ``./launch cv configs/study.yaml --local --stages 1 --folds 2`` (``python -m seg.cv``):
   each fold trains ``--steps`` steps with the study's settings (bf16, batch 8, the cut on
   the GPU, auto workers and channels_last) and its fold evaluation at the end, then the
   stage's reduction (selected on val: a synthetic pack has no selection cities).
3. tools/evaluate.py on val with the reduced model.

Prints and writes (--json) per fold: sustained training images/s (the log windows after
``--warmup`` steps), the share of that time spent waiting for data, the sampled GPU
utilisation (nvidia-smi), the peak memory, and seconds per phase (training, fold evaluation,
the rest: start-up, saving); the seconds of the reduction and of the final evaluation; and
from those rates the projected wall time of the study's whole experiment on this machine
(``STUDY``: 5 folds x the config's stages x its epochs of 2380 frames, a fold evaluation of
595 frames every epoch, a reduction per stage, the val evaluation). Exit status 1 if a step
of the chain fails. --tiny: a ResNet-18 at 32x64 on the CPU, for a few steps; its numbers
only show that the measuring works.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python tools/chain_check.py` from a checkout, not installed: make `seg` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from seg.core.cli import Size, at_least
from seg.core.runs import Experiment
from seg.core.storage import EXIT_STORAGE, check_output_file, writable_problem, write_json_result
from seg.data.loader import steps_per_epoch
from seg.data.pack import Options, pack
from seg.data.synthetic import make_synthetic
from seg.recipe.config import load_config

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "study.yaml"
FOLDS = 2
EXPERIMENT = "chain-check"
# The study's whole experiment, beside what configs/study.yaml says (stages, epochs, batch):
# Cityscapes' 2975 train frames in 5 folds (2380 to train on, 595 to validate each fold), and
# its 500 val frames (the reduction's selection set and the final evaluation).
STUDY = {"folds": 5, "train_frames": 2380, "fold_val_frames": 595, "val_frames": 500}
Window = tuple[float, float]  # when a phase ran: monotonic start and end


@dataclass(frozen=True)
class Scale:
    """What the check runs: frames, sizes and steps."""

    frame: Size  # the synthetic frames (H, W)
    train_size: tuple[int, int]  # the packed train split and the training input (H, W)
    train_frames: int
    val_frames: int
    steps: int
    warmup: int
    log_every: int
    overrides: tuple[str, ...] = ()
    recalibrate: int = 20  # the chain's default reduction: BatchNorm statistics from 20 batches

    def config_overrides(self, shards: Path, runs: Path) -> list[str]:
        h, w = self.train_size
        return [
            f"data.shards={shards}", f"train.runs_dir={runs}", f"train.experiment={EXPERIMENT}",
            f"data.size=[{h},{w}]", f"data.eval_size=[{h},{w}]", f"train.iters={self.steps}",
            f"train.eval_every={self.steps}", f"train.log_every={self.log_every}", "train.early_stop_patience=null",
            "wandb.mode=disabled", "tracking.backends=[]", *self.overrides,
        ]  # fmt: skip


GPU = Scale(Size(1024, 2048), (512, 1024), train_frames=64, val_frames=16, steps=300, warmup=60, log_every=20)
TINY = Scale(
    Size(64, 128), (32, 64), train_frames=8, val_frames=2, steps=4, warmup=1, log_every=1,
    overrides=("model.depth=18", "model.output_stride=16", "train.batch_size=2", "train.precision=no",
               "data.workers=0"), recalibrate=2,
)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a tiny chain on the CPU (seconds)")
    parser.add_argument("--json", type=Path, help="write every result here")
    parser.add_argument(
        "--steps", type=at_least(1), help=f"training steps per fold (default {GPU.steps}; tiny {TINY.steps})"
    )
    parser.add_argument(
        "--warmup", type=at_least(0), help=f"steps left out of the sustained rate (default {GPU.warmup})"
    )
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it (default: a temporary one)")
    args = parser.parse_args(argv)
    scale = TINY if args.tiny else GPU
    if args.steps is not None or args.warmup is not None:
        steps = args.steps if args.steps is not None else scale.steps
        warmup = args.warmup if args.warmup is not None else min(scale.warmup, steps // 2)
        scale = Scale(**{**scale.__dict__, "steps": steps, "warmup": warmup})
    if scale.warmup >= scale.steps:
        print(f"error: --warmup {scale.warmup} leaves no step of --steps {scale.steps} to measure", file=sys.stderr)
        return 2
    if args.json:
        check_output_file(parser, "--json", args.json)  # before the chain: a bad path fails now, not at the end
    if args.keep:
        if problem := writable_problem(args.keep):
            print(f"error: --keep {args.keep}: {problem}", file=sys.stderr)
            return EXIT_STORAGE
        args.keep.mkdir(parents=True, exist_ok=True)
        return check(scale, args.keep, args.json, args.tiny)
    with tempfile.TemporaryDirectory(prefix="chain-check-") as scratch:
        return check(scale, Path(scratch), args.json, args.tiny)


def check(scale: Scale, work: Path, json_path: Path | None, tiny: bool) -> int:
    started = time.monotonic()
    cuda = torch.cuda.is_available() and not tiny
    report: dict[str, Any] = {
        "tiny": tiny,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "cores": len(os.sched_getaffinity(0)),
        "scale": {**scale.__dict__, "frame": list(scale.frame), "train_size": list(scale.train_size)},
    }
    phases: dict[str, float] = {}
    report["phases_s"] = phases
    shards = work / "shards"
    with Timed(phases, "synthetic_and_pack"):
        synthetic_pack(scale, work / "cityscapes", shards)
    overrides = scale.config_overrides(shards, work / "runs")
    command = cv_command(overrides, scale.recalibrate)
    env = os.environ | ({} if cuda else {"CUDA_VISIBLE_DEVICES": ""})  # tiny: the CPU even where a GPU is
    with GpuSampler(cuda) as gpu:
        chain, lines = run_chain(command, env)
        phases |= {name: round(end - start, 1) for name, (start, end) in chain.items()}
        evaluation, code = final_evaluation(Experiment.named(work / "runs", EXPERIMENT), shards, env, phases)
    config = load_config(CONFIG, overrides, stage=1)
    report["command"] = shlex.join(command)
    report["folds"] = [fold_report(work / "runs", k, scale, config.train.batch_size, chain, gpu) for k in range(FOLDS)]
    report["gpu_utilisation_pct"] = gpu.mean()
    report["final"] = evaluation
    report["passed"] = lines is None and code == 0
    if lines is not None:
        report["chain_output_tail"] = lines[-25:]
    elif all(f.get("sustained_images_per_s") for f in report["folds"]):
        report["projection"] = projection(report, load_config(CONFIG, ["data.shards=x"]), scale)
    report["seconds"] = round(time.monotonic() - started, 1)
    print(format_report(report), flush=True)
    if json_path:
        if problem := write_json_result(json_path, report):
            print(f"error: {problem}", file=sys.stderr)
            return EXIT_STORAGE
        print(f"wrote {json_path}")
    return 0 if report["passed"] else 1


class Timed:
    """Seconds of a ``with`` block, into ``phases[name]``."""

    def __init__(self, phases: dict[str, float], name: str) -> None:
        self.phases, self.name = phases, name

    def __enter__(self) -> None:
        self.started = time.monotonic()

    def __exit__(self, *exc: object) -> None:
        self.phases[self.name] = round(time.monotonic() - self.started, 1)


def synthetic_pack(scale: Scale, root: Path, shards: Path) -> None:
    """Synthetic Cityscapes at ``scale.frame``, packed as the recipe reads it: 2 folds of the
    train split at the training size, val at full size."""
    workers = len(os.sched_getaffinity(0))
    make_synthetic(root, counts={"train": scale.train_frames, "val": scale.val_frames, "test": 0},
                   cities={"train": 4, "val": 1, "test": 1}, size=scale.frame, workers=workers,
                   progress=False)  # fmt: skip
    pack(root, shards, Options(folds=FOLDS, splits=("train", "val"), resize=scale.train_size), workers=workers,
         progress=False)  # fmt: skip


def cv_command(overrides: list[str], recalibrate: int) -> list[str]:
    """The chain as ``./launch cv configs/study.yaml --local --stages 1`` runs it."""
    reduce = f"--recalibrate {recalibrate} --select-on val"  # on val: a synthetic pack has no selection cities
    return [sys.executable, "-m", "seg.cv", str(CONFIG), "--local", "--stages", "1", "--folds", str(FOLDS),
            "--reduce", reduce, *overrides]  # fmt: skip


def run_chain(command: list[str], env: dict[str, str]) -> tuple[dict[str, Window], list[str] | None]:
    """The chain, its lines echoed and time-stamped: when each fold and the reduction ran
    (from "X: running" to "X: done", keyed fold0, fold1, reduction), and None, or the
    chain's output if it failed."""
    marks: dict[str, float] = {}
    lines = []
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             cwd=REPO, env=env)  # fmt: skip
    for line in child.stdout:
        now = time.monotonic()
        lines.append(line.rstrip())
        print(f"  chain: {line.rstrip()}", flush=True)
        what, _, said = line.partition(": ")
        if said.startswith("running") or said.startswith("done in"):
            marks[f"{what}/{said.split()[0]}"] = now
    code = child.wait()
    windows = {}
    for key, start in marks.items():
        what, event = key.rsplit("/", 1)
        if event == "running" and f"{what}/done" in marks:
            windows[what.replace("stage 1 ", "").replace(" ", "")] = (start, marks[f"{what}/done"])
    return windows, (lines if code else None)


def final_evaluation(
    experiment: Experiment, shards: Path, env: dict[str, str], phases: dict[str, Any]
) -> tuple[dict[str, Any], int]:
    """tools/evaluate.py on val with the stage's reduced model: its mIoU and exit status."""
    model = experiment.stage(1).reduced_model
    if not model.is_file():
        return {"error": "no reduced model"}, 1
    out = experiment.dir / "final-eval"
    command = [sys.executable, str(REPO / "tools" / "evaluate.py"), str(model), "--shards", str(shards),
               "--split", "val", "--out", str(out), "--workers", str(len(os.sched_getaffinity(0)))]  # fmt: skip
    with Timed(phases, "final_evaluation"):
        done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env)
    if done.returncode:
        return {"error": (done.stdout + done.stderr)[-2000:]}, done.returncode
    metrics = json.loads((out / "metrics.json").read_text())
    return {"val_miou_pct": round(100 * metrics["miou"], 2), "samples": metrics.get("samples")}, 0


@dataclass
class GpuSampler:
    """nvidia-smi's GPU utilisation every 0.5 s while the chain runs (CUDA only): (time, %)."""

    cuda: bool
    samples: list[tuple[float, float]] = field(default_factory=list)

    def __enter__(self) -> GpuSampler:
        self.process = None
        if self.cuda and shutil.which("nvidia-smi"):
            query = ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-lms", "500"]
            self.process = subprocess.Popen(query, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            threading.Thread(target=self._read, daemon=True).start()
        return self

    def _read(self) -> None:
        for line in self.process.stdout:
            first = line.split(",")[0].strip()  # the first GPU: the one the chain uses
            if first.isdigit():
                self.samples.append((time.monotonic(), float(first)))

    def __exit__(self, *exc: object) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait()

    def mean(self, window: Window | None = None) -> float | None:
        """The mean utilisation (%) over ``window`` (monotonic start, end), or over all samples."""
        values = [u for t, u in self.samples if window is None or window[0] <= t <= window[1]]
        return round(sum(values) / len(values), 1) if values else None


def training_windows(records: list[dict[str, Any]], batch: int) -> list[dict[str, float]]:
    """The log windows of a fold's metrics.jsonl: steps, images, seconds and data-wait
    seconds of each (all processes together), in order."""
    windows, previous = [], 0
    for record in records:
        if "train/images_per_s" not in record:
            continue
        steps = record["step"] - previous
        previous = record["step"]
        images = steps * batch * record["train/images_per_s"] / record["train/images_per_s_per_process"]
        seconds = images / record["train/images_per_s"]
        windows.append({"end_step": record["step"], "images": images, "seconds": seconds,
                        "waited": record["train/data_wait_s"], "memory_mb": record["train/memory_mb"]})  # fmt: skip
    return windows


def sustained(windows: list[dict[str, float]], warmup: int) -> dict[str, float | None]:
    """Images/s and the data-wait share over the windows that start after ``warmup`` steps
    (the first steps time cuDNN's autotuning and fill the workers' prefetch)."""
    kept = [w for w, before in zip(windows, [0, *[w["end_step"] for w in windows]], strict=False) if before >= warmup]
    seconds = sum(w["seconds"] for w in kept)
    if not kept or seconds <= 0:
        return {"images_per_s": None, "data_wait_share": None}
    return {
        "images_per_s": sum(w["images"] for w in kept) / seconds,
        "data_wait_share": min(sum(w["waited"] for w in kept) / seconds, 1.0),
    }


def fold_report(runs: Path, fold: int, scale: Scale, batch: int, chain: dict[str, Window], gpu: GpuSampler) -> dict:
    """One fold's numbers, from its metrics.jsonl and summary.json and the chain's clock."""
    folder = Experiment.named(runs, EXPERIMENT).stage(1).fold(fold)
    if not folder.metrics.is_file():
        return {"fold": fold, "error": "no metrics.jsonl"}
    records = [json.loads(line) for line in folder.metrics.read_text().splitlines() if line]
    windows = training_windows(records, batch)
    rate = sustained(windows, scale.warmup)
    evaluation = next((r for r in reversed(records) if "fold/seconds" in r), {})
    summary = json.loads(folder.summary.read_text()) if folder.summary.is_file() else {}
    window = chain.get(f"fold{fold}")
    wall = window[1] - window[0] if window else None
    train_s = sum(w["seconds"] for w in windows)
    eval_s = evaluation.get("fold/seconds", 0.0)
    return {
        "fold": fold,
        "steps": windows[-1]["end_step"] if windows else 0,
        "workers": summary.get("identity", {}).get("loader", {}).get("workers"),
        "sustained_images_per_s": _round(rate["images_per_s"]),
        "data_wait_share": _round(rate["data_wait_share"], 3),
        "gpu_utilisation_pct": gpu.mean(window) if window else None,
        "peak_memory_mb": _round(max((w["memory_mb"] for w in windows), default=None)),
        "fold_eval_samples": evaluation.get("fold/samples"),
        "fold_miou_pct": _round(100 * evaluation["fold/miou"] if "fold/miou" in evaluation else None),
        "seconds": {
            "wall": _round(wall),
            "train": _round(train_s),
            "fold_evaluation": _round(eval_s),
            "other": _round(wall - train_s - eval_s if wall is not None else None),  # start-up, saving
        },
    }


def _round(value: float | None, digits: int = 1) -> float | None:
    return None if value is None else round(value, digits)


def projection(report: dict[str, Any], study: Any, scale: Scale) -> dict[str, Any]:
    """The study's whole experiment on this machine, from the check's rates: every stage's
    folds (training at the sustained rate, a fold evaluation per epoch at the measured
    seconds per frame, the start-up and warm-up the check's folds took beyond those), a
    reduction per stage and the final val evaluation (their start-up taken as a fold's, the
    rest scaled by models x frames): an estimate, each part listed."""
    folds = report["folds"]
    stages, epochs, batch = len(study.stages) or 1, study.train.epochs, study.train.batch_size
    workers = folds[0]["workers"] or 0
    steps = steps_per_epoch(STUDY["train_frames"], batch, 1, workers) * epochs
    rate = sum(f["sustained_images_per_s"] for f in folds) / len(folds)
    eval_per_frame = sum(f["seconds"]["fold_evaluation"] / max(f["fold_eval_samples"] or 1, 1) for f in folds) / len(
        folds
    )
    # beyond the sustained rate: start-up, warm-up and saving, once per fold run
    extra = [
        f["seconds"]["wall"] - f["steps"] * batch / f["sustained_images_per_s"] - f["seconds"]["fold_evaluation"]
        for f in folds
    ]
    start_up = max(sum(extra) / len(extra), 0.0)
    runs = stages * STUDY["folds"]
    phases = report["phases_s"]

    def scaled(measured: float, factor: float) -> float:
        # a process's start-up (taken as a fold's) once, the rest in proportion to the frames
        return start_up + max(measured - start_up, 0.0) * factor

    selection = (STUDY["folds"] * STUDY["val_frames"]) / (FOLDS * scale.val_frames)  # models x frames
    seconds = {
        "train": runs * steps * batch / rate,
        "fold_evaluation": runs * epochs * STUDY["fold_val_frames"] * eval_per_frame,
        "start_up_and_saving": runs * start_up,
        "reduction": stages * scaled(phases.get("reduction", 0.0), selection),
        "final_evaluation": scaled(phases.get("final_evaluation", 0.0), STUDY["val_frames"] / scale.val_frames),
    }
    total = sum(seconds.values())
    return {
        "assumes": {
            **STUDY,
            "stages": stages,
            "epochs": epochs,
            "batch": batch,
            "steps_per_fold": steps,
            "images_per_s": round(rate, 1),
        },
        "seconds": {k: round(v) for k, v in seconds.items()},
        "hours": round(total / 3600, 2),
        "goal_hours": 1.5,
    }


def format_report(report: dict[str, Any]) -> str:
    lines = [f"chain check on {report['device']} ({report['cores']} cores){' (tiny)' if report['tiny'] else ''}"]
    lines += ["| fold | images/s (sustained) | data wait | GPU util % | peak MB | train s | fold eval s | other s |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for f in report["folds"]:
        if "error" in f:
            lines.append(f"| {f['fold']} | {f['error']} | | | | | | |")
            continue
        wait = f"{100 * f['data_wait_share']:.1f}%" if f["data_wait_share"] is not None else "-"
        s = f["seconds"]
        lines.append(f"| {f['fold']} | {f['sustained_images_per_s']} | {wait} | {f['gpu_utilisation_pct'] or '-'} | "
                     f"{f['peak_memory_mb']} | {s['train']} | {s['fold_evaluation']} | {s['other']} |")  # fmt: skip
    lines.append("phases (s): " + ", ".join(f"{k} {v}" for k, v in report["phases_s"].items()))
    lines.append(f"final val evaluation: {report['final']}")
    if "projection" in report:
        p = report["projection"]
        verdict = "within" if p["hours"] <= p["goal_hours"] else "over"
        lines.append(f"projected whole study here: {p['hours']} h ({verdict} the {p['goal_hours']} h goal): "
                     + ", ".join(f"{k} {v} s" for k, v in p["seconds"].items()))  # fmt: skip
    lines.append(f"chain check: {'passed' if report['passed'] else 'FAILED'} in {report['seconds']} s")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
