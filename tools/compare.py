#!/usr/bin/env python
"""Compare experiments fold by fold: per-fold scores, means with 95% intervals, paired tests.

    python tools/compare.py runs/A runs/B                      # B against the baseline A, last common stage
    python tools/compare.py runs/A runs/B runs/C --stage 2 --metric class:rider
    python tools/compare.py runs/A runs/B --allow-missing --wandb

Reads each experiment's stage{s}/fold{k}/summary.json, metrics.jsonl and config.yaml, the
shards' manifest.json the config names, stage{s}/reduced/report.json and tools/evaluate.py's
metrics.json of the reduced model. Refuses pairs that are not comparable (other shards, fold
assignment or selection set; a fold on one side only unless --allow-missing), naming why.
Leads with what the experiments differ in: their stages' identities (resolved config, start
model, data; seg/recipe/identity.py) compared, else their configs.
Writes OUT/compare.md, compare.json and PNGs (default OUT: runs/comparisons/A-vs-B-stage{s},
replaced as a whole) and prints the tables. Exit 2 with one line on any refusal or bad file.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python tools/compare.py` from a checkout, not installed: make `seg` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from seg.analysis.compare import (
    CompareError,
    caveat,
    compare,
    default_out,
    describe_setup,
    log_to_wandb,
    tables,
    wandb_settings,
    write,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "experiments", type=Path, nargs="+", help="runs/<experiment> folders; the first is the baseline"
    )
    parser.add_argument("--stage", type=int, help="the stage to compare (default: the last one all of them have)")
    parser.add_argument("--metric", default="miou", help="miou (default), fwiou or class:NAME (e.g. class:rider)")
    parser.add_argument(
        "--use",
        choices=("final", "best"),
        default="final",
        help="each fold's final evaluation (default) or its best one (chosen on the same held-out fold: optimistic)",
    )
    parser.add_argument("--out", type=Path, help="output folder (default: runs/comparisons/A-vs-B-stage{s})")
    parser.add_argument(
        "--allow-missing", action="store_true", help="compare the common folds when one side lacks some"
    )
    parser.add_argument(
        "--wandb", action="store_true", help="also log a wandb run (job_type compare), offline by default"
    )
    args = parser.parse_args(argv)
    try:
        result = compare(args.experiments, args.stage, args.metric, args.use, args.allow_missing)
        out = args.out or default_out(result, args.experiments[0])
        figures = write(result, out)
    except (CompareError, OSError) as e:
        print("error: " + " ".join(str(e).split("\n")), file=sys.stderr)  # one line
        return 2
    print("\n".join(f"differs: {describe_setup(entry)}" for entry in result["differences"]) + "\n")
    print("\n".join(tables(result)))
    if result["notes"]:
        print("\n" + "\n".join(f"note: {n}" for n in result["notes"]))
    print("\n" + "\n".join(caveat(result)))
    if args.wandb:
        mode = log_to_wandb(result, out, figures, wandb_settings(args.experiments[0], result["stage"]))
        where = out / "wandb"
        print("wandb: disabled (WANDB_MODE)" if mode is None else f"wandb: {mode} run under {where}")
    print(f"comparison: {out / 'compare.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
