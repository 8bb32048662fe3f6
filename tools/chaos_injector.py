"""tools/chaos.py's injector: the chains on the cluster (each submission's jobs), the faults
fired at their planned moments, and the chain recovered after each the way a user would."""

from __future__ import annotations

import contextlib
import json
import re
import shlex
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from seg.core.runs import Experiment
from tests.slurm_cluster import FINISHED, SlurmCluster
from tools.chaos_plan import CONFIG, FOLDS, REPO, STAGES, TINY, Fault, chain_plan, target

POLL_S = 0.2
# seg/core/storage.py's reasons for a disk that cannot take a write: a chain failing for one of
# them is not recovered by running it again.
DISK_FULL = ("no space left on the device", "disk quota exceeded")


class DiskFullError(RuntimeError):
    """The chain failed because its disk is full, not because of a fault."""


@dataclass
class Chain:
    """One chain submitted with ./launch cv (seg.cv); every submission's job ids."""

    cluster: SlurmCluster
    runs: Path
    shards: Path
    folds: int = FOLDS
    submissions: list[list[tuple[int, str, str, list[int]]]] = field(default_factory=list)
    log: list[str] = field(default_factory=list)
    submitted_at: float = 0.0  # time.time() of the latest submission

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
        self.submitted_at = time.time()
        done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
        if done.returncode:
            raise RuntimeError(f"{shlex.join(command)} failed ({done.returncode}): {done.stderr.strip()}")
        self.submissions.append(submitted_jobs(done.stdout))
        jobs = [(stage, array, reduce) for stage, array, reduce, _ in self.submissions[-1]]
        self.say(f"{self.runs.name} chain submitted (stage, array, reduce): {jobs}")

    @property
    def jobs(self) -> list[str]:
        return [job for _, array, reduce, _ in self.submissions[-1] for job in (array, reduce) if job]

    def submitted(self, stage: int) -> tuple[int, str, str, list[int]]:
        """The latest submission's jobs of ``stage``: "" and [] for what it left out as finished
        (a chain found finished throughout submits nothing and prints no stage line)."""
        return next((jobs for jobs in self.submissions[-1] if jobs[0] == stage), (stage, "", "", []))

    def array(self, stage: int) -> str:
        return self.submitted(stage)[1]

    def reduce(self, stage: int) -> str:
        return self.submitted(stage)[2]

    def states(self) -> dict[str, str]:
        return self.cluster.states(self.jobs)

    def done(self, states: dict[str, str]) -> bool:
        """Whether every job of the latest submission completed (each task of its arrays)."""
        expected = {f"{array}_{k}" for _, array, _, folds in self.submissions[-1] for k in folds}
        expected |= {reduce for _, _, reduce, _ in self.submissions[-1] if reduce}
        return all(states.get(key) == "COMPLETED" for key in expected)

    def broken(self, states: dict[str, str]) -> bool:
        return bool(set(states.values()) & (FINISHED - {"COMPLETED"}))

    def disk_full(self) -> str | None:
        """The line of a job log written since the latest submission that says the disk is
        full (seg/core/storage.py), or None."""
        logs = self.experiment.logs
        for log in sorted(logs.glob("*.log")) if logs.is_dir() else []:
            if log.stat().st_mtime >= self.submitted_at:
                for line in log.read_text(errors="replace").splitlines():
                    if any(reason in line for reason in DISK_FULL):
                        return f"{log.name}: {line.strip()}"
        return None


def submitted_jobs(output: str) -> list[tuple[int, str, str, list[int]]]:
    """(stage, array, reduce, the array's folds) per stage from ./launch cv's lines, "" and []
    for what it did not submit (a rerun leaves out what finished before)."""
    jobs = []
    for stage, line in re.findall(r"^stage (\d+): (.*)$", output, re.MULTILINE):
        array, reduce = re.search(r"folds (\d+) \(array ([0-9,]+)", line), re.search(r"reduce (\d+)", line)
        folds = [int(k) for k in array.group(2).split(",")] if array else []
        jobs.append((int(stage), array.group(1) if array else "", reduce.group(1) if reduce else "", folds))
    return jobs


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


def scancel(kind: str, task: str) -> list[str]:
    """The scancel of a fault kind, addressed to one array task ("12_1"): the job id of an
    array's task can be the array's own id, which scancel takes as every task of the array."""
    options = {
        "scancel-kill": ["-s", "KILL"],
        "kill-in-save": ["-s", "KILL"],
        "usr1-batch": ["--batch", "-s", "USR1"],
        "usr1": ["-s", "USR1"],
        "preempt": ["--full", "-s", "TERM"],
    }
    return ["scancel", *options[kind], task]


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
                self.mark_recovered(ended=True)
                return
            jobs = queue(self.cluster)
            for fault in self.faults:
                if fault.fired is None and not self.busy(fault):
                    self.maybe_fire(fault, jobs)
            self.recover(states, jobs)
            time.sleep(POLL_S)

    # -- firing

    def busy(self, fault: Fault) -> bool:
        """Whether an earlier fault on the same target (chaos_plan's ``target``: the fold, or the
        stage's reduction whatever fold a kill-reduce drew) has yet to recover: one at a time each."""
        same = [f for f in self.faults if target(f) == target(fault)]
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
                self.fire(fault, task, scancel(fault.kind, task), "failed", step)
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
            self.fire(fault, task, scancel(fault.kind, task), "failed", step)
        elif fault.kind in ("usr1-batch", "usr1", "preempt"):
            self.fire(fault, task, scancel(fault.kind, task), "requeued", step)
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
            if full := self.chain.disk_full():
                raise DiskFullError(f"the chain failed for its disk, not for a fault ({full}): free space, run again")
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

    def mark_recovered(self, ended: bool = False) -> None:
        """A fault is recovered once its fold trains past the fault's step again (or is done),
        its reduction has completed, its node is back. ``ended``: the whole chain is done, so
        every fired fault is (one that came after its fold's last write had nothing to recover)."""
        for fault in self.faults:
            if fault.fired is None or fault.recovered is not None or fault.kind in ("drain", "duplicate"):
                continue
            if fault.kind == "kill-reduce":
                job = self.chain.reduce(fault.stage)  # "": a rerun found the stage reduced
                if ended or not job or self.cluster.states([job]).get(job) == "COMPLETED":
                    fault.recovered = self.now()
                    rerun = len(self.chain.submissions) > fault.submission
                    fault.outcome = "failed, chain rerun" if rerun else "completed anyway"
                continue
            fold = self.chain.experiment.stage(fault.stage).fold(fault.fold)
            fired_at = time.time() - self.now() + fault.fired  # the fault's wall-clock time
            after_end = fold.summary.exists() and fold.summary.stat().st_mtime <= fired_at
            finished = fold.summary.exists() and fold.summary.stat().st_mtime > fired_at
            resumed = inode(fold.metrics) not in (0, fault.metrics_inode) and last_step(fold.metrics) > (
                fault.at_step or 0
            )
            if resumed or finished or (ended and after_end):
                fault.recovered = self.now()
                rerun = len(self.chain.submissions) > fault.submission
                fault.outcome = "failed, chain rerun" if rerun else "requeued, resumed"
                if not rerun and after_end and not resumed:
                    fault.outcome = "came after the fold's last write"
