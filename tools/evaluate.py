#!/usr/bin/env python
"""Evaluate a model file on a shard split, exactly (any number of processes).

    python tools/evaluate.py runs/study/stage4/reduced/model.safetensors --out eval/
    python tools/evaluate.py MODEL --split val --mode slide --flip --scales 0.75 1.0 1.25
    python tools/evaluate.py MODEL --export eval/predictions   # labelIds PNGs for the benchmark

Writes OUT/metrics.json, OUT/metrics.md, OUT/per_class_iou.png, OUT/confusion.png and
OUT/frequency_vs_iou.png. --export writes one ``{city}_{seq}_{frame}_labelIds.png`` per
image (official label ids, as the Cityscapes benchmark expects).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from accelerate import Accelerator

from seg.atomic import atomic_write_bytes
from seg.augment import DeviceAugment
from seg.cityscapes import CLASS_NAMES, TRAINID_TO_ID
from seg.cli import parse_size
from seg.data import eval_loader
from seg.evaluate import evaluate
from seg.inference import TestTimeAugmentation
from seg.manifest import ManifestError
from seg.model import WeightsError, load_model
from seg.png import encode_gray8
from seg.tracking import confusion_figure


def markdown(result: dict, title: str) -> str:
    lines = [f"# {title}", "", f"mIoU **{100 * result['miou']:.2f}**, fwIoU {100 * result['fwiou']:.2f}, "
             f"pixel accuracy {100 * result['pixel_accuracy']:.2f}, mean accuracy {100 * result['mean_accuracy']:.2f} "
             f"({result['samples']} images)", "", "| class | IoU |", "| --- | --- |"]  # fmt: skip
    lines += [f"| {name} | {100 * value:.2f} |" for name, value in result["iou"].items()]
    return "\n".join(lines) + "\n"


def plots(result: dict, matrix: np.ndarray, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    iou = np.array([result["iou"][name] for name in CLASS_NAMES])
    figure, axes = plt.subplots(figsize=(10, 4))
    axes.bar(CLASS_NAMES, np.nan_to_num(100 * iou))
    axes.set_ylabel("IoU (%)")
    axes.set_title(f"per-class IoU, mIoU {100 * result['miou']:.2f}")
    axes.tick_params(axis="x", rotation=90)
    figure.tight_layout()
    figure.savefig(out / "per_class_iou.png", dpi=100)
    plt.close(figure)

    figure = confusion_figure(matrix)
    figure.savefig(out / "confusion.png", dpi=100)
    plt.close(figure)

    frequency = matrix.sum(1) / max(matrix.sum(), 1)
    figure, axes = plt.subplots(figsize=(6, 5))
    axes.scatter(100 * frequency, 100 * np.nan_to_num(iou))
    for name, x, y in zip(CLASS_NAMES, frequency, np.nan_to_num(iou), strict=True):
        axes.annotate(name, (100 * x, 100 * y), fontsize=7)
    axes.set_xscale("log")
    axes.set_xlabel("share of labelled pixels (%)")
    axes.set_ylabel("IoU (%)")
    figure.tight_layout()
    figure.savefig(out / "frequency_vs_iou.png", dpi=100)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="a .safetensors model with its .json sidecar")
    parser.add_argument("--shards", help="packed dataset (default: the one in the model's config)")
    parser.add_argument("--split", default="val", help="a group of the manifest: val (default), train-fold0, ...")
    parser.add_argument("--input-size", type=parse_size, help="resize images to WIDTHxHEIGHT (default: full)")
    TestTimeAugmentation.add_arguments(parser)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, help="where the report goes (default: beside the model)")
    parser.add_argument("--export", type=Path, help="write predictions as labelIds PNGs here")
    args = parser.parse_args(argv)

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    try:
        model, sidecar = load_model(args.model)
        shards = args.shards or sidecar["config"]["data"]["shards"]
        size = (args.input_size[1], args.input_size[0]) if args.input_size else None
        loader, expected = eval_loader(shards, [args.split], 1, size, accelerator.process_index,
                                       accelerator.num_processes, args.workers)  # fmt: skip
    except (WeightsError, ManifestError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    tta = TestTimeAugmentation.from_arguments(args)
    export = None
    if args.export:
        args.export.mkdir(parents=True, exist_ok=True)

        def export(key: str, prediction: torch.Tensor) -> None:
            labels = TRAINID_TO_ID[prediction.numpy().astype(np.uint8)]
            atomic_write_bytes(args.export / f"{key}_labelIds.png", encode_gray8(labels))

    device = accelerator.device
    matrix, seen, _ = evaluate(model.to(device), loader, device, DeviceAugment("none").to(device), tta=tta,
                               export=export)  # fmt: skip
    result = matrix.compute() | {"samples": seen, "expected": expected, "split": args.split, "shards": str(shards),
                                 "model": str(args.model), "tta": tta.__dict__}  # fmt: skip
    if accelerator.is_main_process:
        out = args.out or args.model.parent / f"eval-{args.split}"
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out / "metrics.json", (json.dumps(result, indent=1) + "\n").encode())
        atomic_write_bytes(out / "metrics.md", markdown(result, f"{args.model} on {args.split}").encode())
        plots(result, matrix.matrix.cpu().numpy(), out)
        print(f"{args.split}: mIoU {100 * result['miou']:.2f} over {seen} images -> {out}")
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())
