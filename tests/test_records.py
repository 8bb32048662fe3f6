"""seg/results/records.py, the one reader of a run's files: a fold's status, its best and
final evaluations and their fallbacks, and errors that name the file."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from seg.core.runs import Stage
from seg.results.records import RecordError, read_stage


def result(miou: float) -> dict:
    return {"miou": miou, "fwiou": miou + 0.2, "iou": {"road": miou}, "samples": 3}


def fold(stage: Path, k: int, evaluations: dict[int, float], summary: dict | None = None, **files: str) -> Path:
    """stage/fold{k}/ with an evaluation record per step of ``evaluations`` (step -> mIoU)."""
    out = stage / f"fold{k}"
    out.mkdir(parents=True)
    records = [{"step": s, "epoch": s / 2, "train/loss": 1.0} for s in range(1, 5)]
    records += [{"step": s, "epoch": s / 2, "fold/miou": m, "fold/iou": {"road": m}} for s, m in evaluations.items()]
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sorted(records, key=lambda r: r["step"])))
    if summary is not None:
        (out / "summary.json").write_text(json.dumps(summary))
    for name, text in files.items():
        (out / name).write_text(text)
    return out


def test_a_folds_status_and_its_evaluations_with_every_fallback(tmp_path):
    stage = tmp_path / "stage1"
    # done, its final evaluation in the summary, the best logged at its step
    fold(stage, 0, {2: 0.5, 4: 0.4}, {"steps": 4, "best": {"miou": 0.5, "step": 2}, "final": {"fold": result(0.4)}})
    # stopped early, no final evaluation in the summary: the last one logged; best = final
    fold(stage, 1, {2: 0.3, 4: 0.6}, {"steps": 4, "stopped_early": True, "best": {"miou": 0.6, "step": 4}})
    # the best step's record is gone (an older log): the summary's mIoU alone
    fold(stage, 2, {4: 0.4}, {"steps": 4, "best": {"miou": 0.7, "step": 3}, "final": {"fold": result(0.4)}})
    fold(stage, 3, {2: 0.2}, PREEMPTED="step 2")  # waiting for its requeue
    fold(stage, 4, {})  # still running
    record = read_stage(Stage.at(stage))
    assert [f.status for f in record.folds] == ["done", "stopped early", "done", "preempted", "in progress"]
    assert [f.fold for f in record.finished()] == [0, 1, 2]
    f0, f1, f2, f3, _ = record.folds
    assert f0.final_evaluation == result(0.4) | {"step": 4} and f0.best_evaluation["miou"] == 0.5
    assert f0.best_evaluation["step"] == 2 and f0.best == (0.5, 2)
    assert f1.final_evaluation["miou"] == 0.6 and f1.final_evaluation["step"] == 4
    assert f1.best_evaluation == f1.final_evaluation
    assert f2.best_evaluation["miou"] == 0.7 and math.isnan(f2.best_evaluation["fwiou"])
    assert f3.best == (0.2, 2) and f3.final_miou == 0.2 and f3.epochs == 2.0
    # what the out-of-fold estimate pools: the summaries' final evaluations, None without one
    assert record.final_fold_results() == {0: result(0.4), 1: None, 2: result(0.4)}
    assert record.final_fold_results([3]) == {3: None}


def test_a_malformed_file_names_itself(tmp_path):
    stage = tmp_path / "stage1"
    bad = fold(stage, 0, {2: 0.5}, {"steps": 4, "best": {"miou": 0.5, "step": "two"}}, **{"config.yaml": "a: [b\n"})
    record = read_stage(Stage.at(stage)).folds[0]
    with pytest.raises(RecordError, match=rf"{bad / 'summary.json'}: best.step is 'two', expected int"):
        record.best_evaluation  # noqa: B018
    with pytest.raises(RecordError, match=rf"{bad / 'config.yaml'}: not a readable YAML config \(line 2"):
        record.config  # noqa: B018
    (bad / "metrics.jsonl").write_text('{"step": 1, "epoch": 0.5}\nnot json\n')
    with pytest.raises(RecordError, match=rf"{bad / 'metrics.jsonl'}:2: not a JSON record"):
        read_stage(Stage.at(stage))
    (bad / "metrics.jsonl").write_text('{"step": 1, "epoch": 0.5}\n{"step": 2, "ep')  # being appended: left out
    assert read_stage(Stage.at(stage)).folds[0].torn
