"""seg/train.py as users run it: python, accelerate launch, signals, resume, wandb offline."""

import json
import os
import re
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from seg.cli import launch_command
from seg.pack import Options, pack
from seg.synthetic import make_synthetic
from seg.train import EXIT_REQUEUE, main

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "data.size=[32,64]", "data.eval_size=null", "data.workers=0", "train.batch_size=2", "train.log_every=1",
    "train.eval_every=1", "wandb.mode=disabled", "model.depth=18",
]  # fmt: skip


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("train") / "cityscapes"
    make_synthetic(root, counts={"train": 16, "val": 4, "test": 0}, cities={"train": 4, "val": 1, "test": 1},
                   size=(64, 32), progress=False)  # fmt: skip
    out = root.parent / "shards"
    pack(root, out, Options(folds=2, splits=("train", "val")), progress=False)
    return out


def command(shards: Path, runs: Path, *extra: str, processes: int = 1) -> list[str]:
    script = [str(REPO / "seg" / "train.py"), "--config", str(REPO / "configs" / "demo.yaml"), "--fold", "0",
              f"data.shards={shards}", f"train.runs_dir={runs}", *TINY, *extra]  # fmt: skip
    return [*launch_command(processes), *script]


def run(shards: Path, runs: Path, *extra: str, processes: int = 1) -> subprocess.CompletedProcess:
    return subprocess.run(command(shards, runs, *extra, processes=processes), capture_output=True, text=True,
                          timeout=600, cwd=REPO)  # fmt: skip


FOLD = Path("demo/stage1/fold0")


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
    evaluations = [r for r in records if "fold/miou" in r]
    assert len(evaluations) == 2 and set(evaluations[0]["fold/iou"]) >= {"road", "sky"}
    sidecar = json.loads((out / "model.json").read_text())
    assert sidecar["fold"] == 0 and sidecar["stage"] == 1 and sidecar["config"]["model"]["depth"] == 18
    assert set(load_file(out / "model.safetensors")) >= {"backbone.conv1.weight", "classifier.weight"}
    assert (out / "best.safetensors").is_file() and (out / "config.yaml").is_file()
    before = (out / "model.safetensors").read_bytes(), (out / "summary.json").read_text()
    again = run(shards, tmp_path, "train.epochs=2")  # a requeued or repeated job: nothing to redo
    assert again.returncode == 0 and "is complete" in again.stdout
    assert ((out / "model.safetensors").read_bytes(), (out / "summary.json").read_text()) == before
    per_epoch = summary["steps_per_epoch"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        f"step-{per_epoch:08d}",
        f"step-{2 * per_epoch:08d}",
    ]


def _wait_for(predicate, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.time() < deadline, "timed out"
        time.sleep(0.2)


def _steps(path: Path) -> int:
    if not path.exists():
        return 0
    return max((json.loads(line)["step"] for line in path.read_text().splitlines() if line), default=0)


def test_a_killed_run_resumes_to_the_weights_of_one_never_stopped(shards, tmp_path):
    epochs = ["train.epochs=3"]
    assert run(shards, tmp_path / "whole", *epochs).returncode == 0
    per_epoch = json.loads((tmp_path / "whole" / FOLD / "summary.json").read_text())["steps_per_epoch"]
    killed = subprocess.Popen(command(shards, tmp_path / "killed", *epochs), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True, cwd=REPO)  # fmt: skip
    out = tmp_path / "killed" / FOLD
    _wait_for(lambda: _steps(out / "metrics.jsonl") >= per_epoch + 1, killed)  # past the first state, mid-epoch
    killed.kill()
    killed.wait()
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


def test_sigusr1_on_one_rank_stops_every_rank_at_the_same_step_with_the_requeue_code(shards, tmp_path):
    job = subprocess.Popen(command(shards, tmp_path, "train.epochs=20", processes=2), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, cwd=REPO)  # fmt: skip
    out = tmp_path / FOLD
    _wait_for(lambda: _steps(out / "metrics.jsonl") >= 3, job)
    workers = [p for p in psutil.Process(job.pid).children(recursive=True) if "train.py" in " ".join(p.cmdline())]
    assert len(workers) == 2
    os.kill(workers[1].pid, signal.SIGUSR1)  # one rank is signalled: all must stop at the same step
    stdout, stderr = job.communicate(timeout=300)
    stops = re.findall(rf"rank (\d): preempted, state saved at step (\d+); exit {EXIT_REQUEUE}", stdout)
    assert sorted(stops) == [("0", stops[0][1]), ("1", stops[0][1])], stdout[-2000:]
    # torchrun reports a child's 75 as its own 1; the marker file is what job scripts read
    assert job.returncode != 0 and f"exitcode  : {EXIT_REQUEUE}" in stderr
    marker = json.loads((out / "PREEMPTED").read_text())
    assert (out / "checkpoints" / marker["state"]).is_dir() and not (out / "summary.json").exists()
    resumed = run(shards, tmp_path, "train.epochs=2", processes=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not (out / "PREEMPTED").exists() and (out / "summary.json").exists()


def test_sigterm_to_a_single_process_exits_75(shards, tmp_path):
    job = subprocess.Popen(command(shards, tmp_path, "train.epochs=20"), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, cwd=REPO)  # fmt: skip
    _wait_for(lambda: _steps(tmp_path / FOLD / "metrics.jsonl") >= 2, job)
    job.send_signal(signal.SIGTERM)
    job.communicate(timeout=300)
    assert job.returncode == EXIT_REQUEUE
    assert (tmp_path / FOLD / "PREEMPTED").is_file()


def test_bf16_training_logs_an_offline_wandb_run_with_group_and_job_type(shards, tmp_path):
    done = run(shards, tmp_path, "train.epochs=1", "train.precision=bf16", "wandb.mode=auto",
               "train.experiment=bf16-check")  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "bf16-check" / "stage1" / "fold0"
    losses = [json.loads(line).get("train/loss") for line in (out / "metrics.jsonl").open()]
    assert all(v == v and abs(v) < 1e4 for v in losses if v is not None)
    (record_file,) = out.glob("wandb/offline-run-*/run-*.wandb")
    run_record = _wandb_run_record(record_file.read_bytes())
    assert (run_record.run_group, run_record.job_type, run_record.display_name) == (
        "bf16-check",
        "stage1-fold0",
        "bf16-check-s1-f0",
    )


def _wandb_run_record(data: bytes):
    """The RunRecord of an offline .wandb file (a LevelDB-style log after a 7-byte header);
    it is one of the first records, inside the first 32 KB block."""
    from wandb.proto import wandb_internal_pb2

    position = 7
    while position + 7 <= len(data):
        _, length, _ = struct.unpack("<IHB", data[position : position + 7])
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data[position + 7 : position + 7 + length])
        if record.WhichOneof("record_type") == "run":
            return record.run
        position += 7 + length
    raise AssertionError("no run record")


def test_a_non_finite_loss_stops_with_an_error_naming_the_step(shards, tmp_path):
    done = run(shards, tmp_path, "train.epochs=1", "optim.lr=1e30", "optim.clip_grad_norm=null",
               "schedule.warmup_iters=0")  # fmt: skip
    assert done.returncode == 1
    assert "loss is NaN or inf at step" in done.stderr


def test_a_bad_config_key_is_a_clear_error(shards, capsys):
    argv = ["--config", str(REPO / "configs" / "demo.yaml"), "--fold", "0", f"data.shards={shards}", "train.epoch=3"]
    assert main(argv) == 2
    assert "config key 'train.epoch'" in capsys.readouterr().err
    assert main([*argv[:-1], "train.precision=fp16"]) == 2
    assert "fp16 needs a GPU" in capsys.readouterr().err
