"""seg/train.py on a tiny synthetic fold, as the training tests run it."""

import json
import os
import subprocess
import time
from pathlib import Path

from seg.core.cli import Size
from seg.core.launch import launch_command
from seg.data.pack import Options, pack
from seg.data.synthetic import make_synthetic

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "data.size=[32,64]", "data.eval_size=null", "data.workers=0", "train.batch_size=2", "train.log_every=1",
    "train.eval_every=1", "wandb.mode=disabled", "model.depth=18",
]  # fmt: skip


def tiny_shards(folder: Path, shard_size: int | None = None) -> Path:
    """A tiny synthetic Cityscapes packed into 2 folds and val under ``folder`` (one shard per
    group, or shards of about ``shard_size`` bytes)."""
    root = folder / "cityscapes"
    make_synthetic(root, counts={"train": 16, "val": 4, "test": 0}, cities={"train": 4, "val": 1, "test": 1},
                   size=Size(32, 64), progress=False)  # fmt: skip
    out = root.parent / "shards"
    sized = {"shard_size": shard_size} if shard_size else {}
    pack(root, out, Options(folds=2, splits=("train", "val"), **sized), progress=False)
    return out


def command(shards: Path, runs: Path, *extra: str, processes: int = 1) -> list[str]:
    script = [str(REPO / "seg" / "train.py"), "--config", str(REPO / "configs" / "demo.yaml"), "--fold", "0",
              f"data.shards={shards}", f"train.runs_dir={runs}", *TINY, *extra]  # fmt: skip
    return [*launch_command(processes), *script]


def run(
    shards: Path, runs: Path, *extra: str, processes: int = 1, drill: str = "", env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """seg/train.py to its end; ``drill``: a signal it sends itself after a step (SEG_DRILL);
    ``env``: more environment variables."""
    env = os.environ | ({"SEG_DRILL": drill} if drill else {}) | (env or {})
    return subprocess.run(command(shards, runs, *extra, processes=processes), capture_output=True, text=True,
                          timeout=600, cwd=REPO, env=env)  # fmt: skip


FOLD = Path("demo/stage1/fold0")


def wait_for(predicate, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.time() < deadline, "timed out"
        time.sleep(0.2)


def steps_logged(path: Path) -> int:
    if not path.exists():
        return 0
    return max((json.loads(line)["step"] for line in path.read_text().splitlines() if line), default=0)
