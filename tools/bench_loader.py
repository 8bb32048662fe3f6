#!/usr/bin/env python
"""Training-loader throughput per CPU core, every variant side by side in one run.

    python tools/bench_loader.py                    # 16 synthetic 2048x1024 frames, 8 copies each
    python tools/bench_loader.py --root /data/cityscapes --json loader.json

The study's recipe (resize to 512x1024, standard augmentation's geometry) over seg's shards:
full-size PNG, full-size JPEG and train-size PNG (``pack --resize 1024x512``), each with the
geometry in the workers (the resize window cut by Pillow) and on the device (workers only
decode and draw; ``data.geometry_on_device``); beside each, its decode-only bound (read the
shard, decode image and label, nothing else). Today's pipeline before this bench's changes
(Pillow decoding, full-size PNG, geometry in the workers) is the first row, the baseline.

Per core: one process, one thread, no loader workers: what one worker costs. A GPU that
trains N images/s needs N / rate cores of loader.

One more row reads the train-size PNG shards streamed over HTTP from this machine (Python's
http.server in its own process; ``data.shards: http://...``, no cache): what fetching each
drawn shard whole, its sha256 and the temporary file cost a worker (seg/data/remote.py).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from seg.core import cityscapes as cs
from seg.core.cli import at_least, format_size, parse_size
from seg.core.storage import EXIT_STORAGE, StorageError, check_output_file, write_json_result
from seg.data import decode
from seg.data.loader import read_shard, shards_of, train_loader
from seg.data.manifest import FoldSplit, fold_groups, load_manifest
from seg.data.pack import Options, pack
from seg.data.synthetic import CITYSCAPES_SIZE, make_synthetic
from seg.data.transforms import TrainGeometry

SHARDS = {  # name: (image format, resize the train split)
    "full-size PNG": ("png", False),
    "full-size JPEG": ("jpg", False),
    "train-size PNG": ("png", True),
}
CITIES = 4  # the synthetic tree's train cities: the fewest frames it takes
COPIES = 8  # copies of each synthetic frame (replicate)


@contextlib.contextmanager
def pillow_only() -> Iterator[None]:
    """Decode as the loader did before libspng/libjpeg-turbo: Pillow alone."""
    saved = decode.pyspng, decode.simplejpeg
    decode.pyspng = decode.simplejpeg = None
    try:
        yield
    finally:
        decode.pyspng, decode.simplejpeg = saved


@contextlib.contextmanager
def one_core() -> Iterator[None]:
    """torch on one thread inside the block (with no loader workers: one core), as before after it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def pack_shards(
    root: Path, scratch: Path, size: tuple[int, int], names: tuple[str, ...] = tuple(SHARDS), workers: int = 2
) -> dict[str, Path]:
    """``root``'s train split packed as each of ``names`` (SHARDS) under ``scratch``, for fold 0:
    the folder of each."""
    folders = {}
    for name in names:
        image_format, resize = SHARDS[name]
        folders[name] = scratch / name.replace(" ", "-")
        options = Options(folds=2, splits=("train",), image_format=image_format, resize=size if resize else None)
        pack(root, folders[name], options, workers=workers, progress=False)
    return folders


def timed(produce: Callable[[], int], seconds: float) -> float:
    """Items per second of ``produce`` (which returns how many it made), over >= ``seconds``."""
    produce()  # warm-up
    made, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        made += produce()
    return made / (time.perf_counter() - started)


@contextlib.contextmanager
def http_server(folder: Path) -> Iterator[str]:
    """``folder`` served over HTTP on 127.0.0.1 by another process; its URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "http.server", "-b", "127.0.0.1", "-d", str(folder), str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"http.server did not start on port {port}") from None
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait()


def pipeline_rate(shards: Path | str, geometry: TrainGeometry, on_device: bool, seconds: float) -> float:
    loader = train_loader(FoldSplit.of(shards, 0), geometry, batch_size=2, workers=0, checksums=False,
                             geometry_on_device=on_device)  # fmt: skip
    batches = iter(loader)
    return timed(lambda: next(batches)["image"].shape[0], seconds)


def pillow_rate(shards: Path, geometry: TrainGeometry, seconds: float) -> float:
    with pillow_only():
        return pipeline_rate(shards, geometry, False, seconds)


def decode_rate(shards: Path, seconds: float) -> float:
    """Read fold 0's training shards and decode image and label to arrays, nothing else: the
    least a worker does (what the device geometry leaves it)."""
    groups, _ = fold_groups(load_manifest(shards), 0)
    paths = [shard.path for shard in shards_of(shards, groups, checksums=False)]
    stream = (sample for _ in iter(int, 1) for path in paths for sample in read_shard(path))

    def one() -> int:
        sample = next(stream)
        png = "image.png" in sample
        decode.png_array(sample["image.png"], "RGB") if png else decode.jpeg_array(sample["image.jpg"])
        decode.png_array(sample["label.png"], "L")
        return 1

    return timed(one, seconds)


def replicate(root: Path, times: int) -> None:
    """Copies of every train frame under new sequence numbers: epochs long beside the shuffle
    buffer (32 raw samples, refilled each epoch), as with real Cityscapes, without drawing
    more frames. The copies decode exactly like their originals."""
    for path in sorted(root.glob("*/train/*/*.png")):
        city, seq, rest = path.name.split("_", 2)
        for k in range(1, times):
            shutil.copyfile(path, path.with_name(f"{city}_{int(seq) + 1000 * k:06d}_{rest}"))


def frame_size(root: Path) -> tuple[int, int]:
    """(H, W) of the tree's train frames, read from the first one's header."""
    first = min(root.glob(f"leftImg8bit/train/*/*{cs.IMAGE_SUFFIX}"))
    with Image.open(first) as image:
        return image.height, image.width


def shard_labels(frame: tuple[int, int], size: tuple[int, int]) -> dict[str, str]:
    """Each of SHARDS as a row names it: the size its images are stored at, said."""
    return {name: f"{format_size(size if resize else frame)} {image_format.upper().replace('JPG', 'JPEG')} "
                  f"({'train' if resize else 'full'} size)"
            for name, (image_format, resize) in SHARDS.items()}  # fmt: skip


def environment() -> dict[str, Any]:
    """Where the rows were measured: what decides a per-core rate."""
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_cores": os.cpu_count(),
        "cores_available": len(os.sched_getaffinity(0)),
        "png_decoder": "libspng" if decode.pyspng else "Pillow",
        "jpeg_decoder": "libjpeg" if decode.simplejpeg else "Pillow",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", help="a Cityscapes tree (default: make a synthetic one in a temporary folder)")
    parser.add_argument(
        "--frames", type=at_least(CITIES), default=16, help=f"synthetic train frames (default 16, at least {CITIES})"
    )
    parser.add_argument("--size", type=parse_size, default="1024x512", help="training input WIDTHxHEIGHT")
    parser.add_argument("--seconds", type=float, default=3.0, help="time per measurement (default 3)")
    parser.add_argument(
        "--repeats", type=at_least(1), default=3, help="measurements per row, the best kept (default 3)"
    )
    parser.add_argument("--json", type=Path, help="also write the rows, with the settings and environment, here")
    args = parser.parse_args(argv)
    if not args.seconds > 0:  # written so, nan is refused too
        parser.error(f"--seconds {args.seconds:g}: the time per measurement must be above 0 (e.g. 3)")
    if args.json:
        check_output_file(parser, "--json", args.json)  # before the measurements: a bad path fails now, not at the end
    size = tuple(args.size)

    scratch = Path(tempfile.mkdtemp(prefix="bench-loader-"))
    try:
        root = Path(args.root) if args.root else scratch / "cityscapes"
        if not args.root:
            print(f"making {args.frames} synthetic {format_size(CITYSCAPES_SIZE)} frames...", flush=True)
            make_synthetic(root, counts={"train": args.frames, "val": 0, "test": 0},
                           cities={"train": CITIES, "val": 1, "test": 1}, workers=2, progress=False)  # fmt: skip
            replicate(root, COPIES)
        folders = pack_shards(root, scratch, size)
        frame = frame_size(root)
        label = shard_labels(frame, size)
        geometry = TrainGeometry(mode="resize", size=size, level="standard")
        train_frames = len(list(root.glob(f"leftImg8bit/train/*/*{cs.IMAGE_SUFFIX}")))

        # Every row is measured --repeats times, round-robin, and keeps its best: on a shared
        # machine load only ever slows a measurement, and round-robin spreads it over the rows.
        fast = "libspng" if decode.pyspng else "Pillow"
        specs: list[tuple[dict, Callable[[], float]]] = [
            ({"shards": "full-size PNG", "decoder": "Pillow", "geometry": "workers"},
             lambda: pillow_rate(folders["full-size PNG"], geometry, args.seconds)),
        ]  # fmt: skip
        for name, shards in folders.items():
            decoder = ("libjpeg" if decode.simplejpeg else "Pillow") if "JPEG" in name else fast
            for where in ("workers", "device", "decode only"):
                if where == "decode only":
                    measure = partial(decode_rate, shards, args.seconds)
                else:
                    measure = partial(pipeline_rate, shards, geometry, where == "device", args.seconds)
                specs.append(({"shards": name, "decoder": decoder, "geometry": where}, measure))
        for row, _ in specs:
            row["read"] = "folder"
        print(f"per core, frames {format_size(frame)}, input {format_size(size)}, standard level, "
              f"best of {args.repeats} x {args.seconds:g} s:")  # fmt: skip
        with http_server(scratch) as url, one_core():
            specs.append(({"shards": "train-size PNG", "decoder": fast, "geometry": "device", "read": "HTTP localhost"},
                          partial(pipeline_rate, f"{url}/train-size-PNG", geometry, True, args.seconds)))  # fmt: skip
            rates: list[list[float]] = [[] for _ in specs]
            for _ in range(args.repeats):
                for i, (_, measure) in enumerate(specs):
                    rates[i].append(measure())
        # rows name their shards by the size stored (64x32 frames are not "full-size" Cityscapes)
        rows = [{**row, "shards": label[row["shards"]], "kind": row["shards"], "images_per_s": max(r), "runs": r}
                for (row, _), r in zip(specs, rates, strict=True)]  # fmt: skip
        for r in rows:
            runs = ", ".join(f"{v:.1f}" for v in r["runs"])
            print(f"  {r['shards']:<26} {r['read']:<15} {r['decoder']:<8} {r['geometry']:<12} "
                  f"{r['images_per_s']:6.1f} images/s per core (runs: {runs})")  # fmt: skip

        baseline = rows[0]["images_per_s"]
        bound = {r["kind"]: r["images_per_s"] for r in rows if r["geometry"] == "decode only"}
        print("\n| shards | read from | decoder | geometry | images/s per core | vs today | vs its decode-only bound |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for r in rows:
            r["vs_today"] = r["images_per_s"] / baseline
            r["vs_decode_bound"] = r["images_per_s"] / bound[r["kind"]]  # the folder's decode-only bound
            print(f"| {r['shards']} | {r['read']} | {r['decoder']} | {r['geometry']} | {r['images_per_s']:.1f} | "
                  f"{r['vs_today']:.2f}x | {r['vs_decode_bound']:.2f} |")  # fmt: skip
        goal = next(r for r in rows if r["kind"] == "train-size PNG" and r["geometry"] == "device")
        print(
            f"\n{goal['shards']}, geometry on the device: {goal['vs_today']:.1f}x today's {rows[0]['shards']} "
            f"pipeline per core (goal >= 4x), {goal['vs_decode_bound']:.2f} of its decode-only bound (goal >= 0.9)"
        )
        if args.json:
            settings = {
                "root": args.root or f"synthetic: {args.frames} frames, {COPIES} copies each",
                "frame_size": format_size(frame),
                "train_frames": train_frames,
                "training_input_size": format_size(size),
                "geometry": "resize, standard level",
                "seconds": args.seconds,
                "repeats": args.repeats,
                "threads": 1,
                "loader_workers": 0,
            }
            report = {"environment": environment(), "settings": settings, "rows": rows}
            if problem := write_json_result(args.json, report, indent=1):
                raise StorageError(problem)
            print(f"wrote {args.json}")
    except StorageError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_STORAGE
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
