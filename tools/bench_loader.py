#!/usr/bin/env python
"""Training-loader throughput, side by side on the same full-resolution frames.

    python tools/bench_loader.py                  # makes 24 synthetic 2048x1024 frames
    python tools/bench_loader.py --root /data/cityscapes

(a) seg's train pipeline over packed shards (PNG, then JPEG shards), at the study's geometry
    (resize to 512x1024, standard augmentation's geometric part);
(b) the usual way: a map-style Dataset reading the PNGs from the Cityscapes tree with PIL,
    mapping labelIds to trainIds and resizing both;
(c) the bound: decode image and label, nothing else.
Each at 1 and 2 DataLoader workers; images/s in total and per worker.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from seg import cityscapes as cs
from seg.cli import parse_size
from seg.data import train_loader
from seg.pack import Options, pack
from seg.synthetic import make_synthetic
from seg.transforms import TrainGeometry


class FolderDataset(Dataset):
    """(b) and (c): frames read from the Cityscapes tree."""

    def __init__(self, root: Path, size: tuple[int, int] | None) -> None:
        self.images = sorted(root.glob("leftImg8bit/train/*/*.png"))
        self.size = size  # None: decode only

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        path = self.images[index]
        label_path = Path(str(path).replace("leftImg8bit", "gtFine", 1).replace(cs.IMAGE_SUFFIX, cs.LABEL_IDS_SUFFIX))
        image, label = Image.open(path).convert("RGB"), Image.open(label_path)
        image.load()
        label.load()
        if self.size is None:
            return torch.zeros(1), torch.zeros(1)
        height, width = self.size
        image = image.resize((width, height), Image.BILINEAR)
        train_ids = cs.ID_TO_TRAINID[np.asarray(label.resize((width, height), Image.NEAREST))]
        return torch.from_numpy(np.asarray(image).transpose(2, 0, 1).copy()), torch.from_numpy(train_ids)


def rate(batches, images: int, batch_size: int) -> float:
    iterator = iter(batches)
    next(iterator)  # workers started, first batch in
    start = time.perf_counter()
    for _ in range(images // batch_size):
        next(iterator)
    return images / (time.perf_counter() - start)


def folder_rate(root: Path, size: tuple[int, int] | None, workers: int, images: int, batch_size: int) -> float:
    dataset = FolderDataset(root, size)
    sampler = torch.utils.data.RandomSampler(dataset, replacement=True, num_samples=10**9)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, persistent_workers=True)
    return rate(loader, images, batch_size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", help="a Cityscapes tree (default: make a synthetic one in a temporary folder)")
    parser.add_argument("--frames", type=int, default=24, help="synthetic train frames (default 24)")
    parser.add_argument("--size", type=parse_size, default=(1024, 512), help="training input WIDTHxHEIGHT")
    parser.add_argument("--images", type=int, default=48, help="images timed per measurement")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    size = (args.size[1], args.size[0])

    scratch = Path(tempfile.mkdtemp(prefix="bench-loader-"))
    try:
        root = Path(args.root) if args.root else scratch / "cityscapes"
        if not args.root:
            print(f"making {args.frames} synthetic 2048x1024 frames...")
            make_synthetic(
                root,
                counts={"train": args.frames, "val": 0, "test": 0},
                cities={"train": 6, "val": 1, "test": 1},
                workers=2,
                progress=False,
            )
        for image_format in ("png", "jpg"):
            options = Options(splits=("train",), shard_size=64 * 2**20, image_format=image_format)
            pack(root, scratch / image_format, options, workers=2, progress=False)
        geometry = TrainGeometry(mode="resize", size=size, level="standard")

        rows = []
        for workers in args.workers:
            for name, image_format in (("(a) seg shards, png", "png"), ("(a) seg shards, jpg", "jpg")):
                loader, _ = train_loader(
                    scratch / image_format, 0, geometry, args.batch_size, workers=workers, checksums=False
                )
                rows.append((name, workers, rate(loader, args.images, args.batch_size)))
            rows.append(("(b) folder + PIL", workers, folder_rate(root, size, workers, args.images, args.batch_size)))
            rows.append(("(c) decode only", workers, folder_rate(root, None, workers, args.images, args.batch_size)))

        print(f"\ninput {size[1]}x{size[0]}, batch {args.batch_size}, {args.images} images timed per row")
        print(f"{'pipeline':<22} {'workers':>7} {'img/s':>8} {'img/s/worker':>13}")
        for name, workers, value in rows:
            print(f"{name:<22} {workers:>7} {value:>8.1f} {value / workers:>13.1f}")
        table = {(name, workers): value for name, workers, value in rows}
        for workers in args.workers:
            a, b, c = (table[n, workers] for n in ("(a) seg shards, png", "(b) folder + PIL", "(c) decode only"))
            jpg = table["(a) seg shards, jpg", workers]
            print(f"{workers} worker(s): png (a)/(b) {a / b:.2f}x, (a)/(c) {a / c:.2f}x; jpg (a)/(b) {jpg / b:.2f}x")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
