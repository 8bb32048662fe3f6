#!/usr/bin/env python
"""Write an experiment's report from its files alone (offline: no wandb, no network).

    python tools/report.py runs/study
    python tools/report.py runs/study --out /tmp/study-report

Reads every stage{s}/fold{k}/metrics.jsonl and summary.json, stage{s}/reduced/report.json and
tools/evaluate.py's metrics.json (eval*/ or evaluation*/ in the experiment, eval-*/ beside a
model); writes OUT/report.md with its PNGs (default OUT: runs/<experiment>/report/, replaced
as a whole). Folds still running and stages not reduced yet are noted in the report.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python tools/report.py` from a checkout, not installed: make `seg` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from seg.analysis.report import ReportError, write_report
from seg.core.runs import Experiment
from seg.core.storage import EXIT_STORAGE, StorageError, check_writable, writing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", type=Path, help="runs/<experiment>, holding stage*/fold*/")
    parser.add_argument("--out", type=Path, help="report folder (default: runs/<experiment>/report)")
    args = parser.parse_args(argv)
    try:
        out = args.out or Experiment(args.experiment).report
        check_writable(out)
        with writing(out):
            write_report(args.experiment, out)
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except StorageError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_STORAGE
    print(f"report: {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
