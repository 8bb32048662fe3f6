"""seg/train.py as users run it: python, accelerate launch, signals, resume, wandb offline."""

import json
import math
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from seg.core import lease
from seg.core.atomic import current_umask
from seg.core.cli import Size
from seg.core.launch import launch_command
from seg.data.pack import Options, pack
from seg.data.synthetic import make_synthetic
from seg.reduction.soup import load_fold_models
from seg.train import main
from seg.training.records import EXIT_REQUEUE
from seg.training.step import LogWindow
from tests.tiny_training import FOLD, REPO, command, run, steps_logged, tiny_shards, wait_for
from tests.wandb_records import run_record as wandb_run_record


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return tiny_shards(tmp_path_factory.mktemp("train"))


def test_two_processes_equal_one_process_with_twice_the_batch(tmp_path):
    """One step of the real parts in float64: the same loss, gradients, BN statistics and
    metrics to 1e-10 (relative); in float32 both sides carry their own rounding."""
    harness = str(REPO / "tests" / "ddp_harness.py")
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    subprocess.run([sys.executable, harness, str(one), "float64"], check=True, capture_output=True, timeout=300)
    done = subprocess.run(
        [*launch_command(2), harness, str(two), "float64"], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = torch.load(one), torch.load(two)
    assert (a["world"], b["world"]) == (1, 2)
    torch.testing.assert_close(b["loss"], a["loss"], rtol=1e-10, atol=0)
    for name, grad in a["grads"].items():
        torch.testing.assert_close(b["grads"][name], grad, rtol=1e-10, atol=1e-14, msg=name)
    for name, buffer in a["buffers"].items():
        torch.testing.assert_close(b["buffers"][name], buffer, rtol=1e-10, atol=1e-14, msg=name)
    assert torch.equal(a["matrix"], b["matrix"]) and a["matrix"].sum() > 0


def test_a_run_writes_its_outputs(shards, tmp_path):
    done = run(shards, tmp_path, "train.epochs=2")
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / FOLD
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 * summary["steps_per_epoch"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "train/loss" in r] == list(range(1, summary["steps"] + 1))
    # how long each log step's window waited for the loader (data.workers=0: the decoding itself)
    waits = [(r["train/data_wait_s"], r["train/data_wait_share"]) for r in records if "train/loss" in r]
    assert all(s > 0 and 0 < share <= 1 for s, share in waits), waits
    evaluations = [r for r in records if "fold/miou" in r]
    assert len(evaluations) == 2 and set(evaluations[0]["fold/iou"]) >= {"road", "sky"}
    sidecar = json.loads((out / "model.json").read_text())
    assert sidecar["fold"] == 0 and sidecar["stage"] == 1 and sidecar["config"]["model"]["depth"] == 18
    assert set(load_file(out / "model.safetensors")) >= {"backbone.conv1.weight", "classifier.weight"}
    assert (out / "best.safetensors").is_file() and (out / "config.yaml").is_file()
    # every output, resumable states included, readable as plain open() makes files (umask)
    expected = 0o666 & ~current_umask()
    modes = {p.relative_to(out).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in out.rglob("*") if p.is_file()}
    assert {p: m for p, m in modes.items() if m != expected} == {}
    before = (out / "model.safetensors").read_bytes(), (out / "summary.json").read_text()
    config_before = (out / "config.yaml").stat().st_mtime_ns
    # a writer killed after its last write left its lease: the next look at the finished fold removes it
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (out / ".lease").write_text(json.dumps(lease._me("training of stage 1 fold 0") | {"pid": int(dead.stdout)}))
    again = run(shards, tmp_path, "train.epochs=2")  # a requeued or repeated job: nothing to redo
    assert again.returncode == 0 and "is complete" in again.stdout
    assert "removed the lease of training of stage 1 fold 0" in again.stdout and not (out / ".lease").exists()
    # decided from the fold's files: no state loaded, nothing rewritten (not even config.yaml)
    assert "resumed from" not in again.stdout and (out / "config.yaml").stat().st_mtime_ns == config_before
    assert ((out / "model.safetensors").read_bytes(), (out / "summary.json").read_text()) == before
    per_epoch = summary["steps_per_epoch"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        f"step-{per_epoch:08d}",
        f"step-{2 * per_epoch:08d}",
    ]

    # Found while writing tools/chaos.py: an attempt killed while exporting its final weights
    # (or pruning its last states) leaves hidden temporary files, and the rerun, resumed from
    # the final state, saves nothing more, so no prune ever removed them. The rerun does.
    (out / "summary.json").unlink()  # killed before the outputs were all written
    leftovers = [out / ".model.safetensors.k1ll3d.tmp", out / "checkpoints" / ".step-00000001.deleting",
                 out / "checkpoints" / ".step-00000009.partial"]  # fmt: skip
    leftovers[0].write_bytes(before[0][:100])
    for folder in leftovers[1:]:
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"torn")
    resumed = run(shards, tmp_path, "train.epochs=2")
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stderr[-3000:]
    assert [p for p in leftovers if p.exists()] == []
    assert (out / "model.safetensors").read_bytes() == before[0] and (out / "summary.json").is_file()


def test_two_ranks_given_unequal_numbers_of_evaluation_images_finish_the_evaluation(tmp_path):
    """Found by tools/chaos.py: the evaluated model was DDP's, whose forward is a collective,
    and 7 held-out images over 2 ranks (4 and 3, one per batch) left one rank in that forward
    and the other in the metrics' all-reduce, forever."""
    root = tmp_path / "cityscapes"
    make_synthetic(root, counts={"train": 9, "val": 1, "test": 0}, cities={"train": 2, "val": 1, "test": 1},
                   size=Size(32, 64), progress=False)  # fmt: skip
    manifest = pack(root, tmp_path / "shards", Options(folds=2, splits=("train", "val")), progress=False)
    held_out = manifest["counts"]["folds"][0]
    assert held_out % 2 == 1, manifest["counts"]  # fold 0's held-out images do not split evenly
    done = subprocess.run(command(tmp_path / "shards", tmp_path, "train.iters=2", processes=2), capture_output=True,
                          text=True, timeout=300, cwd=REPO)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / FOLD / "metrics.jsonl").read_text().splitlines()]
    assert [r["fold/samples"] for r in records if "fold/miou" in r] == [held_out, held_out]


def test_a_killed_run_resumes_to_the_weights_of_one_never_stopped(shards, tmp_path):
    epochs = ["train.epochs=3"]
    assert run(shards, tmp_path / "whole", *epochs).returncode == 0
    per_epoch = json.loads((tmp_path / "whole" / FOLD / "summary.json").read_text())["steps_per_epoch"]
    # SIGKILL, past the first state and mid-epoch, at an exact step whatever the machine's load
    killed = run(shards, tmp_path / "killed", *epochs, drill=f"{per_epoch + 1}:KILL")
    out = tmp_path / "killed" / FOLD
    assert killed.returncode == -signal.SIGKILL and steps_logged(out / "metrics.jsonl") == per_epoch + 1
    assert not (out / "summary.json").exists()
    resumed = run(shards, tmp_path / "killed", *epochs)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    whole = load_file(tmp_path / "whole" / FOLD / "model.safetensors")
    again = load_file(out / "model.safetensors")
    for name, tensor in whole.items():
        assert torch.equal(again[name], tensor), name
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [json.loads(line)["step"] for line in (tmp_path / "whole" / FOLD / "metrics.jsonl").open()]
    # the resumable states too, byte for byte: no wall time in them (an evaluation's seconds were)
    states = sorted((tmp_path / "whole" / FOLD / "checkpoints").glob("step-*"))
    assert states and [s.name for s in states] == sorted(s.name for s in (out / "checkpoints").glob("step-*"))
    for state in states:
        for part in state.iterdir():
            assert (out / "checkpoints" / state.name / part.name).read_bytes() == part.read_bytes(), part


def test_sigusr1_on_one_rank_stops_every_rank_at_the_same_step_and_a_job_script_reads_the_marker(
    shards, tmp_path, monkeypatch
):
    # as slurm/fold.sh runs it: a preempted rank exits 0, so torchrun prints no failure
    monkeypatch.setenv("SEG_PREEMPTED_EXIT", "0")
    epochs = "train.epochs=4"  # 8 steps; rank 1 alone is signalled after step 3: all must stop there
    done = run(shards, tmp_path, epochs, processes=2, drill="3:USR1:1")
    out = tmp_path / FOLD
    stops = re.findall(r"rank (\d): preempted, state saved at step (\d+); exit 0", done.stdout)
    assert sorted(stops) == [("0", "3"), ("1", "3")], done.stdout[-2000:]
    # the marker file is what the job script reads; the launcher's log shows no failure
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "ChildFailedError" not in done.stderr, done.stderr[-3000:]
    marker = json.loads((out / "PREEMPTED").read_text())
    assert (out / "checkpoints" / marker["state"]).is_dir() and not (out / "summary.json").exists()
    resumed = run(shards, tmp_path, epochs, processes=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not (out / "PREEMPTED").exists() and (out / "summary.json").exists()
    # what the learning rate goes with, said once by the main process
    assert resumed.stdout.count("global batch 4 = 2 process(es) x train.batch_size 2 x train.grad_accum 1\n") == 1


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 cores for 2 workers")
def test_a_resume_on_a_machine_with_fewer_cores_keeps_the_workers_of_the_first_start(shards, tmp_path):
    """data.workers=auto is fixed at the run's first start (each worker draws its own share of
    an epoch): a requeue onto 1 core keeps 2 workers and ends where a run never stopped ends
    (with 1 worker it would be refused as another run, 3 steps per epoch instead of 4)."""
    auto = ["train.epochs=2", "train.eval_every=2", "data.workers=auto"]
    two, one = {"SLURM_CPUS_PER_TASK": "2"}, {"SLURM_CPUS_PER_TASK": "1"}
    assert run(shards, tmp_path / "whole", *auto, env=two).returncode == 0
    assert json.loads((tmp_path / "whole" / FOLD / "summary.json").read_text())["identity"]["loader"] == {"workers": 2}
    stopped = run(shards, tmp_path / "moved", *auto, env=two, drill="1:TERM")
    assert stopped.returncode == EXIT_REQUEUE, stopped.stderr[-2000:]
    resumed = run(shards, tmp_path / "moved", *auto, env=one)
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stderr[-2000:]
    out = tmp_path / "moved" / FOLD
    assert json.loads((out / "summary.json").read_text())["identity"]["loader"] == {"workers": 2}
    assert "workers: 2" in (out / "config.yaml").read_text()  # the resolved config, as it ran
    expected = load_file(tmp_path / "whole" / FOLD / "model.safetensors")
    for name, tensor in load_file(out / "model.safetensors").items():
        assert torch.equal(tensor, expected[name]), name


def test_sigterm_to_every_process_with_data_workers_saves_and_exits_75(shards, tmp_path):
    """A Slurm preemption signals every process of the job, data workers included; a job
    script's USR1 may reach a worker too. Workers ignore both; the trainer saves."""
    job = subprocess.Popen(command(shards, tmp_path, "train.epochs=20", "data.workers=2"), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, cwd=REPO, start_new_session=True)  # fmt: skip
    metrics = tmp_path / FOLD / "metrics.jsonl"
    wait_for(lambda: steps_logged(metrics) >= 2, job)
    workers = psutil.Process(job.pid).children()
    assert len(workers) == 2
    os.kill(workers[0].pid, signal.SIGUSR1)
    reached = steps_logged(metrics)
    wait_for(lambda: steps_logged(metrics) >= reached + 2, job)  # it trains on, the worker alive
    os.killpg(job.pid, signal.SIGTERM)  # the whole process group, as Slurm does
    stdout, stderr = job.communicate(timeout=300)
    assert job.returncode == EXIT_REQUEUE, stderr[-3000:]
    assert re.search(rf"rank 0: preempted, state saved at step \d+; exit {EXIT_REQUEUE}", stdout)
    assert "Traceback" not in stderr, stderr[-3000:]
    marker = json.loads((tmp_path / FOLD / "PREEMPTED").read_text())
    assert (tmp_path / FOLD / "checkpoints" / marker["state"]).is_dir()


def _catches(pid: int, sig: int) -> bool:
    status = Path(f"/proc/{pid}/status").read_text()
    caught = int(next(line for line in status.splitlines() if line.startswith("SigCgt:")).split()[1], 16)
    return bool(caught >> (sig - 1) & 1)


def test_a_signal_during_start_up_stops_before_the_first_step_with_exit_75(shards, tmp_path):
    job = subprocess.Popen(command(shards, tmp_path, "train.epochs=20"), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, cwd=REPO)  # fmt: skip
    wait_for(lambda: _catches(job.pid, signal.SIGTERM), job, timeout=120)
    assert not (tmp_path / FOLD / "config.yaml").exists()  # still importing: long before the loop
    job.send_signal(signal.SIGTERM)
    stdout, stderr = job.communicate(timeout=300)
    assert job.returncode == EXIT_REQUEUE, stderr[-3000:]
    assert f"rank 0: preempted, nothing to save before the first step; exit {EXIT_REQUEUE}" in stdout
    assert json.loads((tmp_path / FOLD / "PREEMPTED").read_text())["state"] is None
    assert not (tmp_path / FOLD / "checkpoints").exists() and steps_logged(tmp_path / FOLD / "metrics.jsonl") == 0


def test_ctrl_c_on_one_rank_stops_every_rank_at_the_same_step_saves_and_exits_130(shards, tmp_path):
    job = subprocess.Popen(command(shards, tmp_path, "train.epochs=20", processes=2), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, cwd=REPO)  # fmt: skip
    out = tmp_path / FOLD
    wait_for(lambda: steps_logged(out / "metrics.jsonl") >= 3, job)
    ranks = [p for p in psutil.Process(job.pid).children(recursive=True) if "train.py" in " ".join(p.cmdline())]
    os.kill(ranks[1].pid, signal.SIGINT)
    stdout, stderr = job.communicate(timeout=300)
    (step,) = re.findall(
        r"interrupted: state saved at step (\d+) in .*; rerun the same command to resume; exit 130", stdout
    )
    # torchrun reports the first rank's 130 as its own 1 (and ends the others as they leave)
    assert "exitcode  : 130" in stderr and "KeyboardInterrupt" not in stderr, stderr[-3000:]
    assert (out / "checkpoints" / f"step-{int(step):08d}").is_dir() and not (out / "PREEMPTED").exists()


def test_state_is_saved_every_n_steps_and_a_run_killed_before_its_summary_still_reports_its_metrics(shards, tmp_path):
    """save_every is not tied to evaluations; a run killed after its last state but before
    summary.json resumes at the end and reports the final evaluation the state carries."""
    extra = ["train.epochs=2", "train.eval_every=5", "train.save_every=1", "train.keep_last=2"]
    assert run(shards, tmp_path, *extra).returncode == 0
    out = tmp_path / FOLD
    summary = json.loads((out / "summary.json").read_text())
    steps = summary["steps"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [f"step-{steps - 1:08d}", f"step-{steps:08d}"]
    for name in ("summary.json", "model.json", "model.safetensors"):  # killed after the last state
        (out / name).unlink()
    again = run(shards, tmp_path, *extra)
    assert again.returncode == 0, again.stderr[-3000:]
    resumed = json.loads((out / "summary.json").read_text())
    assert resumed["final"] == summary["final"] and resumed["final"]["fold"]["miou"] >= 0
    (model,) = load_fold_models(tmp_path / "demo" / "stage1", [0], "model")
    assert model.miou == summary["final"]["fold"]["miou"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").open()]
    assert [r["step"] for r in records if "fold/miou" in r] == [steps]


def test_bf16_training_logs_an_offline_wandb_run_with_group_and_job_type(shards, tmp_path):
    done = run(shards, tmp_path, "train.epochs=1", "train.precision=bf16", "wandb.mode=auto",
               "train.experiment=bf16-check")  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "bf16-check" / "stage1" / "fold0"
    losses = [json.loads(line).get("train/loss") for line in (out / "metrics.jsonl").open()]
    assert all(v == v and abs(v) < 1e4 for v in losses if v is not None)
    (record_file,) = out.glob("wandb/offline-run-*/run-*.wandb")
    run_record = wandb_run_record(record_file)
    assert (run_record.run_group, run_record.job_type, run_record.display_name) == (
        "bf16-check",
        "stage1-fold0",
        "bf16-check-s1-f0",
    )


def test_a_non_finite_loss_stops_with_an_error_naming_the_step(shards, tmp_path):
    done = run(shards, tmp_path, "train.epochs=1", "optim.lr=1e30", "optim.clip_grad_norm=null",
               "schedule.warmup_iters=0")  # fmt: skip
    assert done.returncode == 1
    assert "loss is NaN or inf at step" in done.stderr


def test_a_bad_config_key_is_a_clear_error(shards, capsys):
    argv = ["--config", str(REPO / "configs" / "demo.yaml"), "--fold", "0", f"data.shards={shards}", "train.epoch=3"]
    assert main(argv) == 2
    assert "config key 'train.epoch' on the command line" in capsys.readouterr().err
    assert main([*argv[:-1], "train.precision=fp16"]) == 2
    assert "fp16 needs a GPU" in capsys.readouterr().err


def test_runs_that_cannot_work_are_refused_in_one_line_before_any_process_group_or_wandb_run(shards, tmp_path, capsys):
    argv = ["--config", str(REPO / "configs" / "demo.yaml"), "--fold", "0", f"data.shards={shards}",
            f"train.runs_dir={tmp_path}", "wandb.mode=offline"]  # fmt: skip
    assert main([*argv, "train.batch_size=1"]) == 2
    assert "set model.aspp_pool_norm=false" in capsys.readouterr().err
    # each worker yields whole batches: 10000 of them once made an epoch of 10000 steps (and ran out of memory)
    assert main([*argv, "data.workers=10000"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: config key 'data.workers': 10000 is more than the ") and err.count("\n") == 1
    assert "the epoch would stretch to 10000 steps; set at most " in err
    # an accumulation longer than the whole run once ended "done" without one optimizer step
    assert main([*argv, "train.epochs=1", "train.grad_accum=100"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: config key 'train.grad_accum': 100 micro-batches a step is more than the run's ")
    assert "no optimizer step would run; set at most " in err and err.count("\n") == 1
    assert main(["--resume", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --resume {tmp_path}: not a resumable state") and err.count("\n") == 1
    assert not any(tmp_path.iterdir())  # no run folder, no wandb run


def test_refused_folds_stages_and_start_models_leave_no_fold_folder(shards, tmp_path):
    for extra, message in [
        (["--fold", "5"], "fold 5"),
        (["--stage", "0"], "--stage 0: stages count from 1"),
        (["--stage", "2"], "--stage 2 without --init-from: a later stage starts from the previous stage's reduced"),
        (["--init-from", str(tmp_path / "missing.safetensors")], "missing.safetensors"),
    ]:
        done = run(shards, tmp_path, *extra)  # the last --fold given is the one argparse takes
        assert done.returncode == 2 and message in done.stderr, done.stderr[-2000:]
        assert not (tmp_path / "demo").exists(), sorted(p.name for p in tmp_path.rglob("*"))


def test_a_refusal_on_rank_0_ends_every_rank_with_exit_2_and_no_barrier_crash(shards, tmp_path):
    broken = tmp_path / "shards"
    shutil.copytree(shards, broken)
    shard = next(broken.glob("train-fold1-*.tar"))
    data = bytearray(shard.read_bytes())
    data[600] ^= 0xFF  # same size: only the checksum (rank 0's check) sees it
    shard.write_bytes(bytes(data))
    done = run(broken, tmp_path / "runs", processes=2)
    assert done.returncode != 0
    assert done.stderr.count("does not match the manifest") == 1 and "Connection closed" not in done.stderr
    assert "exitcode  : 2" in done.stderr and "SIGABRT" not in done.stderr, done.stderr[-3000:]


def test_a_truncated_shard_trains_on_its_readable_samples_under_skip_without_checksums(shards, tmp_path):
    broken = tmp_path / "shards"
    shutil.copytree(shards, broken)
    shard = next(broken.glob("train-fold1-*.tar"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size * 2 // 3])
    done = run(broken, tmp_path / "runs", "train.epochs=3", "data.checksums=false", "data.on_error=skip")
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((tmp_path / "runs" / FOLD / "summary.json").read_text())["skipped_samples"] > 0
    refused = run(broken, tmp_path / "runs2", "train.epochs=1", "data.checksums=false")
    assert refused.returncode == 2 and f"{shard}: unreadable after sample" in refused.stderr, refused.stderr[-3000:]


def test_geometry_on_the_device_trains_a_fold(shards, tmp_path):
    done = run(shards, tmp_path, "data.geometry_on_device=true", "data.workers=1", "train.iters=3",
               "train.eval_every=3")  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / FOLD / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "train/loss" in r] == [1, 2, 3]
    assert all(math.isfinite(r["train/loss"]) for r in records if "train/loss" in r)


def test_a_finished_fold_is_complete_for_the_same_run_and_refused_for_another(shards, tmp_path):
    """Finished with 2 processes: the same command with 1 process (another global batch) is
    refused, naming the difference and touching nothing; 1 process x twice the batch is the
    same run, and complete."""
    assert run(shards, tmp_path, "train.epochs=1", processes=2).returncode == 0
    out = tmp_path / FOLD
    files = sorted(p for p in out.rglob("*") if p.is_file())
    before = [(p, p.stat().st_mtime_ns, p.read_bytes()) for p in files]
    refused = run(shards, tmp_path, "train.epochs=1")
    assert refused.returncode == 2 and f"error: {out} finished as another run (batch.global: 4 -> 2" in refused.stderr
    assert "--resume none" in refused.stderr and "train.experiment=NAME" in refused.stderr, refused.stderr
    same = run(shards, tmp_path, "train.epochs=1", "train.batch_size=4")
    assert same.returncode == 0 and "is complete" in same.stdout, same.stderr[-2000:]
    assert [(p, p.stat().st_mtime_ns, p.read_bytes()) for p in files] == before
    assert sorted(p for p in out.rglob("*") if p.is_file()) == files
    summary = json.loads((out / "summary.json").read_text())
    assert summary["identity"]["batch"] == {"processes": 2, "per_process": 2, "grad_accum": 1, "global": 4}
    assert summary["identity"]["init_from"] == {"path": None, "model": "scratch"}
    assert json.loads((out / "model.json").read_text())["identity"] == summary["identity"]


def test_a_resume_that_would_change_the_run_is_refused_and_one_that_would_not_resumes(shards, tmp_path):
    stopped = run(shards, tmp_path, "train.epochs=2", drill="3:TERM")
    assert stopped.returncode == EXIT_REQUEUE, stopped.stderr[-2000:]
    out = tmp_path / FOLD
    assert json.loads((out / "checkpoints" / "step-00000003" / "identity.json").read_text())["stage"] == 1
    refused = run(shards, tmp_path, "train.epochs=3")
    assert refused.returncode == 2 and re.search(
        r"cannot resume from \S+step-00000003: it is another run \(config.train.epochs: 2 -> 3; "
        r"schedule.total_steps: (\d+) -> (\d+)\)",
        refused.stderr,
    ), refused.stderr
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000003"]
    # how fast it reads and how it is watched may change on resume
    resumed = run(shards, tmp_path, "train.epochs=2", "data.workers=1", "train.log_every=2")
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stderr[-2000:]
    assert "data.workers" not in resumed.stderr and (out / "summary.json").is_file()


def test_a_later_stage_from_scratch_says_so(shards, tmp_path):
    done = run(shards, tmp_path, "--stage", "2", "--init-from", "scratch", "train.iters=1")
    assert done.returncode == 0, done.stderr[-2000:]
    identity = json.loads((tmp_path / "demo" / "stage2" / "fold0" / "summary.json").read_text())["identity"]
    assert identity["stage"] == 2 and identity["init_from"] == {"path": None, "model": "scratch"}
    assert identity["config"]["optim"]["lr"] == 3.0e-4  # the config's stage-2 entry applied


def test_accelerate_launch_asked_for_processes_without_multi_gpu_is_refused(shards, tmp_path):
    """accelerate's simple launcher would run one process and say nothing."""
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no"]  # fmt: skip
    script = command(shards, tmp_path)[len(launch_command(1)) :]
    done = subprocess.run([*launcher, *script], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode != 0
    assert "accelerate launch --num_processes 2 started this script as 1 process" in done.stderr, done.stderr[-2000:]
    assert "Add --multi_gpu" in done.stderr and not (tmp_path / "demo").exists()


def test_a_resume_on_another_process_count_with_the_same_global_batch_continues(shards, tmp_path):
    """A requeued job may land on other machines: 1 process x batch 4, resumed as 2 x 2."""
    stopped = run(shards, tmp_path, "train.epochs=2", "train.batch_size=4", drill="1:TERM")
    assert stopped.returncode == EXIT_REQUEUE, stopped.stderr[-2000:]
    resumed = run(shards, tmp_path, "train.epochs=2", "train.batch_size=2", processes=2)
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stderr[-2000:]
    summary = json.loads((tmp_path / FOLD / "summary.json").read_text())
    assert summary["steps"] == 2 * summary["steps_per_epoch"] and summary["processes"] == 2
    assert summary["identity"]["batch"] == {"processes": 2, "per_process": 2, "grad_accum": 1, "global": 4}


def test_the_loader_holding_training_back_is_said_once_after_three_slow_log_steps_in_a_row():
    window = LogWindow()
    assert [window.too_slow(share) for share in (0.5, 0.5, 0.05, 0.5, 0.5)] == [False] * 5  # not 3 in a row
    assert window.too_slow(0.2) is True  # the third in a row
    assert [window.too_slow(0.9) for _ in range(5)] == [False] * 5  # once a run


def test_mmsegs_model_trains_with_its_auxiliary_head_and_exports_without_it(shards, tmp_path):
    mmseg = ["model.stem=deep", "model.contract_dilation=true", "model.head=separable-aspp", "model.aux_head=true"]
    done = run(shards, tmp_path, "train.epochs=1", *mmseg)
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / FOLD
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if "train/loss" in r]
    assert steps and all(r["train/aux_ce"] > 0 for r in steps)
    for r in steps:  # the demo's loss (0.6 CE + 0.4 Dice) plus 0.4 x the auxiliary head's CE
        expected = 0.6 * r["train/ce"] + 0.4 * r["train/dice"] + 0.4 * r["train/aux_ce"]
        assert r["train/loss"] == pytest.approx(expected, rel=1e-5)
    weights = load_file(out / "model.safetensors")
    assert "backbone.stem.0.weight" in weights and not any(k.startswith("aux_head") for k in weights)
    assert json.loads((out / "model.json").read_text())["config"]["model"]["aux_head"] is True
