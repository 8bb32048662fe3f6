"""Resumable states on disk: pruning that a kill cannot tear, and a fold without metrics."""

import json
import shutil
from pathlib import Path

import pytest

import seg.checkpoint
from seg.checkpoint import latest_state, prune_states, state_name
from seg.soup import load_fold_models
from seg.weights import WEIGHTS_FORMAT, WeightsError

FILES = ("model.safetensors", "optimizer.bin", "custom_checkpoint_0.pkl", "random_states_0.pkl")


def _state(run: Path, step: int) -> Path:
    state = run / "checkpoints" / state_name(step)
    state.mkdir(parents=True)
    for name in FILES:
        (state / name).write_bytes(b"x" * 10)
    return state


def test_a_prune_killed_midway_leaves_no_torn_state_and_the_next_prune_cleans_up(tmp_path, monkeypatch):
    for step in (10, 20, 30, 40):
        _state(tmp_path, step)
    real_rmtree = shutil.rmtree

    def killed(path, ignore_errors=False):  # deletes one file, then the process dies
        files = sorted(Path(path).glob("*"))
        if files:
            files[0].unlink()
            raise KeyboardInterrupt("killed")
        real_rmtree(path, ignore_errors=ignore_errors)

    monkeypatch.setattr(seg.checkpoint.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        prune_states(tmp_path, keep_last=2, keep=set())
    monkeypatch.setattr(seg.checkpoint.shutil, "rmtree", real_rmtree)
    for state in (tmp_path / "checkpoints").glob("step-*"):  # every state that looks complete is
        assert sorted(p.name for p in state.iterdir()) == sorted(FILES), state
    assert latest_state(tmp_path).name == state_name(40)
    prune_states(tmp_path, keep_last=2, keep=set())
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [state_name(30), state_name(40)]


def test_prune_keeps_the_named_states_and_removes_leftovers_of_a_killed_save(tmp_path):
    for step in (10, 20, 30):
        _state(tmp_path, step)
    (tmp_path / "checkpoints" / ".step-00000040.partial").mkdir()
    prune_states(tmp_path, keep_last=1, keep={state_name(10)})
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [state_name(10), state_name(30)]


def test_the_reducer_refuses_a_fold_without_metrics_clearly(tmp_path):
    fold = tmp_path / "fold0"
    fold.mkdir()
    (fold / "model.safetensors").write_bytes(b"")
    (fold / "model.json").write_text(json.dumps({"format": WEIGHTS_FORMAT, "fold": 0, "metrics": {}}))
    with pytest.raises(WeightsError, match=r"fold 0 has no fold-validation metrics .* rerun its training"):
        load_fold_models(tmp_path, [0], "model")
