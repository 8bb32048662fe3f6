#!/usr/bin/env python
"""Evaluation speed at full resolution, per test-time mode: whole image, sliding window,
each with and without flip (and at several scales with --scales).

    python tools/bench_eval.py                              # the study's R34 OS 8 at 2048x1024
    python tools/bench_eval.py --frames 1 --precision bf16
    python tools/bench_eval.py --size 256x128 --frames 1 --depth 18 --scales 0.75 1.0 1.25

In-process and without start-up: the model is built once and --frames synthetic frames are
rendered in memory; each mode gets one untimed warm-up prediction, then
seg.evaluation.inference.predict_probabilities plus the argmax is timed per image over the frames
(the same call and autocast as seg/evaluation/evaluate.py; data loading and the confusion matrix are
left out). Sliding windows are 1024x512 with stride 683x341 (the study's training size, 2/3 overlap).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import numpy as np
import torch

from seg.core.cli import at_least, format_size, parse_size
from seg.data.augment import DeviceAugment
from seg.data.synthetic import paint_labels, render_image
from seg.evaluation.inference import TestTimeAugmentation, predict_probabilities, slide_windows
from seg.model.deeplab import DeepLabV3Plus, count_parameters

from bench_model import available_device  # tools beside this one (python puts a script's folder on sys.path)
from bench_train import fixed_batch, study_model  # a tool beside this one (python puts a script's folder on sys.path)

MODES = ("whole", "slide", "whole+flip", "slide+flip")
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def frames(count: int, width: int, height: int, seed: int = 0) -> list[torch.Tensor]:
    """``count`` synthetic street scenes as uint8 (1, 3, H, W) tensors."""
    images = []
    for i in range(count):
        rng = np.random.default_rng([seed, i])
        image = render_image(rng, paint_labels(rng, width, height))
        images.append(torch.from_numpy(image.transpose(2, 0, 1).copy())[None])
    return images


def forward_passes(tta: TestTimeAugmentation, height: int, width: int) -> int:
    """Model calls per image: views x windows."""
    total = 0
    for scale in tta.scales:
        h, w = (round(height * scale), round(width * scale)) if scale != 1.0 else (height, width)
        windows = 1
        if tta.mode == "slide":
            rows, cols, _, _ = slide_windows(h, w, tta.crop, tta.stride)
            windows = rows * cols
        total += windows * (2 if tta.flip else 1)
    return total


def mode_name(tta: TestTimeAugmentation) -> str:
    """The mode as the command line names it: whole, slide, whole+flip, slide+flip."""
    return tta.mode + ("+flip" if tta.flip else "")


def time_predictions(
    model: torch.nn.Module,
    images: list[torch.Tensor],
    size: tuple[int, int],
    tta: TestTimeAugmentation,
    dtype: torch.dtype | None = None,
) -> list[float]:
    """Seconds per image of seg.evaluation.inference.predict_probabilities plus the argmax
    (under autocast to ``dtype``, if given), after one untimed warm-up on the first image;
    the device finishes each image before its clock stops."""
    device = images[0].device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        predict_probabilities(model, images[0], size, tta).argmax(dim=1)  # warm-up, untimed
        sync()
        times = []
        for image in images:
            start = time.perf_counter()
            predict_probabilities(model, image, size, tta).argmax(dim=1)
            sync()
            times.append(time.perf_counter() - start)
    return times


def measure_eval(
    depth: int, size: tuple[int, int], tta: TestTimeAugmentation, device: torch.device, images: int
) -> dict[str, Any]:
    """Predictions of one synthetic image of the study's model timed as this tool times them (bf16,
    channels_last): one row of the GPU check's evaluation table (tools/gpu_check.py)."""
    model = study_model(depth).to(device).eval().to(memory_format=torch.channels_last)
    augment = DeviceAugment("none", channels_last=True).to(device)
    image, _ = fixed_batch(size, 1)
    x, _ = augment(image.to(device), train=False)
    elapsed = sum(time_predictions(model, [x] * images, size, tta, torch.bfloat16))
    return {"mode": mode_name(tta), "depth": depth, "size": format_size(size), "precision": "bf16",
            "images_per_s": round(images / elapsed, 2), "status": "ok"}  # fmt: skip


def plan_runs(
    modes: list[str],
    scales: list[float] | None,
    crop: tuple[int, int],
    stride: tuple[int, int],
    parser: argparse.ArgumentParser,
) -> list[tuple[str, TestTimeAugmentation]]:
    """Each mode (at scale 1, and over ``scales`` if given) with its label; a window, stride or
    scale that means nothing is refused in one line (exit 2) as tools/evaluate.py refuses it."""
    runs: list[tuple[str, TestTimeAugmentation]] = []
    scale_sets = [((1.0,), "")]
    if scales:
        scale_sets.append((tuple(scales), "@" + ",".join(f"{s:g}" for s in scales)))
    for views, label in scale_sets:
        for mode in modes:
            base, flip = mode.removesuffix("+flip"), mode.endswith("+flip")
            window = (crop, stride) if base == "slide" else (None, None)  # whole mode takes no window
            try:
                tta = TestTimeAugmentation(base, *window, views, flip)
            except ValueError as e:
                parser.exit(2, f"error: {e}\n")
            runs.append((mode_name(tta) + label, tta))
    return runs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=parse_size, default="2048x1024", help="frame WIDTHxHEIGHT (default 2048x1024)")
    parser.add_argument("--frames", type=at_least(1), default=3, help="timed images per mode (after one warm-up)")
    parser.add_argument("--depth", type=int, default=34, choices=(18, 34, 50, 101))
    parser.add_argument("--output-stride", type=int, default=8, choices=(8, 16))
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--scales", type=float, nargs="+", help="also run every mode averaged over these scales")
    parser.add_argument("--crop", type=parse_size, default="1024x512", help="slide window WIDTHxHEIGHT")
    parser.add_argument("--stride", type=parse_size, default="683x341", help="slide step WIDTHxHEIGHT")
    parser.add_argument("--device", type=available_device, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=tuple(PRECISIONS), default="fp32", help="autocast dtype")
    parser.add_argument("--threads", type=at_least(1), help="torch intra-op threads (default: torch's)")
    args = parser.parse_args(argv)
    crop, stride = tuple(args.crop), tuple(args.stride)
    runs = plan_runs(args.modes, args.scales, crop, stride, parser)  # every mode checked before any work
    device = torch.device(args.device)
    if args.precision == "fp16" and device.type != "cuda":
        sys.exit("error: --precision fp16 needs a GPU; use bf16 on the CPU (as training does)")
    if args.threads:
        torch.set_num_threads(args.threads)
    height, width = args.size
    dtype = PRECISIONS[args.precision]

    torch.manual_seed(0)
    model = DeepLabV3Plus(args.depth, args.output_stride).eval().to(device)
    normalise = DeviceAugment("none").to(device)
    start = time.perf_counter()
    images = [normalise(frame.to(device), train=False)[0] for frame in frames(args.frames, width, height)]
    render_s = time.perf_counter() - start

    name = "cpu" if device.type == "cpu" else torch.cuda.get_device_name(device)
    print(f"torch {torch.__version__}, device {args.device} ({name}), threads {torch.get_num_threads()}, "
          f"precision {args.precision}")  # fmt: skip
    print(f"model R{args.depth} OS {args.output_stride} ({count_parameters(model):,} parameters); "
          f"{args.frames} synthetic frames at {format_size(args.size)} (rendered in {render_s:.1f} s, not timed); "
          f"slide crop {format_size(crop)} stride {format_size(stride)}")  # fmt: skip
    print(f"{'mode':<26} {'passes':>6} {'s/img':>8} {'min s':>8} {'img/s':>8} {'x whole':>8}")
    whole_s = None
    for label, tta in runs:
        times = time_predictions(model, images, (height, width), tta, dtype)
        per_image = sum(times) / len(times)
        if label == "whole":
            whole_s = per_image
        ratio = f"{per_image / whole_s:>8.2f}" if whole_s else f"{'-':>8}"
        passes = forward_passes(tta, height, width)
        print(f"{label:<26} {passes:>6} {per_image:>8.2f} {min(times):>8.2f} {1 / per_image:>8.3f} {ratio}", flush=True)


if __name__ == "__main__":
    main()
