"""seg/train.py on a full or read-only disk: one line, exit 74, the last complete state kept,
and a rerun resumes from it once there is room. (A depth-18 state of the tiny fold takes
about 191 MB, its weights 64 MB.)"""

import re

import pytest

from seg.core.storage import EXIT_STORAGE
from tests.disks import resize, tmpfs
from tests.tiny_training import FOLD, run, tiny_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return tiny_shards(tmp_path_factory.mktemp("storage"))


def _one_error_line(stderr: str) -> str:
    """The one error line (an early warning of a filling disk may come before it)."""
    lines = [line for line in stderr.strip().splitlines() if line.strip() and not line.startswith("warning: ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr[-3000:]
    return lines[0]


def test_a_read_only_runs_folder_is_refused_before_any_work(shards, tmp_path):
    with tmpfs(tmp_path / "runs", "8m", read_only=True) as runs:
        done = run(shards, runs / "inner", "train.iters=1")
    assert done.returncode == EXIT_STORAGE
    line = _one_error_line(done.stderr)
    assert f"cannot create files in {runs} (read-only file system): write to a writable folder" in line


def test_a_state_that_will_not_fit_stops_the_run_keeping_the_last_state_and_a_rerun_resumes(shards, tmp_path):
    with tmpfs(tmp_path / "runs", "400m") as runs:
        full = run(shards, runs, "train.epochs=2")  # epoch 1's state fits, epoch 2's does not
        assert full.returncode == EXIT_STORAGE, full.stderr[-3000:]
        line = _one_error_line(full.stderr)
        checkpoints = runs / FOLD / "checkpoints"
        # warned at the save before, when it saw that the next would not fit
        warning = rf"warning: \d+ MB free on the disk of {re.escape(str(checkpoints))}, a state takes \d+ MB"
        assert re.search(warning, full.stderr)
        assert f"saving the state to {checkpoints}/.step-00000006.partial failed: no space left" in line
        assert "MB needed" in line and f"rerun the same command to resume from {checkpoints}/step-00000003" in line
        assert sorted(p.name for p in checkpoints.iterdir()) == ["step-00000003"]  # no partial state left
        resize(runs, "1024m")
        again = run(shards, runs, "train.epochs=2")
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from {checkpoints}/step-00000003 at step 3" in again.stdout


def test_a_disk_that_fills_after_training_keeps_the_trained_state_and_a_rerun_writes_the_outputs(shards, tmp_path):
    with tmpfs(tmp_path / "runs", "300m") as runs:
        full = run(shards, runs, "train.epochs=1")  # best + the state fit, the final weights do not
        assert full.returncode == EXIT_STORAGE, full.stderr[-3000:]
        line = _one_error_line(full.stderr)
        assert f"writing the outputs to {runs / FOLD}" in line and "no space left on the device" in line
        assert "rerun the same command to resume from" in line and "step-00000003" in line
        resize(runs, "1024m")
        again = run(shards, runs, "train.epochs=1")
        assert again.returncode == 0, again.stderr[-3000:]
        assert "at step 3" in again.stdout and (runs / FOLD / "summary.json").is_file()
