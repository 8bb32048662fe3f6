"""A training step and its log line: ``train_on_batch`` (the loop's step over a loader batch)
over ``train_step`` (the optimizer's micro-batch step, timed alone by the GPU check), and
the ``LogWindow`` of steps between two log lines."""

from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate import Accelerator
from tqdm import tqdm

from seg.core.distributed import all_reduce_sum
from seg.data.augment import cut_on_device
from seg.training.records import FoldData, Run, TrainingState


def train_on_batch(
    run: Run, data: FoldData, training: TrainingState, batch: dict[str, Any]
) -> tuple[torch.Tensor, dict]:
    """The loop's step: one batch as the loader gives it (uint8, on the host) moved to the
    device, cut there (data.geometry_on_device), augmented and trained on through
    ``train_step``; the schedule and the EMA follow every optimizer step. A non-finite loss
    is raised with the step and what to do."""
    device = run.device
    images, labels = batch["image"].to(device, non_blocking=True), batch["label"].to(device, non_blocking=True)
    if run.config.data.geometry_on_device:
        images, labels = cut_on_device(images, labels, batch["window"], batch["flip"], data.geometry.size)
    images, labels = data.augment(images, labels)
    try:
        loss, parts, stepped = train_step(
            training.model,
            images,
            labels,
            training.loss_fn,
            training.optimizer,
            run.accelerator,
            run.config.optim.clip_grad_norm,
        )
    except FloatingPointError:
        step = training.progress.step
        raise FloatingPointError(
            f"loss is NaN or inf at step {step} (epoch {step / data.steps_per_epoch:.2f}): "
            f"lower optim.lr, check the data, or use train.precision=bf16 instead of fp16"
        ) from None
    if stepped:
        training.schedule.step()
        if training.ema is not None:
            training.ema.update_parameters(run.accelerator.unwrap_model(training.model))
    return loss, parts


def train_step(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    loss_fn: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    accelerator: Accelerator,
    clip_grad_norm: float | None,
    check_finite: bool = True,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], bool]:
    """The optimizer's step on tensors already on the device, knowing nothing of the run:
    one micro-batch's forward, loss (fp32), backward, and on the last micro-batch of an
    accumulation the clipped optimizer step. Returns (loss, parts, whether it stepped).
    Every rank checks that its loss is finite before any collective backward. The GPU check
    times this alone (tools/gpu_check.py, through tools/bench_train.py), and once with
    ``check_finite=False``: what that check's wait for the device costs a step."""
    with accelerator.accumulate(model):
        with accelerator.autocast():
            logits = model(images)
        loss, parts = loss_fn(logits, labels)
        # one wait for the device a step (the ranks' verdict read back), not one per rank and one more
        if check_finite and all_reduce_sum((~torch.isfinite(loss.detach())).float().reshape(1)).item() > 0:
            raise FloatingPointError("the loss is not finite")
        accelerator.backward(loss)
        if accelerator.sync_gradients and clip_grad_norm:
            accelerator.clip_grad_norm_(model.parameters(), clip_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        stepped = accelerator.sync_gradients and not accelerator.optimizer_step_was_skipped
    return loss.detach(), parts, stepped


WAIT_WARNING = 0.10  # a data-wait share above this for WAIT_LOGS log steps in a row is said once
WAIT_LOGS = 3


@dataclass
class LogWindow:
    """The steps since the last log line (a window of the run, reset at each log line): their
    count and wall time give images per second, and the time blocked on the loader the data
    wait share; it also remembers whether that share has been too high for a while."""

    start: float = field(default_factory=time.time)
    steps: int = 0
    waited: float = 0.0  # seconds blocked on the loader
    slow_logs: int = 0  # log steps in a row above WAIT_WARNING
    warned: bool = False

    def too_slow(self, wait_share: float) -> bool:
        """Whether to say now that the loader holds training back: the share has been above
        WAIT_WARNING for WAIT_LOGS log steps in a row (said once a run)."""
        self.slow_logs = self.slow_logs + 1 if wait_share > WAIT_WARNING else 0
        if self.slow_logs >= WAIT_LOGS and not self.warned:
            self.warned = True
            return True
        return False


def progress_bar(run: Run, total: int, initial: int) -> tqdm:
    """A tqdm bar on a terminal (main process); elsewhere a line per log step instead."""
    disable = not (run.main_process and sys.stderr.isatty())
    return tqdm(
        total=total, initial=initial, disable=disable, desc=f"fold {run.args.fold}", unit="step", dynamic_ncols=True
    )


def log_step(
    run: Run,
    data: FoldData,
    training: TrainingState,
    loss: torch.Tensor,
    parts: dict[str, torch.Tensor],
    window: LogWindow,
    bar: tqdm,
) -> None:
    """The loss and its parts averaged over the ranks, the lr, images/s and memory: recorded,
    and shown on the bar or as a line."""
    config, progress = run.config, training.progress
    if run.cuda:  # the queued kernels end before the clock is read: here only, so the steps between run freely
        torch.cuda.synchronize(run.device)
    waited = torch.tensor(window.waited, device=loss.device)
    values = all_reduce_sum(torch.stack([loss, *parts.values(), waited]).float()) / run.world
    seconds = max(time.time() - window.start, 1e-9)
    per_process = window.steps * config.train.batch_size / seconds
    wait_share = min(values[-1].item() / seconds, 1.0)  # the ranks' mean
    entry = {
        "train/loss": values[0].item(),
        "train/lr": training.schedule.lr(),
        "train/images_per_s": per_process * run.world,
        "train/images_per_s_per_process": per_process,
        "train/data_wait_s": values[-1].item(),
        "train/data_wait_share": wait_share,
        "train/memory_mb": memory_mb(run.device),
    }
    entry |= {f"train/{k}": v.item() for k, v in zip(parts, values[1:-1], strict=True)}
    run.record(entry, progress, data.steps_per_epoch)
    bar.set_postfix(loss=f"{entry['train/loss']:.4f}", lr=f"{entry['train/lr']:.2e}", data_wait=f"{wait_share:.0%}")
    if run.main_process and bar.disable:
        print(
            f"step {progress.step}/{data.total_steps} loss {entry['train/loss']:.4f} "
            f"lr {entry['train/lr']:.2e} {entry['train/images_per_s']:.1f} img/s, data wait {wait_share:.0%}",
            flush=True,
        )
    if window.too_slow(wait_share) and run.main_process:
        print(
            f"warning: training waited for data {wait_share:.0%} of the time in {WAIT_LOGS} log steps in a row: "
            f"pack the shards at the training size (tools/pack_cityscapes.py --resize WxH), set "
            f"data.geometry_on_device=true, raise data.workers, or pack JPEG (--image-format jpg)",
            file=sys.stderr,
            flush=True,
        )
    window.start, window.steps, window.waited = time.time(), 0, 0.0


def memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
