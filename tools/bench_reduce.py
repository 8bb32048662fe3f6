#!/usr/bin/env python
"""Wall time of reducing a stage's folds (seg.reduction.reduce.reduce_stage) for the study's model,
and of its phases.

    python tools/bench_reduce.py                                  # 5 folds, 4 selection frames at 2048x1024
    python tools/bench_reduce.py --folds 5 --selection-frames 2 --recalibrate 2
    python tools/bench_reduce.py --folds 2 --size 256x128 --selection-frames 1 --eval-size full

In a temporary folder: a synthetic Cityscapes train split at --size (one frame per fold
city, --selection-frames in a held-out selection city) packed with seg.data.pack, and --folds
randomly initialised models (one seed each) exported as ``stage1/fold{k}/best.safetensors``
with sidecars of configs/study.yaml (data.shards pointing at the synthetic shards, wandb
disabled, data.eval_size from --eval-size; more key=value overrides may follow). Then the
phases are timed one by one with seg.reduction.soup and seg.reduction.candidates's Reducer (loading the K models,
the float64 mean of K, one evaluation on the selection set, BN recalibration over
--recalibrate batches), and reduce_stage is run once for the total, counting the
evaluations and recalibrations it makes.
"""

from __future__ import annotations

import argparse
import multiprocessing
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

import seg.reduction.candidates
import seg.reduction.reduce
from seg.core.cli import Size, at_least, format_size, parse_size
from seg.core.runs import Experiment
from seg.data.pack import Options, pack
from seg.data.synthetic import CITIES, Frame, write_frame
from seg.model.deeplab import count_parameters, from_config
from seg.model.weights import export_weights
from seg.recipe.config import load_config, to_dict
from seg.reduction.candidates import Reducer
from seg.reduction.reduce import STRATEGIES, reduce_stage
from seg.reduction.soup import average, load_fold_models

REPO = Path(__file__).resolve().parents[1]
# What reduce_stage calls, timed inside it (the names as seg.reduction.reduce and .candidates import them).
INSIDE = (
    ("load_fold_models", (seg.reduction.reduce, "load_fold_models")),
    ("average (mean, topk, greedy soups)", (seg.reduction.candidates, "average")),
    ("Reducer() (build the model)", (Reducer, "__init__")),
    ("Reducer.score", (Reducer, "score")),
    ("Reducer.recalibrate", (Reducer, "recalibrate")),
)


def make_dataset(scratch: Path, folds: int, selection_frames: int, size: Size) -> Path:
    """Pack one frame per fold city plus ``selection_frames`` of a selection city."""
    names = CITIES["train"]
    if folds + 1 > len(names):
        raise SystemExit(f"--folds {folds}: at most {len(names) - 1}")
    selection = names[folds]
    planned = [Frame("train", city, 0) for city in names[:folds]]
    planned += [Frame("train", selection, seq) for seq in range(selection_frames)]
    root = scratch / "cityscapes"
    jobs = [(root, frame, size.width, size.height, 0, False) for frame in planned]
    with multiprocessing.get_context("fork").Pool(2) as pool:
        pool.starmap(write_frame, jobs)
    shards = scratch / "shards"
    pack(root, shards, Options(folds=folds, splits=("train",), selection_cities=(selection,)), progress=False)
    return shards


@contextmanager
def counted(owner: object, name: str, calls: list[float]) -> Iterator[None]:
    """Time every call of ``owner.name`` into ``calls`` while inside the block."""
    original: Callable[..., Any] = getattr(owner, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            calls.append(time.perf_counter() - start)

    setattr(owner, name, wrapper)
    try:
        yield
    finally:
        setattr(owner, name, original)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="key=value overrides of configs/study.yaml")
    parser.add_argument("--folds", type=at_least(2), default=5, help="K fold models (default 5)")
    parser.add_argument(
        "--selection-frames", type=at_least(1), default=4, help="frames of the selection city (default 4)"
    )
    parser.add_argument("--size", type=parse_size, default="2048x1024", help="synthetic frame WIDTHxHEIGHT")
    parser.add_argument(
        "--eval-size",
        default=None,
        help="data.eval_size as WIDTHxHEIGHT, or 'full' (default: the study's, 1024x512 input, labels full size)",
    )
    parser.add_argument(
        "--recalibrate", type=at_least(0), default=0, metavar="BATCHES", help="BN recalibration batches"
    )
    parser.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES))
    parser.add_argument("--k", type=at_least(1), default=3, help="topk's k (as tools/reduce_folds.py)")
    args = parser.parse_intermixed_args(argv)

    scratch = Path(tempfile.mkdtemp(prefix="bench-reduce-"))
    try:
        start = time.perf_counter()
        shards = make_dataset(scratch, args.folds, args.selection_frames, args.size)
        data_s = time.perf_counter() - start

        overrides = [f"data.shards={shards}", "wandb.mode=disabled"]
        if args.eval_size == "full":
            overrides.append("data.eval_size=null")
        elif args.eval_size:
            height, width = parse_size(args.eval_size)
            overrides.append(f"data.eval_size=[{height},{width}]")
        config = to_dict(load_config(REPO / "configs" / "study.yaml", [*overrides, *args.overrides]))
        stage = Experiment.named(scratch / "runs", "study").stage(1)
        start = time.perf_counter()
        for fold in range(args.folds):
            torch.manual_seed(fold)
            model = from_config(config["model"])
            sidecar = {"config": config, "fold": fold, "stage": 1, "metrics": {"fold": {"miou": 0.5 + 0.01 * fold}}}
            stage.fold(fold).dir.mkdir(parents=True)
            export_weights(model, stage.fold(fold).weights("best"), sidecar)
        write_s = time.perf_counter() - start

        model_config, data = config["model"], config["data"]
        eval_size = "full" if not data["eval_size"] else format_size(data["eval_size"])
        size = format_size(args.size)
        print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, cuda {torch.cuda.is_available()}")
        print(f"configs/study.yaml {' '.join(args.overrides)}: R{model_config['depth']} OS "
              f"{model_config['output_stride']} ({count_parameters(model):,} parameters), {args.folds} folds, "
              f"selection {args.selection_frames} frames at {size}, eval input {eval_size}, data.workers "
              f"{data['workers']}, strategies {' '.join(args.strategies)}, recalibrate {args.recalibrate}")  # fmt: skip
        print(f"setup, not timed below: synthetic data + pack {data_s:.1f} s, writing the folds {write_s:.1f} s")

        accelerator = Accelerator(cpu=not torch.cuda.is_available())
        folds = list(range(args.folds))
        rows: list[tuple[str, int, float]] = []  # phase, calls, total seconds
        start = time.perf_counter()
        models = load_fold_models(stage.dir, folds)
        rows.append((f"load {args.folds} fold models", 1, time.perf_counter() - start))
        start = time.perf_counter()
        mean = average([m.state for m in models])
        rows.append((f"average {args.folds} (float64 mean)", 1, time.perf_counter() - start))
        start = time.perf_counter()
        reducer = Reducer(accelerator, config, str(shards), "train-selection")
        rows.append(("build the evaluation model", 1, time.perf_counter() - start))
        for name, state in (("fold0", models[0].state), ("mean", mean)):  # the first one warms up
            start = time.perf_counter()
            reducer.score(state)
            rows.append((f"evaluate {name} on selection ({args.selection_frames} img)", 1, time.perf_counter() - start))
        if args.recalibrate > 0:
            start = time.perf_counter()
            reducer.recalibrate(mean, args.recalibrate, folds)
            rows.append((f"BN recalibration ({args.recalibrate} batches)", 1, time.perf_counter() - start))
        del models, mean, reducer

        calls: dict[str, list[float]] = {name: [] for name, _ in INSIDE}
        start = time.perf_counter()
        with ExitStack() as stack:
            for name, (owner, attribute) in INSIDE:
                stack.enter_context(counted(owner, attribute, calls[name]))
            report = reduce_stage(stage.dir, strategies=tuple(args.strategies), k=args.k,
                                  recalibrate_batches=args.recalibrate, accelerator=accelerator)  # fmt: skip
        total_s = time.perf_counter() - start

        print()
        print(f"{'phase (timed alone)':<40} {'calls':>5} {'s/call':>8} {'s total':>8}")
        for name, count, seconds in rows:
            print(f"{name:<40} {count:>5} {seconds / count:>8.2f} {seconds:>8.2f}")
        print()
        print(f"{'reduce_stage, once':<40} {'calls':>5} {'s/call':>8} {'s total':>8}")
        for name, times in calls.items():
            if times:
                print(f"{name:<40} {len(times):>5} {sum(times) / len(times):>8.2f} {sum(times):>8.2f}")
        inside = sum(sum(times) for times in calls.values())
        print(f"{'the rest (manifest, writing reduced/)':<40} {'':>5} {'':>8} {total_s - inside:>8.2f}")
        print(f"{'total wall time':<40} {'':>5} {'':>8} {total_s:>8.2f}")
        names = " ".join(c["name"] for c in report["candidates"])
        winner = report["winner"]
        print(f"winner {winner['name']} (folds {winner['folds']}), {len(report['candidates'])} candidates: {names}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
