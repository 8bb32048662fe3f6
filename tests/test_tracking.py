"""seg/tracking.py: what a fold's offline wandb run carries for the wandb UI."""

from __future__ import annotations

from pathlib import Path

import pytest

from seg.config import load_config, to_dict
from seg.tracking import Tracker
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
