#!/usr/bin/env python
"""Evaluate a model file on a shard split, exactly (any number of processes).

    python tools/evaluate.py runs/study/stage4/reduced/model.safetensors
    python tools/evaluate.py MODEL --split val --mode slide --flip --scales 0.75 1.0 1.25
    python tools/evaluate.py MODEL --input-size full     # full resolution, whatever the model's config says
    python tools/evaluate.py MODEL --split test --export eval/predictions   # labelIds PNGs for the benchmark
    python tools/evaluate.py runs/study/stage4/reduced/ensemble.json         # the fold ensemble (or a stage folder,
    python tools/evaluate.py A.safetensors B.safetensors C.safetensors       # or several model files)

The input is resized to the model's own ``data.eval_size`` (from its sidecar: the size it
was validated and selected at) unless --input-size says otherwise; the size used is
printed and recorded. Writes OUT/metrics.json (the metrics and the settings: input size,
mode, flip, scales), OUT/metrics.md, OUT/per_class_iou.png, OUT/confusion.png and
OUT/frequency_vs_iou.png; OUT defaults to ``eval-SPLIT-SETTINGS/`` beside the model (e.g.
``eval-val-1024x512-whole``), so evaluations with other settings sit side by side.
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
import json
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python tools/evaluate.py` from a checkout, not installed: make `seg` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from accelerate import Accelerator

from seg.atomic import atomic_write_bytes
from seg.augment import DeviceAugment
from seg.cityscapes import TRAINID_TO_ID
from seg.ensemble import load_models
from seg.evaluate import (
    describe_settings,
    evaluate,
    model_input_size,
    parse_input_size,
    prediction_loader,
    settings,
    settings_name,
    split_is_labelled,
)
from seg.inference import TestTimeAugmentation
from seg.manifest import ManifestError
from seg.plots import evaluation_figures
from seg.png import encode_gray8
from seg.report import count
from seg.runs import Stage
from seg.storage import EXIT_STORAGE, StorageError, check_writable
from seg.weights import WeightsError


def markdown(result: dict, title: str) -> str:
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
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "models",
        type=Path,
        nargs="+",
        metavar="MODEL",
        help="a .safetensors model with its .json sidecar; several, a stage folder or an ensemble.json: their ensemble",
    )
    parser.add_argument("--shards", help="packed dataset (default: the one in the model's config)")
    parser.add_argument("--split", default="val", help="a group of the manifest: val (default), test, train-fold0, ...")
    parser.add_argument(
        "--input-size",
        type=parse_input_size,
        help="resize images to WIDTHxHEIGHT, or 'full' (default: the model config's data.eval_size)",
    )
    TestTimeAugmentation.add_arguments(parser)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--out", type=Path, help="where the results go (default: eval-SPLIT-SETTINGS/ beside the model)"
    )
    parser.add_argument("--export", type=Path, help="write predictions as labelIds PNGs here")
    args = parser.parse_args(argv)

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    say = accelerator.print
    try:
        model, sidecar, members = load_models(args.models)
        shards = args.shards or sidecar["config"]["data"]["shards"]
        labelled = split_is_labelled(shards, args.split)
        if not labelled and not args.export:
            raise ManifestError(f"{shards}: the {args.split} split has no labels, so there is nothing to measure; "
                                f"pass --export DIR to write its predictions (labelIds PNGs for the Cityscapes "
                                f"benchmark server)")  # fmt: skip
        if args.input_size is None:
            size, size_from = model_input_size(sidecar), "the model's config (data.eval_size)"
        else:
            size = None if args.input_size == "full" else tuple(args.input_size)
            size_from = "--input-size"
        loader, expected = prediction_loader(shards, [args.split], size, accelerator.process_index,
                                             accelerator.num_processes, args.workers)  # fmt: skip
    except (WeightsError, ManifestError) as e:
        say(f"error: {e}", file=sys.stderr)
        return 2
    tta = TestTimeAugmentation.from_arguments(args)
    record = settings(size, size_from, tta)
    if len(members) > 1:
        listed = ", ".join(map(str, members))
        say(f"ensemble of {len(members)} models ({len(members)} forward passes per view): {listed}")
    say(f"{describe_settings(record)}; input size from {size_from}"
        + (" (--input-size WIDTHxHEIGHT or full to change it)" if args.input_size is None else ""))  # fmt: skip
    out = args.out or default_folder(args.models, members) / (
        settings_name(args.split, record) + (f"-ensemble{len(members)}" if len(members) > 1 else "")
    )
    try:  # before the work: a folder that can't be written fails now, not after every image
        for folder in [out, *([args.export] if args.export else [])]:
            check_writable(folder)
    except StorageError as e:
        say(f"error: {e}", file=sys.stderr)
        return EXIT_STORAGE
    export = None
    if args.export:
        args.export.mkdir(parents=True, exist_ok=True)

        def export(key: str, prediction: torch.Tensor) -> None:
            labels = TRAINID_TO_ID[prediction.numpy().astype(np.uint8)]
            atomic_write_bytes(args.export / f"{key}_labelIds.png", encode_gray8(labels))

    device = accelerator.device
    matrix, seen, _ = evaluate(model.to(device), loader, device, DeviceAugment("none").to(device), tta=tta,
                               export=export)  # fmt: skip
    result = {"samples": seen, "expected": expected, "split": args.split, "shards": str(shards),
              "model": ", ".join(map(str, args.models)), "labelled": labelled, "settings": record, "tta": tta.__dict__,
              "export": str(args.export) if args.export else None}  # fmt: skip
    if labelled:
        result = matrix.compute() | result
    else:
        result["metrics"] = f"none: the {args.split} split has no labels"
    if len(members) > 1:
        result["ensemble"] = [str(m) for m in members]
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out / "metrics.json", (json.dumps(result, indent=1) + "\n").encode())
        title = f"{result['model']} on {args.split}"
        if len(members) > 1:
            title = f"ensemble of {len(members)} models ({result['model']}) on {args.split}"
        atomic_write_bytes(out / "metrics.md", markdown(result, title).encode())
        if labelled:
            evaluation_figures(result, matrix.matrix.cpu().numpy(), out, describe_settings(result["settings"]))
            print(f"{args.split}: mIoU {100 * result['miou']:.2f}% over {count(seen, 'image')} -> {out}")
        else:
            print(f"{args.split}: no labels, no metrics; {count(seen, 'prediction')} (labelIds PNGs) -> "
                  f"{args.export}; settings recorded in {out / 'metrics.json'}")  # fmt: skip
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())
