"""seg/results/tracking.py: what a fold's offline wandb run carries for the wandb UI, and TensorBoard beside it."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from seg.core.cityscapes import CLASS_NAMES
from seg.data.manifest import FoldSplit
from seg.recipe.config import ConfigError, load_config, to_dict
from seg.recipe.identity import fold_identity, run_length
from seg.results.tracking import Tracker, log_reduction
from tests.tiny_training import tiny_shards
from tests.wandb_records import run_config, run_record

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(180)
def test_a_fold_run_carries_experiment_stage_and_fold_as_top_level_fields(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    config = to_dict(load_config(str(REPO / "configs" / "demo.yaml"),
                                 ["data.shards=s", "wandb.mode=offline", "train.experiment=aug-none"], 2))  # fmt: skip
    tracker = Tracker(config, tmp_path, stage=2, fold=3, main_process=True)
    tracker.log({"train/loss": 1.0}, step=1)
    tracker.finish()
    import wandb

    wandb.teardown()  # the service flushes the run file before it stops (finish() alone may return first)
    (record_file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    fields = run_config(record_file)
    assert (fields["experiment"], fields["stage"], fields["fold"]) == ("aug-none", 2, 3)
    assert fields["data"]["shards"] == "s" and fields["train"]["experiment"] == "aug-none"
    run = run_record(record_file)
    assert (run.run_group, run.job_type) == ("aug-none", "stage2-fold3")


@pytest.mark.timeout(180)
def test_both_backends_get_the_same_records(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    overrides = ["data.shards=s", "wandb.mode=offline", "tracking.backends=[wandb,tensorboard]"]
    config = to_dict(load_config(str(REPO / "configs" / "demo.yaml"), overrides))
    tracker = Tracker(config, tmp_path, stage=1, fold=0, main_process=True)
    tracker.log({"train/loss": 1.5, "train/lr": 0.25}, step=1)
    result = {"miou": 0.5, "iou": {name: 0.5 for name in CLASS_NAMES}}
    tracker.log_evaluation("fold", result, torch.eye(len(CLASS_NAMES), dtype=torch.long), [], step=2)
    tracker.finish()
    import wandb

    wandb.teardown()
    (record_file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    assert b"train/loss" in record_file.read_bytes() and b"fold/per_class_iou" in record_file.read_bytes()
    scalars = board_scalars(tmp_path / "tensorboard")
    assert (scalars["train/loss"], scalars["train/lr"], scalars["fold/iou/road"]) == (
        [(1, 1.5)],
        [(1, 0.25)],
        [(2, 0.5)],
    )
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert events.Tags()["images"] == ["fold/confusion"]  # the figure wandb gets too


# --- TensorBoard beside wandb (tracking.backends) ------------------------------------------

TINY = [
    "data.size=[32,64]", "data.eval_size=null", "data.workers=0", "train.batch_size=2", "train.log_every=1",
    "train.eval_every=1", "model.depth=18", "tracking.backends=[tensorboard]", "train.epochs=2",
]  # fmt: skip


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return tiny_shards(tmp_path_factory.mktemp("tracking"))


def train(shards: Path, runs: Path, *extra: str, drill: str = "") -> subprocess.CompletedProcess:
    command = [sys.executable, str(REPO / "seg" / "train.py"), "--config", str(REPO / "configs" / "demo.yaml"),
               "--fold", "0", f"data.shards={shards}", f"train.runs_dir={runs}", *TINY, *extra]  # fmt: skip
    env = os.environ | {"SEG_DRILL": drill}
    return subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO, env=env)


def board_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar TensorBoard shows for the event files in ``folder``: tag -> (step, value)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@pytest.mark.timeout(300)
def test_tensorboard_gets_the_scalars_of_metrics_jsonl_and_a_resume_leaves_no_duplicates(shards, tmp_path):
    fold = tmp_path / "demo" / "stage1" / "fold0"
    config = load_config(REPO / "configs" / "demo.yaml", [f"data.shards={shards}", *TINY])
    per_epoch, _ = run_length(config, FoldSplit.of(shards, 0), 1)
    # killed one step into the second epoch, after logging it: the resumed run (from the first
    # epoch's state) logs that step again
    killed = train(shards, tmp_path, drill=f"{per_epoch + 1}:KILL")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert per_epoch + 1 in [step for step, _ in board_scalars(fold / "tensorboard")["train/loss"]]
    resumed = train(shards, tmp_path)
    assert resumed.returncode == 0 and f"at step {per_epoch}" in resumed.stdout, resumed.stderr[-3000:]
    assert not (fold / "wandb").exists()

    expected: dict[str, list[tuple[int, float]]] = {}
    for line in (fold / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        for key, value in record.items():
            if isinstance(value, int | float) and key != "step":
                expected.setdefault(key, []).append((record["step"], value))
            if key.endswith("/iou"):  # per-class IoU: a table in wandb, scalars in TensorBoard
                for name, iou in value.items():
                    expected.setdefault(f"{key}/{name}", []).append((record["step"], iou))
    scalars = board_scalars(fold / "tensorboard")
    assert {"train/loss", "train/lr", "fold/miou", "fold/iou/road"} <= expected.keys()
    assert set(scalars) - {"step"} == set(expected)
    for tag, points in expected.items():  # each step once, with the value metrics.jsonl holds (float32)
        assert [s for s, _ in scalars[tag]] == [s for s, _ in points], tag
        assert [v for _, v in scalars[tag]] == pytest.approx([v for _, v in points], rel=1e-6, nan_ok=True), tag
    # the backends are not the run's identity: the fold is the same run whatever logs it
    other = load_config(REPO / "configs" / "demo.yaml", [f"data.shards={shards}", *TINY, "tracking.backends=[]"])
    split = FoldSplit.of(shards, 0)
    assert fold_identity(other, 1, split, None, 1) == fold_identity(config, 1, split, None, 1)


def test_a_backend_that_is_unknown_or_not_installed_is_refused_in_one_line(monkeypatch, capsys):
    argv = [str(REPO / "configs" / "demo.yaml"), ["data.shards=s", "tracking.backends=[wandb,mlflow]"]]
    with pytest.raises(ConfigError, match=r"'tracking.backends' \(on the command line\): 'mlflow' is not one of"):
        load_config(*argv)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else find_spec(name, *a)
    )
    from seg.train import main

    assert (
        main(["--config", str(REPO / "configs" / "demo.yaml"), "--fold", "0", "tracking.backends=[tensorboard]"]) == 2
    )
    err = capsys.readouterr().err
    assert err == ("error: config key 'tracking.backends' (on the command line): tensorboard is asked for but "
                   "tensorboard is not installed (pip install -e '.[tensorboard]')\n")  # fmt: skip
    assert load_config(str(REPO / "configs" / "demo.yaml"), ["data.shards=s"]).tracking.backends == ["wandb"]


def test_a_reduction_is_logged_to_tensorboard_in_the_stage_folder(tmp_path):
    from tests.test_report import reduction_report

    stage = tmp_path / "runs" / "study" / "stage2"
    stage.mkdir(parents=True)
    plot = tmp_path / "reduction.png"
    Image.fromarray(np.full((20, 30, 3), 200, dtype=np.uint8)).save(plot)
    config = {"train": {"experiment": "study"}, "wandb": {"project": "seg", "entity": None, "mode": "offline"},
              "tracking": {"backends": ["tensorboard"]}}  # fmt: skip
    log_reduction(config, 2, reduction_report(stage, [0, 1, 2]), stage, plot)
    assert not (stage / "wandb").exists()  # only what was asked for
    scalars = board_scalars(stage / "tensorboard")
    assert scalars["winner/miou"] == [(2, pytest.approx(0.4612))]
    assert scalars["selection/samples"] == [(2, 12.0)]
