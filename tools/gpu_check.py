#!/usr/bin/env python
"""The prepared GPU check: is the CUDA path right, and how fast is it?

    ./launch gpu-check                     # on a machine with CUDA: about 3-4 minutes
    ./launch gpu-check --chain             # the study's chain instead: tools/chain_check.py
    python tools/gpu_check.py --tiny       # anywhere: a small model, seconds (the test suite runs it)
    python tools/gpu_check.py --json out.json --budget 200 --peak-tflops 989

Correctness
  cpu-vs-cuda    one training batch of the study's model (R34, OS8) in fp32 on the CPU and on
                 CUDA, dropout off, BN on batch statistics; loss and every gradient compared
                 with an fp64 CPU reference. Pass: CUDA's fp32 (TF32 off) is as close to fp64
                 as the CPU's own fp32 is, within a factor of 10 (or 1e-4 relative, whichever
                 is larger): both differ from fp64 only by rounding and summation order, so
                 the CPU's error is the yardstick for "the same computation". CUDA with TF32
                 convolutions (torch's default) is reported beside it, not judged.
  bf16 / fp16    a few steps of seg.training.step.train_step through accelerate (fp16 with its loss
                 scaling) on one fixed batch: every loss finite, the last below the first.
  syncbn         torch's SyncBatchNorm kernels over NCCL (one process per GPU; with one GPU a
                 one-process NCCL group, which runs the same kernels and collectives but not
                 a cross-GPU reduction) against BatchNorm2d on the whole batch on the CPU:
                 outputs, input/weight gradients and running statistics.
Speed (CUDA only)
  profile        torch.profiler over a few steps of the study's row (R34-OS8, bf16, batch 8,
                 channels_last): the top ops and the step's time by category, first
                 (tools/profile_step.py; --tiny profiles the tiny row on the CPU).
  train          images/s and peak memory of seg.training.step.train_step (device augmentation,
                 loss, backward, clipping, Adam) at 512x1024 for R34/R50/R101 at OS8, batch 16,
                 8 and 4, fp32/bf16/fp16, channels_last on and off, torch.compile on and off,
                 fused Adam (training's) and foreach (torch's default on CUDA), the study's row
                 without the finite-loss verdict (its wait's cost); model FLOP utilisation
                 against the device's dense bf16 peak.
  loss           each training loss's forward + backward at the study's size, batch 8, bf16 logits
                 (tools/bench_loss.py): the fp32 work at full resolution.
  eval           full-resolution (1024x2048) images/s for whole / slide / whole+flip.
  loader         seg's training pipeline on one core, images/s: full-size PNG with the geometry
                 in the worker, and train-size PNG with the geometry on the device; the cores
                 each would take to feed the fastest study-model configuration.

The speed grid runs most important first and stops starting new rows after --budget seconds
(the rest are listed as skipped). Prints a table; --json writes everything. Exit status 1
if a correctness check fails.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from seg.core.cli import format_size
from seg.core.storage import EXIT_STORAGE, check_output_file, write_json_result
from seg.data.augment import DeviceAugment
from seg.evaluation.inference import TestTimeAugmentation, default_stride
from seg.recipe.losses import CombinedLoss
from seg.training.step import train_step

# The measuring code of the bench tools beside this one (python puts a script's folder first
# on sys.path): the GPU check runs their measurements instead of repeating them.
from bench_eval import measure_eval, mode_name
from bench_loader import one_core, pack_shards, pipeline_rate
from bench_loss import format_losses, measure_losses
from bench_model import device_peak_tflops
from bench_train import SpeedRow, fixed_batch, fresh_accelerator, measure_train_step, study_model
from profile_step import format_profile, profile_train_step

STUDY_WINDOW = (512, 1024)  # slide mode's window: the study's training size (H, W)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a small model and input on the CPU (seconds)")
    parser.add_argument("--json", type=Path, help="write every result here")
    parser.add_argument("--budget", type=float, default=170.0, help="seconds after which no new speed row starts")
    parser.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak (default: from its name)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    parser.add_argument("--no-loader", action="store_true", help="skip the loader measurement")
    args = parser.parse_args(argv)
    if args.json:
        check_output_file(parser, "--json", args.json)  # before the checks: a bad path fails now, not at the end

    cuda = torch.cuda.is_available() and not args.tiny
    started = time.perf_counter()
    report: dict[str, Any] = {"environment": environment(cuda), "tiny": args.tiny}
    print(format_environment(report["environment"]), flush=True)
    # tiny: R18 on a small input, so the same code runs on any CPU in seconds
    depth, size, batch = (18, (32, 64), 2) if args.tiny else (34, (256, 512), 2)

    checks: list[dict[str, Any]] = []
    report["checks"] = checks
    # fp64 on the CPU is slow: the comparison runs at half the mixed-precision checks' input
    half = (size[0] // 2, size[1] // 2) if cuda else size
    checks.append(run_check("cpu-vs-cuda", lambda: check_cpu_vs_cuda(depth, half, batch, cuda)))
    for precision in ("bf16", "fp16"):
        checks.append(run_check(precision, lambda p=precision: check_mixed_precision(p, depth, size, cuda)))
    checks.append(run_check("syncbn", lambda: check_sync_batchnorm(cuda)))
    print(format_checks(checks), flush=True)

    if cuda:
        torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick its kernels
        peak = args.peak_tflops or device_peak_tflops(torch.cuda.get_device_name())
        deadline = started + args.budget
        report["peak_bf16_tflops"] = peak
        # where the study's step spends its time (issue 24): a few steps, so first
        report["profile"] = profile_train_step(SpeedRow(34, 8, "bf16", True, False), torch.device("cuda"))
        print(format_profile(report["profile"]), flush=True)
        report["loss"] = measure_losses(8, STUDY_WINDOW, "bf16", torch.device("cuda"))
        print(format_losses(report["loss"]), flush=True)
        report["train"] = train_speed_grid(peak, deadline, compile_rows=not args.no_compile)
        print(format_train(report["train"]), flush=True)
        report["eval"] = eval_speed(deadline)
        print(format_eval(report["eval"]), flush=True)
    else:
        # The CPU runs the same measuring code on the tiny model, one row each.
        tiny = SpeedRow(depth=18, batch=2, precision="fp32", channels_last=False, compile=False, size=(32, 64))
        report["train"] = [measure_train_step(tiny, torch.device("cpu"), peak=None, steps=2, warmup=1)]
        print(format_train(report["train"]), flush=True)
        report["profile"] = profile_train_step(tiny, torch.device("cpu"), steps=1, warmup=1)
        print(format_profile(report["profile"]), flush=True)
        report["loss"] = measure_losses(1, (32, 64), "fp32", torch.device("cpu"), steps=1)
        print(format_losses(report["loss"]), flush=True)
        tta = TestTimeAugmentation("slide", (32, 64), (24, 48))
        report["eval"] = [measure_eval(18, (64, 128), tta, torch.device("cpu"), images=1)]
        print(format_eval(report["eval"]), flush=True)
    if not args.no_loader:
        study_rows = [r for r in report["train"] if r["status"] == "ok" and r["depth"] in (34, 18)]
        fastest = max((r["images_per_s"] for r in study_rows), default=None)
        try:
            report["loader"] = loader_speed(args.tiny, fastest)
        except Exception as e:  # reported, not fatal
            report["loader"] = [{"pipeline": "seg train pipeline", "images_per_s_per_core": f"error: {e}"}]
        print(format_loader(report["loader"]), flush=True)

    report["seconds"] = round(time.perf_counter() - started, 1)
    failed = [c["name"] for c in checks if c["status"] == "fail"]
    report["passed"] = not failed
    if args.json:
        if problem := write_json_result(args.json, report):
            print(f"error: {problem}", file=sys.stderr)
            return EXIT_STORAGE
        print(f"wrote {args.json}")
    print(f"gpu-check: {'FAILED: ' + ', '.join(failed) if failed else 'all checks passed'} in {report['seconds']} s")
    return 1 if failed else 0


# --- environment ---------------------------------------------------------------------------


def environment(cuda: bool) -> dict[str, Any]:
    env: dict[str, Any] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_cores": os.cpu_count(),
        "cuda_available": torch.cuda.is_available(),
    }
    if cuda:
        props = torch.cuda.get_device_properties(0)
        env.update(
            device=torch.cuda.get_device_name(0),
            devices=torch.cuda.device_count(),
            capability=f"{props.major}.{props.minor}",
            memory_gib=round(props.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            nccl=_version(torch.cuda.nccl.version()),
        )
    else:
        env["device"] = "cpu"
    return env


def _version(version: int | tuple[int, ...]) -> str:
    return ".".join(map(str, version)) if isinstance(version, tuple) else str(version)


# --- correctness ------------------------------------------------------------------------------


def run_check(name: str, check: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """A check's result dict with its name and status; an exception is a failure, not a crash."""
    started = time.perf_counter()
    try:
        result = check()
    except Exception as e:
        result = {"status": "fail", "error": f"{type(e).__name__}: {e}"}
    result = {"name": name, **result, "seconds": round(time.perf_counter() - started, 1)}
    print(f"  {name}: {result['status']} ({result['seconds']} s)", flush=True)
    return result


def without_dropout(model: nn.Module) -> nn.Module:
    """Dropout draws from each device's own generator; for a CPU-vs-CUDA comparison it must go."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model


def loss_and_gradients(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, device: str, dtype: torch.dtype
) -> tuple[float, torch.Tensor]:
    """The combined loss of one training batch and every gradient, flattened, in fp64 on the CPU."""
    model = model.to(device=device, dtype=dtype).train()
    model.zero_grad(set_to_none=True)
    augment = DeviceAugment("none").to(device)
    x, y = augment(images.to(device), labels.to(device), train=False)
    loss, _ = CombinedLoss(alpha=0.6, label_smoothing=0.1)(model(x.to(dtype)), y)
    loss.backward()
    grads = torch.cat([p.grad.reshape(-1).double().cpu() for p in model.parameters()])
    return loss.item(), grads


def relative_error(value: torch.Tensor | float, reference: torch.Tensor | float) -> float:
    value, reference = torch.as_tensor(value, dtype=torch.float64), torch.as_tensor(reference, dtype=torch.float64)
    return float((value - reference).norm() / reference.norm().clamp(min=1e-30))


def check_cpu_vs_cuda(depth: int, size: tuple[int, int], batch: int, cuda: bool) -> dict[str, Any]:
    images, labels = fixed_batch(size, batch)
    model = without_dropout(study_model(depth))
    reference = loss_and_gradients(copy.deepcopy(model), images, labels, "cpu", torch.float64)
    cpu = loss_and_gradients(copy.deepcopy(model), images, labels, "cpu", torch.float32)
    errors = {"cpu_fp32": _errors(cpu, reference)}
    if not cuda:
        return {"status": "skipped", "reason": "no CUDA: only the CPU's fp32 error was measured", "errors": errors}
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    batch_on_cuda = (images, labels, "cuda", torch.float32)
    try:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        errors["cuda_fp32"] = _errors(loss_and_gradients(copy.deepcopy(model), *batch_on_cuda), reference)
        torch.backends.cudnn.allow_tf32 = True  # torch's default for convolutions: what fp32 training runs
        errors["cuda_tf32"] = _errors(loss_and_gradients(copy.deepcopy(model), *batch_on_cuda), reference)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    tolerance = {key: max(10 * errors["cpu_fp32"][key], 1e-4) for key in ("loss", "gradients")}
    passed = all(errors["cuda_fp32"][key] <= tolerance[key] for key in tolerance)
    return {"status": "pass" if passed else "fail", "errors": errors, "tolerance": tolerance,
            "model": f"R{depth}-OS8", "input": f"{batch}x{format_size(size)}"}  # fmt: skip


def _errors(result: tuple[float, torch.Tensor], reference: tuple[float, torch.Tensor]) -> dict[str, float]:
    return {"loss": relative_error(result[0], reference[0]), "gradients": relative_error(result[1], reference[1])}


def check_mixed_precision(precision: str, depth: int, size: tuple[int, int], cuda: bool) -> dict[str, Any]:
    if precision == "fp16" and not cuda:
        return {"status": "skipped", "reason": "fp16 loss scaling needs CUDA (the CPU trains in bf16)"}
    steps = 8
    with fresh_accelerator(precision, cpu=not cuda) as accelerator:
        model = without_dropout(study_model(depth)).to(accelerator.device)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        model, optimizer = accelerator.prepare(model, optimizer)
        augment = DeviceAugment("none").to(accelerator.device)
        images, labels = augment(*[t.to(accelerator.device) for t in fixed_batch(size, 4)], train=False)
        loss_fn = CombinedLoss(0.6, 0.1).to(accelerator.device)
        losses, skipped = [], 0
        for _ in range(steps):
            loss, _, stepped = train_step(model, images, labels, loss_fn, optimizer, accelerator, 1.0)
            losses.append(float(loss))
            skipped += not stepped
        scaler = getattr(accelerator, "scaler", None)
        scale = float(scaler.get_scale()) if scaler is not None else None
    finite = all(math.isfinite(v) for v in losses)
    lowered = finite and losses[-1] < losses[0]
    return {"status": "pass" if lowered else "fail", "losses": [round(v, 4) for v in losses],
            "skipped_steps": skipped, "loss_scale": scale}  # fmt: skip


def check_sync_batchnorm(cuda: bool) -> dict[str, Any]:
    if not cuda:
        return {"status": "skipped", "reason": "torch's SyncBatchNorm kernels run on CUDA only; the CPU path "
                "(seg.core.distributed.CPUSyncBatchNorm over gloo) is pinned by tests/test_model.py"}  # fmt: skip
    gpus = torch.cuda.device_count()
    runs: dict[str, dict[str, Any]] = {}
    if gpus >= 2:
        runs[f"nccl, {gpus} processes on {gpus} GPUs"] = _spawn_syncbn(gpus, "nccl", one_gpu=False)
    else:
        # NCCL refuses two ranks on one GPU; gloo moves CUDA tensors through the host, so two
        # processes on one GPU still run torch's kernels with a real cross-process reduction.
        runs["nccl, 1 process"] = _syncbn_compare(0, 1, f"file://{tempfile.mkdtemp()}/store", "nccl", 0)
        runs["gloo, 2 processes on one GPU"] = _spawn_syncbn(2, "gloo", one_gpu=True)
    passed = all(run["status"] == "pass" for run in runs.values())
    return {"status": "pass" if passed else "fail", "runs": runs}


def _spawn_syncbn(world: int, backend: str, one_gpu: bool) -> dict[str, Any]:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as scratch:
        mp.spawn(_syncbn_worker, args=(world, scratch, backend, one_gpu), nprocs=world, join=True)
        return json.loads((Path(scratch) / "rank0.json").read_text())


def _syncbn_worker(rank: int, world: int, scratch: str, backend: str, one_gpu: bool) -> None:
    result = _syncbn_compare(rank, world, f"file://{scratch}/store", backend, 0 if one_gpu else rank)
    if rank == 0:
        (Path(scratch) / "rank0.json").write_text(json.dumps(result))


def _syncbn_compare(rank: int, world: int, init: str, backend: str, gpu: int) -> dict[str, Any]:
    """Each rank normalises its slice of one batch with torch's SyncBatchNorm; the result must
    equal BatchNorm2d over the whole batch in fp64 on the CPU."""
    from torch.nn.modules._functions import SyncBatchNorm as SyncBatchNormFunction

    torch.cuda.set_device(gpu)
    dist.init_process_group(backend, init_method=init, rank=rank, world_size=world)
    try:
        generator = torch.Generator().manual_seed(0)
        channels, per_rank = 64, 4
        whole = torch.randn(per_rank * world, channels, 33, 65, generator=generator, dtype=torch.float64) * 3 + 1
        weight = torch.rand(channels, generator=generator, dtype=torch.float64) + 0.5
        bias = torch.randn(channels, generator=generator, dtype=torch.float64)
        upstream = torch.randn(whole.shape, generator=generator, dtype=torch.float64)

        reference = nn.BatchNorm2d(channels, dtype=torch.float64).train()
        with torch.no_grad():
            reference.weight.copy_(weight)
            reference.bias.copy_(bias)
        x_ref = whole.clone().requires_grad_(True)
        y_ref = reference(x_ref)
        (y_ref * upstream).sum().backward()

        device = torch.device("cuda", gpu)
        rows = slice(rank * per_rank, (rank + 1) * per_rank)
        x = whole[rows].float().to(device).requires_grad_(True)
        w = weight.float().to(device).requires_grad_(True)
        b = bias.float().to(device).requires_grad_(True)
        running_mean, running_var = torch.zeros(channels, device=device), torch.ones(channels, device=device)
        out = SyncBatchNormFunction.apply(x, w, b, running_mean, running_var, 1e-5, 0.1, dist.group.WORLD, world)
        (out * upstream[rows].float().to(device)).sum().backward()
        # weight/bias gradients are per-rank partial sums in torch's SyncBatchNorm (DDP adds them)
        grad_w, grad_b = w.grad.clone(), b.grad.clone()
        dist.all_reduce(grad_w)
        dist.all_reduce(grad_b)
        errors = {
            "output": relative_error(out.detach().cpu(), y_ref.detach()[rows]),
            "grad_input": relative_error(x.grad.cpu(), x_ref.grad[rows]),
            "grad_weight": relative_error(grad_w.cpu(), reference.weight.grad),
            "grad_bias": relative_error(grad_b.cpu(), reference.bias.grad),
            "running_mean": relative_error(running_mean.cpu(), reference.running_mean),
            "running_var": relative_error(running_var.cpu(), reference.running_var),
        }
    finally:
        dist.destroy_process_group()
    tolerance = 1e-4  # fp32 against fp64 over 4x33x65 values per channel and rank
    return {"status": "pass" if max(errors.values()) <= tolerance else "fail", "errors": errors, "tolerance": tolerance}


# --- speed ---------------------------------------------------------------------------------------


def speed_grid(compile_rows: bool) -> list[SpeedRow]:
    """Most important first: the study's row (R34, bf16, batch 8, channels_last) and what issue
    24 asks of it (compiled: its first step compiles, ~1 min; batch 16; torch's default Adam on
    CUDA, foreach, beside training's fused; without the finite-loss verdict's wait), the study's
    model in every precision and layout, then the mmseg backbones, then the smaller batch."""
    rows = [SpeedRow(34, 8, "bf16", True, False)]
    rows += [SpeedRow(34, 8, "bf16", True, True)] if compile_rows else []
    rows += [SpeedRow(34, 16, "bf16", True, False), SpeedRow(34, 8, "bf16", True, False, optimizer="foreach"),
             SpeedRow(34, 8, "bf16", True, False, finite_check=False)]  # fmt: skip
    rows += [SpeedRow(34, 8, p, cl, False) for p in ("bf16", "fp32", "fp16") for cl in (True, False)
             if (p, cl) != ("bf16", True)]  # fmt: skip
    rows += [SpeedRow(d, 8, p, True, False) for d in (50, 101) for p in ("bf16", "fp32")]
    rows += [SpeedRow(d, 4, "bf16", True, False) for d in (34, 50, 101)]
    rows += [SpeedRow(34, 4, "bf16", True, True), SpeedRow(101, 8, "bf16", True, True)] if compile_rows else []
    return rows


def train_speed_grid(peak: float | None, deadline: float, compile_rows: bool) -> list[dict[str, Any]]:
    results = []
    for row in speed_grid(compile_rows):
        if time.perf_counter() > deadline:
            results.append({**row, "status": "skipped", "reason": "time budget spent"})
            continue
        results.append(measure_train_step(row, torch.device("cuda"), peak))
        print("  " + format_train_row(results[-1]), flush=True)
    return results


def eval_speed(deadline: float) -> list[dict[str, Any]]:
    """Full-resolution inference of the study's model: bf16, channels_last, one image at a time."""
    modes = [
        TestTimeAugmentation("whole"),
        TestTimeAugmentation("slide", STUDY_WINDOW, default_stride(STUDY_WINDOW)),
        TestTimeAugmentation("whole", flip=True),
        TestTimeAugmentation("slide", STUDY_WINDOW, default_stride(STUDY_WINDOW), flip=True),
    ]
    results = []
    for tta in modes:
        if time.perf_counter() > deadline + 30:  # evaluation is short: a little past the budget
            results.append({"mode": mode_name(tta), "status": "skipped", "reason": "time budget spent"})
            continue
        try:
            results.append(measure_eval(34, (1024, 2048), tta, torch.device("cuda"), images=5))
        except Exception as e:  # reported, not fatal
            results.append({"mode": mode_name(tta), "status": f"error: {type(e).__name__}: {str(e)[:200]}"})
    return results


def loader_speed(tiny: bool, train_images_per_s: float | None) -> list[dict[str, Any]]:
    """seg's training pipeline on one core, measured as tools/bench_loader.py measures it
    (which has every variant): full-size PNG shards with the geometry in the worker, and
    shards packed at the training size with the geometry on the device (``pack --resize``,
    ``data.geometry_on_device``)."""
    from seg.core.cli import Size
    from seg.data.synthetic import make_synthetic
    from seg.data.transforms import TrainGeometry

    frame, train_size, frames, seconds = (
        (Size(128, 256), (64, 128), 8, 0.5) if tiny else (Size(1024, 2048), (512, 1024), 24, 3.0)
    )
    rows = []
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as scratch:
        root = Path(scratch) / "cityscapes"
        workers = min(os.cpu_count() or 1, 8)
        make_synthetic(root, counts={"train": frames, "val": 0, "test": 0}, cities={"train": 3, "val": 1, "test": 1},
                       size=frame, workers=workers, progress=False)  # fmt: skip
        folders = pack_shards(root, Path(scratch), train_size, ("full-size PNG", "train-size PNG"), workers)
        geometry = TrainGeometry("resize", train_size, "standard")
        # named with the sizes stored: the tiny frames are not Cityscapes' full size
        full, small = format_size(frame), format_size(train_size)
        pipelines = ((f"full-size PNG ({full}), geometry in the worker", "full-size PNG", False),
                     (f"train-size PNG ({small}), geometry on the device", "train-size PNG", True))  # fmt: skip
        for name, shards, on_device in pipelines:
            with one_core():
                per_core = pipeline_rate(folders[shards], geometry, on_device, seconds)
            row: dict[str, Any] = {"pipeline": name, "images_per_s_per_core": round(per_core, 2)}
            if train_images_per_s:
                row["cores_to_feed_fastest_row"] = math.ceil(train_images_per_s / per_core)
                row["fastest_row_images_per_s"] = train_images_per_s
            rows.append(row)
    return rows


# --- printing ------------------------------------------------------------------------------------


def format_environment(env: dict[str, Any]) -> str:
    keys = ("device", "devices", "capability", "memory_gib", "torch", "cuda", "cudnn", "nccl", "cpu_cores")
    return "gpu-check on " + ", ".join(f"{k} {env[k]}" for k in keys if k in env)


def format_checks(checks: list[dict[str, Any]]) -> str:
    lines = ["| check | status | details |", "| --- | --- | --- |"]
    for check in checks:
        details = {k: v for k, v in check.items() if k not in ("name", "status", "seconds")}
        lines.append(f"| {check['name']} | {check['status']} | {_short(details)} |")
    return "\n".join(lines)


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.2e}" if value and abs(value) < 1e-2 else f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_short(v)}" for k, v in value.items())
    if isinstance(value, list):
        return "[" + " ".join(_short(v) for v in value) + "]"
    return str(value)


TRAIN_HEADER = ("| model | batch | precision | channels_last | compile | Adam | finite check | images/s | step ms | "
                "peak GiB | TFLOP/img | MFU % |\n" + "| --- " * 12 + "|")  # fmt: skip


def format_train_row(r: dict[str, Any]) -> str:
    cells = [f"R{r['depth']}-OS8 {r['size']}", r["batch"], r["precision"], "on" if r["channels_last"] else "off",
             "on" if r["compile"] else "off", r["optimizer"], "on" if r["finite_check"] else "off"]  # fmt: skip
    if r["status"] == "ok":
        cells += [r["images_per_s"], r["step_ms"], r.get("peak_memory_gib", "-"), r["tflop_per_image"],
                  r.get("mfu_percent", "-")]  # fmt: skip
    else:
        cells += [r["status"] + (f": {r.get('error') or r.get('reason')}" if r.get("error") or r.get("reason") else "")]
        cells += [""] * 4
    return "| " + " | ".join(map(str, cells)) + " |"


def format_train(rows: list[dict[str, Any]]) -> str:
    return "\n".join([TRAIN_HEADER, *map(format_train_row, rows)])


def format_eval(rows: list[dict[str, Any]]) -> str:
    lines = ["| evaluation | input | images/s |", "| --- | --- | --- |"]
    for r in rows:
        rate = r.get("images_per_s", r["status"])
        lines.append(f"| {r['mode']} | {r.get('size', '')} | {rate} |")
    return "\n".join(lines)


def format_loader(rows: list[dict[str, Any]]) -> str:
    lines = []
    for row in rows:
        line = f"loader, {row['pipeline']}: {row['images_per_s_per_core']} images/s per core"
        if "cores_to_feed_fastest_row" in row:
            line += (f"; feeding {row['fastest_row_images_per_s']} images/s takes "
                     f"{row['cores_to_feed_fastest_row']} cores")  # fmt: skip
        lines.append(line)
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
