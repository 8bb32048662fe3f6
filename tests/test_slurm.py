"""`./launch cv` on a real Slurm (tests/slurm_cluster.py): a chain that cannot finish is never
submitted. The whole chain on Slurm (2-node folds, a preempted fold requeued and resumed, each
reduce job after its stage) is tests/test_chaos.py's short mode, under faults."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from seg.core.cli import Size
from seg.data.pack import Options, pack
from seg.data.synthetic import make_synthetic
from tests.slurm_cluster import SlurmCluster, slurm_cluster_fixture  # noqa: F401 (registers `slurm_cluster`)

# The time limit counts the test alone (func_only): the session's cluster may first wait for
# another one on this machine (tests/slurm_cluster.py).
pytestmark = [pytest.mark.slurm, pytest.mark.xdist_group("slurm"), pytest.mark.timeout(300, func_only=True)]

REPO = Path(__file__).resolve().parents[1]
STEPS = 16
TINY = [
    "data.size=[32,64]", "data.eval_size=null", "data.workers=0", "train.batch_size=2", "train.log_every=1",
    f"train.iters={STEPS}", f"train.eval_every={STEPS}", "wandb.mode=auto",
]  # fmt: skip


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
