#!/usr/bin/env python
"""Reduce a stage's fold models to one model that seeds the next stage, beside the folds' ensemble.

    python tools/reduce_folds.py runs/study/stage1 [--recalibrate 50] [--select-on val]
    accelerate launch --multi_gpu --num_processes 2 tools/reduce_folds.py runs/study/stage1

Writes runs/<experiment>/stage{s}/reduced/: model.safetensors (+ .json), ensemble.json (the
fold ensemble's members, for tools/evaluate.py and tools/predict.py), report.json, report.md
and reduction.png. When the ensemble wins the selection, model.safetensors is the best
single-model candidate (--seed-from chooses another). Start the next stage with
    seg/train.py ... --stage s+1 --init-from runs/<experiment>/stage{s}/reduced/model.safetensors
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python tools/reduce_folds.py` from a checkout, not installed: make `seg` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from seg.core.lease import LeaseHeldError
from seg.core.runs import Stage
from seg.core.storage import EXIT_STORAGE, StorageError
from seg.data.manifest import ManifestError
from seg.data.remote import RemoteError
from seg.model.weights import WeightsError
from seg.reduction.reduce import add_arguments, reduce_stage


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("stage_dir", help="runs/<experiment>/stage{s}, holding fold*/")
    add_arguments(parser)
    args = parser.parse_args(argv)
    reduced = Stage.at(args.stage_dir).reduced
    before = _folder_state(reduced)
    try:
        reduce_stage(
            args.stage_dir,
            args.shards,
            args.folds,
            tuple(args.strategies),
            args.k,
            args.recalibrate,
            args.select_on,
            args.weights,
            seed_from=args.seed_from,
        )
    except (WeightsError, ManifestError, RemoteError, ValueError, LeaseHeldError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except StorageError as e:
        print(f"error: {e}; the stage's earlier reduction, if any, is untouched", file=sys.stderr)
        return EXIT_STORAGE
    except KeyboardInterrupt:
        if _folder_state(reduced) not in (before, None):  # reduced/ is replaced whole: this one is complete
            print(f"interrupted after {reduced} was written: the stage is reduced (its wandb or tensorboard "
                  "summary may be incomplete); exit 130", file=sys.stderr)  # fmt: skip
        else:
            print(f"interrupted: {args.stage_dir} not reduced (an earlier reduction is untouched); exit 130",
                  file=sys.stderr)  # fmt: skip
        return 130
    return 0


def _folder_state(path: Path) -> tuple[int, int] | None:
    """What tells a folder replaced by a rename from the one that was there (None: there is none)."""
    try:
        found = path.stat()
    except OSError:
        return None
    return found.st_ino, found.st_mtime_ns


if __name__ == "__main__":
    sys.exit(main())
