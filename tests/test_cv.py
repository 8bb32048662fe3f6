"""The cross-validation chain (seg/cv.py): what it submits, in which order, and what it skips."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from seg import cv
from seg.core import lease
from seg.core.cli import Size
from seg.core.signals import Signals
from seg.data.manifest import FoldSplit, ManifestError
from seg.data.pack import Options, pack
from seg.data.synthetic import make_synthetic
from seg.recipe.config import ConfigError, load_config
from seg.recipe.identity import fold_identity

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "demo.yaml")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cv") / "cityscapes"
    make_synthetic(root, counts={"train": 9, "val": 2, "test": 0}, cities={"train": 3, "val": 1, "test": 1},
                   size=Size(32, 64), progress=False)  # fmt: skip
    pack(root, root.parent / "shards", Options(folds=3, splits=("train", "val")), progress=False)
    return root.parent / "shards"


def chain(shards: Path, runs: Path, stages: int = 2, folds: int | None = None) -> cv.Chain:
    # these shards have no selection subset: the reduction chooses on val
    overrides = [f"data.shards={shards}", f"train.runs_dir={runs}"]
    return cv.plan(CONFIG, overrides, stages, folds, ["--recalibrate", "3", "--select-on", "val"])


def test_the_chain_is_submitted_stage_by_stage_with_its_dependencies(shards, tmp_path):
    calls = []

    def recorder(args: list[str], env: dict[str, str]) -> str:
        calls.append((args, env))
        return str(100 + len(calls))

    plan = chain(shards, tmp_path / "runs", folds=2)
    jobs = cv.submit(plan, nodes=2, gpus=0, processes=3, sbatch_args=["--time", "1:00:00"], submit_job=recorder)
    assert jobs == [(1, "101", "102"), (2, "103", "104")]
    (array1, _), (reduce1, _), (array2, _), (reduce2, _) = calls
    assert "--array=0,1" in array1 and "--nodes" in array1 and array1[array1.index("--nodes") + 1] == "2"
    assert not any(a.startswith("--dependency") for a in array1)
    assert "--dependency=afterok:101" in reduce1 and "--dependency=afterok:102" in array2
    assert "--dependency=afterok:103" in reduce2
    assert array1[array1.index("--time") + 1] == "1:00:00"
    # stage 1 starts from the config's weights, stage 2 from stage 1's reduced model
    assert "--init-from" not in array1
    stage1 = tmp_path / "runs" / "demo" / "stage1"
    assert array2[array2.index("--init-from") + 1] == str(stage1 / "reduced" / "model.safetensors")
    assert array2[array2.index(str(REPO / "slurm" / "fold.sh")) + 1 :][:3] == [CONFIG, "--stage", "2"]
    assert reduce1[reduce1.index(str(REPO / "slurm" / "reduce.sh")) + 1] == str(stage1)
    assert reduce1[-7:] == ["--recalibrate", "3", "--select-on", "val", "--folds", "0", "1"]
    # a dependant of a failed job is removed by Slurm, not left pending forever
    for dependant in (reduce1, array2, reduce2):
        assert "--kill-on-invalid-dep=yes" in dependant
    assert calls[0][1]["SEG_PROCS_PER_NODE"] == "3"
    # logs per fold and stage under the experiment's folder
    assert f"--output={tmp_path / 'runs' / 'demo' / 'logs' / 'stage1-fold%a-%A.log'}" in array1


def test_a_failed_submission_cancels_what_was_submitted(shards, tmp_path, monkeypatch):
    cancelled = []
    monkeypatch.setattr(cv.subprocess, "run", lambda command, **kw: cancelled.append(command))

    submitted = []

    def fails_third(args: list[str], env: dict[str, str]) -> str:
        if len(submitted) == 2:
            raise RuntimeError("sbatch: error: invalid partition specified: gpu")
        submitted.append(str(201 + len(submitted)))
        return submitted[-1]

    with pytest.raises(RuntimeError, match="invalid partition"):
        cv.submit(chain(shards, tmp_path / "runs"), 1, 1, 1, [], submit_job=fails_third)
    assert cancelled == [["scancel", "201", "202"]]


def test_bad_input_fails_before_anything_is_submitted(shards, tmp_path):
    with pytest.raises(ConfigError, match="packed with 3 folds"):
        chain(shards, tmp_path, folds=4)
    with pytest.raises(ConfigError, match="--stages 0"):
        chain(shards, tmp_path, stages=0)
    # the model seeding stage 1, read before any fold starts
    overrides = [f"data.shards={shards}", f"train.runs_dir={tmp_path}"]
    for start, message in [(tmp_path / "none.safetensors", "none.safetensors: no such file"),
                           (Path(CONFIG), "demo.yaml: not a weights file; pass a .safetensors model")]:  # fmt: skip
        with pytest.raises(ConfigError, match=f"^--init-from .*{message}"):
            cv.plan(CONFIG, overrides, 1, None, ["--select-on", "val"], str(start))
    done = subprocess.run([sys.executable, "-m", "seg.cv", CONFIG, "--stages", "1", "train.epochz=3",
                           f"data.shards={shards}"], capture_output=True, text=True, cwd=REPO)  # fmt: skip
    assert done.returncode == 2 and "epochz" in done.stderr


def test_a_chain_that_cannot_reduce_is_refused_before_anything_is_submitted(shards, tmp_path):
    overrides = [f"data.shards={shards}", f"train.runs_dir={tmp_path}"]
    # in ./launch cv's terms: a bare --select-on val there was "unrecognized arguments"
    with pytest.raises(ManifestError, match=r'no selection subset.*or pass --reduce "--select-on val" \(the report'):
        cv.plan(CONFIG, overrides, 2, None, ["--recalibrate", "3"])
    for options, message in [
        (["--recalibrate", "-1"], "--recalibrate: -1: at least 0"),
        (["--k", "0"], "--k: 0: at least 1"),
        (["--strategies", "median"], "invalid choice: 'median'"),
        (["--select-on", "test"], "invalid choice: 'test'"),
        (["--recalibrat", "3", "--select-on", "val"], "unrecognized arguments"),
        (["--folds", "0", "--select-on", "val"], "--folds is set by the chain"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            cv.plan(CONFIG, overrides, 2, None, options)
    # The command as a user runs it, with an sbatch that records every call: nothing submitted.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "sbatch-calls"
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\necho "$@" >> {calls}\necho 1\n')
    (bin_dir / "sbatch").chmod(0o755)
    env = os.environ | {"PATH": f"{bin_dir}:{os.environ['PATH']}"}
    done = subprocess.run([sys.executable, "-m", "seg.cv", CONFIG, "--stages", "2", *overrides],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=120)  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "no selection subset" in done.stderr and "--select-on val" in done.stderr
    assert not calls.exists()


def finish(plan: cv.Chain, stage: int, fold: int, init_from: str | None, processes: int = 1) -> None:
    """A summary.json as seg/train.py writes it at the end of that run."""
    config = load_config(CONFIG, plan.overrides, stage)
    identity = fold_identity(config, stage, FoldSplit.of(config.data.shards, fold), init_from, processes)
    summary = {"steps": identity["schedule"]["total_steps"], "identity": identity}
    (plan.experiment.stage(stage).dir / f"fold{fold}").mkdir(parents=True, exist_ok=True)
    (plan.experiment.stage(stage).dir / f"fold{fold}" / "summary.json").write_text(json.dumps(summary))


def test_finished_folds_and_reductions_are_skipped(shards, tmp_path):
    plan = chain(shards, tmp_path / "runs", folds=2)
    assert not cv.fold_done(plan, 1, 0, 1) and cv.reduction_done(plan, 1) == (False, "")
    for fold in (0, 1):
        folder = plan.experiment.stage(1).dir / f"fold{fold}"
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(b"weights")
    (plan.experiment.stage(1).dir / "fold0" / "summary.json").write_text("{}")  # no steps, no identity: not finished
    assert not cv.fold_done(plan, 1, 0, 1)
    finish(plan, 1, 0, None)
    assert cv.fold_done(plan, 1, 0, 1) and not cv.fold_done(plan, 1, 1, 1)
    reduced = plan.experiment.stage(1)
    reduced.reduced_model.parent.mkdir(parents=True)
    reduced.reduced_model.write_bytes(b"reduced")
    reduced.reduced_report.write_text("{}")  # by an older seg
    assert cv.reduction_done(plan, 1) == (False, "its report does not record the options it ran with (an older "
                                                 "seg): reducing again")  # fmt: skip
    reduced.reduced_report.write_text(json.dumps({"options": plan.reduce_options()}))
    assert cv.reduction_done(plan, 1) == (True, "reduced before, skipped")
    # reduced by hand with other options: the chain reduces again, saying why
    other = json.loads(reduced.reduced_report.read_text())
    other["options"]["recalibrate"] = 5
    reduced.reduced_report.write_text(json.dumps(other))
    done, why = cv.reduction_done(plan, 1)
    assert not done and why == "reduced before with other options (recalibrate: 5 -> 3): reducing again"
    reduced.reduced_report.write_text(json.dumps({"options": plan.reduce_options()}))
    # a fold retrained after the reduction makes it stale
    model = plan.experiment.stage(1).dir / "fold1" / "model.safetensors"
    stat = plan.experiment.stage(1).reduced_model.stat()
    os.utime(model, (stat.st_atime, stat.st_mtime + 10))
    assert cv.reduction_done(plan, 1) == (False, "a fold was trained again since its reduction: reducing again")


def reduce_by_hand(plan: cv.Chain, stage: int) -> None:
    """Fold models and a reduction of ``stage`` as the chain's reduce step leaves them."""
    for fold in plan.folds:
        (plan.experiment.stage(stage).dir / f"fold{fold}" / "model.safetensors").write_bytes(b"weights")
    reduced = plan.experiment.stage(stage)
    reduced.reduced_model.parent.mkdir(parents=True, exist_ok=True)
    reduced.reduced_model.write_bytes(f"stage {stage} reduced".encode())
    reduced.reduced_report.write_text(json.dumps({"options": plan.reduce_options()}))


def fake_sbatch(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """An sbatch on PATH that records its arguments and answers job ids 1, 2, ... (and an sinfo
    that answers)."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "sbatch-calls"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\necho "$@" >> {calls}\nwc -l < {calls}\n')
    (bin_dir / "sinfo").write_text("#!/bin/sh\necho debug\n")
    for script in ("sbatch", "sinfo"):
        (bin_dir / script).chmod(0o755)
    return os.environ | {"PATH": f"{bin_dir}:{os.environ['PATH']}"}, calls


def test_a_rerun_on_slurm_submits_only_the_folds_and_reductions_left(shards, tmp_path, monkeypatch, capsys):
    plan = chain(shards, tmp_path / "runs", folds=2)
    stage1 = plan.experiment.stage(1)

    def left() -> list[tuple[int, list[int], bool]]:
        return [(w.stage, w.folds, w.reduce) for w in cv.work_left(plan, 2)]  # 2 nodes x 1 process

    def submitted() -> tuple[list[list[str]], list[tuple[int, str, str]]]:
        calls: list[list[str]] = []

        def recorder(args: list[str], env: dict[str, str]) -> str:
            calls.append(args)
            return str(300 + len(calls))

        return calls, cv.submit(plan, 2, 0, 1, [], submit_job=recorder, work=cv.work_left(plan, 2))

    assert left() == [(1, [0, 1], True), (2, [0, 1], True)]
    finish(plan, 1, 0, None, processes=2)
    # its writer was killed after writing summary.json, before releasing its lease (found by tools/chaos.py)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lease_file = plan.experiment.stage(1).fold(0).lease
    lease_file.write_text(json.dumps(lease._me("training of stage 1 fold 0") | {"pid": int(dead.stdout)}))
    assert left() == [(1, [1], True), (2, [0, 1], True)]  # stage 2 whole: its start model is yet to be made
    assert not lease_file.exists()  # tidied: nothing would ever take a finished fold's lease again
    calls, jobs = submitted()
    assert jobs == [(1, "301", "302"), (2, "303", "304")] and "--array=1" in calls[0] and "--array=0,1" in calls[2]

    # Stage 1 trained and reduced: stage 2 alone, from stage 1's model, waiting for no job.
    finish(plan, 1, 1, None, processes=2)
    reduce_by_hand(plan, 1)
    assert left() == [(1, [], False), (2, [0, 1], True)]
    calls, jobs = submitted()
    assert jobs == [(1, "", ""), (2, "301", "302")]
    array2, reduce2 = calls
    assert not any(a.startswith("--dependency") for a in array2) and "--dependency=afterok:301" in reduce2
    assert array2[array2.index("--init-from") + 1] == str(stage1.reduced_model)

    # Stage 2's folds finished, its reduction not: the reduction alone.
    for fold in (0, 1):
        finish(plan, 2, fold, str(stage1.reduced_model), processes=2)
    assert left() == [(1, [], False), (2, [], True)]
    calls, jobs = submitted()
    assert jobs == [(1, "", ""), (2, "", "301")] and not any(a.startswith("--dependency") for a in calls[0])

    # The command as a user runs it (in this process: its start-up is not what is tested), with an
    # sbatch on PATH: what it skipped in one line a stage; a finished chain submits nothing.
    env, sbatch_calls = fake_sbatch(tmp_path)
    monkeypatch.setenv("PATH", env["PATH"])
    args = [CONFIG, "--stages", "2", "--folds", "2", "--reduce", "--recalibrate 3 --select-on val", *plan.overrides]
    assert cv.main([*args, "--nodes", "2"]) == 0
    out = capsys.readouterr().out
    assert "stage 1: finished before (every fold trained and reduced), skipped" in out
    assert "stage 2: every fold finished before, reduce 1" in out
    assert sbatch_calls.read_text().count("\n") == 1 and "reduce.sh" in sbatch_calls.read_text()
    sbatch_calls.unlink()
    reduce_by_hand(plan, 2)
    assert cv.main([*args, "--nodes", "2"]) == 0
    assert "done: every stage finished before, nothing submitted" in capsys.readouterr().out
    assert not sbatch_calls.exists()
    # A fold that finished as another run (2 processes, the chain now asks 1): refused, nothing submitted.
    assert cv.main([*args, "--nodes", "1"]) == 2
    err = capsys.readouterr().err
    assert "stage 1 fold 0:" in err and "batch.global: 8 -> 4" in err and not sbatch_calls.exists()


def test_each_stage_applies_its_entry_of_the_config_and_bad_keys_name_the_entry(tmp_path):
    config = tmp_path / "x.yaml"
    config.write_text("data: {shards: s}\noptim: {lr: 1.0e-3}\nstages: [{}, {optim.lr: 3.0e-4, loss.alpha: 0.5}]\n")
    assert load_config(config, [], 1).optim.lr == 1.0e-3
    assert load_config(config, [], 2).optim.lr == 3.0e-4
    later = load_config(config, [], 5)  # beyond the list: the last entry
    assert (later.optim.lr, later.loss.alpha) == (3.0e-4, 0.5)
    assert load_config(config, ["optim.lr=0.1"], 2).optim.lr == 0.1  # the command line wins
    config.write_text("data: {shards: s}\nstages:\n  - {}\n  - {optim.lx: 3.0e-4}\n")
    with pytest.raises(ConfigError, match=r"'optim.lx' in stages\[1\]"):
        load_config(config, [], 2)


def test_without_slurm_the_chain_says_so_and_points_to_local(shards, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").symlink_to(sys.executable)
    done = subprocess.run([sys.executable, "-m", "seg.cv", CONFIG, "--stages", "1", "--reduce", "--select-on val",
                           f"data.shards={shards}", f"train.runs_dir={tmp_path}"],
                          capture_output=True, text=True, cwd=REPO, timeout=120,
                          env=os.environ | {"PATH": str(bin_dir)})  # fmt: skip
    assert done.returncode == 2 and "no Slurm here" in done.stderr and "--local" in done.stderr, done.stderr


def test_a_local_step_prints_one_line_and_keeps_its_output_in_the_log(tmp_path, capsys):
    log = tmp_path / "logs" / "step.log"
    talk = [sys.executable, "-c", "for i in range(100): print('config line', i)"]
    assert cv.run_logged(talk, log, "stage 1 fold 0", Signals()) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 2 and "stage 1 fold 0: done in" in out and "config line" not in out
    assert log.read_text().count("\nconfig line") == 100  # the command line heads the log
    fail = [sys.executable, "-c", "import sys; print('what went wrong'); sys.exit(3)"]
    assert cv.run_logged(fail, log, "stage 1 reduction", Signals()) == 3
    assert "what went wrong" in capsys.readouterr().err  # the log's tail, on a failure


def test_a_fold_that_finished_as_another_run_stops_the_chain_naming_the_difference(shards, tmp_path):
    plan = chain(shards, tmp_path / "runs", folds=2)
    finish(plan, 1, 0, None, processes=1)
    with pytest.raises(ConfigError, match=r"stage 1 fold 0: .* finished as another run than this chain's "
                       r"\(batch.global: 4 -> 8"):  # fmt: skip
        cv.fold_done(plan, 1, 0, 2)  # the chain runs 2 processes: another global batch
    # a stage 2 fold trained without its start model (seg/train.py --stage 2 --init-from scratch)
    plan.experiment.stage(1).reduced_model.parent.mkdir(parents=True)
    plan.experiment.stage(1).reduced_model.write_bytes(b"the reduced stage-1 model")
    finish(plan, 2, 0, None)
    with pytest.raises(ConfigError, match=r"init_from.model: 'scratch' -> 'sha256:[0-9a-f]{64}'"):
        cv.fold_done(plan, 2, 0, 1)
    finish(plan, 2, 1, str(plan.experiment.stage(1).reduced_model))
    assert cv.fold_done(plan, 2, 1, 1)
    plan.experiment.stage(1).reduced_model.write_bytes(b"stage 1 reduced again, to another model")
    with pytest.raises(ConfigError, match=r"stage 2 fold 1: .*init_from.model: 'sha256:"):
        cv.fold_done(plan, 2, 1, 1)
    done = subprocess.run([sys.executable, "-m", "seg.cv", CONFIG, *plan.overrides, "--stages", "2", "--folds", "2",
                           "--local", "--processes", "2", "--reduce", "--select-on val"], capture_output=True,
                          text=True, timeout=300, cwd=REPO)  # fmt: skip
    assert done.returncode == 2 and "error: stage 1 fold 0:" in done.stderr, done.stderr[-2000:]
    assert "batch.global: 4 -> 8" in done.stderr and not (plan.experiment.stage(1).dir / "fold1").exists()


def _tiny_chain(shards: Path, runs: Path, *extra: str) -> list[str]:
    overrides = [f"data.shards={shards}", f"train.runs_dir={runs}", "data.size=[32,64]", "data.eval_size=null",
                 "data.workers=0", "train.batch_size=2", "train.log_every=1", "wandb.mode=disabled",
                 "model.depth=18"]  # fmt: skip
    return [sys.executable, "-m", "seg.cv", CONFIG, "--stages", "1", "--folds", "1", "--local", "--reduce",
            "--select-on val", *overrides, *extra]  # fmt: skip


def test_ctrl_c_of_a_local_chain_lets_the_fold_save_and_says_where_it_stopped(shards, tmp_path):
    """As a terminal sends it: SIGINT to the chain's process group. The fold runs in 2 processes
    under accelerate's launcher, which once took the chain's passed-on SIGINT as a second one
    and sent its ranks a SIGTERM: a preemption (exit 75, PREEMPTED), not a stop by hand."""
    tiny = _tiny_chain(shards, tmp_path, "train.epochs=50", "train.eval_every=100", "--processes", "2")
    chain = subprocess.Popen(tiny,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                             start_new_session=True)  # fmt: skip
    metrics = tmp_path / "demo" / "stage1" / "fold0" / "metrics.jsonl"
    try:
        deadline = time.time() + 300
        while not (metrics.exists() and metrics.read_text().strip()):
            assert chain.poll() is None and time.time() < deadline, chain.communicate()[1][-3000:]
            time.sleep(0.2)
        os.killpg(chain.pid, signal.SIGINT)
        _, err = chain.communicate(timeout=300)
    finally:
        chain.kill()
    assert chain.returncode == 130, err[-3000:]
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    step = re.search(r"^stage 1 fold 0: interrupted, at step (\d+), state saved in (\S+); rerun the same command "
                     r"to continue; exit 130$", lines[0])  # fmt: skip
    assert step and Path(step[2]).is_dir() and step[2].endswith(f"step-{int(step[1]):08d}"), lines[0]
    log = (tmp_path / "demo" / "logs" / "stage1-fold0.log").read_text()
    assert f"interrupted: state saved at step {step[1]}" in log  # the fold saved before it exited
    assert "preempted" not in log and not (metrics.parent / "PREEMPTED").exists()
    assert not (tmp_path / "demo" / "stage1" / ".chain.lease").exists()


# A fold's command that counts the SIGINTs it gets in the second after its first.
_COUNTS_INTS = """
import signal, sys, time
count = 0
def caught(*_):
    global count
    count += 1
signal.signal(signal.SIGINT, caught)
open(sys.argv[1] + ".ready", "w").close()
deadline = time.time() + 60
while count == 0 and time.time() < deadline:
    time.sleep(0.05)
time.sleep(1.0)
open(sys.argv[1], "w").write(str(count))
"""

_CHAIN = """
import sys
from pathlib import Path
from seg.core.signals import Signals
from seg.cv import run_logged
sys.exit(run_logged([sys.executable, "-c", sys.argv[1], sys.argv[2]], Path(sys.argv[3]), "fold", Signals().install()))
"""


def test_a_terminals_ctrl_c_reaches_a_folds_command_once_through_the_chain(tmp_path):
    """A terminal's Ctrl-C goes to the chain's process group; the chain passes it on. Had the
    fold's command been in that group too, it would get two: accelerate's launcher takes a
    second SIGINT during its shutdown as a reason to SIGTERM its ranks (a preemption)."""
    count = tmp_path / "count"
    chain = subprocess.Popen([sys.executable, "-c", _CHAIN, _COUNTS_INTS, str(count), str(tmp_path / "fold.log")],
                             cwd=REPO, start_new_session=True)  # fmt: skip
    try:
        deadline = time.time() + 60
        while not count.with_suffix(".ready").exists():
            assert chain.poll() is None and time.time() < deadline
            time.sleep(0.05)
        os.killpg(chain.pid, signal.SIGINT)
        assert chain.wait(timeout=60) == 0
    finally:
        chain.kill()
    assert count.read_text() == "1"


@pytest.mark.parametrize(
    ("options", "error"),
    [
        (["--local", "--processes", "0"], "error: argument --processes: 0: at least 1"),
        (["--processes", "-1"], "error: argument --processes: -1: at least 1"),
        (["--nodes", "0"], "error: argument --nodes: 0: at least 1"),
        (["--gpus", "-2"], "error: argument --gpus: -2: at least 0"),
        (["--stages", "0"], "error: argument --stages: 0: at least 1"),
        (["--local", "--nodes", "2"], "error: --nodes and --gpus are Slurm's: with --local, --processes P runs"),
    ],
)
def test_process_counts_that_cannot_run_are_refused_before_anything_runs(options, error, tmp_path, capsys):
    try:
        code = cv.main(["no-such-config.yaml", f"train.runs_dir={tmp_path}", *options])
    except SystemExit as e:  # argparse's refusal of a count: its usage, then the error
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and error in err and err.endswith("\n") and error in err.splitlines()[-1], err
    assert not any(tmp_path.iterdir())


def test_a_fold_that_finished_as_the_chain_was_stopped_is_said_finished(monkeypatch, tmp_path, capsys):
    """The stop came as the fold ended (exit 0): the chain says so, not "state saved at step N"."""
    signals = Signals()

    def ends_as_stopped(*args):
        signals.interrupted = True
        return 0

    monkeypatch.setattr(cv, "run_logged", ends_as_stopped)
    monkeypatch.setattr(cv, "fold_done", lambda *args: False)
    chain = cv.Chain(CONFIG, [], 1, [0], cv.Experiment.named(tmp_path, "x"))
    assert cv.run_stage(chain, 1, 1, signals) == 130
    assert capsys.readouterr().err == (
        "stage 1 fold 0: interrupted, after it had finished; rerun the same command to continue; exit 130\n"
    )


def test_a_second_local_chain_on_a_stage_is_refused_naming_the_first(shards, tmp_path):
    from seg.core.lease import acquire

    with acquire(tmp_path / "demo" / "stage1" / ".chain.lease", "local chain of stage 1"):
        done = subprocess.run(_tiny_chain(shards, tmp_path), capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    assert f"is being written by local chain of stage 1 (host {socket.gethostname()}, pid {os.getpid()}" in done.stderr
    assert not (tmp_path / "demo" / "stage1" / "fold0").exists()


def test_a_closed_terminals_hangup_stops_a_local_chain_as_a_ctrl_c(monkeypatch, tmp_path):
    """The folds' process groups are their own: a terminal's HUP reaches the chain alone, which
    takes it as a Ctrl-C (and passes that on) rather than dying with its fold left running."""
    seen = []

    def stage(chain, stage, processes, signals):
        signal.raise_signal(signal.SIGHUP)
        seen.append((signals.interrupted, signals.preempted))
        return 130

    monkeypatch.setattr(cv, "run_stage", stage)
    chain = cv.Chain(CONFIG, [], 1, [0], cv.Experiment.named(tmp_path, "x"))
    before = signal.getsignal(signal.SIGHUP)
    assert cv.run_local(chain, 1) == 130
    assert seen == [(True, False)]
    assert signal.getsignal(signal.SIGHUP) == before  # given back
