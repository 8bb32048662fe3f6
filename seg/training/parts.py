"""The run's parts: the fold's data (groups, geometry, augmentation, length, the training
stream) and the model with its optimisation (loss, optimizer, schedule, EMA)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from seg.core.distributed import convert_sync_batchnorm
from seg.data.augment import DeviceAugment
from seg.data.loader import packed_size, shards_of, train_loader
from seg.data.manifest import FoldSplit, ManifestError
from seg.data.transforms import TrainGeometry
from seg.model.deeplab import from_config
from seg.model.weights import WeightsError, load_backbone, load_weights
from seg.recipe import losses, optim
from seg.recipe.identity import SCRATCH, run_length
from seg.recipe.schedule import Schedule
from seg.training.records import FoldData, Progress, Run, TrainingState


def fold_data(run: Run, split: FoldSplit | None) -> tuple[FoldData | None, str | None]:
    """The fold's groups and geometry, checked against the manifest; or why they can't be used.
    ``split``: the fold's split as read at the start (None: it couldn't be; read it for the error)."""
    data = run.config.data
    try:
        split = split or FoldSplit.of(data.shards, run.args.fold)
        geometry = TrainGeometry.from_config(data)
        error = geometry.source_problem(packed_size(split.manifest))
        if run.main_process and not error:  # presence; sizes (under on_error=raise) or sha256 (data.checksums)
            groups = [*split.train_groups, split.val_group]
            shards_of(data.shards, groups, data.checksums, sizes=data.on_error == "raise")
    except ManifestError as e:
        error = str(e)
    if error:
        return None, error
    augment = DeviceAugment(data.level, data.channels_last).to(run.device)
    per_epoch, total = run_length(run.config, split, run.world)
    return FoldData(split, geometry, augment, per_epoch, total), None


def training_loader(run: Run, data: FoldData, start_epoch: int) -> torch.utils.data.DataLoader:
    """The fold's training stream from ``start_epoch``, the same on every rank whatever its restarts."""
    config = run.config
    return train_loader(
        data.split,
        data.geometry,
        config.train.batch_size,
        run.rank,
        run.world,
        config.data.workers,
        config.train.seed,
        start_epoch=start_epoch,
        shuffle_buffer=config.data.shuffle_buffer,
        on_error=config.data.on_error,
        pin_memory=run.cuda,
        checksums=False,
        geometry_on_device=config.data.geometry_on_device,
        cache=config.data.cache_dir,
    )


def stream_at(loader: torch.utils.data.DataLoader, position: int) -> Iterator[dict[str, Any]]:
    """The loader's stream, ``position`` batches into the epoch: where a stopped run left it."""
    batches = iter(loader)
    for _ in range(position):
        next(batches)
    return batches


def load_model(run: Run) -> tuple[torch.nn.Module, str | None]:
    """The network with its starting weights (a previous stage's model, or ImageNet weights for
    the backbone); or why those weights don't fit."""
    config = run.config
    model = from_config(config.model, training=True)  # with model.aux_head's head
    try:
        if run.args.init_from not in (None, SCRATCH):
            load_weights(model, run.args.init_from, config.model)
        elif config.model.pretrained:
            missing, unexpected = load_backbone(model, config.model.pretrained)
            if run.main_process:
                print(f"backbone weights: missing {missing or 'none'}, unexpected {unexpected or 'none'}")
    except (WeightsError, RuntimeError) as e:
        return model, str(e).split("\n\t")[0]
    return model, None


def optimisation(run: Run, data: FoldData, model: torch.nn.Module) -> TrainingState:
    """Synchronised BatchNorm, the loss, optimizer, schedule and EMA, prepared by accelerate
    and registered for its checkpoints with the progress."""
    config, accelerator = run.config, run.accelerator
    if config.model.sync_bn and run.world > 1:
        model = convert_sync_batchnorm(model, run.cuda)
    if config.data.channels_last:
        model = model.to(memory_format=torch.channels_last)
    aux_weight = config.model.aux_weight if config.model.aux_head else None
    loss_fn = losses.from_config(config.loss, data.split.class_pixels(), run.world > 1, aux_weight).to(run.device)
    optimizer = optim.from_config(config.optim, model)
    schedule = Schedule.from_config(optimizer, config.schedule, data.total_steps // config.train.grad_accum)
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
    return TrainingState(model, loss_fn, optimizer, schedule, ema, progress)
