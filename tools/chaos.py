#!/usr/bin/env python
"""A chaos proof: seeded faults on a whole chain on the one-machine Slurm cluster, which must
end bit-identical to an undisturbed chain of the same seed.

    python tools/chaos.py [--faults 5] [--seed 0] [--kinds K,...] [--json FILE] [--workdir DIR]

Starts a cluster of slurm/testing/cluster.sh (or uses the one SLURM_CONF names with
--use-cluster), packs tiny synthetic data, and submits two chains with ``./launch cv`` (2
stages x 3 folds, each fold a 2-node job): the reference, left alone, and the chaos chain,
into which a seeded injector puts ``--faults`` faults, each at a planned step of a planned
fold (the plan is the seed's; the moment is the fold's own progress, not the clock). More
faults than ``--per-round`` (8) run in rounds of at most that many, one fault on each fold
or reduction a round (tools/chaos_plan.py's rounds): a fresh chaos chain for each, each
compared with the one reference (one chain has too few moments for many faults), and
removed once it compared identical (a chain's resumable states take GBs). After
each fault the chain recovers the way a user would: a requeued job is released from its
BeginTime wait; a chain a failure broke is left to drain, then ``./launch cv`` is run again
to continue. At the end every fold's and reduction's weights must be bitwise equal to the
reference's, every metrics.jsonl must hold each step once with equal values, the summaries
and reports equal (wall times aside), and nothing left behind (no lease, PREEMPTED marker or
hidden partial folder). Prints a table (faults by kind, recoveries, time lost, verdict) and
exits 0 when the chain ends identical, 1 when not, 2 on bad arguments, 74 when a chain failed
for its disk (full: not a fault that running the chain again recovers from).

Fault kinds (``--kinds``, default all):
  kill-rank      SIGKILL of one training rank (seeded: rank 0 or 1)
  kill-launcher  SIGKILL of one node's `accelerate launch`
  scancel-kill   `scancel -s KILL` of the fold's job
  usr1-batch     Slurm's time-limit warning: `scancel --batch -s USR1` (the batch script)
  usr1           `scancel -s USR1` of the job's steps
  preempt        a preemption's TERM to every process of the job (`scancel --full -s TERM`); srun
                 takes it as a cancel and kills the step after KillWait, so unless the trainer's
                 save beats that, the job fails and the chain is run again (a cluster with
                 PreemptMode=REQUEUE would requeue it itself)
  kill-in-save   `scancel -s KILL` the moment a resumable state is being written
  duplicate      the same fold submitted again while it runs (the lease must refuse it)
  drain          a node drained, then resumed (`scontrol update nodename=... state=drain`)
  kill-reduce    `scancel -s KILL` of a stage's reduction while it runs
Not in (yet): a kill timed inside a prune or inside the export of the reduced model (both
are windows of milliseconds that the injector cannot aim at from outside).

The chain's shape and the seeded plan are tools/chaos_plan.py; the chains on the cluster and
the injector, tools/chaos_injector.py; the comparison, the table and the command, here.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # `python tools/chaos.py` from a checkout: make `seg`, `tests` and `tools` importable
    sys.path.insert(0, str(REPO))

from seg.core.cli import at_least  # noqa: E402
from seg.core.storage import EXIT_STORAGE, check_output_file, writable_problem, write_json_result  # noqa: E402
from tests.slurm_cluster import SlurmCluster, cluster_dir, running_cluster  # noqa: E402
from tools.chaos_injector import Chain, DiskFullError, Injector  # noqa: E402
from tools.chaos_plan import FOLDS, KINDS, PER_ROUND, STAGES, STEPS, plan, prepare_data, rounds  # noqa: E402

# Keys that hold wall-clock measurements (or where a run ran), not results: left out of the comparison.
CLOCK_WORDS = {
    "time",
    "times",
    "seconds",
    "wall",
    "since",
    "started",
    "ended",
    "host",
    "restart",
    "job",
    "sec",
    "speed",
    "wait",  # train/data_wait_share: how long the step waited for data, a share of its time
    "memory",  # train/memory_mb: what the process held, not what it computed
}


def clock_key(key: str) -> bool:
    """Whether a JSON key names a wall-clock measurement, the machine's or where a run ran
    (``train/step_time``, ``wall_s``, ``images_per_s``, ``train/memory_mb``): its words, split
    at ``/``, ``_``, ``.`` and ``-``."""
    words = re.split(r"[/_.\-]", key.lower())
    return bool(CLOCK_WORDS & set(words)) or words[-1] == "s" or "per" in words


# --- the comparison ------------------------------------------------------------------------


def without_clock(value: Any) -> Any:
    """A JSON value with its wall-clock entries (and its absolute paths' roots) left out."""
    if isinstance(value, dict):
        return {k: without_clock(v) for k, v in value.items() if not clock_key(k)}
    if isinstance(value, list):
        return [without_clock(v) for v in value]
    if isinstance(value, str):  # a path in either chain's runs folder, or the folder itself (train.runs_dir)
        return re.sub(r"/\S*/(reference|chaos\d*)(?=/|$)", "RUNS", value)
    return value


def difference(a: Any, b: Any, where: str = "") -> str | None:
    """Where two JSON values first differ (``[3].train/loss: 0.5 != 0.51``); None when equal."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=str):
            if key not in a or key not in b:
                return f"{where}{key}: only in the {'reference' if key in a else 'chaos chain'}"
            found = difference(a[key], b[key], f"{where}{key}.")
            if found:
                return found
        return None
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return f"{where.rstrip('.') or 'the list'}: {len(a)} entries, not {len(b)}"
        found = (difference(x, y, f"{where}[{i}].") for i, (x, y) in enumerate(zip(a, b, strict=True)))
        return next((d for d in found if d), None)
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return None  # an IoU of a class that is in neither prediction nor label: NaN, in both
    return None if a == b else f"{where.rstrip('.')}: {str(a)[:60]} != {str(b)[:60]}"


def state_record(path: Path) -> Any:
    """A state's custom record (accelerate's custom_checkpoint_N.pkl: the schedule, the
    progress) as plain values, compared as the JSON files are (the chains' own paths aside)."""
    import torch

    def plain(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return value.tolist()
        if isinstance(value, dict):
            return {str(k): plain(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [plain(v) for v in value]
        return value

    return plain(torch.load(path, map_location="cpu", weights_only=True))


def kept(root: Path) -> list[Path]:
    """The files of a run folder that are results: not logs, not wandb's own folders."""
    return sorted(
        p.relative_to(root) for p in root.rglob("*")
        if p.is_file() and not {"logs", "wandb"} & set(p.relative_to(root).parts)
    )  # fmt: skip


def leftovers(root: Path) -> list[str]:
    """What a finished chain must not hold: leases, PREEMPTED markers, hidden partial folders."""
    found = []
    for p in root.rglob("*"):
        parts = p.relative_to(root).parts
        if {"logs", "wandb"} & set(parts):
            continue
        if p.name.startswith(".") or p.name == "PREEMPTED":
            found.append(str(p.relative_to(root)))
    return found


def metrics_problems(reference: Path, chaos: Path) -> list[str]:
    ref = [json.loads(line) for line in reference.read_text().splitlines()]
    got = [json.loads(line) for line in chaos.read_text().splitlines()]
    steps = [r["step"] for r in got if "train/loss" in r]
    problems = []
    if steps != list(range(1, STEPS + 1)):
        problems.append(f"{chaos}: training steps {steps}, not 1..{STEPS} once each")
    found = difference([without_clock(r) for r in ref], [without_clock(r) for r in got])
    if found:
        problems.append(f"{chaos}: records differ from the reference's at {found}")
    return problems


def compare(reference: Path, chaos: Path) -> tuple[list[str], dict[str, int]]:
    """(problems, counts of what was compared) between two experiments' folders."""
    problems, counts = [], Counter()
    ref_files, chaos_files = kept(reference), kept(chaos)
    if ref_files != chaos_files:
        extra, missing = set(chaos_files) - set(ref_files), set(ref_files) - set(chaos_files)
        problems.append(f"files differ: extra {sorted(map(str, extra))}, missing {sorted(map(str, missing))}")
    problems += [f"left behind: {p}" for p in leftovers(chaos)]
    for rel in set(ref_files) & set(chaos_files):
        a, b = reference / rel, chaos / rel
        if rel.name == "metrics.jsonl":
            problems += metrics_problems(a, b)
            counts["metrics logs"] += 1
        elif rel.suffix == ".json":
            found = difference(without_clock(json.loads(a.read_text())), without_clock(json.loads(b.read_text())))
            if found:
                problems.append(f"{rel}: differs (wall times aside) at {found}")
            counts["summaries and reports (json)"] += 1
        elif rel.suffix == ".safetensors":
            if a.read_bytes() != b.read_bytes():
                problems.append(f"{rel}: weights differ")
            counts["weights files"] += 1
        elif rel.suffix == ".pkl":  # bytes first; where they differ, the values (the chains' paths aside)
            if a.read_bytes() != b.read_bytes():
                found = difference(without_clock(state_record(a)), without_clock(state_record(b)))
                if found:
                    problems.append(f"{rel}: state differs at {found}")
                else:  # counted: whether a byte compare alone would do
                    counts["state records equal by value, not bytes (pkl)"] += 1
            counts["state records (pkl)"] += 1
        elif rel.suffix in (".bin", ".pt"):
            if a.read_bytes() != b.read_bytes():
                problems.append(f"{rel}: state differs")
            counts["state files"] += 1
    return sorted(problems), dict(counts)


# --- the run and its table -----------------------------------------------------------------


def wait_done(chain: Chain, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not chain.done(states := chain.states()):
        if chain.broken(states):
            raise RuntimeError(f"the reference chain failed: {states}\n{chain.cluster.log_tail()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"the reference chain is not done after {timeout} s: {states}")
        time.sleep(1)


def chaos(cluster: SlurmCluster, workdir: Path, seed: int, count: int, kinds: list[str],
          reference: Path | None = None, timeout: float = 3600, folds: int = FOLDS,
          per_round: int = PER_ROUND) -> dict[str, Any]:  # fmt: skip
    """Run the reference (unless ``reference`` names one already run on the same data) and the
    chaos chain side by side on ``cluster``, then a fresh chaos chain for each further round of
    ``per_round`` faults, each compared with the reference; the result as JSON-able data."""
    shards = prepare_data(workdir, folds)
    faults = plan(seed, count, kinds, folds)
    ref = Chain(cluster, reference or workdir / "reference", shards, folds)
    started = time.monotonic()
    reference_wall, chaos_wall = None, 0.0
    if reference is None:
        ref.submit()
    problems: list[str] = []
    counts: Counter[str] = Counter()
    recoveries: Counter[str] = Counter()
    chains: list[Chain] = []
    batches = rounds(faults, per_round)
    for number, batch in enumerate(batches, 1):
        chain = Chain(cluster, workdir / ("chaos" if number == 1 else f"chaos{number}"), shards, folds)
        chains.append(chain)
        chain.submit()
        injector = Injector(chain, batch)
        injector.run(timeout)
        chaos_wall += injector.now()
        if reference is None and reference_wall is None:
            wait_done(ref, timeout)
            reference_wall = time.monotonic() - started
        found, compared = compare(ref.experiment.dir, chain.experiment.dir)
        where = f"round {number}: " if len(batches) > 1 else ""
        problems += [where + p for p in found]
        problems += [f"{where}fault {f.index} ({f.kind}) never fired" for f in batch if f.fired is None]
        counts.update(compared)
        recoveries.update(injector.recoveries)
        if len(batches) > 1 and not found:  # a long run keeps only the chains that differ: each holds GBs of states
            shutil.rmtree(chain.runs)
            chain.say(f"round {number}: identical to the reference; its chain removed")
    first_submission = ref.submissions[0] if ref.submissions else []
    return {
        "seed": seed,
        "folds": folds,
        "rounds": len(batches),
        "faults": [asdict(f) for batch in batches for f in batch],
        "by_kind": dict(Counter(f.kind for f in faults)),
        "recoveries": dict(recoveries),
        "submissions": sum(len(c.submissions) for c in chains),
        "time_lost_s": round(sum(f.lost for f in faults), 1),
        "chaos_wall_s": round(chaos_wall, 1),
        "reference_wall_s": round(reference_wall, 1) if reference_wall is not None else None,
        "compared": dict(counts),
        "problems": problems,
        "verdict": "identical" if not problems else "DIFFERENT",
        "log": [line for c in chains for line in c.log],
        "reference": str(ref.experiment.dir),
        "reference_jobs": [(stage, array, reduce) for stage, array, reduce, _ in first_submission],
        "chaos": str(chains[0].experiment.dir),
        "chaos_rounds": [str(c.experiment.dir) for c in chains if c.experiment.dir.exists()],  # those kept
    }


def table(result: dict[str, Any]) -> str:
    shape = f"{STAGES} stages x {result['folds']} folds x 2 nodes"
    chains = f", {result['rounds']} chaos chains" if result.get("rounds", 1) > 1 else ""
    lines = [f"chaos: seed {result['seed']}, {len(result['faults'])} faults, {shape}{chains}",
             f"{'#':>3}  {'kind':<14} {'target':<16} {'at step':>7}  {'outcome':<24} {'lost':>6}"]  # fmt: skip
    for f in result["faults"]:
        target = f"stage {f['stage']} " + ("reduce" if f["kind"] == "kill-reduce" else f"fold {f['fold']}")
        lost = f"{f['recovered'] - f['fired']:.0f} s" if f["fired"] is not None and f["recovered"] is not None else "-"
        at = "-" if f["at_step"] is None else str(f["at_step"])
        lines.append(f"{f['index']:>3}  {f['kind']:<14} {target:<16} {at:>7}  {f['outcome']:<24} {lost:>6}")
    lines.append("by kind: " + ", ".join(f"{k} {n}" for k, n in sorted(result["by_kind"].items())))
    lines.append("recoveries: " + (", ".join(f"{k} {n}" for k, n in sorted(result["recoveries"].items())) or "none"))
    ref = f", reference {result['reference_wall_s']:.0f} s (run alongside)" if result["reference_wall_s"] else ""
    lines.append(f"time lost: {result['time_lost_s']:.0f} s; wall: chaos chains {result['chaos_wall_s']:.0f} s{ref}")
    lines.append("compared: " + ", ".join(f"{n} {k}" for k, n in sorted(result["compared"].items())))
    lines.append(f"verdict: {result['verdict']}")
    lines += [f"  {p}" for p in result["problems"][:30]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--faults", type=at_least(1), default=5, help="how many faults (default 5: the suite's short mode)"
    )
    parser.add_argument("--seed", type=int, default=0, help="draws the faults: the same seed, the same plan")
    parser.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated, from {','.join(KINDS)}")
    parser.add_argument(
        "--workdir", type=Path, help="where data, runs and the cluster live (default: a new temp folder)"
    )
    parser.add_argument(
        "--reference", type=Path, help="a reference runs folder of an earlier run in the same --workdir"
    )
    parser.add_argument(
        "--per-round", type=at_least(1), default=PER_ROUND,
        help=f"faults per chaos chain (default {PER_ROUND}); more run in rounds, a fresh chain each",
    )  # fmt: skip
    parser.add_argument(
        "--folds", type=at_least(2), default=FOLDS, help=f"folds per stage (default {FOLDS}, at least 2)"
    )
    parser.add_argument("--use-cluster", action="store_true", help="use the running cluster SLURM_CONF names")
    parser.add_argument("--json", type=Path, help="also write the result as JSON here")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds before the chain counts as stuck")
    args = parser.parse_args(argv)
    kinds = [k for k in args.kinds.split(",") if k]
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        print(
            f"error: --kinds {args.kinds!r}: {', '.join(unknown) or 'none'} unknown; from {','.join(KINDS)}",
            file=sys.stderr,
        )
        return 2
    if args.json:
        check_output_file(parser, "--json", args.json)  # before the chains: a bad path fails now, not at the end
    if args.workdir and (problem := writable_problem(args.workdir)):
        print(f"error: --workdir {args.workdir}: {problem}", file=sys.stderr)
        return EXIT_STORAGE
    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="seg-chaos-"))).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    if args.use_cluster and "SLURM_CONF" not in os.environ:
        print(
            "error: --use-cluster: SLURM_CONF is not set (slurm/testing/cluster.sh start DIR prints it)",
            file=sys.stderr,
        )
        return 2
    arguments = (workdir, args.seed, args.faults, kinds, args.reference, args.timeout, args.folds, args.per_round)
    try:
        if args.use_cluster:
            result = chaos(SlurmCluster(Path(os.environ["SLURM_CONF"]).parent), *arguments)
        else:
            with running_cluster(cluster_dir(workdir / "slurm")) as cluster:
                result = chaos(cluster, *arguments)
    except DiskFullError as e:
        print(f"error: {e}; exit {EXIT_STORAGE}", file=sys.stderr)
        return EXIT_STORAGE
    print(table(result))
    if args.json and (problem := write_json_result(args.json, result, indent=1)):  # the chains' states filled it
        print(f"error: {problem}", file=sys.stderr)
        return EXIT_STORAGE
    return 0 if result["verdict"] == "identical" else 1


if __name__ == "__main__":
    sys.exit(main())
