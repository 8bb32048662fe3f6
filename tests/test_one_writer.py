"""One writer per fold folder (seg/core/lease.py through seg/train.py): a second training of a fold
is refused while the first writes, a lease left by a dead process is taken over."""

import json
import re
import signal
import subprocess
import sys

import pytest

from seg.core.lease import _me
from tests.tiny_training import FOLD, REPO, command, run, steps_logged, tiny_shards, wait_for


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return tiny_shards(tmp_path_factory.mktemp("one-writer"))


def test_a_second_training_of_a_fold_is_refused_in_one_line_and_the_first_run_stays_clean(shards, tmp_path):
    first = subprocess.Popen(
        command(shards, tmp_path, "train.epochs=40", "train.eval_every=100", "wandb.mode=offline"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
    )  # fmt: skip
    fold = tmp_path / FOLD
    try:
        wait_for(lambda: steps_logged(fold / "metrics.jsonl") >= 1, first)
        second = run(shards, tmp_path, "train.epochs=40", "train.eval_every=100", "wandb.mode=offline")
        assert first.poll() is None  # still training: the refusal is not a finished fold's
        assert second.returncode == 2, second.stderr[-2000:]
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {fold} is being written by training of stage 1 fold 0")
        assert f"pid {first.pid}" in lines[0] and "wait for it to finish or stop it" in lines[0]
        first.send_signal(signal.SIGINT)
        _, err = first.communicate(timeout=300)
    finally:
        first.kill()
    assert first.returncode == 130, err[-2000:]
    steps = [json.loads(line)["step"] for line in (fold / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, len(steps) + 1))  # one writer: no step twice
    assert len(list((fold / "wandb").glob("offline-run-*"))) == 1  # one wandb run
    assert not (fold / ".lease").exists()  # released on the way out


def test_a_lease_left_by_a_dead_training_is_taken_over_saying_so(shards, tmp_path):
    fold = tmp_path / FOLD
    fold.mkdir(parents=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (fold / ".lease").write_text(json.dumps(_me("training of stage 1 fold 0") | {"pid": int(dead.stdout)}))
    done = run(shards, tmp_path, "train.iters=1")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "taking over the lease of training of stage 1 fold 0 (host" in done.stdout
    assert f"pid {int(dead.stdout)} is not running on this host" in done.stdout
    assert (fold / "summary.json").is_file() and not (fold / ".lease").exists()


def test_a_reduction_is_refused_while_another_reduces_the_stage(tmp_path):
    from seg.core.lease import acquire

    stage = tmp_path / "demo" / "stage1"
    with acquire(stage / ".reduce.lease", f"reduction of {stage}"):
        done = subprocess.run([sys.executable, str(REPO / "tools" / "reduce_folds.py"), str(stage)],
                              capture_output=True, text=True, cwd=REPO, timeout=300)  # fmt: skip
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.startswith(f"error: {stage} is being written by reduction of {stage} (host ")
    assert done.stderr.count("\n") == 1 and not (stage / "reduced").exists()


def _wandb_ids(fold) -> list[str]:
    """The run id of each offline wandb run of the fold, in the order they were made."""
    return [p.name.split("-", 3)[3] for p in sorted((fold / "wandb").glob("offline-run-*"))]


def test_one_wandb_run_per_fold_run_continued_by_a_resume_and_another_for_a_restart(shards, tmp_path):
    wandb = ("train.epochs=2", "wandb.mode=offline")
    assert run(shards, tmp_path, *wandb, drill="3:TERM").returncode == 75
    resumed = run(shards, tmp_path, *wandb)
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stderr[-2000:]
    fold = tmp_path / FOLD
    first, second = _wandb_ids(fold)
    assert first == second and re.fullmatch(r"demo-s1-f0-[0-9a-f]{8}", first)  # the same run, continued
    restarted = run(shards, tmp_path, *wandb, "--resume", "none")
    assert restarted.returncode == 0, restarted.stderr[-2000:]
    third = _wandb_ids(fold)[-1]
    assert third.startswith(f"{first}-r") and third != first  # trained again from scratch: its own run


def test_a_config_typo_under_a_two_process_launcher_is_said_once(shards, tmp_path):
    done = run(shards, tmp_path, "train.epoch=3", processes=2)
    assert done.returncode != 0
    assert done.stderr.count("error: config key 'train.epoch'") == 1, done.stderr[-3000:]
