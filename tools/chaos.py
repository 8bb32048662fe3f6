#!/usr/bin/env python
"""A chaos proof: seeded faults on a whole chain on the one-machine Slurm cluster, which must
end bit-identical to an undisturbed chain of the same seed.

    python tools/chaos.py [--faults 5] [--seed 0] [--kinds K,...] [--json FILE] [--workdir DIR]

Starts a cluster of slurm/testing/cluster.sh (or uses the one SLURM_CONF names with
--use-cluster), packs tiny synthetic data, and submits two chains with ``./launch cv`` (2
stages x 3 folds, each fold a 2-node job): the reference, left alone, and the chaos chain,
into which a seeded injector puts ``--faults`` faults, each at a planned step of a planned
fold (the plan is the seed's; the moment is the fold's own progress, not the clock). After
each fault the chain recovers the way a user would: a requeued job is released from its
BeginTime wait; a chain a failure broke is left to drain, then ``./launch cv`` is run again
to continue. At the end every fold's and reduction's weights must be bitwise equal to the
reference's, every metrics.jsonl must hold each step once with equal values, the summaries
and reports equal (wall times aside), and nothing left behind (no lease, PREEMPTED marker or
hidden partial folder). Prints a table (faults by kind, recoveries, time lost, verdict) and
exits 0 when the chain ends identical, 1 when not, 2 on bad arguments.

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
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import shlex
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # `python tools/chaos.py` from a checkout: make `seg` and `tests` importable
    sys.path.insert(0, str(REPO))

from seg.core.atomic import atomic_write_bytes  # noqa: E402
from seg.core.runs import Experiment  # noqa: E402
from tests.slurm_cluster import FINISHED, SlurmCluster, running_cluster  # noqa: E402

KINDS = (
    "kill-rank",
    "kill-launcher",
    "scancel-kill",
    "usr1-batch",
    "usr1",
    "preempt",
    "kill-in-save",
    "duplicate",
    "drain",
    "kill-reduce",
)
STAGES, FOLDS, STEPS = 2, 3, 12
# Tiny and quick, every fold saving often: a fault always has a recent state to resume from.
TINY = [
    "data.size=[32,64]", "data.eval_size=null", "data.workers=1", "train.batch_size=2", "train.log_every=1",
    f"train.iters={STEPS}", f"train.eval_every={STEPS // 2}", "train.save_every=2", "wandb.mode=offline",
]  # fmt: skip
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
}


def clock_key(key: str) -> bool:
    """Whether a JSON key names a wall-clock measurement or where a run ran (``train/step_time``,
    ``wall_s``, ``images_per_s``): its words, split at ``/``, ``_``, ``.`` and ``-``."""
    words = re.split(r"[/_.\-]", key.lower())
    return bool(CLOCK_WORDS & set(words)) or words[-1] == "s" or "per" in words


POLL_S = 0.2


@dataclass
class Fault:
    """One planned fault and what became of it."""

    index: int
    kind: str
    stage: int
    fold: int  # the target fold (ignored by kill-reduce and drain's node choice)
    step: int  # fires once the target fold has logged this step
    detail: int  # rank, node or delay, drawn with the rest
    fired: float | None = None  # seconds since the chain's start
    at_step: int | None = None
    target: str = ""
    outcome: str = "not fired"
    recovered: float | None = None  # seconds since the chain's start

    @property
    def lost(self) -> float:
        return (self.recovered - self.fired) if self.fired is not None and self.recovered is not None else 0.0


def plan(seed: int, count: int, kinds: list[str]) -> list[Fault]:
    """``count`` faults drawn from ``kinds`` by ``seed``: kind, stage, fold, step, detail. Every
    kind is used before any repeats (the short mode covers as many kinds as it has faults)."""
    rng = random.Random(seed)
    order: list[str] = []
    while len(order) < count:
        order += rng.sample(kinds, len(kinds))
    faults = [
        Fault(i, kind, rng.randint(1, STAGES), rng.randrange(FOLDS), rng.randint(1, STEPS - 1), rng.randint(0, 1))
        for i, kind in enumerate(order[:count])
    ]
    return sorted(faults, key=lambda f: (f.stage, f.step, f.index))


# --- the cluster and the chains ------------------------------------------------------------


def prepare_data(workdir: Path) -> Path:
    """Tiny synthetic Cityscapes packed in FOLDS folds with a selection city; the shards' folder."""
    from seg.core.cli import Size
    from seg.data.pack import Options, pack
    from seg.data.synthetic import make_synthetic

    shards = workdir / "shards"
    if not (shards / "manifest.json").exists():
        root = workdir / "cityscapes"
        cities = {"train": FOLDS + 1, "val": 1, "test": 1}  # a city per fold, and the selection city
        counts = {"train": 16, "val": 2, "test": 0}
        make_synthetic(root, counts=counts, cities=cities, size=Size(32, 64), progress=False, overwrite=True)
        options = Options(folds=FOLDS, splits=("train", "val"), selection_cities=("bochum",))
        pack(root, shards, options, progress=False, overwrite=True)
    return shards


@dataclass
class Chain:
    """One chain submitted with ./launch cv (seg.cv); every submission's job ids."""

    cluster: SlurmCluster
    runs: Path
    shards: Path
    submissions: list[list[tuple[int, str, str]]] = field(default_factory=list)
    log: list[str] = field(default_factory=list)

    def say(self, line: str) -> None:
        """A line of the run's log, printed as it happens (stderr: the table goes to stdout)."""
        self.log.append(line)
        print(f"chaos: {line}", file=sys.stderr, flush=True)

    @property
    def experiment(self) -> Experiment:
        return Experiment.named(str(self.runs), "demo")

    def submit(self) -> None:
        env = self.cluster.env | {"SEG_PYTHON": sys.executable, "WANDB_SILENT": "true"}
        env.pop("WANDB_MODE", None)
        command = [sys.executable, "-m", "seg.cv", str(REPO / "configs" / "demo.yaml"), "--stages", str(STAGES),
                   "--nodes", "2", "--reduce", "--recalibrate 1", "--sbatch", "--time 30",
                   f"data.shards={self.shards}", f"train.runs_dir={self.runs}", *TINY]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
        if done.returncode:
            raise RuntimeError(f"{shlex.join(command)} failed ({done.returncode}): {done.stderr.strip()}")
        jobs = re.findall(r"stage (\d+): folds (\d+) \(array [0-9,]+\), reduce (\d+)", done.stdout)
        self.submissions.append([(int(s), a, r) for s, a, r in jobs])
        self.say(f"{self.runs.name} chain submitted (stage, array, reduce): {jobs}")

    @property
    def jobs(self) -> list[str]:
        return [job for _, array, reduce in self.submissions[-1] for job in (array, reduce)]

    def array(self, stage: int) -> str:
        return self.submissions[-1][stage - 1][1]

    def reduce(self, stage: int) -> str:
        return self.submissions[-1][stage - 1][2]

    def states(self) -> dict[str, str]:
        return self.cluster.states(self.jobs)

    def done(self, states: dict[str, str]) -> bool:
        expected = {f"{self.array(s)}_{k}" for s in range(1, STAGES + 1) for k in range(FOLDS)}
        expected |= {self.reduce(s) for s in range(1, STAGES + 1)}
        return all(states.get(key) == "COMPLETED" for key in expected)

    def broken(self, states: dict[str, str]) -> bool:
        return bool(set(states.values()) & (FINISHED - {"COMPLETED"}))


def queue(cluster: SlurmCluster) -> dict[str, tuple[str, str, str]]:
    """Every queued job or array task: "12_0" or "13" -> (its own job id, state, reason)."""
    lines = cluster.run(["squeue", "-h", "-r", "-t", "all", "-o", "%i|%A|%T|%r"], check=False).splitlines()
    return {key: (job, state, reason) for key, job, state, reason in (line.split("|", 3) for line in lines)}


def processes(job_id: str) -> list[tuple[int, str, dict[str, str]]]:
    """(pid, command line, environment) of this machine's processes that belong to a Slurm job."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):
            env = dict(
                item.split("=", 1) for item in (proc / "environ").read_bytes().decode().split("\0") if "=" in item
            )
            if env.get("SLURM_JOB_ID") == job_id:
                found.append((int(proc.name), (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(), env))
    return found


def inode(path: Path) -> int:
    """The file's inode number (0 when missing): metrics.jsonl is written anew by a resume."""
    try:
        return path.stat().st_ino
    except OSError:
        return 0


def last_step(metrics: Path) -> int:
    """The last training step a metrics.jsonl records (0 when none)."""
    with contextlib.suppress(OSError):
        for line in reversed(metrics.read_text().splitlines()):
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if "train/loss" in record:
                    return int(record["step"])
    return 0


# --- the injector --------------------------------------------------------------------------


class Injector:
    """Fires each planned fault once its moment comes, and recovers the chain as a user would."""

    def __init__(self, chain: Chain, faults: list[Fault]) -> None:
        self.chain, self.faults, self.cluster = chain, faults, chain.cluster
        self.started = time.monotonic()
        self.recoveries: Counter[str] = Counter()
        self.duplicates: list[tuple[Fault, str]] = []
        self.drained: list[tuple[Fault, str, float]] = []  # (fault, node, resume at)
        self.seen_pending: dict[str, float] = {}  # requeued task -> when first seen waiting

    def now(self) -> float:
        return time.monotonic() - self.started

    def run(self, timeout: float) -> None:
        while True:
            assert self.now() < timeout, f"the chaos chain is not done after {timeout} s: {self.chain.log[-5:]}"
            states = self.chain.states()
            if self.chain.done(states) and not self.drained:
                return
            jobs = queue(self.cluster)
            for fault in self.faults:
                if fault.fired is None and not self.busy(fault):
                    self.maybe_fire(fault, jobs)
            self.recover(states, jobs)
            time.sleep(POLL_S)

    # -- firing

    def busy(self, fault: Fault) -> bool:
        """Whether an earlier fault on the same target has yet to recover: one at a time each."""
        same = [
            f
            for f in self.faults
            if (f.stage, f.fold, f.kind == "kill-reduce") == (fault.stage, fault.fold, fault.kind == "kill-reduce")
        ]
        return any(f.fired is not None and f.recovered is None for f in same)

    def maybe_fire(self, fault: Fault, jobs: dict[str, tuple[str, str, str]]) -> None:
        fold = self.chain.experiment.stage(fault.stage).fold(fault.fold)
        if fault.kind == "kill-reduce":
            job, state, _ = jobs.get(self.chain.reduce(fault.stage), ("", "", ""))
            # detail: at once, or a second into it (after its start-up, inside the work)
            if state == "RUNNING" and self.running_for(job) >= fault.detail:
                self.fire(fault, job, ["scancel", "-s", "KILL", job], "failed")
            return
        task = f"{self.chain.array(fault.stage)}_{fault.fold}"
        job, state, _ = jobs.get(task, ("", "", ""))
        if state != "RUNNING":
            return
        step = last_step(fold.metrics)
        if fault.kind == "kill-in-save":
            partial = [p for p in fold.checkpoints.glob(".step-*.partial")] if fold.checkpoints.is_dir() else []
            if step >= fault.step and partial:
                self.fire(fault, job, ["scancel", "-s", "KILL", job], "failed", step)
                fault.target += f", {partial[0].name} being written" if partial[0].exists() else ", after the save"
            return
        if step < fault.step:
            return
        if fault.kind in ("kill-rank", "kill-launcher"):
            pid = self.find(job, fault)
            if pid:
                self.fire(fault, job, ["kill", "-KILL", str(pid)], "failed", step)
                fault.target += f", pid {pid}"
        elif fault.kind == "scancel-kill":
            self.fire(fault, job, ["scancel", "-s", "KILL", job], "failed", step)
        elif fault.kind == "usr1-batch":
            self.fire(fault, job, ["scancel", "--batch", "-s", "USR1", job], "requeued", step)
        elif fault.kind == "usr1":
            self.fire(fault, job, ["scancel", "-s", "USR1", job], "requeued", step)
        elif fault.kind == "preempt":
            self.fire(fault, job, ["scancel", "--full", "-s", "TERM", job], "requeued", step)
        elif fault.kind == "duplicate":
            self.fire_duplicate(fault, job, step)
        elif fault.kind == "drain":
            node = f"n{fault.detail + 1}"
            command = ["scontrol", "update", f"nodename={node}", "state=drain", "reason=chaos"]
            self.fire(fault, node, command, "drained", step)
            self.drained.append((fault, node, time.monotonic() + 5))

    def running_for(self, job: str) -> float:
        out = self.cluster.run(["squeue", "-h", "-j", job, "-o", "%M"], check=False).strip()
        parts = [int(p) for p in re.split("[:-]", out) if p.isdigit()] if out else []
        seconds = 0
        for p in parts:
            seconds = seconds * 60 + p
        return seconds

    def find(self, job: str, fault: Fault) -> int | None:
        """The pid of the fault's rank (kill-rank) or node's launcher (kill-launcher): torchrun
        gives each training process RANK and LOCAL_RANK; a launcher runs accelerate's module."""
        for pid, cmdline, env in processes(job):
            launcher = "accelerate.commands.launch" in cmdline
            if fault.kind == "kill-rank" and "seg/train.py" in cmdline and not launcher and "LOCAL_RANK" in env:
                if env.get("RANK") == str(fault.detail):
                    return pid
            elif fault.kind == "kill-launcher" and launcher and env.get("SLURM_NODEID") == str(fault.detail):
                return pid
        return None

    def fire(self, fault: Fault, target: str, command: list[str], expected: str, step: int | None = None) -> None:
        """Run the fault's command; ``expected``: how the chain should take it (failed, requeued...)."""
        self.cluster.run(command, check=False)
        self.fired(fault, step, f"{target}: {shlex.join(command)}", f"expected {expected}")

    def fired(self, fault: Fault, step: int | None, target: str, outcome: str) -> None:
        fault.fired, fault.at_step, fault.submission = self.now(), step, len(self.chain.submissions)
        fault.metrics_inode = inode(self.chain.experiment.stage(fault.stage).fold(fault.fold).metrics)
        fault.target, fault.outcome = target, outcome
        where = f"stage {fault.stage} fold {fault.fold} step {step}"
        self.chain.say(f"{fault.fired:.1f} s: fault {fault.index} {fault.kind} {where}: {fault.target}")

    def fire_duplicate(self, fault: Fault, job: str, step: int) -> None:
        """The running fold's task submitted again, as a user who resubmits it by mistake: the
        same fold.sh arguments ./launch cv gave it (seg/cv.py's plan)."""
        env = self.cluster.env | {"SEG_PYTHON": sys.executable, "SEG_PROCS_PER_NODE": "1", "WANDB_SILENT": "true"}
        env.pop("WANDB_MODE", None)
        log = self.chain.experiment.logs / f"duplicate-stage{fault.stage}-fold{fault.fold}-%A.log"
        args = [f"--array={fault.fold}", "--nodes=2", "--ntasks-per-node=1", "--time=30", f"--output={log}"]
        script = [
            str(REPO / "slurm" / "fold.sh"),
            CONFIG,
            *chain_plan(self.chain.runs, self.chain.shards).train_args(fault.stage),
        ]
        # from the repository, as ./launch cv submits: fold.sh starts in the submission's folder
        env["SLURM_CONF"] = str(self.cluster.conf)
        done = subprocess.run(["sbatch", "--parsable", *args, *script], env=env, cwd=REPO, capture_output=True,
                              text=True, timeout=60, check=True)  # fmt: skip
        submitted = done.stdout.strip().split(";")[0]
        self.duplicates.append((fault, submitted))
        self.fired(fault, step, f"{job} running; the same task submitted again as {submitted}", "submitted")

    # -- recovering

    def recover(self, states: dict[str, str], jobs: dict[str, tuple[str, str, str]]) -> None:
        now = time.monotonic()
        for fault, node, resume_at in list(self.drained):
            if now >= resume_at:
                self.cluster.run(["scontrol", "update", f"nodename={node}", "state=resume"], check=False)
                self.drained.remove((fault, node, resume_at))
                fault.outcome, fault.recovered = "drained, resumed", self.now()
                self.recoveries["node resumed"] += 1
        self.release_requeued(jobs)
        for fault, job in list(self.duplicates):
            state = self.cluster.states([job]).get(f"{job}_{fault.fold}")
            if state in FINISHED:
                self.duplicates.remove((fault, job))
                text = "\n".join(
                    p.read_text(errors="replace") for p in self.chain.experiment.logs.glob(f"duplicate-*-{job}.log")
                )
                if "is being written by" in text:
                    fault.outcome = "refused by the lease"
                elif "complete" in text and state == "COMPLETED":
                    fault.outcome = "found the fold finished"
                else:
                    fault.outcome = f"duplicate {state}"
                fault.recovered = self.now()
        self.mark_recovered()
        if self.chain.broken(states) and self.drained_out(jobs):
            self.chain.submit()  # the user's way on: ./launch cv again
            self.recoveries["chain rerun (./launch cv)"] += 1
            self.chain.say(f"{self.now():.1f} s: the chain was broken; ./launch cv again")
            self.seen_pending.clear()

    def release_requeued(self, jobs: dict[str, tuple[str, str, str]]) -> None:
        """A requeued task waits two minutes (BeginTime); a user would wait, the injector
        releases it after 3 s (slurmd refuses a launch in the second of its revocation)."""
        ours = set(self.chain.jobs)
        for key, (_, state, reason) in jobs.items():
            if key.split("_")[0] not in ours or state != "PENDING" or reason != "BeginTime":
                continue
            first = self.seen_pending.setdefault(key, time.monotonic())
            if time.monotonic() - first >= 3:
                self.cluster.release(key)
                self.recoveries["requeue released"] += 1
                self.chain.say(f"{self.now():.1f} s: requeued {key} released")
                del self.seen_pending[key]

    def drained_out(self, jobs: dict[str, tuple[str, str, str]]) -> bool:
        """Whether nothing of the current submission is still queued or running (a dependant
        Slurm cancelled may already be forgotten: gone is as good as finished)."""
        ours = set(self.chain.jobs)
        return not [k for k, (_, state, _) in jobs.items() if k.split("_")[0] in ours and state not in FINISHED]

    def mark_recovered(self) -> None:
        """A fault is recovered once its fold trains past the fault's step again (or is done),
        its reduction has completed, its node is back."""
        for fault in self.faults:
            if fault.fired is None or fault.recovered is not None or fault.kind in ("drain", "duplicate"):
                continue
            if fault.kind == "kill-reduce":
                job = self.chain.reduce(fault.stage)
                if self.cluster.states([job]).get(job) == "COMPLETED":
                    fault.recovered = self.now()
                    rerun = len(self.chain.submissions) > fault.submission
                    fault.outcome = "failed, chain rerun" if rerun else "completed anyway"
                continue
            fold = self.chain.experiment.stage(fault.stage).fold(fault.fold)
            finished = fold.summary.exists() and fold.summary.stat().st_mtime > time.time() - self.now() + fault.fired
            resumed = inode(fold.metrics) not in (0, fault.metrics_inode) and last_step(fold.metrics) > (
                fault.at_step or 0
            )
            if resumed or finished:
                fault.recovered = self.now()
                rerun = len(self.chain.submissions) > fault.submission
                fault.outcome = "failed, chain rerun" if rerun else "requeued, resumed"


# --- the comparison ------------------------------------------------------------------------


def without_clock(value: Any) -> Any:
    """A JSON value with its wall-clock entries (and its absolute paths' roots) left out."""
    if isinstance(value, dict):
        return {k: without_clock(v) for k, v in value.items() if not clock_key(k)}
    if isinstance(value, list):
        return [without_clock(v) for v in value]
    if isinstance(value, str):
        return re.sub(r"/\S*/(reference|chaos)/", "RUNS/", value)
    return value


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
    if [without_clock(r) for r in ref] != [without_clock(r) for r in got]:
        problems.append(f"{chaos}: records differ from the reference's")
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
            if without_clock(json.loads(a.read_text())) != without_clock(json.loads(b.read_text())):
                problems.append(f"{rel}: differs (wall times aside)")
            counts["summaries and reports (json)"] += 1
        elif rel.suffix == ".safetensors":
            if a.read_bytes() != b.read_bytes():
                problems.append(f"{rel}: weights differ")
            counts["weights files"] += 1
        elif rel.suffix in (".bin", ".pkl", ".pt"):
            if a.read_bytes() != b.read_bytes():
                problems.append(f"{rel}: state differs")
            counts["state files"] += 1
    return sorted(problems), dict(counts)


# --- the run and its table -----------------------------------------------------------------

CONFIG = str(REPO / "configs" / "demo.yaml")


def chain_plan(runs: Path, shards: Path) -> Any:
    from seg.cv import plan as cv_plan

    return cv_plan(
        CONFIG, [f"data.shards={shards}", f"train.runs_dir={runs}", *TINY], STAGES, None, ["--recalibrate", "1"]
    )


def wait_done(chain: Chain, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not chain.done(states := chain.states()):
        if chain.broken(states):
            raise RuntimeError(f"the reference chain failed: {states}\n{chain.cluster.log_tail()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"the reference chain is not done after {timeout} s: {states}")
        time.sleep(1)


def chaos(cluster: SlurmCluster, workdir: Path, seed: int, count: int, kinds: list[str],
          reference: Path | None = None, timeout: float = 3600) -> dict[str, Any]:  # fmt: skip
    """Run the reference (unless ``reference`` names one already run on the same data) and the
    chaos chain side by side on ``cluster``; the result as JSON-able data."""
    shards = prepare_data(workdir)
    faults = plan(seed, count, kinds)
    ref = Chain(cluster, reference or workdir / "reference", shards)
    chain = Chain(cluster, workdir / "chaos", shards)
    started = time.monotonic()
    if reference is None:
        ref.submit()
    chain.submit()
    injector = Injector(chain, faults)
    injector.run(timeout)
    chaos_wall = time.monotonic() - started
    if reference is None:
        wait_done(ref, timeout)
    reference_wall = time.monotonic() - started
    problems, counts = compare(ref.experiment.dir, chain.experiment.dir)
    problems += [f"fault {f.index} ({f.kind}) never fired" for f in faults if f.fired is None]
    return {
        "seed": seed,
        "faults": [asdict(f) for f in faults],
        "by_kind": dict(Counter(f.kind for f in faults)),
        "recoveries": dict(injector.recoveries),
        "submissions": len(chain.submissions),
        "time_lost_s": round(sum(f.lost for f in faults), 1),
        "chaos_wall_s": round(chaos_wall, 1),
        "reference_wall_s": round(reference_wall, 1) if reference is None else None,
        "compared": counts,
        "problems": problems,
        "verdict": "identical" if not problems else "DIFFERENT",
        "log": chain.log,
        "reference": str(ref.experiment.dir),
        "reference_jobs": ref.submissions[0] if ref.submissions else [],
        "chaos": str(chain.experiment.dir),
    }


def table(result: dict[str, Any]) -> str:
    lines = [f"chaos: seed {result['seed']}, {len(result['faults'])} faults, {STAGES} stages x {FOLDS} folds x 2 nodes",
             f"{'#':>3}  {'kind':<14} {'target':<16} {'at step':>7}  {'outcome':<24} {'lost':>6}"]  # fmt: skip
    for f in result["faults"]:
        target = f"stage {f['stage']} " + ("reduce" if f["kind"] == "kill-reduce" else f"fold {f['fold']}")
        lost = f"{f['recovered'] - f['fired']:.0f} s" if f["fired"] is not None and f["recovered"] is not None else "-"
        at = "-" if f["at_step"] is None else str(f["at_step"])
        lines.append(f"{f['index']:>3}  {f['kind']:<14} {target:<16} {at:>7}  {f['outcome']:<24} {lost:>6}")
    lines.append("by kind: " + ", ".join(f"{k} {n}" for k, n in sorted(result["by_kind"].items())))
    lines.append("recoveries: " + (", ".join(f"{k} {n}" for k, n in sorted(result["recoveries"].items())) or "none"))
    ref = f", reference {result['reference_wall_s']:.0f} s (run alongside)" if result["reference_wall_s"] else ""
    lines.append(f"time lost: {result['time_lost_s']:.0f} s; wall: chaos chain {result['chaos_wall_s']:.0f} s{ref}")
    lines.append("compared: " + ", ".join(f"{n} {k}" for k, n in sorted(result["compared"].items())))
    lines.append(f"verdict: {result['verdict']}")
    lines += [f"  {p}" for p in result["problems"][:30]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--faults", type=int, default=5, help="how many faults (default 5: the suite's short mode)")
    parser.add_argument("--seed", type=int, default=0, help="draws the faults: the same seed, the same plan")
    parser.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated, from {','.join(KINDS)}")
    parser.add_argument(
        "--workdir", type=Path, help="where data, runs and the cluster live (default: a new temp folder)"
    )
    parser.add_argument(
        "--reference", type=Path, help="a reference runs folder of an earlier run in the same --workdir"
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
    if args.faults < 1:
        print(f"error: --faults {args.faults}: at least 1", file=sys.stderr)
        return 2
    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="seg-chaos-"))).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    if args.use_cluster:
        if "SLURM_CONF" not in os.environ:
            print(
                "error: --use-cluster: SLURM_CONF is not set (slurm/testing/cluster.sh start DIR prints it)",
                file=sys.stderr,
            )
            return 2
        cluster = SlurmCluster(Path(os.environ["SLURM_CONF"]).parent)
        result = chaos(cluster, workdir, args.seed, args.faults, kinds, args.reference, args.timeout)
    else:
        from tests.slurm_cluster import cluster_dir

        with running_cluster(cluster_dir(workdir / "slurm")) as cluster:
            result = chaos(cluster, workdir, args.seed, args.faults, kinds, args.reference, args.timeout)
    print(table(result))
    if args.json:
        atomic_write_bytes(args.json, (json.dumps(result, indent=1) + "\n").encode())
    return 0 if result["verdict"] == "identical" else 1


if __name__ == "__main__":
    sys.exit(main())
