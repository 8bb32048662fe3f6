#!/usr/bin/env python
"""Training throughput of a config as seg/train.py runs it: steps/s, images/s per process
and in total, peak memory per process.

    python tools/bench_train.py configs/demo.yaml --processes 1 2
    python tools/bench_train.py configs/study.yaml --steps 3 --size 2048x1024 train.batch_size=2

Runs fold 0 for --steps optimizer steps on a synthetic Cityscapes (made and packed in a
temporary folder, at --size) and reads the numbers back from metrics.jsonl. The first
step is left out (start-up). Extra key=value arguments override the config.

The training step alone, without the loader, evaluation or start-up:

    python tools/bench_train.py --step --depth 34 --batch 8 --precision bf16 --channels-last [--compile]

times seg.training.step.train_step on device-resident batches of the study's model (R<depth>-OS8,
augmented on the device, Adam, clipping) after --warmup steps: images/s, step time, peak
memory, FLOPs per image and, with --peak-tflops, the model FLOP utilisation. It is one row of
the GPU check's training grid (tools/gpu_check.py runs the grid through it). With --profile
(and --json FILE) the same steps run under torch.profiler instead (tools/profile_step.py):
the top ops and the step's time by category, per step.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch.profiler import record_function

from seg.core.cityscapes import IGNORE_INDEX, NUM_CLASSES
from seg.core.cli import at_least, format_size, parse_size
from seg.core.launch import launch_command
from seg.core.runs import Experiment
from seg.core.storage import EXIT_STORAGE, check_output_file, write_json_result
from seg.data.augment import DeviceAugment
from seg.data.pack import Options, pack
from seg.data.synthetic import make_synthetic
from seg.model.deeplab import DeepLabV3Plus
from seg.recipe.config import OptimConfig
from seg.recipe.losses import CombinedLoss
from seg.recipe.optim import from_config
from seg.training.step import train_step

from bench_model import training_flops  # a tool beside this one (python puts a script's folder on sys.path)
from bench_optimizer import IMPLEMENTATIONS

REPO = Path(__file__).resolve().parents[1]
CITIES = 6  # the synthetic tree's train cities (pack's 5 folds by city need 5): the fewest frames it takes


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", help="the config to train (not with --step)")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--processes", type=at_least(1), nargs="+", default=[1, 2])
    parser.add_argument(
        "--steps", type=at_least(1), default=10, help="optimizer steps timed (plus one warm-up; --step: plus --warmup)"
    )
    parser.add_argument("--size", type=parse_size, help="synthetic frame size (default 512x256; --step: 1024x512)")
    parser.add_argument(
        "--frames", type=at_least(CITIES), default=24, help=f"synthetic train frames (default 24, at least {CITIES})"
    )
    step = parser.add_argument_group("--step: the training step alone")
    step.add_argument("--step", action="store_true", help="time seg.training.step.train_step alone")
    step.add_argument("--depth", type=int, default=34, choices=(18, 34, 50, 101))
    step.add_argument("--batch", type=at_least(1), default=8, help="images per step")
    step.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="bf16")
    step.add_argument("--channels-last", action="store_true")
    step.add_argument("--compile", action="store_true", help="torch.compile the model")
    step.add_argument("--optimizer", choices=list(IMPLEMENTATIONS), default="fused",
                      help="Adam's implementation (training's: fused)")  # fmt: skip
    step.add_argument("--no-finite-check", action="store_true",
                      help="skip the finite-loss verdict, to measure what its wait costs")  # fmt: skip
    step.add_argument("--warmup", type=at_least(0), default=3, help="untimed steps first")
    step.add_argument("--peak-tflops", type=float, help="the device's dense peak, for the FLOP utilisation")
    step.add_argument("--profile", action="store_true", help="torch.profiler over --steps steps instead of "
                      "timing them: the top ops and the step's time by category (tools/profile_step.py)")  # fmt: skip
    step.add_argument("--json", type=Path, help="--profile: write the profile here too")
    args = parser.parse_intermixed_args(argv)  # overrides may follow the options
    if args.json and not (args.step and args.profile):
        parser.error(f"--json {args.json}: writes the profile of --step --profile; add both, or leave --json out")
    if args.json:
        check_output_file(parser, "--json", args.json)  # before the steps: a bad path fails now, not at the end
    if args.step:
        sys.exit(step_only(args))
    if args.config is None:
        parser.error("the config is needed (or --step)")
    args.size = args.size or parse_size("512x256")

    scratch = Path(tempfile.mkdtemp(prefix="bench-train-"))
    try:
        root = scratch / "cityscapes"
        make_synthetic(root, counts={"train": args.frames, "val": 2, "test": 0},
                       cities={"train": CITIES, "val": 1, "test": 1}, size=args.size, workers=2,
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


def step_only(args: argparse.Namespace) -> int:
    """``--step``: one row timed, printed as a line of key: value."""
    size = tuple(args.size or parse_size("1024x512"))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.precision == "fp16" and device.type != "cuda":
        print("error: --precision fp16 needs a GPU; use bf16 on the CPU (as training does)", file=sys.stderr)
        return 2
    row = SpeedRow(args.depth, args.batch, args.precision, args.channels_last, args.compile, size, args.optimizer,
                   not args.no_finite_check)  # fmt: skip
    if args.profile:
        from profile_step import format_profile, profile_train_step  # beside this one; it imports this one

        profiled = profile_train_step(row, device, steps=args.steps, warmup=args.warmup)
        print(format_profile(profiled), flush=True)
        if args.json:
            if problem := write_json_result(args.json, profiled):
                print(f"error: {problem}", file=sys.stderr)
                return EXIT_STORAGE
            print(f"wrote {args.json}")
        return 0 if profiled["status"] == "ok" else 1
    result = measure_train_step(row, device, args.peak_tflops, steps=args.steps, warmup=args.warmup)
    print(", ".join(f"{k}: {v}" for k, v in result.items()), flush=True)
    return 0 if result["status"] == "ok" else 1


# --- the training step alone (shared with tools/gpu_check.py) -------------------------------------


def fixed_batch(size: tuple[int, int], batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images and labels with blocks of classes and some ignored pixels, from a seed."""
    generator = torch.Generator().manual_seed(seed)
    h, w = size
    images = torch.randint(0, 256, (batch, 3, h, w), dtype=torch.uint8, generator=generator)
    coarse = torch.randint(0, NUM_CLASSES, (batch, 1, max(h // 16, 1), max(w // 16, 1)), generator=generator)
    labels = F.interpolate(coarse.float(), size=size, mode="nearest").squeeze(1).long()
    labels[torch.rand(labels.shape, generator=generator) < 0.05] = IGNORE_INDEX
    # images that say something about their labels, so a few steps can lower the loss
    tint = (labels.clamp(max=NUM_CLASSES - 1) * 13 % 256).to(torch.uint8).unsqueeze(1)
    return (images // 2 + tint // 2).to(torch.uint8), labels


def study_model(depth: int, seed: int = 0) -> DeepLabV3Plus:
    torch.manual_seed(seed)
    return DeepLabV3Plus(depth, 8)


@contextlib.contextmanager
def fresh_accelerator(precision: str, cpu: bool) -> Iterator[Any]:
    """An Accelerator with this precision; accelerate keeps one state per process, so it is
    reset before and after."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    try:
        # accelerate (and train.precision) call fp32 "no"
        mixed = "no" if precision == "fp32" else precision
        yield Accelerator(cpu=cpu, mixed_precision=mixed, step_scheduler_with_optimizer=False)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


class SpeedRow(dict):
    """One training configuration to time."""

    def __init__(self, depth: int, batch: int, precision: str, channels_last: bool, compile: bool,
                 size: tuple[int, int] = (512, 1024), optimizer: str = "fused",
                 finite_check: bool = True) -> None:  # fmt: skip
        """``optimizer``: the implementation of the Adam training builds (fused); ``foreach``,
        torch's default on CUDA, measures what fused gains on the device. ``finite_check``:
        off, the step skips train_step's finite-loss verdict, to measure what its wait costs."""
        super().__init__(depth=depth, batch=batch, precision=precision, channels_last=channels_last,
                         compile=compile, size=format_size(size), optimizer=optimizer,
                         finite_check=finite_check)  # fmt: skip
        self.input_size = size


@contextlib.contextmanager
def training_step(row: SpeedRow, device: torch.device) -> Iterator[Callable[[], None]]:
    """One call of the returned function is one training step of this row as
    measure_train_step times it (and tools/profile_step.py profiles it): the fixed batch,
    device-resident, augmented on the device, through seg.training.step.train_step (loss,
    backward, clipping, the fused Adam training builds). The augmentation and the loss run in ranges named for the
    profiler (``seg::augment``, ``seg::loss``; nearly free when no profiler listens)."""
    with fresh_accelerator(row["precision"], cpu=device.type != "cuda") as accelerator:
        model = study_model(row["depth"]).to(device)
        if row["channels_last"]:
            model = model.to(memory_format=torch.channels_last)
        optimizer = from_config(OmegaConf.structured(OptimConfig()), model)  # the study's Adam, as training builds it
        for group in optimizer.param_groups:
            group.update(IMPLEMENTATIONS[row["optimizer"]])
        model, optimizer = accelerator.prepare(model, optimizer)
        if row["compile"]:
            model = torch.compile(model)
        augment = DeviceAugment("standard", row["channels_last"]).to(device)
        combined = CombinedLoss(0.6, 0.1, torch.ones(NUM_CLASSES, device=device)).to(device)
        images, labels = (t.to(device) for t in fixed_batch(row.input_size, row["batch"]))

        def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            with record_function("seg::loss"):
                return combined(logits, target)

        def step() -> None:
            with record_function("seg::augment"):
                x, y = augment(images, labels)
            train_step(model, x, y, loss_fn, optimizer, accelerator, 1.0, check_finite=row["finite_check"])

        yield step


def measure_train_step(
    row: SpeedRow, device: torch.device, peak: float | None, steps: int = 10, warmup: int = 3
) -> dict[str, Any]:
    """seg.training.step.train_step timed on device-resident uint8 batches, augmented on the
    device as training does (the loader is measured apart): images/s, step time, peak memory,
    FLOPs per image and, given the device's peak, the model FLOP utilisation. A row that runs
    out of memory or breaks (a compile failure, say) is reported in the result, not raised."""
    cuda = device.type == "cuda"
    result: dict[str, Any] = dict(row)
    try:
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        with training_step(row, device) as step:
            started = time.perf_counter()
            for _ in range(warmup):
                step()
            synchronize(cuda)
            result["warmup_s"] = round(time.perf_counter() - started, 1)
            started = time.perf_counter()
            for _ in range(steps):
                step()
            synchronize(cuda)
            elapsed = time.perf_counter() - started
        result["images_per_s"] = round(steps * row["batch"] / elapsed, 2)
        result["step_ms"] = round(1000 * elapsed / steps, 1)
        if cuda:
            result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        flops = training_flops(row["depth"], 8, row.input_size, device)
        result["tflop_per_image"] = round(flops / 1e12, 3)
        if peak:
            result["mfu_percent"] = round(100 * result["images_per_s"] * flops / (peak * 1e12), 1)
        result["status"] = "ok"
    except torch.cuda.OutOfMemoryError:
        result.update(status="oom")
    except Exception as e:  # a row that breaks (a compile failure, say) is reported, not fatal
        result.update(status="error", error=f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
    finally:
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    return result


def synchronize(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
