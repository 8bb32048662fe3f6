"""The run folder: its path objects, resumable states (pruning that a kill cannot tear), a fold without metrics."""

import json
import shutil
from pathlib import Path

import pytest

import seg.core.runs
from seg.core.runs import (
    INTERRUPTION,
    Experiment,
    Fold,
    Stage,
    fold_number,
    latest_state,
    prune_states,
    stage_number,
    state_name,
)
from seg.model.weights import WEIGHTS_FORMAT, WeightsError
from seg.reduction.soup import load_fold_models

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

    monkeypatch.setattr(seg.core.runs.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        prune_states(tmp_path, keep_last=2, keep=set())
    monkeypatch.setattr(seg.core.runs.shutil, "rmtree", real_rmtree)
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


def test_a_state_saved_when_the_run_was_stopped_goes_once_a_newer_one_exists(tmp_path):
    """Found by tools/chaos.py: a preemption's state at step 11 outlived the run's end, where
    a run never stopped keeps 10 and 12: the fold's states now end the same either way."""
    for step in (6, 8, 10):
        _state(tmp_path, step)
    (_state(tmp_path, 11) / INTERRUPTION).write_text("saved when the run was preempted at step 11\n")

    def names() -> list[str]:
        return sorted(p.name for p in (tmp_path / "checkpoints").iterdir())

    prune_states(tmp_path, keep_last=2, keep=set())  # the newest: kept, to resume from
    assert names() == [state_name(10), state_name(11)]
    _state(tmp_path, 12)
    prune_states(tmp_path, keep_last=2, keep=set())
    assert names() == [state_name(10), state_name(12)]  # as a run never stopped keeps them


def test_the_reducer_refuses_a_fold_without_metrics_clearly(tmp_path):
    fold = tmp_path / "fold0"
    fold.mkdir()
    (fold / "model.safetensors").write_bytes(b"")
    (fold / "model.json").write_text(json.dumps({"format": WEIGHTS_FORMAT, "fold": 0, "metrics": {}}))
    with pytest.raises(WeightsError, match=r"fold 0 has no fold-validation metrics .* rerun its training"):
        load_fold_models(tmp_path, [0], "model")


def test_the_run_folder_is_named_by_its_path_objects_and_numbers_parse_back(tmp_path):
    experiment = Experiment.named(tmp_path / "runs", "study")
    assert experiment.dir == tmp_path / "runs" / "study" and experiment.name == "study"
    assert experiment.logs == experiment.dir / "logs"
    stage = experiment.stage(2)
    assert stage == Stage(experiment.dir / "stage2", 2) == Stage.at(experiment.dir / "stage2")
    assert stage.reduced_model == stage.dir / "reduced" / "model.safetensors"
    assert (
        stage.reduced_ensemble.parent == stage.reduced_report.parent == stage.reduction_figure.parent == stage.reduced
    )
    fold = stage.fold(3)
    assert fold == Fold(stage.dir / "fold3", 3) == Fold.at(stage.dir / "fold3")
    assert fold.weights() == fold.dir / "best.safetensors" and fold.weights("model") == fold.dir / "model.safetensors"
    assert (fold.config.name, fold.summary.name, fold.metrics.name) == ("config.yaml", "summary.json", "metrics.jsonl")
    assert fold.preempted.name == "PREEMPTED" and fold.checkpoints == fold.dir / "checkpoints"
    assert (stage_number("stage2"), fold_number("fold3"), fold_number("fold12")) == (2, 3, 12)
    assert [fold_number(n) for n in ("fold_x", "fold3.tmp", "fold", "stage1")] == [None] * 4
    assert Stage.at(tmp_path / "somewhere").number is None

    assert stage.folds() == [] and experiment.stages() == []  # nothing on disk yet
    for name in ("fold10", "fold2", "fold0", "fold_x", "fold3.tmp", "reduced"):
        (stage.dir / name).mkdir(parents=True)
    (stage.dir / "fold7").write_text("a file, not a fold")
    assert [f.number for f in stage.folds()] == [0, 2, 10]
    assert stage.folds()[1] == stage.fold(2)
    (experiment.dir / "stage1").mkdir()
    (experiment.dir / "stage_old").mkdir()
    assert [s.number for s in experiment.stages()] == [1, 2]
