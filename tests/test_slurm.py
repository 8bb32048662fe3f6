"""`./launch cv` on a real Slurm (tests/slurm_cluster.py): two stages of two folds, every fold
over two nodes, a preempted fold requeued and resumed, each reduce job after its stage."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import pytest

from seg.core.cli import Size
from seg.data.pack import Options, pack
from seg.data.synthetic import make_synthetic
from tests.slurm_cluster import FINISHED, SlurmCluster, slurm_cluster_fixture  # noqa: F401 (registers `slurm_cluster`)

# The time limit counts the test alone (func_only): the session's cluster may first wait for
# another one on this machine (tests/slurm_cluster.py). Its own waits add up to about 1350 s.
pytestmark = [pytest.mark.slurm, pytest.mark.xdist_group("slurm"), pytest.mark.timeout(1800, func_only=True)]

REPO = Path(__file__).resolve().parents[1]
STEPS = 16
TINY = [
    "data.size=[32,64]", "data.eval_size=null", "data.workers=0", "train.batch_size=2", "train.log_every=1",
    f"train.iters={STEPS}", f"train.eval_every={STEPS}", "wandb.mode=auto",
]  # fmt: skip


def jobcomp(cluster: SlurmCluster) -> list[dict[str, str]]:
    """Slurm's records of finished jobs (a requeued run leaves one too)."""
    lines = (cluster.dir / "jobcomp.txt").read_text().splitlines()
    return [dict(f.split("=", 1) for f in line.split() if "=" in f) for line in lines]


def logs(experiment: Path) -> str:
    return "\n".join(f"--- {p}\n{p.read_text()[-3000:]}" for p in sorted((experiment / "logs").glob("*.log")))


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.5)


def test_cv_chain_with_two_node_folds_a_preemption_and_reductions(slurm_cluster: SlurmCluster, tmp_path: Path):
    root = tmp_path / "cityscapes"
    make_synthetic(root, counts={"train": 12, "val": 2, "test": 0}, cities={"train": 3, "val": 1, "test": 1},
                   size=Size(32, 64), progress=False)  # fmt: skip
    shards = tmp_path / "shards"
    pack(root, shards, Options(folds=2, splits=("train", "val"), selection_cities=("bochum",)), progress=False)
    runs = tmp_path / "runs"
    env = slurm_cluster.env | {"SEG_PYTHON": sys.executable, "WANDB_SILENT": "true"}
    env.pop("WANDB_MODE", None)  # the job scripts choose offline
    done = subprocess.run(
        [sys.executable, "-m", "seg.cv", str(REPO / "configs" / "demo.yaml"), "--stages", "2", "--nodes", "2",
         "--reduce", "--recalibrate 1", "--sbatch", "--time 15", f"data.shards={shards}", f"train.runs_dir={runs}",
         *TINY],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    jobs = re.findall(r"stage (\d): folds (\d+) \(array 0,1\), reduce (\d+)", done.stdout)
    assert [s for s, _, _ in jobs] == ["1", "2"], done.stdout
    (_, array1, reduce1), (_, array2, reduce2) = jobs

    # Preempt stage 1's fold 0 once it trains, the way Slurm warns of a time limit: USR1 to the
    # batch script. It saves, requeues itself; release it from its two-minute BeginTime.
    experiment = runs / "demo"
    metrics = experiment / "stage1" / "fold0" / "metrics.jsonl"

    def training() -> bool:
        states = slurm_cluster.states([array1])
        assert not set(states.values()) & FINISHED, (states, slurm_cluster.log_tail(), logs(experiment))
        return metrics.exists() and bool(metrics.read_text().strip())

    wait_until(training, 180, "stage 1 fold 0 to train")
    slurm_cluster.run(["scancel", "--batch", "--signal=USR1", f"{array1}_0"])

    def requeued() -> bool:
        state = slurm_cluster.run(["squeue", "-h", "-j", f"{array1}_0", "-o", "%T %r"], check=False).strip()
        return state.startswith("PENDING") and "BeginTime" in state

    wait_until(requeued, 120, "the preempted fold to requeue")
    # Not at once: slurmd refuses a relaunch within the second its old credential was revoked
    # ("Job credential revoked", the job then fails). Slurm's own delay is two minutes.
    time.sleep(3)
    slurm_cluster.release(f"{array1}_0")
    jobs = [array1, reduce1, array2, reduce2]

    def chain_done() -> bool:  # fails at once on a failed job: its dependants would wait forever
        states = slurm_cluster.states(jobs)
        failed = set(states.values()) & (FINISHED - {"COMPLETED"})
        assert not failed, (states, slurm_cluster.log_tail(), logs(experiment))
        return {key.split("_")[0] for key in states} == set(jobs) and set(states.values()) == {"COMPLETED"}

    wait_until(chain_done, 900, "the chain to complete")

    # Every fold ran on two machine ranks, one on each node, to the last step.
    for stage in (1, 2):
        for fold in (0, 1):
            summary = json.loads((experiment / f"stage{stage}" / f"fold{fold}" / "summary.json").read_text())
            assert (summary["machines"], summary["nodes"], summary["processes"]) == ([0, 1], ["n1", "n2"], 2)
            assert summary["steps"] == STEPS
            seed = experiment / "stage1" / "reduced" / "model.safetensors"
            assert summary["init_from"] == (str(seed) if stage == 2 else None)
            assert list((experiment / f"stage{stage}" / f"fold{fold}" / "wandb").glob("offline-run-*"))
        assert (experiment / f"stage{stage}" / "reduced" / "model.safetensors").is_file()
        assert list((experiment / f"stage{stage}" / "wandb").glob("offline-run-*")), "the reduction's wandb run"

    # The preempted fold: requeued once, resumed from its saved state, its record unbroken.
    log = next((experiment / "logs").glob(f"stage1-fold0-{array1}.log")).read_text()
    assert "state saved, requeued" in log and "restart 1" in log and "resumed from" in log
    # a preemption reads as one: no launcher traceback, no failed task, one reaction per signal
    for failure in ("Traceback", "ChildFailedError", "Exited with exit code"):
        assert failure not in log, log[-3000:]
    assert log.count("received: asking the fold to save") == 1, log[-3000:]
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines() if "train/loss" in line]
    assert steps == list(range(1, STEPS + 1))
    assert not (metrics.parent / "PREEMPTED").exists()

    # Each reduce job started only after every fold of its stage had ended (Slurm's own times).
    records = jobcomp(slurm_cluster)

    def times(job: str, key: str) -> list[datetime]:
        return [datetime.fromisoformat(r[key]) for r in records if job in (r.get("ArrayJobId"), r["JobId"])]

    for array, reduce in ((array1, reduce1), (array2, reduce2)):
        assert min(times(reduce, "StartTime")) >= max(times(array, "EndTime"))
    assert min(times(array2, "StartTime")) >= max(times(reduce1, "EndTime"))


def test_a_chain_that_cannot_reduce_is_never_submitted(slurm_cluster: SlurmCluster, tmp_path: Path):
    root = tmp_path / "cityscapes"
    make_synthetic(root, counts={"train": 6, "val": 1, "test": 0}, cities={"train": 2, "val": 1, "test": 1},
                   size=Size(32, 64), progress=False)  # fmt: skip
    shards = tmp_path / "shards"
    pack(root, shards, Options(folds=2, splits=("train", "val")), progress=False)  # no selection subset
    before = slurm_cluster.env | {"SEG_PYTHON": sys.executable}
    queued = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, env=before, check=True)
    done = subprocess.run(
        [sys.executable, "-m", "seg.cv", str(REPO / "configs" / "demo.yaml"), "--stages", "2",
         f"data.shards={shards}", f"train.runs_dir={tmp_path / 'runs'}", *TINY],
        capture_output=True, text=True, env=before, cwd=REPO, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2 and "no selection subset" in done.stderr and "--select-on val" in done.stderr
    after = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, env=before, check=True)
    assert after.stdout == queued.stdout  # nothing was submitted
