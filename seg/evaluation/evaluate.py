"""Exact distributed evaluation of a model over an evaluation loader, and the settings
record of an evaluation (input size, mode, flip, scales) that its results carry."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from seg.core.cli import Size, format_size, orientation_mismatch, parse_size
from seg.core.distributed import all_reduce_sum
from seg.core.runs import working_directories
from seg.data.augment import DeviceAugment
from seg.data.loader import EvalStream, Shard, shards_of
from seg.data.manifest import MANIFEST, load_manifest
from seg.data.remote import is_remote
from seg.data.transforms import eval_sample
from seg.data.workers import loader_options
from seg.evaluation.inference import TestTimeAugmentation, predict_probabilities
from seg.evaluation.metrics import ConfusionMatrix


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    batches: Iterable[dict[str, Any]],
    device: torch.device,
    normalise: DeviceAugment,
    autocast_dtype: torch.dtype | None = None,
    keep: int = 0,
    tta: TestTimeAugmentation | None = None,
    export: Callable[[str, torch.Tensor], None] | None = None,
) -> tuple[ConfusionMatrix, int, list[dict[str, Any]]]:
    """The confusion matrix summed over every rank, the number of samples seen over every
    rank, and up to ``keep`` (image, prediction, label, key) examples of this rank.

    Every rank must call this, even one whose loader is empty: the reduction is collective.
    ``tta`` selects sliding windows, flips and scales; ``export(key, prediction)`` receives
    every prediction (trainIds at the label's size). A batch without labels (the test
    split) is predicted at the images' original size (its ``size``, from
    :func:`prediction_loader`; else the input's) and exported, and adds nothing to the
    matrix; its examples have ``label`` None.
    """
    was_training = model.training
    model.eval()
    matrix = ConfusionMatrix(device=device)
    seen = 0
    examples: list[dict[str, Any]] = []
    for batch in batches:
        images = batch["image"].to(device, non_blocking=True)
        labels = batch["label"].to(device, non_blocking=True) if "label" in batch else None
        if labels is not None:
            size = tuple(labels.shape[1:])  # predictions are brought to the label's size
        elif "size" in batch:
            size = tuple(int(v) for v in batch["size"][0])  # one batch, one image size
        else:
            size = tuple(images.shape[2:])
        inputs, _ = normalise(images, train=False)
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            prediction = predict_probabilities(model, inputs, size, tta or TestTimeAugmentation()).argmax(dim=1)
        if labels is not None:
            matrix.update(prediction, labels)
        if export is not None:
            for key, single in zip(batch["key"], prediction, strict=True):
                export(key, single.cpu())
        seen += images.shape[0]
        for i in range(min(images.shape[0], keep - len(examples))):
            examples.append(
                {
                    "image": images[i].cpu(),
                    "prediction": prediction[i].cpu(),
                    "label": labels[i].cpu() if labels is not None else None,
                    "key": batch["key"][i],
                }
            )
    matrix.reduce()
    total_seen = int(all_reduce_sum(torch.tensor([seen], device=device)).item())
    model.train(was_training)
    return matrix, total_seen, examples


# --- the prediction loader of tools/evaluate.py ---------------------------------------------


class SizedEvalStream(EvalStream):
    """EvalStream's items plus ``size``, each image's original (H, W): what an unlabelled
    image's prediction is brought back to when the input is resized. The resize is
    EvalStream's own (Pillow's bilinear, on the same decoded RGB pixels), so a labelled
    sample gives exactly the input EvalStream gives."""

    def __init__(self, shards: list[Shard], size: tuple[int, int] | None = None, rank: int = 0, world_size: int = 1):
        super().__init__(shards, None, rank, world_size)
        self.input_size = size

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for item in super().__iter__():
            height, width = item["image"].shape[1:]
            item["size"] = torch.tensor([height, width])
            if self.input_size is not None and (height, width) != tuple(self.input_size):
                pixels = Image.fromarray(np.ascontiguousarray(item["image"].permute(1, 2, 0).numpy()), "RGB")
                item["image"], _ = eval_sample(pixels, None, self.input_size)
            yield item


def split_is_labelled(shards: str | Path, split: str) -> bool:
    """Whether the manifest's group ``split`` has labels (the test split has none: its
    class histogram is null). An unknown group counts as labelled: the loader names it."""
    group = load_manifest(shards)["groups"].get(split)
    return group is None or group.get("class_pixels") is not None


def prediction_loader(
    shards: str | Path,
    groups: list[str],
    size: tuple[int, int] | None = None,
    rank: int = 0,
    world_size: int = 1,
    workers: int = 2,
) -> tuple[DataLoader, int]:
    """seg.data.loader.eval_loader's loader (batch 1), whose items also carry each image's original size."""
    stream = SizedEvalStream(shards_of(shards, groups), size, rank, world_size)
    options = loader_options(workers, False) | {"persistent_workers": False}
    return DataLoader(stream, batch_size=1, **options), sum(s.samples for s in stream.shards)


# --- what an evaluation records -------------------------------------------------------------


def parse_input_size(text: str) -> Size | str:
    """A tool's input size: WIDTHxHEIGHT (as (H, W)), or ``full`` (each image at its own resolution)."""
    return "full" if text.strip().lower() == "full" else parse_size(text)


class SettingsError(ValueError):
    """Evaluation settings that contradict the model (or a config given with it): the message says which."""


CONFIG_SUFFIXES = (".yaml", ".yml")
# What builds the network from a sidecar (seg.model.deeplab.from_config's keys): a config given
# with a model must agree on these, since the model is built from its own sidecar.
MODEL_KEYS = ("model.depth", "model.output_stride", "model.aspp_pool_norm", "model.stem", "model.contract_dilation",
              "model.head")  # fmt: skip
# What a config given with a model decides for the evaluation (mmseg's test_cfg and test pipeline).
CONFIG_USED = ("data.shards", "data.eval_size", "data.size")


@dataclass(frozen=True)
class Defaults:
    """What an evaluation takes when the command line does not say: from the model's sidecar,
    or from a config given before the model (mmseg's ``test.py CONFIG CHECKPOINT``)."""

    shards: str | None
    input_size: tuple[int, int] | None  # data.eval_size (H, W); None: full resolution
    train_size: tuple[int, int] | None  # data.size (H, W): the slide window's default
    source: str  # "the model's config" or the config file's path

    @classmethod
    def of(
        cls,
        sidecar: dict[str, Any],
        config: dict[str, Any] | None = None,
        path: Path | None = None,
        model: Path | None = None,
    ) -> Defaults:
        """``model``: the sidecar's model file, from whose run a relative data.shards of the
        sidecar is found when it is not where the command runs (:func:`recorded_shards`)."""
        chosen = config if config is not None else sidecar.get("config", {})
        shards = _select(chosen, "data.shards")
        if config is None and model is not None and isinstance(shards, str):
            shards = recorded_shards(shards, model, chosen)
        return cls(
            shards,
            _pair(_select(chosen, "data.eval_size")),
            _pair(_select(chosen, "data.size")),
            str(path) if config is not None else "the model's config",
        )


def recorded_shards(shards: str, model: Path, config: dict[str, Any]) -> str:
    """A model's recorded data.shards, found from here: a relative one names a folder relative
    to where its training ran, tried here first, then where the run's folder says it ran
    (seg.core.runs.working_directories, as tools/compare.py finds it: the model's
    ancestor named ``train.experiment``, less ``train.runs_dir``). Unfound: as recorded."""
    if is_remote(shards) or Path(shards).is_absolute() or (Path(shards) / MANIFEST).is_file():
        return shards
    experiment = next((p for p in model.resolve().parents if p.name == _select(config, "train.experiment")), None)
    if experiment is None:
        return shards
    for root in working_directories(experiment, _select(config, "train.runs_dir")):
        if (root / shards / MANIFEST).is_file():
            return str(root / shards)
    return shards


def _select(tree: dict[str, Any], key: str) -> Any:
    value: Any = tree
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _pair(size: Any) -> tuple[int, int] | None:
    return (int(size[0]), int(size[1])) if size else None


def split_config(paths: list[Path]) -> tuple[Path | None, list[Path]]:
    """(the config among ``paths``, if any, and the rest: the models). mmseg's habit, CONFIG
    then CHECKPOINT; a config alone, or two, are refused saying what to pass."""
    configs = [p for p in paths if p.suffix.lower() in CONFIG_SUFFIXES]
    if not configs:
        return None, paths
    if len(configs) > 1:
        raise SettingsError(f"{configs[0]} and {configs[1]}: one config at most, then the model (CONFIG MODEL)")
    models = [p for p in paths if p != configs[0]]
    if not models:
        raise SettingsError(
            f"{configs[0]} is a config, not a model: pass the model file too (CONFIG MODEL, or MODEL alone: "
            f"its sidecar holds its config), e.g. runs/<experiment>/stage1/reduced/model.safetensors"
        )
    return configs[0], models


def check_config(path: Path, sidecar: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The config at ``path`` (resolved) and lines naming what it changes for the evaluation
    (``CONFIG_USED`` keys that differ from the model's sidecar). Refused (SettingsError),
    naming the keys: a config that describes another network than the model's sidecar."""
    from seg.recipe.config import ConfigError, ModelConfig, load_config, to_dict  # (it imports the training stack)

    try:
        config = to_dict(load_config(path))
    except ConfigError as e:
        raise SettingsError(str(e)) from None
    theirs = sidecar.get("config", {})

    def network(tree: dict[str, Any], key: str) -> Any:  # a sidecar older than a key builds its default
        value = _select(tree, key)
        return getattr(ModelConfig, key.removeprefix("model."), None) if value is None else value

    differ = [
        f"{key} {network(config, key)!r} there, {network(theirs, key)!r} in the model's sidecar"
        for key in MODEL_KEYS
        if network(config, key) != network(theirs, key)
    ]
    if differ:
        raise SettingsError(
            f"{path} describes another network than the model ({'; '.join(differ)}); the model is built from its "
            f"sidecar: pass the config it was trained with, or the model alone"
        )
    used = [
        f"{key} {_shown(key, _select(config, key))} from {path} (the model's: {_shown(key, _select(theirs, key))})"
        for key in CONFIG_USED
        if _select(config, key) != _select(theirs, key)
    ]
    return config, used


def _shown(key: str, value: Any) -> str:
    if key.endswith("size"):
        return describe_size(_pair(value))
    return str(value)


def check_orientation(option: str, size: tuple[int, int] | None, defaults: Defaults) -> None:
    """Refuse a size (H, W; given as ``option``) that lies the other way than the model's
    training size: 96x192 typed for a 192x96 model scores badly without a word."""
    if size is None or defaults.train_size is None:
        return
    swapped = orientation_mismatch(option, size, defaults.train_size, "the model's training size (data.size)")
    if swapped:
        raise SettingsError(swapped)


def fit_window(
    tta: TestTimeAugmentation, defaults: Defaults, size: tuple[int, int] | None
) -> tuple[TestTimeAugmentation, str | None, list[str]]:
    """``tta`` with its sliding window decided (TestTimeAugmentation.fitted: --crop, else the
    training size; clipped to a fixed input ``size``), where the window came from, and lines
    for the person running it. Whole mode: unchanged, None, no lines."""
    if tta.mode != "slide":
        return tta, None, []
    if tta.crop is not None:
        check_orientation("--crop", tta.crop, defaults)
    try:
        fitted, clipped = tta.fitted(defaults.train_size, size)
    except ValueError as e:
        raise SettingsError(str(e)) from None
    source = "--crop" if tta.crop is not None else f"the training size (data.size of {defaults.source})"
    if clipped:
        return fitted, f"{source}, clipped to the input", [clipped]
    return fitted, source, []


def describe_size(size: tuple[int, int] | None) -> str:
    """(H, W) as WIDTHxHEIGHT, the way the tools take it; None as ``full``."""
    return "full" if size is None else format_size(size)


def settings(
    size: tuple[int, int] | None, size_from: str, tta: TestTimeAugmentation, window_from: str | None = None
) -> dict[str, Any]:
    """What an evaluation's numbers depend on besides the model and the data, as recorded in
    metrics.json: the input size (WIDTHxHEIGHT or ``full``) and where it came from, mode,
    flip, scales, and only in slide mode the window and stride used (WIDTHxHEIGHT) and where
    the window came from. ``tta`` is :meth:`TestTimeAugmentation.fitted`'s."""
    record: dict[str, Any] = {
        "input_size": describe_size(size),
        "input_size_from": size_from,
        "mode": tta.mode,
        "flip": tta.flip,
        "scales": list(tta.scales),
    }
    if tta.mode == "slide":
        record |= {"crop": describe_size(tta.crop), "stride": describe_size(tta.stride)}
        record["crop_from"] = window_from or "--crop"
    return record


def describe_settings(record: dict[str, Any]) -> str:
    """One line for a person: ``input 192x96, whole, no flip, scales 1``."""
    mode = record["mode"]
    if mode == "slide":
        mode = f"slide (window {record['crop']}, stride {record['stride']})"
    size = "full resolution" if record["input_size"] == "full" else record["input_size"]
    scales = ", ".join(f"{s:g}" for s in record["scales"])
    return f"input {size}, {mode}, {'flip' if record['flip'] else 'no flip'}, scales {scales}"


def settings_name(split: str, record: dict[str, Any]) -> str:
    """A folder name that tells evaluations of different settings apart:
    ``eval-val-192x96-whole``, ``eval-val-full-slide1024x512s683x341-flip-scales0.75_1_1.25``."""
    parts = [f"eval-{split}", record["input_size"]]
    parts.append(f"slide{record['crop']}s{record['stride']}" if record["mode"] == "slide" else record["mode"])
    if record["flip"]:
        parts.append("flip")
    if list(record["scales"]) != [1.0]:
        parts.append("scales" + "_".join(f"{s:g}" for s in record["scales"]))
    return "-".join(parts)
