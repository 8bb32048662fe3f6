#!/usr/bin/env python
"""Model speed and memory: forward+backward per image at the training size, inference at
full resolution, for each depth and numeric mode; plus the model's FLOPs.

    python tools/bench_model.py                         # depth 34 and 50 at OS 8, 512x1024
    python tools/bench_model.py --depths 34 --size 256x512 --modes fp32 bf16

Each configuration runs in a fresh process, so its peak memory (max RSS above the process's
footprint after building the model, on the CPU; torch's peak allocation on a GPU) is its own.
On a GPU it also prints images/s and the share of the GPU's peak FLOP rate (--peak-tflops).
"""

from __future__ import annotations

import argparse
import functools
import multiprocessing
import resource
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from seg.core.cli import at_least, format_size, parse_size
from seg.model.deeplab import DeepLabV3Plus
from seg.recipe.losses import CombinedLoss

MODES = ("fp32", "bf16", "fp16", "fp32-channels-last", "bf16-channels-last")

# Dense bf16 tensor-core peaks in TFLOP/s (vendor data sheets, no sparsity), matched as
# substrings of torch.cuda.get_device_name, most specific first. tools/gpu_check.py's --peak-tflops overrides.
BF16_PEAK_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),
    ("H200", 989.0),
    ("GH200", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10", 125.0),
    ("RTX 4090", 165.0),
    ("RTX 3090", 71.0),
    ("A6000", 155.0),
    ("V100", 125.0),  # fp16: V100 has no bf16
)


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _run(args: tuple) -> dict:
    depth, output_stride, mode, size, full_size, device, repeat = args
    torch.manual_seed(0)
    model = DeepLabV3Plus(depth, output_stride).to(device)
    channels_last = mode.endswith("channels-last")
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[mode.split("-")[0]]
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, 3, *size, device=device).to(memory_format=memory_format)
    target = torch.randint(0, 19, (2, *size), device=device)
    loss_fn = CombinedLoss()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def train_step() -> None:
        with torch.autocast(device, dtype=dtype, enabled=dtype is not None):
            loss, _ = loss_fn(model(x), target)
        loss.backward()
        model.zero_grad(set_to_none=True)

    base = _rss_mb()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    train_step()  # warm-up
    sync()
    start = time.perf_counter()
    for _ in range(repeat):
        train_step()
    sync()
    train_s = (time.perf_counter() - start) / repeat / x.shape[0]
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else _rss_mb() - base

    model.eval()
    full = torch.randn(1, 3, *full_size, device=device).to(memory_format=memory_format)
    with torch.no_grad(), torch.autocast(device, dtype=dtype, enabled=dtype is not None):
        model(full)
        sync()
        start = time.perf_counter()
        model(full)
        sync()
    infer_s = time.perf_counter() - start
    return {"train_s": train_s, "peak_mb": peak / x.shape[0], "infer_s": infer_s}


def flops(depth: int, output_stride: int, size: tuple[int, int]) -> int:
    """Forward FLOPs of one image (torch's counter: 2 per multiply-add)."""
    model = DeepLabV3Plus(depth, output_stride).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randn(1, 3, *size))
    return counter.get_total_flops()


@functools.cache
def training_flops(depth: int, output_stride: int, size: tuple[int, int], device: torch.device | str = "cpu") -> float:
    """Forward + backward FLOPs of one image, as counted (torch's counter: convolutions and
    matmuls), on ``device`` (a GPU counts a large model in a moment)."""
    torch.manual_seed(0)
    model = DeepLabV3Plus(depth, output_stride).to(device)
    x = torch.randn(1, 3, *size, device=device)
    counter = FlopCounterMode(display=False)
    model.eval()  # BN on running statistics: batch 1 is allowed, and the FLOPs are the same
    with counter:
        model(x).sum().backward()
    return float(counter.get_total_flops())


def device_peak_tflops(name: str) -> float | None:
    """The dense bf16 peak of a device named so (torch.cuda.get_device_name), if the table knows it."""
    return next((peak for key, peak in BF16_PEAK_TFLOPS if key in name), None)


def available_device(text: str) -> str:
    """An argparse type: ``cpu``, ``cuda`` or ``cuda:N`` that this machine has, refused as the
    command line is read (not with torch's traceback once the model is built)."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device: cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{text!r}: cpu, cuda or cuda:N")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise argparse.ArgumentTypeError(f"{text}: this machine has no CUDA GPU that torch can use; use cpu")
        if device.index is not None and device.index >= count:
            raise argparse.ArgumentTypeError(f"{text}: this machine has {count} GPU(s), cuda:0 to cuda:{count - 1}")
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depths", type=int, nargs="+", choices=(18, 34, 50, 101), default=[34, 50])
    parser.add_argument("--output-stride", type=int, choices=(8, 16), default=8)
    parser.add_argument("--size", type=parse_size, default="1024x512", help="training input WIDTHxHEIGHT")
    parser.add_argument("--full-size", type=parse_size, default="2048x1024", help="inference WIDTHxHEIGHT")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=["fp32", "bf16", "fp32-channels-last"])
    parser.add_argument(
        "--device",
        type=available_device,
        choices=("cpu", "cuda"),
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="cpu or cuda (default: cuda where there is a GPU)",
    )
    parser.add_argument("--repeat", type=at_least(1), default=1, help="timed training steps (batch 2) after a warm-up")
    parser.add_argument("--peak-tflops", type=float, help="the GPU's peak rate for the mode, for the share")
    args = parser.parse_args(argv)
    size, full_size = tuple(args.size), tuple(args.full_size)

    print(f"device {args.device}, threads {torch.get_num_threads()}, train {format_size(size)} batch 2")
    print(f"{'model':<10} {'mode':<20} {'fwd+bwd s/img':>14} {'img/s':>7} {'peak MB/img':>12} "
          f"{'infer s (full)':>15} {'TFLOP/s':>8}")  # fmt: skip
    context = multiprocessing.get_context("spawn")
    for depth in args.depths:
        train_flops = training_flops(depth, args.output_stride, size)
        for mode in args.modes:
            job = (depth, args.output_stride, mode, size, full_size, args.device, args.repeat)
            with context.Pool(1) as pool:
                result = pool.apply(_run, (job,))
            rate = train_flops / result["train_s"] / 1e12
            share = f" ({100 * rate / args.peak_tflops:.0f}% of peak)" if args.peak_tflops else ""
            print(
                f"R{depth}-OS{args.output_stride:<4} {mode:<20} {result['train_s']:>14.2f} "
                f"{1 / result['train_s']:>7.2f} {result['peak_mb']:>12.0f} {result['infer_s']:>15.2f} "
                f"{rate:>8.3f}{share}"
            )
        gflop = flops(depth, args.output_stride, size) / 1e9
        print(f"R{depth}-OS{args.output_stride}: {gflop:.0f} GFLOP forward per {format_size(size)} image")


if __name__ == "__main__":
    main()
