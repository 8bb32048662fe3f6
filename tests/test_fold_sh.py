"""slurm/fold.sh without a cluster: Slurm's commands and the trainer faked on PATH, each call
logged. The whole script on a real Slurm is tests/test_chaos.py's short mode."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FAKES = {
    "scontrol": """echo "scontrol $*" >> "$LOG"
case "$1 $2" in
    "show hostnames") echo n1 ;;
    "show node") echo "NodeName=n1 NodeAddr=127.0.0.1 State=IDLE" ;;
esac""",
    # the steps' answer to a USR1: they save and exit (fold.sh then reads 75 as "requeue me")
    "scancel": """echo "scancel $*" >> "$LOG"; touch "$LOG.signalled\"""",
    "srun": """echo "srun" >> "$LOG"
for _ in $(seq 100); do [[ -e "$LOG.signalled" ]] && exit 75; sleep 0.1; done
exit 1""",
    "python": """[[ " $* " == *" --print-run-dir "* ]] && echo "$RUN_DIR"; exit 0""",
}


@pytest.mark.parametrize(
    ("array", "named"),
    [({"SLURM_ARRAY_JOB_ID": "13", "SLURM_ARRAY_TASK_ID": "1"}, "13_1"), ({"SEG_FOLD": "1"}, "13")],
)
def test_a_warned_fold_signals_and_requeues_its_own_array_task_alone(tmp_path: Path, array: dict, named: str):
    """An array task's own job id can be the array's id (13_1's was 13), which scancel and
    scontrol take as every task of the array: a time-limit warning to one fold saved and
    requeued every fold of its stage (found by tools/chaos.py). Its task is named instead."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in FAKES.items():
        (bin_dir / name).write_text(f"#!/usr/bin/env bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "calls.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SEG_"))}
    env |= {"PATH": f"{bin_dir}:{env['PATH']}", "LOG": str(log), "RUN_DIR": str(tmp_path / "run"),
            "SEG_PYTHON": str(bin_dir / "python"), "SLURM_JOB_ID": "13", "SLURM_SUBMIT_DIR": str(REPO),
            "SLURM_JOB_NUM_NODES": "1", **array}  # fmt: skip
    script = subprocess.Popen(["bash", str(REPO / "slurm" / "fold.sh"), "configs/demo.yaml"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    deadline = time.monotonic() + 30
    while not (log.exists() and "srun" in log.read_text()):
        assert time.monotonic() < deadline and script.poll() is None, script.communicate()[0]
        time.sleep(0.05)
    script.send_signal(signal.SIGUSR1)  # Slurm's warning before the time limit (--signal=B:USR1)
    out = script.communicate(timeout=30)[0]
    assert script.returncode == 0, out
    calls = log.read_text().splitlines()
    assert f"scancel --signal=USR1 {named}" in calls, calls
    assert f"scontrol requeue {named}" in calls, calls
    assert "requeued" in out
