"""Train one fold of one stage.

    accelerate launch [--num_processes N ...] seg/train.py --config configs/X.yaml --fold k \\
        [--stage s] [--init-from runs/X/stage{s-1}/reduced/model.safetensors] [key=value ...]
    torchrun --nproc_per_node N seg/train.py ...      python seg/train.py ... (one process)

On a machine without CUDA it runs on the CPU over gloo. State goes to
``runs/<experiment>/stage{s}/fold{k}/`` (see seg/checkpoint.py). On SIGTERM or SIGUSR1
every rank stops at the same step, the state is saved, a PREEMPTED file is written in the
fold's folder, and every rank exits with EXIT_REQUEUE (75); a job script turns either into
a requeue, and ``--resume auto`` (the default) continues from the newest complete state.
SIGINT (Ctrl-C) stops and saves the same way, without the marker, and exits
EXIT_INTERRUPTED (130). The handlers are installed before anything else (seg/signals.py):
a signal during start-up stops the run before its first step. Data workers ignore all three.
"""

# ruff: noqa: E402 (the signal handlers are installed before the heavy imports)
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script (accelerate launch seg/train.py): make `seg` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from seg.signals import Signals

# Caught from here on, before the imports that take seconds: a signal during them is not lost.
EARLY_SIGNALS = Signals().install() if __name__ == "__main__" else None

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from omegaconf import OmegaConf
from tqdm import tqdm

from seg.atomic import atomic_write_bytes
from seg.augment import DeviceAugment, cut_on_device
from seg.checkpoint import MetricsLog, export_weights, is_state, latest_state, prune_states, run_dir, state_name
from seg.config import ConfigError, load_config, to_dict
from seg.data import DataError, eval_loader, packed_size, shards_of, train_loader
from seg.data import steps_per_epoch as epoch_steps
from seg.distributed import all_reduce_sum, convert_sync_batchnorm
from seg.evaluate import evaluate
from seg.losses import CombinedLoss, class_weights_from_pixels, ohem_cross_entropy
from seg.manifest import ManifestError, fold_groups, load_manifest
from seg.model import WeightsError, from_config, load_backbone, load_weights
from seg.schedule import Schedule
from seg.tracking import Tracker
from seg.transforms import TrainGeometry

EXIT_REQUEUE = 75  # saved on a preemption signal (TERM, USR1): requeue and resume
EXIT_INTERRUPTED = 130  # saved on Ctrl-C (INT): stopped by hand, rerun to resume
# Written beside the state on preemption, removed when the fold resumes: launchers such as
# torchrun report a child's 75 as their own exit code 1, so job scripts look for this file.
PREEMPTED = "PREEMPTED"


@dataclass
class Progress:
    """Where the run is: saved with every resumable state."""

    step: int = 0  # micro-batches done
    best_miou: float = -1.0
    best_step: int = -1
    bad_evals: int = 0
    skipped: int = 0  # unreadable samples skipped (data.on_error=skip)
    final: dict[str, Any] = field(default_factory=dict)  # the latest evaluation: a run resumed at its end reports it

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="experiment YAML (configs/)")
    parser.add_argument("--fold", type=int, required=True, help="the fold to train (validates on its group)")
    parser.add_argument("--stage", type=int, default=1)
    parser.add_argument("--init-from", help="weights to start from (a reduced model of the previous stage)")
    parser.add_argument("--resume", default="auto", help="auto (newest complete state, if any) | none | a state folder")
    parser.add_argument(
        "--print-run-dir", action="store_true", help="print the fold's folder and exit (for job scripts)"
    )
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. train.epochs=5 data.workers=4")
    return parser.parse_args(argv)


def build_loss(config: Any, class_weights: torch.Tensor | None, distributed: bool) -> torch.nn.Module:
    loss = config.loss
    if loss.name == "combined":
        return CombinedLoss(loss.alpha, loss.label_smoothing, class_weights, distributed=distributed)
    if loss.name == "ce":
        return CombinedLoss(1.0, loss.label_smoothing, class_weights, distributed=distributed)

    class OHEM(torch.nn.Module):
        def forward(self, logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, dict]:
            value = ohem_cross_entropy(logits, target, loss.ohem_threshold, loss.ohem_min_kept, class_weights)
            return value, {"ohem": value.detach()}

    return OHEM()


def build_optimizer(config: Any, model: torch.nn.Module) -> torch.optim.Optimizer:
    optim = config.optim
    backbone = [p for n, p in model.named_parameters() if n.startswith("backbone.")]
    head = [p for n, p in model.named_parameters() if not n.startswith("backbone.")]
    groups = [{"params": backbone, "lr": optim.lr * optim.backbone_lr_mult}, {"params": head, "lr": optim.lr}]
    if optim.name == "sgd":
        return torch.optim.SGD(groups, lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay)
    kind = torch.optim.AdamW if optim.name == "adamw" else torch.optim.Adam
    return kind(groups, lr=optim.lr, weight_decay=optim.weight_decay)


def train_step(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    loss_fn: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    accelerator: Accelerator,
    clip_grad_norm: float | None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], bool]:
    """One micro-batch: forward, loss (fp32), backward, and on the last micro-batch of an
    accumulation the clipped optimizer step. Returns (loss, parts, whether it stepped).
    Every rank checks that its loss is finite before any collective backward."""
    with accelerator.accumulate(model):
        with accelerator.autocast():
            logits = model(images)
        loss, parts = loss_fn(logits, labels)
        bad = all_reduce_sum(torch.tensor([0.0 if torch.isfinite(loss) else 1.0], device=loss.device))
        if bad.item() > 0:
            raise FloatingPointError("the loss is not finite")
        accelerator.backward(loss)
        if accelerator.sync_gradients and clip_grad_norm:
            accelerator.clip_grad_norm_(model.parameters(), clip_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        stepped = accelerator.sync_gradients and not accelerator.optimizer_step_was_skipped
    return loss.detach(), parts, stepped


def save_state(accelerator: Accelerator, out: Path, step: int, keep_last: int, keep: set[str]) -> Path:
    """A resumable state, renamed into place only once every rank has written its part."""
    final = out / "checkpoints" / state_name(step)
    if final.exists():
        return final
    tmp = out / "checkpoints" / f".{final.name}.partial"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        os.replace(tmp, final)
        prune_states(out, keep_last, keep)
    accelerator.wait_for_everyone()
    return final


def memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def refusal(args: argparse.Namespace, config: Any) -> str | None:
    """What makes the run impossible, found before any process group or wandb run exists."""
    if config.train.precision == "fp16" and not torch.cuda.is_available():
        return "config key 'train.precision': fp16 needs a GPU; use bf16 on the CPU"
    world = int(os.environ.get("WORLD_SIZE", "1"))  # set by torchrun / accelerate launch
    per_norm = config.train.batch_size * (world if config.model.sync_bn else 1)
    if per_norm == 1 and config.model.aspp_pool_norm:
        return (
            f"config key 'train.batch_size': 1 image per BatchNorm ({world} process(es), model.sync_bn="
            f"{config.model.sync_bn}) leaves the ASPP image-pooling BatchNorm one value per channel; "
            f"set model.aspp_pool_norm=false (or use 2+ processes with model.sync_bn=true)"
        )
    if args.resume not in ("auto", "none") and not is_state(Path(args.resume)):
        return (
            f"--resume {args.resume}: not a resumable state (a runs/.../checkpoints/step-NNNNNNNN folder); "
            f"pass auto, none or such a folder"
        )
    return None


def complete_before(args: argparse.Namespace, config: Any) -> dict[str, Any] | None:
    """The summary of an earlier run of this fold that already did all this run would do, from
    the fold's files alone (nothing loaded, no process group). Read before the process group
    exists, it cannot be this run's own summary: no rank writes one before every rank joined."""
    out = run_dir(config.train.runs_dir, config.train.experiment, args.stage, args.fold)
    summary_path = out / "summary.json"
    if args.resume == "none" or not summary_path.is_file() or (out / PREEMPTED).exists():
        return None
    try:
        summary = json.loads(summary_path.read_text())
        manifest = load_manifest(config.data.shards)
        train_groups, _ = fold_groups(manifest, args.fold)
    except (json.JSONDecodeError, ManifestError, OSError):
        return None  # the run itself will say what is wrong
    world = int(os.environ.get("WORLD_SIZE", "1"))
    samples = sum(manifest["groups"][g]["samples"] for g in train_groups)
    per_epoch = epoch_steps(samples, config.train.batch_size, world, config.data.workers)
    total = config.train.iters * config.train.grad_accum if config.train.iters else config.train.epochs * per_epoch
    return summary if summary.get("stopped_early") or summary.get("steps", -1) >= total else None


def preempted_exit_code() -> int:
    """EXIT_REQUEUE, or what SEG_PREEMPTED_EXIT asks for: slurm/fold.sh asks for 0, since a
    launcher (torchrun) reports a child's 75 as a failure with a traceback, and the script
    reads the PREEMPTED marker instead."""
    return int(os.environ.get("SEG_PREEMPTED_EXIT", EXIT_REQUEUE))


def refused_together(accelerator: Accelerator, error: str | None) -> bool:
    """Every rank's verdict to every rank: on an error of any rank, the main process prints
    the first one and every rank leaves the process group, none left waiting at a barrier."""
    first = next((e for e in gather_object([error]) if e), None)
    if first:
        if accelerator.is_main_process:
            print(f"error: {first}", file=sys.stderr, flush=True)
        accelerator.end_training()
    return first is not None


def agreed_signal(signals: Signals, device: torch.device, skipped: float = 0.0) -> tuple[int, float]:
    """One small all-reduce: the exit code every rank takes for the signals any rank caught
    (0: go on; a preemption outranks a Ctrl-C), and the samples skipped on all ranks."""
    flags = torch.tensor([float(signals.preempted), float(signals.interrupted), skipped], device=device)
    preempted, interrupted, skipped = all_reduce_sum(flags).tolist()
    return (EXIT_REQUEUE if preempted else EXIT_INTERRUPTED if interrupted else 0), skipped


def stop_on_signal(accelerator: Accelerator, out: Path, progress: Progress, keep_last: int, code: int) -> None:
    """Every rank, at the same step: save (when there is a step to save), write the PREEMPTED
    marker for a requeue, and say so: a line per rank on preemption, one line on Ctrl-C."""
    saved = progress.step > 0
    if saved:
        save_state(accelerator, out, progress.step, keep_last, {state_name(progress.best_step)})
    what = f"state saved at step {progress.step}" if saved else "nothing to save before the first step"
    if code == EXIT_REQUEUE:
        if accelerator.is_main_process:
            state = state_name(progress.step) if saved else None
            marker = {"step": progress.step, "state": state, "time": time.time()}
            atomic_write_bytes(out / PREEMPTED, (json.dumps(marker) + "\n").encode())
        print(f"rank {accelerator.process_index}: preempted, {what}; exit {preempted_exit_code()}", flush=True)
    elif accelerator.is_main_process:
        print(f"interrupted: {what} in {out}; rerun the same command to resume; exit {code}", flush=True)


def stream_at(loader: torch.utils.data.DataLoader, position: int) -> Iterator[dict[str, Any]]:
    """The loader's stream, ``position`` batches into the epoch: where a stopped run left it."""
    batches = iter(loader)
    for _ in range(position):
        next(batches)
    return batches


def main(argv: list[str] | None = None) -> int:
    signals = (EARLY_SIGNALS or Signals()).install()
    try:
        return train(parse_args(argv), signals)
    finally:
        if EARLY_SIGNALS is None:  # a caller in the same process gets its handlers back; a
            signals.restore()  # script keeps them to its end: a launcher's TERM as it leaves is no crash


def train(args: argparse.Namespace, signals: Signals) -> int:
    # --- configuration ---------------------------------------------------------------
    try:
        config = load_config(args.config, args.overrides, args.stage)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.print_run_dir:
        print(run_dir(config.train.runs_dir, config.train.experiment, args.stage, args.fold))
        return 0
    cuda = torch.cuda.is_available()
    error = refusal(args, config)
    if error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    done = complete_before(args, config)
    if done is not None:
        if int(os.environ.get("RANK", "0")) == 0:
            out = run_dir(config.train.runs_dir, config.train.experiment, args.stage, args.fold)
            print(f"{out} is complete (step {done['steps']}); nothing to do", flush=True)
        return 0

    # --- processes ---------------------------------------------------------------------
    accelerator = Accelerator(
        cpu=not cuda,  # accelerate must be told: gloo on the CPU
        mixed_precision=config.train.precision,
        gradient_accumulation_steps=config.train.grad_accum,
        step_scheduler_with_optimizer=False,
        dynamo_backend="inductor" if config.train.compile else "no",
    )
    # fixed input sizes: let cuDNN time its kernels once (the GPU check measures with it on)
    torch.backends.cudnn.benchmark = cuda and not config.train.deterministic
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    main_process = accelerator.is_main_process
    out = run_dir(config.train.runs_dir, config.train.experiment, args.stage, args.fold)
    if main_process:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out / "config.yaml", OmegaConf.to_yaml(config).encode())
        (out / PREEMPTED).unlink(missing_ok=True)  # an earlier attempt's
        print(OmegaConf.to_yaml(config), flush=True)
    set_seed(config.train.seed + rank, deterministic=config.train.deterministic)
    # Where each rank runs, for the summary: torchrun's GROUP_RANK is the machine rank.
    machines = gather_object([(int(os.environ.get("GROUP_RANK", 0)), os.environ.get("SLURMD_NODENAME", ""))])

    # --- data ----------------------------------------------------------------------------
    data, error = config.data, None
    try:
        manifest = load_manifest(data.shards)
        train_groups, val_group = fold_groups(manifest, args.fold)
        geometry = TrainGeometry(data.geometry, tuple(data.size), data.level, base_size=tuple(data.base_size))
        error = geometry.source_problem(packed_size(manifest))
        if main_process and not error:  # presence; sizes (under on_error=raise) or sha256 (data.checksums)
            shards_of(data.shards, [*train_groups, val_group], data.checksums, sizes=data.on_error == "raise")
    except ManifestError as e:
        error = str(e)
    if refused_together(accelerator, error):
        return 2
    augment = DeviceAugment(data.level, data.channels_last).to(device)

    fold_samples = sum(manifest["groups"][g]["samples"] for g in train_groups)
    steps_per_epoch = epoch_steps(fold_samples, config.train.batch_size, world, data.workers)
    total_steps = (
        config.train.iters * config.train.grad_accum if config.train.iters else config.train.epochs * steps_per_epoch
    )

    # --- model, loss, optimisation ------------------------------------------------------
    model = from_config(config.model)
    try:
        if args.init_from:
            load_weights(model, args.init_from, config.model)
        elif config.model.pretrained:
            missing, unexpected = load_backbone(model, config.model.pretrained)
            if main_process:
                print(f"backbone weights: missing {missing or 'none'}, unexpected {unexpected or 'none'}")
    except (WeightsError, RuntimeError) as e:
        error = str(e).split("\n\t")[0]
    if refused_together(accelerator, error):
        return 2
    if config.model.sync_bn and world > 1:
        model = convert_sync_batchnorm(model, cuda)
    if data.channels_last:
        model = model.to(memory_format=torch.channels_last)
    class_weights = None
    if config.loss.class_weights:
        pixels = torch.tensor([manifest["groups"][g]["class_pixels"] for g in train_groups]).sum(0)
        class_weights = class_weights_from_pixels(pixels, config.loss.class_weights).to(device)
    loss_fn = build_loss(config, class_weights, distributed=world > 1).to(device)
    optimizer = build_optimizer(config, model)
    sched = config.schedule
    schedule = Schedule(
        optimizer,
        sched.name,
        total_steps // config.train.grad_accum,
        sched.warmup_iters,
        sched.warmup_ratio,
        sched.power,
        sched.min_lr_ratio,
        sched.plateau_factor,
        sched.plateau_patience,
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    ema = None
    if config.train.ema_decay:
        ema = torch.optim.swa_utils.AveragedModel(
            accelerator.unwrap_model(model),
            multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(config.train.ema_decay),
            use_buffers=True,
        )
    progress = Progress()
    accelerator.register_for_checkpointing(schedule, progress, *([ema] if ema is not None else []))

    # --- resume -------------------------------------------------------------------------
    state = None if args.resume == "none" else latest_state(out) if args.resume == "auto" else Path(args.resume)
    if state is not None:
        try:
            accelerator.load_state(str(state))
        except (RuntimeError, ValueError, OSError, KeyError) as e:
            error = f"cannot resume from {state} ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
        if refused_together(accelerator, error):
            return 2
        if main_process:
            print(f"resumed from {state} at step {progress.step}", flush=True)
    summary_path = out / "summary.json"
    log = MetricsLog(out / "metrics.jsonl", progress.step if state else None) if main_process else None
    tracker = Tracker(to_dict(config), out, args.stage, args.fold, main_process)

    def record(entry: dict[str, Any]) -> None:
        entry = {"step": progress.step, "epoch": progress.step / steps_per_epoch, **entry}
        if log:
            log.write(entry)
        tracker.log({k: v for k, v in entry.items() if isinstance(v, int | float)}, progress.step)

    def run_evaluation() -> dict[str, Any]:
        autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.train.precision)
        evaluated = ema.module if ema is not None else model
        results = {}
        groups = {"fold": [val_group]} | ({"val": ["val"]} if config.train.eval_val else {})
        for name, group in groups.items():
            loader, expected = eval_loader(
                data.shards,
                group,
                1,
                tuple(data.eval_size) if data.eval_size else None,
                rank,
                world,
                data.workers,
                data.on_error,
                cuda,
                checksums=False,
            )
            matrix, seen, examples = evaluate(evaluated, loader, device, augment, autocast, config.wandb.images)
            result = matrix.compute()
            result["samples"], result["skipped"] = seen, expected - seen
            results[name] = result
            record({f"{name}/{k}": v for k, v in result.items() if k != "iou"} | {f"{name}/iou": result["iou"]})
            tracker.log_evaluation(name, result, matrix.matrix, examples, progress.step)
        return results

    def sidecar(metrics: dict[str, Any]) -> dict[str, Any]:
        return {
            "config": to_dict(config),
            "fold": args.fold,
            "stage": args.stage,
            "step": progress.step,
            "epoch": progress.step / steps_per_epoch,
            "metrics": metrics,
        }

    # --- the loop -------------------------------------------------------------------------
    patience = config.train.early_stop_patience
    stopped_early = bool(patience and progress.bad_evals >= patience)  # resumed after its early stop
    exit_code, _ = agreed_signal(signals, device)  # signalled during start-up: stop before the first step
    loader, _ = train_loader(
        data.shards,
        args.fold,
        geometry,
        config.train.batch_size,
        rank,
        world,
        data.workers,
        config.train.seed,
        start_epoch=progress.step // steps_per_epoch,
        shuffle_buffer=data.shuffle_buffer,
        on_error=data.on_error,
        pin_memory=cuda,
        checksums=False,
        geometry_on_device=data.geometry_on_device,
    )
    batches = stream_at(loader, progress.step % steps_per_epoch) if not exit_code else iter(())
    bar = tqdm(
        total=total_steps,
        initial=progress.step,
        disable=not (main_process and sys.stderr.isatty()),
        desc=f"fold {args.fold}",
        unit="step",
        dynamic_ncols=True,
    )
    started, window_start, window_steps = time.time(), time.time(), 0
    try:
        if exit_code:
            stop_on_signal(accelerator, out, progress, config.train.keep_last, exit_code)
        while not exit_code and not stopped_early and progress.step < total_steps:
            batch = next(batches)
            exit_code, skipped = agreed_signal(signals, device, float(batch["skipped"].sum()))
            if exit_code:  # this batch is not trained on; a resumed run draws it again
                stop_on_signal(accelerator, out, progress, config.train.keep_last, exit_code)
                break
            progress.skipped += int(skipped)
            images, labels = batch["image"].to(device, non_blocking=True), batch["label"].to(device, non_blocking=True)
            if data.geometry_on_device:
                images, labels = cut_on_device(images, labels, batch["window"], batch["flip"], geometry.size)
            images, labels = augment(images, labels)
            try:
                loss, parts, stepped = train_step(
                    model, images, labels, loss_fn, optimizer, accelerator, config.optim.clip_grad_norm
                )
            except FloatingPointError:
                raise FloatingPointError(
                    f"loss is NaN or inf at step {progress.step} (epoch {progress.step / steps_per_epoch:.2f}): "
                    f"lower optim.lr, check the data, or use train.precision=bf16 instead of fp16"
                ) from None
            if stepped:
                schedule.step()
                if ema is not None:
                    ema.update_parameters(accelerator.unwrap_model(model))
            progress.step += 1
            window_steps += 1
            bar.update()

            if progress.step % config.train.log_every == 0 or progress.step == total_steps:
                values = all_reduce_sum(torch.stack([loss, *parts.values()]).float()) / world
                seconds = time.time() - window_start
                per_process = window_steps * config.train.batch_size / max(seconds, 1e-9)
                entry = {
                    "train/loss": values[0].item(),
                    "train/lr": schedule.lr(),
                    "train/images_per_s": per_process * world,
                    "train/images_per_s_per_process": per_process,
                    "train/memory_mb": memory_mb(device),
                }
                entry |= {f"train/{k}": v.item() for k, v in zip(parts, values[1:], strict=True)}
                record(entry)
                bar.set_postfix(loss=f"{entry['train/loss']:.4f}", lr=f"{entry['train/lr']:.2e}")
                if main_process and bar.disable:
                    print(
                        f"step {progress.step}/{total_steps} loss {entry['train/loss']:.4f} "
                        f"lr {entry['train/lr']:.2e} {entry['train/images_per_s']:.1f} img/s",
                        flush=True,
                    )
                window_start, window_steps = time.time(), 0

            every = config.train.eval_every * (1 if config.train.iters else steps_per_epoch)
            if progress.step % every == 0 or progress.step == total_steps:
                progress.final = run_evaluation()
                miou = progress.final["fold"]["miou"]
                improved = schedule.observe(miou)
                if improved:
                    progress.best_miou, progress.best_step, progress.bad_evals = miou, progress.step, 0
                    if main_process:
                        export_weights(
                            accelerator.unwrap_model(ema.module if ema else model),
                            out / "best.safetensors",
                            sidecar(progress.final),
                        )
                else:
                    progress.bad_evals += 1
                if main_process:
                    print(f"step {progress.step}: fold mIoU {miou:.4f} (best {progress.best_miou:.4f})", flush=True)
                save_state(accelerator, out, progress.step, config.train.keep_last, {state_name(progress.best_step)})
                if patience and progress.bad_evals >= patience:
                    if main_process:
                        print(f"early stop: no better fold mIoU in {patience} evaluations", flush=True)
                    stopped_early = True
            if config.train.save_every and progress.step % config.train.save_every == 0:
                save_state(accelerator, out, progress.step, config.train.keep_last, {state_name(progress.best_step)})
        if not exit_code and not progress.final:  # resumed at the end from a state that lacks it
            progress.final = run_evaluation()
    except (DataError, FloatingPointError) as e:
        print(f"error (rank {rank}): {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        bar.close()

    # --- outputs -------------------------------------------------------------------------
    if exit_code == 0 and main_process:
        final = accelerator.unwrap_model(ema.module if ema else model)
        export_weights(final, out / "model.safetensors", sidecar(progress.final))
        summary = {
            "fold": args.fold,
            "stage": args.stage,
            "steps": progress.step,
            "steps_per_epoch": steps_per_epoch,
            "init_from": args.init_from,
            "processes": world,
            "machines": sorted({rank for rank, _ in machines}),
            "nodes": sorted({name for _, name in machines if name}),
            "best": {"miou": progress.best_miou, "step": progress.best_step},
            "final": progress.final,
            "skipped_samples": progress.skipped,
            "stopped_early": stopped_early,
            "seconds": time.time() - started,
        }
        atomic_write_bytes(summary_path, (json.dumps(summary, indent=1) + "\n").encode())
        print(f"done: {out} (best fold mIoU {progress.best_miou:.4f} at step {progress.best_step})", flush=True)
    tracker.finish()
    # Leave together: a launcher (torchrun) stops the other ranks as soon as one exits non-zero.
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return preempted_exit_code() if exit_code == EXIT_REQUEUE else exit_code


if __name__ == "__main__":
    sys.exit(main())
