#!/usr/bin/env python
"""Pack a Cityscapes tree into fold-grouped webdataset shards, or verify packed shards.

    python tools/pack_cityscapes.py /data/cityscapes --out shards/cityscapes --folds 5
    python tools/pack_cityscapes.py --verify shards/cityscapes

The train split becomes K fold groups (train-fold{k}-NNNNNN.tar): fold k trains on all
groups but k and validates on group k. The official val and test splits get their own
shards (test: images only). Images keep their original PNG bytes unless --image-format jpg
(lossy: decoded and re-encoded at --jpeg-quality). Labels are stored as trainId PNGs.
--resize WxH stores the train split at that size (the training input), val and test as they are.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from seg.core import cityscapes as cs
from seg.core.atomic import OutputExistsError
from seg.core.cli import at_least, parse_bytes, parse_list, parse_size
from seg.core.lease import LeaseHeldError
from seg.core.signals import interrupt_exit_code, interrupt_once
from seg.core.storage import EXIT_STORAGE, StorageError, check_writable, writing
from seg.data.manifest import ManifestError, verify
from seg.data.pack import FOLD_MODES, IMAGE_FORMATS, Options, PackError, pack


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", nargs="?", help="Cityscapes root holding leftImg8bit/ and gtFine/")
    parser.add_argument("--out", help="output directory (default: shards/<name of root>)")
    parser.add_argument("--folds", type=int, default=5, help="fold groups of the train split (default 5)")
    parser.add_argument(
        "--fold-mode",
        choices=FOLD_MODES,
        default="city",
        help="city: whole cities per fold, balanced by image count (default); random: seeded",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of fold assignment and shard order")
    parser.add_argument(
        "--selection-cities",
        type=parse_list,
        default=(),
        help="train cities held out of every fold for model selection, e.g. ulm",
    )
    parser.add_argument(
        "--selection-fraction",
        type=float,
        default=0.0,
        help="with --fold-mode random: share of train frames held out for model selection",
    )
    parser.add_argument("--splits", type=parse_list, default=cs.SPLITS, help="splits to pack (default train,val,test)")
    parser.add_argument("--shard-size", type=parse_bytes, default="256MB", help="target shard size (default 256MB)")
    parser.add_argument(
        "--image-format",
        choices=IMAGE_FORMATS,
        default="png",
        help="png: original bytes (default); jpg: lossy re-encode, smaller and faster to decode",
    )
    parser.add_argument("--jpeg-quality", type=int, default=95)
    parser.add_argument(
        "--resize",
        type=parse_size,
        help="store the train split at WIDTHxHEIGHT (e.g. 1024x512, the study's input): a quarter of the "
        "pixels to decode per training sample; val and test keep full resolution for evaluation",
    )
    parser.add_argument("--workers", type=at_least(1), default=os.cpu_count(), help="processes (default: all cores)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    parser.add_argument(
        "--verify",
        metavar="DIR|URL",
        help="check packed shards (a folder, or a URL: each fetched) against their manifest",
    )
    args = parser.parse_args(argv)
    with interrupt_once():  # a kill cleans up as a Ctrl-C does: partial output, workers
        return _pack_or_verify(parser, args)


def _pack_or_verify(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    out = None
    try:
        if args.verify:
            problems = verify(args.verify, workers=args.workers)
            for problem in problems:
                print(f"error: {problem}", file=sys.stderr)
            if problems:
                print(f"{args.verify}: {len(problems)} problem(s); repack with --overwrite", file=sys.stderr)
                return 1
            print(f"{args.verify}: every shard matches the manifest")
            return 0
        if not args.root:
            parser.error("give a Cityscapes root to pack, or --verify DIR")
        out = Path(args.out or Path("shards") / Path(args.root).resolve().name)
        options = Options(
            folds=args.folds,
            fold_mode=args.fold_mode,
            seed=args.seed,
            selection_cities=args.selection_cities,
            selection_fraction=args.selection_fraction,
            splits=args.splits,
            shard_size=args.shard_size,
            image_format=args.image_format,
            jpeg_quality=args.jpeg_quality,
            resize=tuple(args.resize) if args.resize else None,
        )
        check_writable(out.parent)
        with writing(out, "packing into"):
            manifest = pack(args.root, out, options, workers=args.workers, overwrite=args.overwrite)
    except (PackError, OutputExistsError, ManifestError, LeaseHeldError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except StorageError as e:
        print(f"error: {e} (nothing was left behind)", file=sys.stderr)
        return EXIT_STORAGE
    except KeyboardInterrupt as e:
        code = interrupt_exit_code(e)
        what = f"{out} not packed (an existing one is untouched)" if out else f"{args.verify} not verified"
        print(f"interrupted: {what}, nothing was left behind; exit {code}", file=sys.stderr)
        return code
    counts = manifest["counts"]
    shards = sum(len(g["shards"]) for g in manifest["groups"].values())
    split_counts = ", ".join(f"{s} {counts[s]}" for s in cs.SPLITS if s in counts)
    print(f"packed {split_counts} frames into {shards} shards in {out}; folds {counts['folds']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
