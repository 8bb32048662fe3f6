"""Typed experiment configuration (OmegaConf structured configs).

A config is this schema, overlaid by a YAML file, overlaid by ``key=value`` overrides from
the command line. Unknown keys and values of the wrong type are refused with the key's
name; the resolved config is printed and saved with every run.

A YAML file may extend others, as mmseg's configs do: ``_base_: other.yaml`` (or a list,
merged in order), relative to the file that names it. Bases are merged first, then the
file's own keys, so a file only states what differs; sections merge key by key, while a
list, ``stages`` included, is replaced whole by the file that sets it (OmegaConf's merge).
Only the resolved config is saved and compared, so a based config and its flattened copy
are the same run.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf, read_write
from omegaconf.errors import OmegaConfBaseException
from yaml import YAMLError

from seg.core.cli import orientation
from seg.data.loader import ON_ERROR
from seg.data.transforms import GEOMETRIES, LEVELS
from seg.data.workers import AUTO, resolve_workers
from seg.model.deeplab import DEPTHS, HEADS, OUTPUT_STRIDES, STEMS
from seg.recipe.losses import CLASS_WEIGHTS, LOSSES
from seg.recipe.optim import OPTIMIZERS
from seg.recipe.schedule import SCHEDULES
from seg.results.tracking import BACKENDS, DEFAULT_BACKENDS, MODES, missing_package


@dataclass
class DataConfig:
    shards: str = MISSING  # a packed dataset (tools/pack_cityscapes.py): a folder, http(s):// or s3:// URL
    geometry: str = "resize"  # resize (the study) | scale-crop (mmseg)
    size: list[int] = field(default_factory=lambda: [512, 1024])  # training input (H, W)
    base_size: list[int] = field(default_factory=lambda: [1024, 2048])  # scale-crop's reference scale
    level: str = "standard"  # augmentation: none | standard | advanced
    eval_size: list[int] | None = None  # None: evaluate at full resolution; else resize images to it
    # DataLoader workers per process: a count, or auto: the cores this process may use (CPU
    # affinity, SLURM_CPUS_PER_TASK) shared among the run's processes on the machine, fixed at
    # the run's first start and kept by its resumes (seg.data.workers.auto_workers, resolve_auto)
    workers: int | str = AUTO
    shuffle_buffer: int = 32
    on_error: str = "raise"  # raise | skip (and count) unreadable samples
    checksums: bool = True  # verify shard sha256 before training (remote shards: always, as they arrive)
    cache_dir: str | None = None  # remote shards: keep each one fetched here (by sha256) for later epochs
    # the model and its input in channels_last: true | false | auto (on with CUDA, where it
    # wins by 26% (README, the GPU check); off on the CPU, where it loses: README, Benchmarks)
    channels_last: bool | str = AUTO
    # True: workers only decode and draw each sample's window; the cut and resize run batched
    # on the training device (seg.data.augment.cut_on_device), fewer CPU cores per GPU
    geometry_on_device: bool = False


@dataclass
class ModelConfig:
    depth: int = 34  # 18 | 34 | 50 | 101
    output_stride: int = 8  # 8 | 16
    aspp_pool_norm: bool = True  # False: batch 1 on a single device trains (see seg/model/deeplab.py)
    # ImageNet weights for the backbone: a file (.pth/.safetensors, torchvision's or ResNetV1c's
    # layout) or a name fetched into torch.hub's cache: imagenet (the one for model.depth and
    # model.stem), ResNet50_Weights.IMAGENET1K_V2 (torchvision's), open-mmlab://resnet50_v1c
    pretrained: str | None = None
    sync_bn: bool = True  # batch statistics over all processes
    stem: str = "torchvision"  # torchvision (7x7 conv) | deep (mmseg's ResNetV1c: 3x3 convs 32-32-64)
    contract_dilation: bool = False  # a dilated layer's first block at half the dilation (ResNetV1c)
    head: str = "aspp"  # aspp (the study's) | separable-aspp (mmseg's DepthwiseSeparableASPPHead)
    aux_head: bool = False  # mmseg's auxiliary FCNHead on layer3, in training only
    aux_weight: float = 0.4  # its cross entropy's weight in the loss


@dataclass
class LossConfig:
    name: str = "combined"  # combined | ce | ohem
    alpha: float = 0.6  # combined: alpha * CE + (1 - alpha) * Dice
    label_smoothing: float = 0.1
    class_weights: str | None = None  # None | inverse | inverse-sqrt | log (from the manifest's pixel counts)
    ohem_threshold: float = 0.7
    ohem_min_kept: int = 100_000


@dataclass
class OptimConfig:
    name: str = "adam"  # adam | adamw | sgd
    lr: float = 1e-4
    weight_decay: float = 1e-3
    momentum: float = 0.9  # sgd
    backbone_lr_mult: float = 1.0
    clip_grad_norm: float | None = 1.0


@dataclass
class ScheduleConfig:
    name: str = "plateau"  # constant | poly | cosine | plateau (of the validation mIoU)
    warmup_iters: int = 0  # linear warm-up from warmup_ratio * lr
    warmup_ratio: float = 0.1
    power: float = 0.9  # poly
    min_lr_ratio: float = 0.05  # cosine floor, and poly's end, as a share of lr
    plateau_factor: float = 0.5
    plateau_patience: int = 5  # evaluations in a row without a better mIoU let pass; the rate drops at the
    # next one (counted as torch's ReduceLROnPlateau counts)


@dataclass
class TrainConfig:
    experiment: str = "experiment"
    runs_dir: str = "runs"
    epochs: int = 20
    iters: int | None = None  # when set, train this many iterations instead of epochs (mmseg style)
    batch_size: int = 8  # per process; global batch = batch_size x processes x grad_accum
    grad_accum: int = 1
    precision: str = "no"  # no | bf16 | fp16 (fp16: GPU only, with loss scaling)
    compile: bool = False  # torch.compile through accelerate (inductor); measured in README, "The GPU check"
    eval_every: int = 1  # epochs (or, with iters, iterations)
    eval_val: bool = False  # also evaluate the official val split
    early_stop_patience: int | None = None  # evaluations without a better fold mIoU
    ema_decay: float | None = None
    keep_last: int = 2  # resumable states kept (plus the best)
    seed: int = 0
    log_every: int = 10  # iterations
    save_every: int | None = None  # also save a resumable state every this many iterations (None: at evaluations only)
    deterministic: bool = False


@dataclass
class WandbConfig:
    project: str = "seg"
    entity: str | None = None
    mode: str = "auto"  # auto (online with an API key, else offline) | online | offline | disabled
    images: int = 4  # predictions logged as overlays per evaluation


@dataclass
class TrackingConfig:
    # where runs are logged besides metrics.jsonl: wandb (the wandb section's settings) and/or
    # tensorboard (event files in the run's folder; pip install -e '.[tensorboard]'); [] for neither
    backends: list[str] = field(default_factory=lambda: list(DEFAULT_BACKENDS))


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    # What changes from stage to stage of the cross-validation chain: stage s (seg/train.py
    # --stage s) applies entry s, or the last entry beyond the list; e.g. [{}, {optim.lr: 3.0e-5}].
    stages: list[dict[str, Any]] = field(default_factory=list)


# Each choice is defined by the module that implements it.
CHOICES = {
    "data.geometry": GEOMETRIES,
    "data.level": LEVELS,
    "data.on_error": ON_ERROR,
    "model.depth": tuple(DEPTHS),
    "model.output_stride": tuple(OUTPUT_STRIDES),
    "model.stem": STEMS,
    "model.head": tuple(HEADS),
    "loss.name": LOSSES,
    "loss.class_weights": (None, *CLASS_WEIGHTS),
    "optim.name": tuple(OPTIMIZERS),
    "schedule.name": SCHEDULES,
    "train.precision": ("no", "bf16", "fp16"),  # accelerate's mixed_precision
    "wandb.mode": MODES,
}


# Keys that take ``auto`` (chosen for the machine by resolve_auto) or a value of this kind.
AUTO_KEYS = {"data.workers": "a number (0: load in the training process)", "data.channels_last": "true/false"}


# Numeric ranges: key -> (low, high, low included, high included); None is no bound. A key
# whose value may be None (off) is checked only when set.
RANGES: dict[str, tuple[float | None, float | None, bool, bool]] = {
    "data.workers": (0, None, True, False),
    "data.shuffle_buffer": (1, None, True, False),
    "model.aux_weight": (0, None, True, False),
    "loss.alpha": (0, 1, True, True),
    "loss.label_smoothing": (0, 1, True, False),
    "loss.ohem_threshold": (0, 1, False, True),
    "loss.ohem_min_kept": (1, None, True, False),
    "optim.lr": (0, None, False, False),
    "optim.weight_decay": (0, None, True, False),
    "optim.momentum": (0, 1, True, False),
    "optim.backbone_lr_mult": (0, None, True, False),
    "optim.clip_grad_norm": (0, None, False, False),
    "schedule.warmup_iters": (0, None, True, False),
    "schedule.warmup_ratio": (0, 1, True, True),
    "schedule.power": (0, None, False, False),
    "schedule.min_lr_ratio": (0, 1, True, True),
    "schedule.plateau_factor": (0, 1, False, True),
    "schedule.plateau_patience": (0, None, True, False),
    "train.epochs": (1, None, True, False),
    "train.iters": (1, None, True, False),
    "train.batch_size": (1, None, True, False),
    "train.grad_accum": (1, None, True, False),
    "train.eval_every": (1, None, True, False),
    "train.early_stop_patience": (1, None, True, False),
    "train.ema_decay": (0, 1, False, False),
    "train.keep_last": (1, None, True, False),
    "train.seed": (0, None, True, False),
    "train.log_every": (1, None, True, False),
    "train.save_every": (1, None, True, False),
    "wandb.images": (0, None, True, False),
}


def describe_range(low: float | None, high: float | None, low_in: bool, high_in: bool) -> str:
    """(0, 1, True, False) -> '0 <= value < 1'; (1, None, True, False) -> 'value >= 1'."""
    if high is None:
        return f"value {'>=' if low_in else '>'} {low}"
    return f"{low} {'<=' if low_in else '<'} value {'<=' if high_in else '<'} {high}"


def in_range(value: float, low: float | None, high: float | None, low_in: bool, high_in: bool) -> bool:
    above = low is None or (value >= low if low_in else value > low)
    below = high is None or (value <= high if high_in else value < high)
    return above and below and math.isfinite(value)  # NaN is in no range, and no bound is infinite


class ConfigError(ValueError):
    """A config that cannot be used: the message names the key."""


BASE_KEY = "_base_"  # mmseg's name for the configs a config extends


def read_layers(path: str | Path, including: tuple[Path, ...] = ()) -> list[tuple[Path, DictConfig]]:
    """The YAML files a config is made of, in merge order (each file's bases, depth first and
    in the order listed, before the file), each with its own keys less ``_base_``.
    ``including``: the files that led here, so a cycle is refused naming them."""
    path = Path(path)
    named = f" (a {BASE_KEY} of {including[-1]})" if including else ""
    if not path.is_file():
        raise ConfigError(f"config file {path}{named} not found")
    if any(path.resolve() == p.resolve() for p in including):
        cycle = " -> ".join(map(str, (*including, path)))
        raise ConfigError(f"config files extend each other in a cycle: {cycle} (remove one {BASE_KEY})")
    try:
        raw = OmegaConf.load(path)
    except (YAMLError, OSError) as e:
        raise ConfigError(f"config file {path}{named} is not readable YAML: {e}".replace("\n", " ")) from None
    if not isinstance(raw, DictConfig):
        raise ConfigError(f"config file {path}{named} is not a mapping of sections (data:, model:, ...)")
    bases = raw.pop(BASE_KEY, [])
    bases = [bases] if isinstance(bases, str) else bases
    if not isinstance(bases, list | ListConfig) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"config key {BASE_KEY!r} in {path}: {bases!r} is not a file name or a list of file names")
    layers = []
    for base in bases:
        layers += read_layers(path.parent / base, (*including, path))
    return [*layers, (path, raw)]


def origin(layers: list[tuple[Path, DictConfig]], key: str) -> Path | None:
    """The file whose value of ``key`` the merge kept: the last that sets it."""
    unset = object()
    setting = (file for file, raw in reversed(layers) if OmegaConf.select(raw, key, default=unset) is not unset)
    return next(setting, None)


def load_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), stage: int | None = None
) -> DictConfig:
    """Schema <- YAML file (its bases first) <- the ``stages`` entry for ``stage`` <- ``key=value``
    overrides, checked; read-only once resolved. Every caller reads configs through here."""
    config = OmegaConf.structured(Config)
    where, layers, staged = "", [], {}
    try:
        layers = read_layers(path) if path is not None else []
        for file, raw in layers:
            where = f" in {file}"
            config = OmegaConf.merge(config, raw)
        if stage is not None and config.stages:
            config, staged = apply_stage(config, stage, origin(layers, "stages"))
        where = " on the command line"
        for override in overrides:
            check_override(config, override)
        config = OmegaConf.merge(config, OmegaConf.from_dotlist(list(overrides)))
        where = ""
        OmegaConf.to_container(config, throw_on_missing=True)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        raise ConfigError(f"config key {key!r}{where}: {e.msg if hasattr(e, 'msg') else e}".split("\n")[0]) from None
    sources = {key: f"in {file}" for file, raw in layers for key in _keys(raw)} | staged
    sources |= {o.split("=", 1)[0].lstrip("+~"): "on the command line" for o in overrides}
    check_values(config, sources)
    OmegaConf.set_readonly(config, True)
    return config


def check_override(config: DictConfig, override: str) -> None:
    """What OmegaConf would refuse in words of its own (a key of None, "AnyNode is not a
    ListConfig"), or not at all (a missing value), said in the command line's terms."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} is not key=value (e.g. train.epochs=5)")
    key, value = override.split("=", 1)
    key = key.lstrip("+~")
    node = OmegaConf.select(config, key, default=None)
    if not value.strip():
        raise ConfigError(f"config key {key!r} on the command line: no value after '=' (null for none)")
    if key.split(".")[0] == "stages":  # applied before the command line: it would be recorded, never used
        raise ConfigError(
            f"config key {key!r} on the command line: a stage's entries are the config file's; set KEY=VALUE "
            "for every stage, or write a config (_base_: this one) with its own stages: [...]"
        )
    if isinstance(node, DictConfig):
        example = next(iter(node), "KEY")
        raise ConfigError(f"config key {key!r} on the command line: a section, not a value; set its keys, "
                          f"e.g. {key}.{example}=...")  # fmt: skip
    if key in CHOICES and value.lstrip().startswith(("[", "{")):  # OmegaConf: "Cannot convert 'ListConfig' to string"
        choices = ", ".join("null" if c is None else str(c) for c in CHOICES[key])
        raise ConfigError(f"config key {key!r} on the command line: {value} is not one of {choices}")
    if isinstance(node, ListConfig) and not value.lstrip().startswith("[") and value != "null":
        example = "[height,width]" if key.endswith("size") else "[a,b]"
        raise ConfigError(f"config key {key!r} on the command line: {value!r} is not a list; write {key}={example}")


def _keys(tree: DictConfig, prefix: str = "") -> list[str]:
    """The dotted keys a YAML layer sets."""
    keys = []
    for key, value in tree.items_ex(resolve=False):
        keys += _keys(value, f"{prefix}{key}.") if isinstance(value, DictConfig) else [f"{prefix}{key}"]
    return keys


def check_values(config: DictConfig, sources: dict[str, str]) -> None:
    """Choices, sizes and numeric ranges, each refused with its key, its value, what is valid
    and where the value came from (``sources``: key -> "in FILE", "in stages[i] of FILE" or
    "on the command line"; a key in none of them has the schema's default)."""

    def refuse(key: str, problem: str) -> None:
        source = f" ({sources[key]})" if key in sources else ""
        raise ConfigError(f"config key {key!r}{source}: {problem}")

    for key, choices in CHOICES.items():
        value = OmegaConf.select(config, key)
        if value == "False" and "no" in choices:  # YAML 1.1 reads `no` as false: `train.precision=no` meant "no"
            OmegaConf.update(config, key, "no")
            continue
        if value not in choices:
            refuse(key, f"{value!r} is not one of {', '.join(map(str, choices))}")
    for key in ("data.size", "data.base_size", "data.eval_size"):
        value = OmegaConf.select(config, key)
        if value is not None and (len(value) != 2 or min(value) <= 0):
            refuse(key, f"{list(value)} is not [height, width]")
    size = list(config.data.size)
    for key in ("data.eval_size", "data.base_size"):  # the training crop lies the way the frames it is cut from do
        other = OmegaConf.select(config, key)
        if other is not None and (swapped := size_swapped(size, list(other), f"{key} {list(other)}")):
            refuse("data.size", swapped)
    for key, kind in AUTO_KEYS.items():
        value = OmegaConf.select(config, key)
        if isinstance(value, str) and value != AUTO:
            refuse(key, f"{value!r} is not {AUTO} or {kind}")
    for key, bounds in RANGES.items():
        value = OmegaConf.select(config, key)
        if value is not None and value != AUTO and not in_range(value, *bounds):
            refuse(key, f"{value!r} is out of range; valid: {describe_range(*bounds)}")
    schedule, stop = config.schedule, config.train.early_stop_patience
    if schedule.name == "plateau" and stop is not None and stop <= schedule.plateau_patience + 1:
        cut = schedule.plateau_patience + 1
        refuse("train.early_stop_patience", f"{stop} stops the run before a step at a plateau-lowered rate "
               f"(schedule.plateau_patience {schedule.plateau_patience}: the rate drops at evaluation {cut} "
               f"in a row without a better mIoU); set it above {cut}, or lower "
               "schedule.plateau_patience")  # fmt: skip
    name = config.train.experiment
    if name in ("", ".", "..") or "/" in name:  # runs_dir/NAME, and never outside runs_dir
        refuse("train.experiment", f"{name!r} is not a folder name: name the experiment without '/' (train.runs_dir "
               f"says where its folder goes)")  # fmt: skip
    backends = list(config.tracking.backends)
    for backend in backends:
        if backend not in BACKENDS:
            refuse("tracking.backends", f"{backend!r} is not one of {', '.join(BACKENDS)}")
        if backends.count(backend) > 1:
            refuse("tracking.backends", f"{backend!r} is named twice")
        if missing := missing_package(backend):
            refuse("tracking.backends", f"{backend} is asked for but {missing}")


def size_swapped(size: list[int], reference: list[int], what: str) -> str | None:
    """None when ``size`` ([height, width], as data.size holds it) lies the way ``reference``
    (described by ``what``) does, or either is square; else why it looks swapped and the fix
    (the config's [height, width] is easily typed the command line's WIDTHxHEIGHT way round)."""
    mine, theirs = orientation(size), orientation(reference)
    if "square" in (mine, theirs) or mine == theirs:
        return None
    height, width = size
    return (
        f"{size} is [height, width]: {width} wide, {height} high, {mine}, but {what} is {theirs}; "
        f"did you mean [{width}, {height}]?"
    )


def resolve_auto(config: DictConfig, cuda: bool, recorded_workers: int | None = None) -> DictConfig:
    """The config a run uses, its ``auto`` values chosen (read-only, as load_config's):
    data.workers the count the run recorded at its first start (``recorded_workers``), else
    this machine's (seg.data.workers.resolve_workers); data.channels_last on with CUDA, off without."""
    data = config.data
    workers = resolve_workers(data.workers, recorded_workers)
    channels_last = cuda if data.channels_last == AUTO else data.channels_last
    if (workers, channels_last) == (data.workers, data.channels_last):
        return config
    resolved = copy.deepcopy(config)
    with read_write(resolved):
        resolved.data.workers, resolved.data.channels_last = workers, channels_last
    return resolved


def stage_values_overridden(config: DictConfig, overrides: list[str] | tuple[str, ...], stages: int) -> list[str]:
    """The command line's keys that replace what a ``stages`` entry of ``config`` (as loaded,
    before any stage) sets for one of the first ``stages`` stages, each as ``optim.lr=2e-4
    replaces stages[1]'s 5e-05``: the command line comes last, one value in every stage."""
    keys = {o.split("=", 1)[0].lstrip("+~"): o for o in overrides}
    return [
        f"{keys[key]} replaces stages[{index}]'s {value}"
        for index, entry in enumerate(config.stages[:stages])
        for key, value in entry.items()
        if key in keys
    ]


def apply_stage(config: DictConfig, stage: int, path: Path | None) -> tuple[DictConfig, dict[str, str]]:
    """The config with its ``stages`` entry for ``stage`` applied (dotted keys), and where
    each key it set came from."""
    index = min(stage, len(config.stages)) - 1
    for key, value in config.stages[index].items():
        try:
            OmegaConf.update(config, key, value, merge=True)
        except OmegaConfBaseException as e:
            reason = e.msg if hasattr(e, "msg") else e
            raise ConfigError(f"config key {key!r} in stages[{index}] of {path}: {reason}".split("\n")[0]) from None
    return config, {key: f"in stages[{index}] of {path}" for key in config.stages[index]}


def to_dict(config: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(config, resolve=True)  # type: ignore[return-value]
