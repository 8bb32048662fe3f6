#!/usr/bin/env python
"""Pack throughput against the bare minimum of the same work, at 1 and 2 workers.

    python tools/bench_pack.py                # makes 40 full-resolution synthetic frames
    python tools/bench_pack.py --root /data/cityscapes --splits train

The minimum reads both files of every frame, decodes the label and writes the bytes, over
the same shard plan and the same number of processes; the page cache is warmed first, so
both measure CPU work, not the disk. Prints images/s, the cost ratio and the scaling.
"""

from __future__ import annotations

import argparse
import hashlib
import multiprocessing
import shutil
import tempfile
import time
from pathlib import Path

from PIL import Image

from seg.core.cli import at_least, format_size, parse_bytes, parse_list, parse_size
from seg.data.pack import Options, ShardJob, assign_groups, pack, plan_shards, scan
from seg.data.synthetic import make_synthetic


def _minimum_shard(args: tuple[Path, Path, ShardJob]) -> int:
    root, out, job = args
    with open(out / job.name, "wb") as f:
        for sample in job.samples:
            image = (root / sample.image).read_bytes()
            label = (root / sample.label).read_bytes()
            Image.open(root / sample.label).load()
            f.write(image)
            f.write(label)
    return len(job.samples)


def _run(function, jobs: list, workers: int) -> float:
    start = time.perf_counter()
    if workers == 1:
        list(map(function, jobs))
    else:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            list(pool.imap_unordered(function, jobs))
    return time.perf_counter() - start


CITIES = 6  # the synthetic tree's train cities (pack's 5 folds by city need 5): the fewest frames it takes


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", help="a Cityscapes tree (default: make a synthetic one in a temporary folder)")
    parser.add_argument(
        "--images", type=at_least(CITIES), default=40, help=f"synthetic train frames (default 40, at least {CITIES})"
    )
    parser.add_argument("--size", type=parse_size, default="2048x1024", help="synthetic frame size")
    parser.add_argument("--splits", type=parse_list, default=("train",))
    parser.add_argument("--shard-size", type=parse_bytes, default="16MB", help="small, so 2 workers share the work")
    parser.add_argument("--workers", type=at_least(1), nargs="+", default=[1, 2])
    parser.add_argument("--repeat", type=at_least(1), default=3, help="best of N runs of each measurement")
    args = parser.parse_args(argv)

    scratch = Path(tempfile.mkdtemp(prefix="bench-pack-"))
    try:
        root = Path(args.root) if args.root else scratch / "cityscapes"
        if not args.root:
            print(f"making {args.images} synthetic frames at {format_size(args.size)}...")
            make_synthetic(
                root,
                counts={"train": args.images, "val": 0, "test": 0},
                cities={"train": CITIES, "val": 1, "test": 1},
                size=args.size,
                workers=max(args.workers),
                progress=False,
            )
        options = Options(splits=args.splits, shard_size=args.shard_size)
        splits = scan(root, options.splits)
        groups = assign_groups(splits["train"], options) if "train" in splits else {}
        groups |= {s: v for s, v in splits.items() if s != "train"}
        jobs = plan_shards(root, groups, options)
        frames = sum(len(j.samples) for j in jobs)
        source_bytes = sum(j.planned_bytes for j in jobs)
        for job in jobs:  # warm the page cache
            _minimum_shard((root, scratch, job))
        print(f"{frames} frames, {source_bytes / 1e6:.0f} MB, {len(jobs)} shards")

        rates: dict[tuple[str, int], float] = {}
        for workers in args.workers:
            minimum_out = scratch / "minimum"
            minimum_out.mkdir(exist_ok=True)
            minimum_jobs = [(root, minimum_out, job) for job in sorted(jobs, key=lambda j: -j.planned_bytes)]
            best = min(_run(_minimum_shard, minimum_jobs, workers) for _ in range(args.repeat))
            rates["minimum", workers] = frames / best
            times = []
            for _ in range(args.repeat):
                start = time.perf_counter()
                pack(root, scratch / "packed", options, workers=workers, overwrite=True, progress=False)
                times.append(time.perf_counter() - start)
            rates["pack", workers] = frames / min(times)

        packed = sum(p.stat().st_size for p in (scratch / "packed").glob("*.tar"))
        start = time.perf_counter()
        for path in (scratch / "packed").glob("*.tar"):
            hashlib.sha256(path.read_bytes()).hexdigest()
        sha_ms = (time.perf_counter() - start) / frames * 1000

        print(f"\n{'workers':>8} {'minimum img/s':>14} {'pack img/s':>11} {'pack cost / minimum':>20}")
        for workers in args.workers:
            minimum, packing = rates["minimum", workers], rates["pack", workers]
            print(f"{workers:>8} {minimum:>14.1f} {packing:>11.1f} {minimum / packing:>19.2f}x")
        if 1 in args.workers and 2 in args.workers:
            print(
                f"\nscaling 1 -> 2 workers: pack {rates['pack', 2] / rates['pack', 1]:.2f}x, "
                f"minimum {rates['minimum', 2] / rates['minimum', 1]:.2f}x"
            )
        print(
            f"sha256 of the shards alone (the manifest's checksums): {sha_ms:.1f} ms per frame "
            f"({packed / 1e6 / (sha_ms * frames / 1000):.0f} MB/s on this CPU)"
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
