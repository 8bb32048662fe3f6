"""The Slurm test harness itself (tests/slurm_cluster.py, slurm/testing/cluster.sh) on a real cluster."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.slurm_cluster import (
    LOCK_TIMEOUT_S,
    SlurmCluster,
    alive,
    cluster_dir,
    processes_mentioning,
    running_cluster,
    slurm_cluster_fixture,  # noqa: F401 (registers the `slurm_cluster` fixture)
    slurm_missing_reason,
)

# func_only: the time limit counts the test, not the session cluster's start (which may wait
# for another cluster on this machine).
pytestmark = [pytest.mark.slurm, pytest.mark.xdist_group("slurm"), pytest.mark.timeout(600, func_only=True)]


def wait_for(cluster: SlurmCluster, job: int, expected: str, timeout: float = 30.0) -> None:
    """Wait until squeue's "STATE REASON" for `job` starts with `expected` ("RUNNING", "PENDING BeginTime")."""
    deadline = time.monotonic() + timeout
    while not (now := cluster.run(["squeue", "-h", "-j", str(job), "-o", "%T %r"]).strip()).startswith(expected):
        assert time.monotonic() < deadline, f"job {job} is {now!r} after {timeout} s, not {expected!r}"
        time.sleep(0.2)


def test_two_nodes_one_task_each(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    out = tmp_path / "two.out"
    script = "srun bash -c 'echo $SLURM_NODEID $SLURMD_NODENAME'"  # single quotes: expanded by each task
    job = slurm_cluster.sbatch(["-N", "2", "--ntasks-per-node=1", "-o", str(out), "--wrap", script])
    assert slurm_cluster.wait([job]) == {str(job): "COMPLETED"}
    assert sorted(out.read_text().splitlines()) == ["0 n1", "1 n2"]


def test_dependency_runs_after_the_whole_array(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    # Each task prints its id and the time it ends; the dependent job, the time it starts.
    array = slurm_cluster.sbatch(
        ["--array=0-2", "-o", f"{tmp_path}/task_%a.out", "--wrap", "sleep 1; echo $SLURM_ARRAY_TASK_ID $(date +%s.%N)"]
    )
    after = slurm_cluster.sbatch(
        [f"--dependency=afterok:{array}", "-o", f"{tmp_path}/after.out", "--wrap", "date +%s.%N"]
    )
    states = slurm_cluster.wait([array, after])
    assert states == {
        f"{array}_0": "COMPLETED",
        f"{array}_1": "COMPLETED",
        f"{array}_2": "COMPLETED",
        str(after): "COMPLETED",
    }
    ends = {}
    for task in range(3):
        task_id, end = (tmp_path / f"task_{task}.out").read_text().split()
        ends[int(task_id)] = float(end)
    assert sorted(ends) == [0, 1, 2]
    assert float((tmp_path / "after.out").read_text()) >= max(ends.values())


def test_wait_reports_failures(slurm_cluster: SlurmCluster) -> None:
    ok, failed = (slurm_cluster.sbatch(["-o", "/dev/null", "--wrap", f"exit {code}"]) for code in (0, 3))
    assert slurm_cluster.wait([ok, failed]) == {str(ok): "COMPLETED", str(failed): "FAILED"}


def test_requeued_job_released(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    # The job requeues itself on its first run; `release` spares the two-minute BeginTime wait.
    script = 'echo run ${SLURM_RESTART_COUNT:-0}; [ "${SLURM_RESTART_COUNT:-0}" = 0 ] || exit 0; '
    script += "scontrol requeue $SLURM_JOB_ID; sleep 60"
    job = slurm_cluster.sbatch(["-o", f"{tmp_path}/job.out", "--open-mode=append", "--wrap", script])
    wait_for(slurm_cluster, job, "PENDING BeginTime")
    slurm_cluster.release(job)
    assert slurm_cluster.wait([job]) == {str(job): "COMPLETED"}, slurm_cluster.log_tail()
    runs = [line for line in (tmp_path / "job.out").read_text().splitlines() if line.startswith("run")]
    assert runs == ["run 0", "run 1"]


def test_node_address(slurm_cluster: SlurmCluster) -> None:
    assert "NodeAddr=127.0.0.1 " in slurm_cluster.run(["scontrol", "show", "node", "n1"])


@pytest.mark.timeout(LOCK_TIMEOUT_S + 900)  # its private cluster may wait for the machine's lock
def test_stop_leaves_nothing_running(tmp_path: Path) -> None:
    """A private cluster (the session's one stops at the end, checked by the fixture the same way)."""
    if reason := slurm_missing_reason():
        pytest.skip(reason)
    with running_cluster(cluster_dir(tmp_path)) as cluster:
        daemons = cluster.daemons()
        # munged is among them only if this cluster started it.
        assert sorted(p for p in daemons.values() if p != "munged") == ["slurmctld", "slurmd", "slurmd"]
        assert all(alive(pid, program) for pid, program in daemons.items())
        # A job still running at stop must go too (slurmstepd outlives slurmd).
        job = cluster.sbatch(["-o", "/dev/null", "--wrap", f"echo $$ > {tmp_path}/job.pid; exec sleep 300"])
        wait_for(cluster, job, "RUNNING")
        for _ in range(100):
            if (tmp_path / "job.pid").exists():
                break
            time.sleep(0.1)
        job_pid = int((tmp_path / "job.pid").read_text())
        assert alive(job_pid, "sleep")
    assert not any(alive(pid, program) for pid, program in daemons.items())
    assert not alive(job_pid, "sleep")
    assert processes_mentioning(str(cluster.conf)) == []
