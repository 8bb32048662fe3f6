"""The cross-validation chain: S stages of K folds, each stage reduced to the model that
seeds the next (the study's recipe).

    ./launch cv configs/X.yaml --stages 2 [--folds K] [--nodes N --gpus G] [key=value ...]
    ./launch cv configs/X.yaml --stages 2 --local [--processes P] [key=value ...]

On Slurm, every stage is one job array of slurm/fold.sh (a task per fold, each over
``--nodes`` machines) and one slurm/reduce.sh job that waits for the whole array
(``afterok``); the next stage's array waits for that reduce job and starts from its model.
The whole chain is submitted at once and the job ids are printed. ``--local`` runs the same
chain here: each fold through ``accelerate launch`` with P processes, folds in turn. Either
way a rerun skips what is finished: a fold whose summary.json records the run the chain
would start (seg/recipe/identity.py), a stage whose reduced model is newer than its folds'
models and was reduced with the chain's options. On Slurm a rerun submits only the folds and
reductions left (no job allocates a node just to find its fold finished); once a stage has
work left, every later stage is submitted whole, as its start model is yet to be made, and
seg/train.py skips a fold there that finished as the run it would start. A fold that
finished as another run stops the chain with the difference named, before anything is
submitted.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from seg.core.cli import at_least
from seg.core.launch import launch_command
from seg.core.lease import LeaseHeldError, acquire, clear_if_gone
from seg.core.runs import Experiment, latest_state, state_step
from seg.core.signals import Signals
from seg.data.manifest import FoldSplit, ManifestError, load_manifest
from seg.model.weights import WeightsError, read_state_dict
from seg.recipe.config import ConfigError, load_config, stage_values_overridden
from seg.recipe.identity import SCRATCH, config_as_run, describe_changes, finished_run, fold_identity
from seg.reduction.reduce import add_arguments, options_record, selection_group

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Chain:
    """What a chain runs: the same arguments on Slurm and locally."""

    config: str
    overrides: list[str]
    stages: int
    folds: list[int]
    experiment: Experiment
    reduce_args: list[str] = field(default_factory=list)
    first_init: str | None = None  # a model seeding stage 1 (e.g. a previous experiment's)

    def init_from(self, stage: int) -> str | None:
        """The model ``stage`` starts from: the previous stage's reduced model."""
        return str(self.experiment.stage(stage - 1).reduced_model) if stage > 1 else self.first_init

    def reduce_options(self) -> dict[str, Any]:
        """The options its reductions run with, as a reduction's report records them."""
        options = parse_reduce_options(self.reduce_args)
        shards = options.shards or load_config(self.config, self.overrides, 1).data.shards
        return options_record(options.strategies, options.k, options.recalibrate, options.select_on, options.weights,
                              options.seed_from, self.folds, shards)  # fmt: skip

    def train_args(self, stage: int) -> list[str]:
        """seg/train.py's arguments after ``--config`` for every fold of ``stage`` (the fold
        is added per task)."""
        init = self.init_from(stage)
        seed = ["--init-from", init] if init else []
        return ["--stage", str(stage), *seed, *self.overrides]


def plan(
    config: str,
    overrides: list[str],
    stages: int,
    folds: int | None = None,
    reduce_args: list[str] | None = None,
    first_init: str | None = None,
) -> Chain:
    """Check here everything the chain will need, so that a chain that cannot finish fails
    before anything runs: every stage's config, the folds, the reduce options and the
    selection set they choose on, the model seeding stage 1."""
    if stages < 1:
        raise ConfigError(f"--stages {stages}: at least 1")
    resolved = load_config(config, overrides, 1)
    for stage in range(2, stages + 1):
        load_config(config, overrides, stage)
    manifest = load_manifest(resolved.data.shards)
    packed = manifest["options"]["folds"]
    folds = packed if folds is None else folds
    if not 1 <= folds <= packed:
        raise ConfigError(f"--folds {folds}: {resolved.data.shards} was packed with {packed} folds (1..{packed})")
    reduce_options = parse_reduce_options(reduce_args or [])
    selection_group(load_manifest(reduce_options.shards) if reduce_options.shards else manifest,
                    reduce_options.shards or resolved.data.shards, reduce_options.select_on,
                    '--reduce "--select-on val"')  # fmt: skip
    if first_init not in (None, SCRATCH):  # a chain that would fail at its first fold
        try:
            read_state_dict(first_init)
        except WeightsError as e:
            raise ConfigError(f"--init-from {e}") from None
    experiment = Experiment.named(resolved.train.runs_dir, resolved.train.experiment)
    return Chain(config, list(overrides), stages, list(range(folds)), experiment, reduce_args or [], first_init)


class _ReduceOptionParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # argparse would print and exit
        raise ConfigError(f"--reduce: {message} (tools/reduce_folds.py --help lists its options)")


def parse_reduce_options(reduce_args: list[str]) -> argparse.Namespace:
    """The reduce step's options, parsed as tools/reduce_folds.py will parse them."""
    if "--folds" in reduce_args:
        raise ConfigError("--reduce: --folds is set by the chain (use ./launch cv --folds)")
    parser = _ReduceOptionParser(prog="tools/reduce_folds.py", add_help=False, allow_abbrev=False)
    return add_arguments(parser).parse_args(reduce_args)


# --- this machine ------------------------------------------------------------------------


def fold_done(chain: Chain, stage: int, fold: int, processes: int) -> bool:
    """Whether the fold finished as the run the chain would start; a fold that finished as
    another run is refused (ConfigError) with the difference named."""
    config = load_config(chain.config, chain.overrides, stage)
    fold_run = Experiment.named(config.train.runs_dir, config.train.experiment).stage(stage).fold(fold)
    config = config_as_run(config, fold_run)
    split = FoldSplit.of(config.data.shards, fold)
    summary, changes = finished_run(fold_run, fold_identity(config, stage, split, chain.init_from(stage), processes))
    if changes:
        raise ConfigError(
            f"stage {stage} fold {fold}: {fold_run.dir} finished as another run than this chain's "
            f"({describe_changes(changes)}): run the chain with its settings, train the fold again "
            f"(seg/train.py ... --resume none), or use another train.experiment=NAME"
        )
    return summary is not None


def reduction_done(chain: Chain, stage: int) -> tuple[bool, str]:
    """Whether the stage's reduction is the one the chain would run (newer than every fold's
    model, with the chain's reduce options); else why it runs again ("" for a first time)."""
    reduced = chain.experiment.stage(stage)
    if not reduced.reduced_model.exists():
        return False, ""
    models = [reduced.fold(k).weights("model") for k in chain.folds]
    if not all(m.exists() and m.stat().st_mtime <= reduced.reduced_model.stat().st_mtime for m in models):
        return False, "a fold was trained again since its reduction: reducing again"
    try:
        recorded = json.loads(reduced.reduced_report.read_text()).get("options")
    except (OSError, json.JSONDecodeError):
        recorded = None
    if recorded is None:
        return False, "its report does not record the options it ran with (an older seg): reducing again"
    changes = [f"{key}: {recorded.get(key)!r} -> {value!r}" for key, value in chain.reduce_options().items()
               if recorded.get(key) != value]  # fmt: skip
    if changes:
        return False, f"reduced before with other options ({describe_changes(changes)}): reducing again"
    return True, "reduced before, skipped"


def run_logged(command: list[str], log: Path, what: str, signals: Signals) -> int:
    """Run ``command`` with its whole output appended to ``log``; on this terminal one line
    when it ends (and the log's tail if it failed). A Ctrl-C (or TERM) of the chain is passed
    on once and the command is waited for: a fold saves its state before it exits."""
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"{what}: running (log: {log})", flush=True)
    started = time.monotonic()
    with open(log, "ab") as f:
        f.write(f"$ {shlex.join(command)}\n".encode())
        f.flush()
        # In a process group of its own, the command gets a signal from the chain alone, once: a
        # terminal's Ctrl-C reaching the launcher too made torchrun's second SIGINT, during its
        # shutdown, a SIGTERM to the ranks (a preemption, where a Ctrl-C was meant).
        child = subprocess.Popen(command, stdout=f, stderr=subprocess.STDOUT, preexec_fn=os.setpgrp)
        passed_on = False
        while (code := child.poll()) is None:
            if signals.stop_requested and not passed_on:
                # to the whole group, as a terminal would: the launcher, its ranks and their workers
                os.killpg(child.pid, signal.SIGTERM if signals.preempted else signal.SIGINT)
                passed_on = True
            time.sleep(0.2)
    if signals.stop_requested:
        return code
    if code:
        tail = log.read_text(errors="replace").splitlines()[-25:]
        print("\n".join([f"--- the end of {log}:", *tail, "---"]), file=sys.stderr)
    else:
        print(f"{what}: done in {time.monotonic() - started:.0f} s", flush=True)
    return code


def stopped(what: str, where: str) -> int:
    """The one line of a chain stopped by a signal: what it was doing, where that stopped, and
    how to go on."""
    print(f"{what}: interrupted, {where}; rerun the same command to continue; exit 130", file=sys.stderr)
    return 130


def saved_state(fold_dir: Path) -> str:
    """Where an interrupted fold stopped: its newest state."""
    state = latest_state(fold_dir)
    return f"at step {state_step(state)}, state saved in {state}" if state else "nothing saved"


def run_local(chain: Chain, processes: int) -> int:
    """Every stage, fold after fold, then its reduction; stops at the first failure. One local
    chain per stage at a time (the stage's chain lease), and Ctrl-C stops it where it is."""
    # its commands run in process groups of their own (run_logged): a closed terminal reaches the
    # chain alone, which passes it on as a Ctrl-C
    signals = Signals(interrupts=(signal.SIGINT, signal.SIGHUP)).install()
    try:
        for stage in range(1, chain.stages + 1):
            if signals.stop_requested:
                return stopped(f"stage {stage}", "before it started")
            try:
                with acquire(chain.experiment.stage(stage).chain_lease, f"local chain of stage {stage}"):
                    code = run_stage(chain, stage, processes, signals)
            except LeaseHeldError as e:
                print(f"error: {e}", file=sys.stderr)
                return 2
            if code:
                return code
    finally:
        signals.restore()
    print(f"done: final model {chain.experiment.stage(chain.stages).reduced_model}", flush=True)
    return 0


def run_stage(chain: Chain, stage: int, processes: int, signals: Signals) -> int:
    """A stage's folds, then its reduction, on this machine."""
    launcher = launch_command(processes)
    for fold in chain.folds:
        try:
            done = fold_done(chain, stage, fold, processes)
        except (ConfigError, ManifestError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if done:
            tidy(chain.experiment.stage(stage).fold(fold).lease)
            print(f"stage {stage} fold {fold}: done before, skipped", flush=True)
            continue
        train = [str(REPO / "seg" / "train.py"), "--config", chain.config, "--fold", str(fold)]
        command = [*launcher, *train, *chain.train_args(stage)]
        what = f"stage {stage} fold {fold}"
        code = run_logged(command, chain.experiment.fold_log(stage, fold), what, signals)
        if signals.stop_requested:
            where = "after it had finished" if code == 0 else saved_state(chain.experiment.stage(stage).fold(fold).dir)
            return stopped(what, where)
        if code:
            print(f"error: {what} failed (exit {code})", file=sys.stderr)
            return code
    done, why = reduction_done(chain, stage)
    if why:
        print(f"stage {stage}: {why}", flush=True)
    if done:
        tidy(chain.experiment.stage(stage).reduce_lease)
        return 0
    script = str(REPO / "tools" / "reduce_folds.py")
    command = [*launcher, script, str(chain.experiment.stage(stage).dir), *chain.reduce_args]
    command += ["--folds", *map(str, chain.folds)]
    code = run_logged(command, chain.experiment.reduce_log(stage), f"stage {stage} reduction", signals)
    if signals.stop_requested:
        where = "after it had finished" if code == 0 else "not reduced (an earlier reduction is untouched)"
        return stopped(f"stage {stage} reduction", where)
    if code:
        print(f"error: stage {stage} reduction failed (exit {code})", file=sys.stderr)
    return code


def slurm_problem() -> str | None:
    """Why this machine can't submit to Slurm, or None."""
    if shutil.which("sbatch") is None:
        return "no Slurm here (sbatch is not on PATH): run the chain on this machine with --local [--processes P]"
    if shutil.which("sinfo") is None:
        return None  # nothing to ask: sbatch will say
    done = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        reason = (done.stderr.strip().splitlines() or ["no answer"])[-1]
        return f"Slurm does not answer (sinfo: {reason}): check SLURM_CONF and the controller, or use --local"
    return None


# --- Slurm ---------------------------------------------------------------------------------


def sbatch(args: list[str], env: dict[str, str] | None = None) -> str:
    """Submit; the job id (``--parsable`` prints ``id[;cluster]``)."""
    command = ["sbatch", "--parsable", *args]
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{shlex.join(command)} failed: {done.stderr.strip()}")
    return done.stdout.strip().split(";")[0]


@dataclass
class StageWork:
    """What a submission runs of one stage: the folds to train, whether to reduce, and why it
    reduces again ("" for a first time)."""

    stage: int
    folds: list[int]
    reduce: bool = True
    why: str = ""


def work_left(chain: Chain, processes: int) -> list[StageWork]:
    """Each stage's folds left to train and whether it reduces, for a chain whose folds each run
    ``processes`` processes. What finished before is left out (and the lease its writer may
    have left, tidied) while every earlier stage has finished too; from the first stage with
    work left, every stage runs whole. Raises ConfigError for a fold that finished as another run."""
    work: list[StageWork] = []
    for stage in range(1, chain.stages + 1):
        if work and (work[-1].folds or work[-1].reduce):
            work.append(StageWork(stage, list(chain.folds)))
            continue
        folds = []
        for fold in chain.folds:
            if fold_done(chain, stage, fold, processes):
                tidy(chain.experiment.stage(stage).fold(fold).lease)
            else:
                folds.append(fold)
        done, why = reduction_done(chain, stage) if not folds else (False, "")
        if done:
            tidy(chain.experiment.stage(stage).reduce_lease)
        work.append(StageWork(stage, folds, not done, "" if done else why))
    return work


def tidy(lease: Path) -> None:
    """The lease a finished fold's or reduction's writer left when killed after its last
    write: removed once its holder is gone (seg/core/lease.py), saying so."""
    if left := clear_if_gone(lease):
        print(left, flush=True)


def after_ok(job: str) -> list[str]:
    """Start once ``job`` has succeeded; if it fails, Slurm removes the dependant instead of
    leaving it pending (DependencyNeverSatisfied) until cancelled by hand."""
    return [f"--dependency=afterok:{job}", "--kill-on-invalid-dep=yes"]


def submit(
    chain: Chain,
    nodes: int,
    gpus: int,
    processes: int,
    sbatch_args: list[str],
    submit_job: Callable[[list[str], dict[str, str]], str] = sbatch,
    work: list[StageWork] | None = None,
) -> list[tuple[int, str, str]]:
    """Submit each stage's array of the folds in ``work`` (default: the whole chain) and its
    reduce job, with their dependencies; (stage, array id, reduce id) per stage, "" for what
    was not submitted. ``processes`` per node is used only on CPU nodes (``gpus == 0``). If a
    submission fails, the jobs already submitted are cancelled: half a chain would wait
    forever on jobs that never come."""
    logs = chain.experiment.logs
    logs.mkdir(parents=True, exist_ok=True)
    env = os.environ | {"SEG_PROCS_PER_NODE": str(gpus or processes)}
    resources = ["--nodes", str(nodes), "--ntasks-per-node", "1", *(["--gpus-per-node", str(gpus)] if gpus else [])]
    jobs: list[tuple[int, str, str]] = []
    after = ""  # the last job submitted: what the next one waits for
    try:
        for left in work if work is not None else [StageWork(s, list(chain.folds)) for s in range(1, chain.stages + 1)]:
            stage, name, array, reduce = left.stage, f"{chain.experiment.name}-s{left.stage}", "", ""
            if left.folds:
                array = after = submit_job(
                    [
                        f"--array={','.join(map(str, left.folds))}",
                        f"--job-name={name}",
                        f"--output={chain.experiment.fold_log(stage, '%a', job='%A')}",
                        *resources,
                        *(after_ok(after) if after else []),
                        *sbatch_args,
                        str(REPO / "slurm" / "fold.sh"),
                        chain.config,
                        *chain.train_args(stage),
                    ],
                    env,
                )
            jobs.append((stage, array, ""))
            if left.reduce:
                reduce = after = submit_job(
                    [
                        *(after_ok(after) if after else []),
                        f"--job-name={name}-reduce",
                        f"--output={chain.experiment.reduce_log(stage, job='%j')}",
                        "--nodes=1",
                        "--ntasks=1",
                        *(["--gpus-per-node=1"] if gpus else []),
                        *sbatch_args,
                        str(REPO / "slurm" / "reduce.sh"),
                        str(chain.experiment.stage(stage).dir),
                        *chain.reduce_args,
                        "--folds",
                        *map(str, chain.folds),
                    ],
                    env,
                )
            jobs[-1] = (stage, array, reduce)
    except (RuntimeError, OSError):
        submitted = [job for _, array, reduce in jobs for job in (array, reduce) if job]
        if submitted:
            subprocess.run(["scancel", *submitted], check=False)
        raise
    return jobs


def submitted_line(chain: Chain, left: StageWork, array: str, reduce: str) -> str:
    """What was submitted of a stage, in one line."""
    if not array and not reduce:
        return f"stage {left.stage}: finished before (every fold trained and reduced), skipped"
    if not array:
        why = f" ({left.why})" if left.why else ""
        return f"stage {left.stage}: every fold finished before, reduce {reduce}{why}"
    finished = ",".join(str(fold) for fold in chain.folds if fold not in left.folds)
    before = f"; fold {finished} finished before" if finished else ""
    return f"stage {left.stage}: folds {array} (array {','.join(map(str, left.folds))}{before}), reduce {reduce}"


def counts_problem(args: argparse.Namespace) -> str | None:
    """Why the chain's process counts can't run, before anything does (None: they can); each
    count's range is its argparse type's."""
    if args.local and (args.nodes is not None or args.gpus is not None):
        return "--nodes and --gpus are Slurm's: with --local, --processes P runs each fold in P processes here"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="./launch cv", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("config", help="experiment YAML (configs/)")
    parser.add_argument("overrides", nargs="*", help="config overrides for every fold, e.g. train.epochs=40")
    parser.add_argument("--stages", type=at_least(1), default=1)
    parser.add_argument("--folds", type=int, help="run folds 0..K-1 (default: all the dataset was packed with)")
    parser.add_argument("--init-from", help="a model seeding stage 1 (default: the config's backbone weights)")
    parser.add_argument("--local", action="store_true", help="run here, fold after fold, instead of on Slurm")
    parser.add_argument("--processes", type=at_least(1), default=1, help="processes per fold (--local) or per CPU node")
    parser.add_argument("--nodes", type=at_least(1), help="Slurm: machines per fold (default 1)")
    parser.add_argument(
        "--gpus", type=at_least(0), help="Slurm: GPUs per machine, one process each (default 0: CPU nodes)"
    )
    parser.add_argument("--sbatch", default="", help='Slurm: more sbatch options, e.g. "-p gpu -t 8:00:00"')
    parser.add_argument(
        "--reduce", default="--recalibrate 20", help='tools/reduce_folds.py options (default "--recalibrate 20")'
    )
    args = parser.parse_intermixed_args(argv)
    if problem := counts_problem(args):
        print(f"error: {problem}", file=sys.stderr)
        return 2
    args.nodes, args.gpus = args.nodes or 1, args.gpus or 0
    try:
        chain = plan(args.config, args.overrides, args.stages, args.folds, shlex.split(args.reduce), args.init_from)
    except (ConfigError, ManifestError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for replaced in stage_values_overridden(load_config(args.config, args.overrides), args.overrides, args.stages):
        print(f"note: {replaced} (the command line comes after a stage's entry: one value in every stage)")
    if args.local:
        return run_local(chain, args.processes)
    problem = slurm_problem()
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        work = work_left(chain, args.nodes * (args.gpus or args.processes))
    except (ConfigError, ManifestError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    final = chain.experiment.stage(chain.stages).reduced_model
    if not any(left.folds or left.reduce for left in work):
        print(f"done: every stage finished before, nothing submitted; final model {final}")
        return 0
    try:
        jobs = submit(chain, args.nodes, args.gpus, args.processes, shlex.split(args.sbatch), work=work)
    except (RuntimeError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for left, (_, array, reduce) in zip(work, jobs, strict=True):
        print(submitted_line(chain, left, array, reduce))
    print(f"logs: {chain.experiment.logs}/   final model: {final}")
    print(f"watch: squeue -u $USER    cancel: scancel {' '.join(j for _, a, r in jobs for j in (a, r) if j)}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # before the chain's own handling (run_local) or after it
        print("interrupted: nothing was running; rerun the same command to continue; exit 130", file=sys.stderr)
        sys.exit(130)
