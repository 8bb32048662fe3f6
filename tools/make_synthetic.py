#!/usr/bin/env python
"""Write a synthetic Cityscapes tree (official layout) of procedural street scenes.

python tools/make_synthetic.py data/synthetic --train 60 --val 20 --test 6 --size 512x256
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from seg.core.atomic import OutputExistsError
from seg.core.cli import at_least, orientation_mismatch, parse_size
from seg.core.lease import LeaseHeldError
from seg.core.signals import interrupt_exit_code, interrupt_once
from seg.core.storage import EXIT_STORAGE, StorageError, check_writable, writing
from seg.data.synthetic import CITIES, CITYSCAPES_SIZE, make_synthetic


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="root of the tree to write (leftImg8bit/ and gtFine/ go inside)")
    for split, images, cities in (("train", 30, 6), ("val", 10, 2), ("test", 6, 2)):
        parser.add_argument(f"--{split}", type=int, default=images, help=f"{split} images (default {images})")
        parser.add_argument(
            f"--{split}-cities",
            type=int,
            default=cities,
            help=f"cities in {split}, at most {len(CITIES[split])} (default {cities})",
        )
    parser.add_argument("--size", type=parse_size, default="2048x1024", help="WIDTHxHEIGHT (default 2048x1024)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-ids", action="store_true", help="also write *_gtFine_labelTrainIds.png")
    parser.add_argument("--workers", type=at_least(1), default=os.cpu_count(), help="processes (default: all cores)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing tree")
    args = parser.parse_args(argv)
    # A portrait scene can be meant (it is still drawn as a street), so only a warning.
    swapped = orientation_mismatch("--size", args.size, CITYSCAPES_SIZE, "Cityscapes frames")
    if swapped:
        print(
            f"warning: {swapped} (writing the {args.size.width}x{args.size.height} scenes asked for)", file=sys.stderr
        )
    try:
        check_writable(Path(args.out).parent)
        with interrupt_once(), writing(args.out):  # a kill cleans up as a Ctrl-C does: partial tree, workers
            frames = make_synthetic(
                args.out,
                counts={s: getattr(args, s) for s in CITIES},
                cities={s: getattr(args, f"{s}_cities") for s in CITIES},
                size=args.size,
                seed=args.seed,
                workers=args.workers,
                train_ids=args.train_ids,
                overwrite=args.overwrite,
            )
    except (OutputExistsError, ValueError, LeaseHeldError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except StorageError as e:
        print(f"error: {e} (nothing was left behind)", file=sys.stderr)
        return EXIT_STORAGE
    except KeyboardInterrupt as e:
        code = interrupt_exit_code(e)
        print(f"interrupted: {args.out} not written (an existing one is untouched), nothing was left behind; "
              f"exit {code}", file=sys.stderr)  # fmt: skip
        return code
    print(f"wrote {len(frames)} frames to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
