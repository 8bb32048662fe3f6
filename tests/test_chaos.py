"""tools/chaos.py: its plan and its comparison here; its short mode on a real Slurm, 2 stages x 2
folds (the long mode's chain has 3 folds), 5 faults (which also covers what the chain test of
tests/test_slurm.py covered: two stages of 2-node folds through ./launch cv, a fold preempted by
Slurm's time-limit warning, requeued and resumed, each reduction after its stage)."""

from __future__ import annotations

import json
import math
import os
import time
from collections import Counter
from datetime import datetime
from pathlib import Path

import pytest
import torch

from tests.slurm_cluster import SlurmCluster, slurm_cluster_fixture  # noqa: F401 (registers `slurm_cluster`)
from tools.chaos import chaos, clock_key, compare, main, table
from tools.chaos_injector import Chain, Injector, scancel, submitted_jobs
from tools.chaos_plan import FOLDS, KINDS, STAGES, STEPS, Fault, plan, rounds, target


def test_a_seed_draws_the_same_plan_and_uses_every_kind_before_repeating():
    first, again, other = plan(7, 12, list(KINDS)), plan(7, 12, list(KINDS)), plan(8, 12, list(KINDS))
    assert first == again and first != other
    kinds = [f.kind for f in sorted(first, key=lambda f: f.index)]
    assert sorted(kinds[: len(KINDS)]) == sorted(KINDS)  # the first ten: each kind once
    assert all(1 <= f.stage <= STAGES and 0 <= f.fold < FOLDS and 1 <= f.step < STEPS for f in first)
    assert [(f.stage, f.step) for f in first] == sorted((f.stage, f.step) for f in first)  # in the order they come
    assert {f.fold for f in plan(7, 12, list(KINDS), folds=2)} == {0, 1}


def test_many_faults_run_in_rounds_one_on_each_target_each_in_the_plans_order():
    faults = plan(1, 50, list(KINDS))
    batches = rounds(faults, 8)
    assert sorted(f.index for b in batches for f in b) == list(range(50))
    for batch in batches:
        assert len(batch) <= 8 and len({target(f) for f in batch}) == len(batch)  # a target once a round
        assert [(f.stage, f.step, f.index) for f in batch] == sorted((f.stage, f.step, f.index) for f in batch)
    assert len(batches) == max(
        Counter(target(f) for f in faults).values()
    )  # no more rounds than the busiest target needs
    short = plan(1132, 5, ["kill-rank", "scancel-kill", "usr1-batch", "preempt", "duplicate"], folds=2)
    assert rounds(short, 8) == [short]  # the short mode: one chain, its two faults on one fold included


def test_a_fault_waits_while_an_earlier_one_on_its_target_recovers(tmp_path: Path):
    """The injector's target is the plan's: two kill-reduces of one stage that drew different
    folds hit one reduction, so the second waits; a fold's fault waits for its fold only."""
    chain = Chain(cluster=None, runs=tmp_path, shards=tmp_path, folds=2)  # type: ignore[arg-type]
    first, second = Fault(0, "kill-reduce", 1, 0, 3, 0), Fault(1, "kill-reduce", 1, 1, 5, 0)
    on_fold, other_fold = Fault(2, "kill-rank", 1, 0, 4, 0), Fault(3, "kill-rank", 1, 1, 4, 0)
    again = Fault(4, "usr1", 1, 0, 6, 0)
    injector = Injector(chain, [first, second, on_fold, other_fold, again])
    assert not any(injector.busy(f) for f in injector.faults)
    first.fired, on_fold.fired = 1.0, 2.0
    assert injector.busy(second) and injector.busy(again) and not injector.busy(other_fold)
    first.recovered, on_fold.recovered = 3.0, 4.0
    assert not injector.busy(second) and not injector.busy(again)


@pytest.mark.parametrize(
    ("key", "clock"),
    [("train/step_time", True), ("wall_s", True), ("images_per_s", True), ("since", True), ("host", True),
     ("train/data_wait_share", True), ("train/memory_mb", True),
     ("train/loss", False), ("candidates", False), ("val/miou", False), ("steps", False), ("skipped", False)],
)  # fmt: skip
def test_clock_keys_are_told_from_results(key: str, clock: bool):
    assert clock_key(key) is clock


def experiment(root: Path, name: str, steps: int = STEPS) -> Path:
    """A fake experiment folder: one fold's weights, metrics, summary; one reduction."""
    fold = root / name / "demo" / "stage1" / "fold0"
    fold.mkdir(parents=True)
    (fold / "model.safetensors").write_bytes(b"weights")
    lines = [json.dumps({"step": s, "train/loss": 1.0 / s, "train/step_time": 0.1 * s, "fold/iou": {"train": math.nan}})
             for s in range(1, steps + 1)]  # fmt: skip
    (fold / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (fold / "summary.json").write_text(json.dumps({"steps": steps, "wall_s": 3.0, "init_from": f"{root}/{name}/x"}))
    (fold / "model.json").write_text(json.dumps({"config": {"train": {"runs_dir": f"{root}/{name}"}}}))
    reduced = root / name / "demo" / "stage1" / "reduced"
    reduced.mkdir()
    (reduced / "model.safetensors").write_bytes(b"reduced")
    (root / name / "demo" / "logs").mkdir()
    (root / name / "demo" / "logs" / "whatever.log").write_text(name)  # logs are not compared
    return root / name / "demo"


def test_equal_chains_compare_equal_wall_times_paths_and_logs_aside(tmp_path: Path):
    reference, chain = experiment(tmp_path, "reference"), experiment(tmp_path, "chaos")
    summary = chain / "stage1" / "fold0" / "summary.json"
    summary.write_text(summary.read_text().replace('"wall_s": 3.0', '"wall_s": 9.5'))
    problems, counts = compare(reference, chain)
    assert problems == []
    assert counts == {"metrics logs": 1, "summaries and reports (json)": 2, "weights files": 2}


def test_a_differing_weight_a_lost_or_doubled_step_and_a_leftover_are_each_found(tmp_path: Path):
    reference, chain = experiment(tmp_path, "reference"), experiment(tmp_path, "chaos")
    (chain / "stage1" / "reduced" / "model.safetensors").write_bytes(b"reduceD")
    metrics = chain / "stage1" / "fold0" / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join([*lines[:3], lines[2], *lines[3:]]) + "\n")  # step 3 twice
    (chain / "stage1" / "fold0" / ".lease").write_text("{}")
    (chain / "stage1" / "fold0" / "PREEMPTED").write_text("{}")
    (chain / "stage1" / "fold0" / "checkpoints" / ".step-00000004.partial").mkdir(parents=True)
    problems = "\n".join(compare(reference, chain)[0])
    assert "stage1/reduced/model.safetensors: weights differ" in problems
    assert f"training steps [1, 2, 3, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], not 1..{STEPS} once each" in problems
    for left in (".lease", "PREEMPTED", "checkpoints/.step-00000004.partial"):
        assert f"left behind: stage1/fold0/{left}" in problems
    assert "files differ: extra" in problems


def test_a_changed_value_in_metrics_or_a_summary_is_found(tmp_path: Path):
    reference, chain = experiment(tmp_path, "reference"), experiment(tmp_path, "chaos")
    metrics = chain / "stage1" / "fold0" / "metrics.jsonl"
    metrics.write_text(metrics.read_text().replace('"train/loss": 0.5,', '"train/loss": 0.50001,'))
    summary = chain / "stage1" / "fold0" / "summary.json"
    summary.write_text(summary.read_text().replace('"steps": 12', '"steps": 11'))
    problems = compare(reference, chain)[0]
    assert any("metrics.jsonl: records differ from the reference's at [1].train/loss: 0.5 != 0.50001" in p
               for p in problems)  # fmt: skip
    assert "stage1/fold0/summary.json: differs (wall times aside) at steps: 12 != 11" in problems


def test_a_progress_record_is_compared_by_its_values_wall_times_aside(tmp_path: Path):
    """accelerate's custom_checkpoint_1.pkl is the progress, compared by value as the JSON files are
    (training keeps an evaluation's seconds out of it, but a wall time there would not be a result)."""
    reference, chain = experiment(tmp_path, "reference"), experiment(tmp_path, "chaos")

    def state(root: Path, miou: float, seconds: float) -> None:
        folder = root / "stage1" / "fold0" / "checkpoints" / "step-00000006"
        folder.mkdir(parents=True)
        torch.save(
            {"step": 6, "final": {"fold": {"miou": miou, "seconds": seconds}}}, folder / "custom_checkpoint_1.pkl"
        )

    state(reference, 0.25, 1.5)
    state(chain, 0.25, 4.0)
    problems, counts = compare(reference, chain)
    assert problems == [] and counts["state records (pkl)"] == 1
    torch.save({"step": 6, "final": {"fold": {"miou": 0.5, "seconds": 4.0}}},
               chain / "stage1" / "fold0" / "checkpoints" / "step-00000006" / "custom_checkpoint_1.pkl")  # fmt: skip
    assert compare(reference, chain)[0] == [
        "stage1/fold0/checkpoints/step-00000006/custom_checkpoint_1.pkl: state differs at final.fold.miou: 0.25 != 0.5"
    ]


def test_a_rerun_s_submission_is_read_with_what_it_left_out_and_done_when_its_own_jobs_are(tmp_path: Path):
    """./launch cv on Slurm leaves out what finished before (seg/cv.py's work_left)."""
    output = (
        "stage 1: finished before (every fold trained and reduced), skipped\n"
        "stage 2: folds 21 (array 1; fold 0 finished before), reduce 22\n"
        "logs: /x/logs/   final model: /x/stage2/reduced/model.safetensors\n"
    )
    assert submitted_jobs(output) == [(1, "", "", []), (2, "21", "22", [1])]
    assert submitted_jobs("stage 1: every fold finished before, reduce 7 (a fold was trained again)\n") == [
        (1, "", "7", [])
    ]
    chain = Chain(cluster=None, runs=tmp_path, shards=tmp_path, folds=2)  # type: ignore[arg-type]
    chain.submissions.append(submitted_jobs(output))
    assert chain.jobs == ["21", "22"] and chain.array(1) == "" and chain.reduce(2) == "22"
    assert not chain.done({"21_1": "COMPLETED"}) and chain.done({"21_1": "COMPLETED", "22": "COMPLETED"})
    chain.submissions.append(submitted_jobs("done: every stage finished before, nothing submitted; final model x\n"))
    assert chain.jobs == [] and chain.array(2) == chain.reduce(2) == "" and chain.done({})


def test_a_chain_failed_for_its_disk_is_told_by_the_log_written_since_its_submission(tmp_path: Path):
    """A full disk is no fault a rerun recovers from: the injector stops instead of rerunning."""
    chain = Chain(cluster=None, runs=tmp_path / "runs", shards=tmp_path, folds=2)  # type: ignore[arg-type]
    logs = chain.experiment.logs
    logs.mkdir(parents=True)
    old = logs / "stage1-fold0-3.log"
    old.write_text("error: saving the state to x failed: no space left on the device (0 kB free): free space\n")
    os.utime(old, (1, 1))  # before the submission: a disk since freed
    chain.submitted_at = time.time() - 1
    assert chain.disk_full() is None
    (logs / "stage1-fold1-5.log").write_text("step 3/12 loss 4.1\nwriting y failed: disk quota exceeded: free space\n")
    assert chain.disk_full() == "stage1-fold1-5.log: writing y failed: disk quota exceeded: free space"


@pytest.mark.parametrize("kind", ["scancel-kill", "kill-in-save", "usr1-batch", "usr1", "preempt"])
def test_a_fault_signals_one_array_task_not_the_whole_array(kind: str):
    """Found by the short mode: the job id of an array's task 13_1 was 13, the array's own, and
    `scancel --batch -s USR1 13` requeued both folds."""
    command = scancel(kind, "13_1")
    assert command[0] == "scancel" and command[-1] == "13_1" and "13" not in command


def test_unknown_kinds_or_no_faults_are_refused_with_exit_2(capsys: pytest.CaptureFixture[str]):
    assert main(["--kinds", "kill-rank,meteor"]) == 2
    assert "'kill-rank,meteor'" in capsys.readouterr().err
    for count, least in (("--faults", 1), ("--per-round", 1), ("--folds", 2)):
        with pytest.raises(SystemExit) as refused:
            main([count, str(least - 1)])
        assert refused.value.code == 2
        assert capsys.readouterr().err.endswith(f"error: argument {count}: {least - 1}: at least {least}\n")


def test_a_json_or_workdir_that_cannot_be_written_is_refused_before_any_chain(capsys, monkeypatch, tmp_path: Path):
    """Found by a user: --json into a missing folder ran every chain, then a traceback."""
    import tools.chaos
    from seg.core.storage import EXIT_STORAGE
    from tests.disks import tmpfs

    def no_work(*args, **kwargs):
        raise AssertionError("a chain started: the path should have been refused first")

    monkeypatch.setattr(tools.chaos, "running_cluster", no_work)
    missing = tmp_path / "missing" / "chaos.json"
    for path, line in ((missing, f"its folder {missing.parent} does not exist"), (tmp_path, "is a folder")):
        with pytest.raises(SystemExit) as refused:
            main(["--json", str(path), "--workdir", str(tmp_path / "work")])
        assert refused.value.code == 2
        assert f"error: --json {path}: {line}" in capsys.readouterr().err
    with tmpfs(tmp_path / "ro", "1m", read_only=True) as read_only:
        with pytest.raises(SystemExit) as refused:
            main(["--json", str(read_only / "chaos.json"), "--workdir", str(tmp_path / "work")])
        assert refused.value.code == EXIT_STORAGE
        assert f"cannot create files in {read_only} (read-only file system)" in capsys.readouterr().err
        assert main(["--workdir", str(read_only / "work")]) == EXIT_STORAGE
        assert f"error: --workdir {read_only / 'work'}: cannot create files in {read_only}" in capsys.readouterr().err


def test_a_disk_that_fills_before_the_json_is_written_is_one_line_and_exit_74(capsys, monkeypatch, tmp_path: Path):
    """The chains' states can fill the disk the result goes to: the table is printed, then one line."""
    import contextlib
    import errno

    import seg.core.storage as storage
    import tools.chaos

    result = {"seed": 1, "folds": 2, "faults": [], "by_kind": {}, "recoveries": {}, "time_lost_s": 0.0,
              "chaos_wall_s": 1.0, "reference_wall_s": 1.0, "compared": {}, "problems": [],
              "verdict": "identical"}  # fmt: skip

    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(tools.chaos, "running_cluster", lambda folder: contextlib.nullcontext(None))
    monkeypatch.setattr(tools.chaos, "chaos", lambda *args: result)
    monkeypatch.setattr(storage, "atomic_write_bytes", full)  # under write_json_result
    assert main(["--json", str(tmp_path / "chaos.json"), "--workdir", str(tmp_path / "work")]) == 74
    out, err = capsys.readouterr()
    assert "verdict: identical" in out
    assert err.startswith("error: ") and "no space left" in err and err.count("\n") == 1, err


# --- the short mode on a real Slurm -------------------------------------------------------------

SHORT_KINDS = ["kill-rank", "scancel-kill", "usr1-batch", "preempt", "duplicate"]
# 2 folds, not the chain's 3: two fewer 2-process jobs on the suite's 2 cores for every stage of
# both chains. Seed 1132 draws a short critical path: stage 1's folds killed at step 10 (one by
# kill-rank, one by scancel-kill: one rerun), stage 2's fold 1 warned (usr1-batch at step 2,
# requeued) and submitted twice (step 3) while fold 0 is preempted at step 9 (a second rerun).
SHORT_SEED, SHORT_FOLDS = 1132, 2


@pytest.mark.slurm
@pytest.mark.xdist_group("slurm")
# 220-294 s measured alone on 2 cores at a load of 2-5 (CI runs the rest of the suite beside it);
# func_only: the session's cluster may first wait for another on this machine.
@pytest.mark.timeout(900, func_only=True)
def test_five_faults_on_a_whole_chain_end_bit_identical(slurm_cluster: SlurmCluster, tmp_path: Path):
    result = chaos(slurm_cluster, tmp_path, SHORT_SEED, len(SHORT_KINDS), SHORT_KINDS, timeout=600, folds=SHORT_FOLDS)
    print(table(result))
    assert result["verdict"] == "identical", table(result)
    assert sorted(result["by_kind"]) == sorted(SHORT_KINDS)
    assert all(f["fired"] is not None and f["recovered"] is not None for f in result["faults"]), table(result)
    duplicate = next(f for f in result["faults"] if f["kind"] == "duplicate")
    assert duplicate["outcome"] in ("refused by the lease", "found the fold finished"), table(result)
    warned = next(f for f in result["faults"] if f["kind"] == "usr1-batch")
    assert warned["outcome"] == "requeued, resumed", table(result)

    # Every fold ran on two machine ranks, one on each node; stage 2 started from stage 1's model.
    reference, chain = Path(result["reference"]), Path(result["chaos"])
    for stage in range(1, STAGES + 1):
        for fold in range(SHORT_FOLDS):
            summary = json.loads((chain / f"stage{stage}" / f"fold{fold}" / "summary.json").read_text())
            assert (summary["machines"], summary["nodes"], summary["processes"]) == ([0, 1], ["n1", "n2"], 2)
            seed = chain / "stage1" / "reduced" / "model.safetensors"
            assert summary["init_from"] == (str(seed) if stage == 2 else None)
            assert list((chain / f"stage{stage}" / f"fold{fold}" / "wandb").glob("offline-run-*"))
        assert list((chain / f"stage{stage}" / "wandb").glob("offline-run-*")), "the reduction's wandb run"

    # Slurm's time-limit warning reads as a preemption in the fold's log: no traceback, one reaction.
    log = "\n".join(p.read_text() for p in (chain / "logs").glob(f"stage{warned['stage']}-fold{warned['fold']}-*.log"))
    assert "state saved, requeued" in log and "restart 1" in log and "resumed from" in log

    # The undisturbed chain: each reduce job started only after every fold of its stage had ended.
    records = [dict(f.split("=", 1) for f in line.split() if "=" in f)
               for line in (slurm_cluster.dir / "jobcomp.txt").read_text().splitlines()]  # fmt: skip
    jobs = [line for line in result["reference_jobs"]]

    def times(job: str, key: str) -> list[datetime]:
        return [datetime.fromisoformat(r[key]) for r in records if job in (r.get("ArrayJobId"), r["JobId"])]

    for stage, array, reduce in jobs:
        assert min(times(reduce, "StartTime")) >= max(times(array, "EndTime"))
        if stage > 1:
            assert min(times(array, "StartTime")) >= max(times(jobs[stage - 2][2], "EndTime"))
    assert reference != chain
