#!/usr/bin/env python
"""Evaluate a model file on a shard split, exactly (any number of processes).

    python tools/evaluate.py runs/study/stage4/reduced/model.safetensors
    python tools/evaluate.py MODEL --split val --mode slide --flip --scales 0.75 1.0 1.25
    python tools/evaluate.py MODEL --input-size full     # full resolution, whatever the model's config says
    python tools/evaluate.py MODEL --split test --export eval/predictions   # labelIds PNGs for the benchmark
    python tools/evaluate.py runs/study/stage4/reduced/ensemble.json         # the fold ensemble (or a stage folder,
    python tools/evaluate.py A.safetensors B.safetensors C.safetensors       # or several model files)
    python tools/evaluate.py configs/X.yaml MODEL      # mmseg's test.py CONFIG CHECKPOINT

The input is resized to the model's own ``data.eval_size`` (from its sidecar: the size it
was validated and selected at) unless --input-size says otherwise; the size used is
printed and recorded. An --input-size the other way round than the model's training size
(``data.size``; 96x192 for a 192x96 model) is refused naming the swap. --mode slide slides
a window of the model's training size (``data.size``, as mmseg's test_cfg takes the training
crop) unless --crop says otherwise, with a stride of 2/3 of the window unless --stride says
otherwise; a window larger than the input is clipped to it (and said). A config given
before the model must describe the same network (model.depth, output_stride,
aspp_pool_norm, stem, contract_dilation, head; else refused naming them); its data.shards,
data.eval_size and data.size then replace the sidecar's. Writes OUT/metrics.json (the metrics and the settings: input
size, mode, flip, scales, and in slide mode the window and stride used), OUT/metrics.md,
OUT/per_class_iou.png, OUT/confusion.png and OUT/frequency_vs_iou.png; OUT defaults to
``eval-SPLIT-SETTINGS/`` beside the model (e.g. ``eval-val-1024x512-whole``), so evaluations
with other settings sit side by side.
--export writes one ``{city}_{seq}_{frame}_labelIds.png`` per image (official label ids, at
the image's original size, as the Cityscapes benchmark expects). A split without labels
(test) needs --export: its predictions are exported and no metrics are reported.

Several model files, a stage folder (its reduced/ensemble.json, else every
fold*/best.safetensors) or an ensemble.json evaluate the ensemble: the members' class
probabilities averaged for every view (a forward pass per member), members of another
architecture or evaluation size refused; its folder is ``eval-SPLIT-SETTINGS-ensembleK/``
beside the ensemble.json, in the stage's reduced/ (a stage folder), or beside the files.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python tools/evaluate.py` from a checkout, not installed: make `seg` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from accelerate import Accelerator

from seg.core.atomic import atomic_directory, atomic_write_bytes
from seg.core.cityscapes import TRAINID_TO_ID
from seg.core.cli import at_least
from seg.core.png import encode_gray8
from seg.core.runs import Stage
from seg.core.storage import EXIT_STORAGE, StorageError, check_writable, writing
from seg.data.augment import DeviceAugment
from seg.data.manifest import ManifestError, manifest_sha256
from seg.data.remote import RemoteError
from seg.evaluation.ensemble import load_models
from seg.evaluation.evaluate import (
    Defaults,
    SettingsError,
    check_config,
    check_orientation,
    describe_settings,
    evaluate,
    fit_window,
    parse_input_size,
    prediction_loader,
    settings,
    settings_name,
    split_config,
    split_is_labelled,
)
from seg.evaluation.inference import TestTimeAugmentation
from seg.model.weights import WeightsError
from seg.results.plots import evaluation_figures
from seg.results.tables import count

# What an evaluation writes in its folder (seg.results.plots.evaluation_figures: the PNGs)
RESULT_FILES = ("metrics.json", "metrics.md", "per_class_iou.png", "confusion.png", "frequency_vs_iou.png")


def evaluation_markdown(result: dict, title: str) -> str:
    lines = [f"# {title}", "", f"Settings: {describe_settings(result['settings'])}.", ""]
    if not result["labelled"]:
        exported = count(result["samples"], "prediction")
        lines.append(
            f"No metrics: the `{result['split']}` split has no labels. {exported} exported to "
            f"`{result['export']}` (labelIds PNGs for the Cityscapes benchmark server)."
        )
        return "\n".join(lines) + "\n"
    pct = {key: f"{100 * result[key]:.2f}%" for key in ("miou", "fwiou", "pixel_accuracy", "mean_accuracy")}
    lines += [
        f"mIoU **{pct['miou']}**, fwIoU {pct['fwiou']}, pixel accuracy {pct['pixel_accuracy']}, "
        f"mean accuracy {pct['mean_accuracy']} ({count(result['samples'], 'image')})",
        "",
        "| class | IoU (%) |",
        "| --- | --- |",
    ]
    lines += [f"| {name} | {100 * value:.2f} |" for name, value in result["iou"].items()]
    return "\n".join(lines) + "\n"


def is_result_file(name: str) -> bool:
    """Whether ``name`` in a results folder is what an evaluation writes there (or a temporary
    file of it that a hard kill left)."""
    return name in RESULT_FILES or any(fnmatch.fnmatch(name, f".{file}.*.tmp") for file in RESULT_FILES)


def reuse_problem(out: Path, export: Path | None) -> str | None:
    """Why the results can't go to ``out``, which is replaced whole: it holds what an evaluation
    does not write (a user's folder: nothing of theirs is deleted), or ``export`` is inside it."""
    if export is not None and export.resolve().is_relative_to(out.resolve()):
        return (
            f"--export {export} is inside the results folder {out}, which is replaced whole: give each its own folder"
        )
    foreign = sorted(p.name for p in out.iterdir() if not is_result_file(p.name)) if out.is_dir() else []
    if foreign:
        listed = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        return (f"{out} holds what an evaluation does not write ({listed}); its results replace the folder whole, "
                f"so give a new or empty folder, or an earlier evaluation's")  # fmt: skip
    return None


def labelled_split(shards: str, split: str, recorded_in: str | None) -> bool:
    """split_is_labelled; a dataset that can't be read names --shards when it came from
    ``recorded_in`` (the model's config, or a config given with it), not the command line."""
    try:
        return split_is_labelled(shards, split)
    except ManifestError as e:
        if not recorded_in:
            raise
        raise ManifestError(f"{e} (data.shards of {recorded_in}); pass --shards DIR to name the dataset") from None


def write_results(out: Path, result: dict, matrix: np.ndarray | None, title: str) -> None:
    """``out`` with metrics.json, metrics.md and (``matrix``: a labelled split) the figures,
    replacing an earlier evaluation's whole: complete or not at all, on a full disk or Ctrl-C,
    and no figure of another split or setting left beside the new metrics."""
    with writing(out), atomic_directory(out, overwrite=True) as folder:
        (folder / "metrics.json").write_text(json.dumps(result, indent=1) + "\n")
        (folder / "metrics.md").write_text(evaluation_markdown(result, title))
        if matrix is not None:
            evaluation_figures(result, matrix, folder, describe_settings(result["settings"]))


def default_folder(given: list[Path], members: list[Path]) -> Path:
    """Where results go by default: beside the model file or the ensemble.json; a stage
    folder's reduced/ (else the stage folder); several files: their common folder."""
    if len(given) > 1:
        return Path(os.path.commonpath([m.resolve() for m in given]))
    (path,) = given
    if path.is_dir():
        reduced = Stage.at(path).reduced
        return reduced if reduced.is_dir() else path
    return path.parent


def main(argv: list[str] | None = None) -> int:
    """The command; a disk that refuses a write (its folders are checked before the work) is
    one line and EXIT_STORAGE, Ctrl-C one line and 130."""
    try:
        return run(argv)
    except StorageError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_STORAGE
    except KeyboardInterrupt:  # the results folder is replaced whole or not at all: one line, no traceback
        print("interrupted: no results written (an earlier evaluation's folder is untouched; labelIds PNGs "
              "exported so far are complete); exit 130", file=sys.stderr)  # fmt: skip
        return 130


def run(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "models",
        type=Path,
        nargs="+",
        metavar="[CONFIG] MODEL",
        help="a .safetensors model with its .json sidecar; several, a stage folder or an ensemble.json: their "
        "ensemble. A config (.yaml) before it, as mmseg's test.py CONFIG CHECKPOINT, must describe the same network; "
        "its data.shards, data.eval_size and data.size then replace the model's",
    )
    parser.add_argument(
        "--shards", help="packed dataset: a folder, http(s):// or s3:// URL (default: the one in the model's config)"
    )
    parser.add_argument("--split", default="val", help="a group of the manifest: val (default), test, train-fold0, ...")
    parser.add_argument(
        "--input-size",
        type=parse_input_size,
        help="resize images to WIDTHxHEIGHT, or 'full' (default: the model config's data.eval_size)",
    )
    TestTimeAugmentation.add_arguments(parser)
    parser.add_argument("--workers", type=at_least(0), default=2, help="data loading processes (0: in this one)")
    parser.add_argument(
        "--out", type=Path, help="where the results go (default: eval-SPLIT-SETTINGS/ beside the model)"
    )
    parser.add_argument("--export", type=Path, help="write predictions as labelIds PNGs here")
    args = parser.parse_args(argv)
    tta = TestTimeAugmentation.from_arguments(args, parser)

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    say = accelerator.print
    try:
        config_path, model_paths = split_config(args.models)
        model, sidecar, members = load_models(model_paths)
        config, changed = check_config(config_path, sidecar) if config_path else (None, [])
        defaults = Defaults.of(sidecar, config, config_path, members[0])
        shards = args.shards or defaults.shards
        labelled = labelled_split(shards, args.split, args.shards is None and defaults.source)
        if not labelled and not args.export:
            raise ManifestError(f"{shards}: the {args.split} split has no labels, so there is nothing to measure; "
                                f"pass --export DIR to write its predictions (labelIds PNGs for the Cityscapes "
                                f"benchmark server)")  # fmt: skip
        if args.input_size is None:
            size, size_from = defaults.input_size, f"{defaults.source} (data.eval_size)"
        else:
            size = None if args.input_size == "full" else tuple(args.input_size)
            size_from = "--input-size"
            check_orientation("--input-size", size, defaults)
        tta, window_from, window_lines = fit_window(tta, defaults, size)
        loader, expected = prediction_loader(shards, [args.split], size, accelerator.process_index,
                                             accelerator.num_processes, args.workers)  # fmt: skip
    except (WeightsError, ManifestError, SettingsError) as e:
        say(f"error: {e}", file=sys.stderr)
        return 2
    record = settings(size, size_from, tta, window_from)
    for line in changed + window_lines:
        say(line)
    if len(members) > 1:
        listed = ", ".join(map(str, members))
        say(f"ensemble of {len(members)} models ({len(members)} forward passes per view): {listed}")
    say(f"{describe_settings(record)}; input size from {size_from}"
        + (" (--input-size WIDTHxHEIGHT or full to change it)" if args.input_size is None else ""))  # fmt: skip
    out = args.out or default_folder(model_paths, members) / (
        settings_name(args.split, record) + (f"-ensemble{len(members)}" if len(members) > 1 else "")
    )
    for folder in [out, *([args.export] if args.export else [])]:
        check_writable(folder)  # before the work: a folder that can't be written fails now, not after every image
    if problem := reuse_problem(out, args.export):
        say(f"error: {problem}", file=sys.stderr)
        return 2
    if args.export and (earlier := len(list(args.export.glob("*_labelIds.png")))):
        say(f"note: {args.export} already holds {count(earlier, 'labelIds PNG')}: this split's are replaced, any "
            f"others stay (give an empty folder for a benchmark submission)")  # fmt: skip
    export = None
    if args.export:
        args.export.mkdir(parents=True, exist_ok=True)

        def export(key: str, prediction: torch.Tensor) -> None:
            labels = TRAINID_TO_ID[prediction.numpy().astype(np.uint8)]
            with writing(args.export, "exporting predictions to"):
                atomic_write_bytes(args.export / f"{key}_labelIds.png", encode_gray8(labels))

    device = accelerator.device
    try:
        matrix, seen, _ = evaluate(model.to(device), loader, device, DeviceAugment("none").to(device), tta=tta,
                                   export=export)  # fmt: skip
    except RemoteError as e:  # a remote shard that still fails after its retries
        say(f"error: {e}", file=sys.stderr)
        return 1
    # the manifest's sha256 says which pack's images these are, wherever it is (compare and report pair by it)
    result = {"samples": seen, "expected": expected, "split": args.split, "shards": str(shards),
              "manifest_sha256": manifest_sha256(shards), "model": ", ".join(map(str, model_paths)),
              "labelled": labelled, "settings": record,
              "export": str(args.export) if args.export else None}  # fmt: skip
    if config_path is not None:
        result["config"] = str(config_path)
    if labelled:
        result = matrix.compute() | result
    else:
        result["metrics"] = f"none: the {args.split} split has no labels"
    if len(members) > 1:
        result["ensemble"] = [str(m) for m in members]
    if accelerator.is_main_process:
        title = f"{result['model']} on {args.split}"
        if len(members) > 1:
            title = f"ensemble of {len(members)} models ({result['model']}) on {args.split}"
        write_results(out, result, matrix.matrix.cpu().numpy() if labelled else None, title)
        if labelled:
            print(f"{args.split}: mIoU {100 * result['miou']:.2f}% over {count(seen, 'image')} -> {out}")
        else:
            print(f"{args.split}: no labels, no metrics; {count(seen, 'prediction')} (labelIds PNGs) -> "
                  f"{args.export}; settings recorded in {out / 'metrics.json'}")  # fmt: skip
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())
