"""tools/gpu_check.py: its tiny mode runs the same code on the CPU, so the GPU check can't rot
while no GPU is at hand."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def load_tool():
    if str(REPO / "tools") not in sys.path:  # as when run as a script: it imports the bench tools beside it
        sys.path.insert(0, str(REPO / "tools"))
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "tools" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.timeout(600)
def test_tiny_mode_runs_every_part_and_writes_its_json(tmp_path: Path) -> None:
    out = tmp_path / "check.json"
    done = subprocess.run(
        [sys.executable, str(REPO / "tools" / "gpu_check.py"), "--tiny", "--json", str(out)],
        capture_output=True, text=True, cwd=tmp_path, timeout=540,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    checks = {c["name"]: c for c in report["checks"]}
    assert list(checks) == ["cpu-vs-cuda", "bf16", "fp16", "syncbn"]
    # On the CPU: what needs CUDA says so; what doesn't, ran and passed.
    assert checks["cpu-vs-cuda"]["status"] == "skipped"
    cpu_error = checks["cpu-vs-cuda"]["errors"]["cpu_fp32"]
    assert 0 < cpu_error["loss"] < 1e-4 and 0 < cpu_error["gradients"] < 0.1, cpu_error
    assert checks["bf16"]["status"] == "pass"
    losses = checks["bf16"]["losses"]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    assert checks["fp16"]["status"] == "skipped" and "CUDA" in checks["fp16"]["reason"]
    assert checks["syncbn"]["status"] == "skipped" and "CUDA" in checks["syncbn"]["reason"]
    (train,) = report["train"]
    assert train["status"] == "ok" and train["images_per_s"] > 0 and train["tflop_per_image"] > 0
    (evaluation,) = report["eval"]
    assert evaluation["status"] == "ok" and evaluation["images_per_s"] > 0
    full, small = report["loader"]
    assert "full-size" in full["pipeline"] and "train-size" in small["pipeline"]
    assert full["images_per_s_per_core"] > 0 and small["images_per_s_per_core"] > 0
    assert report["passed"] is True
    assert "all checks passed" in done.stdout
    assert "| bf16 | pass |" in done.stdout  # the printed table


def test_a_check_that_raises_is_a_failure_not_a_crash() -> None:
    tool = load_tool()

    def broken() -> dict:
        raise RuntimeError("CUDA error: an illegal memory access")

    result = tool.run_check("broken", broken)
    assert result["status"] == "fail"
    assert "illegal memory access" in result["error"]


def test_peak_flops_by_device_name_most_specific_first() -> None:
    tool = load_tool()
    assert tool.device_peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert tool.device_peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert tool.device_peak_tflops("NVIDIA H200") == 989.0
    assert tool.device_peak_tflops("NVIDIA L40S") == 362.0
    assert tool.device_peak_tflops("NVIDIA L4") == 121.0
    assert tool.device_peak_tflops("Some Future GPU") is None


def test_relative_error_measures_what_it_says() -> None:
    tool = load_tool()
    import torch

    reference = torch.tensor([3.0, 4.0])  # norm 5
    assert tool.relative_error(reference, reference) == 0.0
    assert tool.relative_error(torch.tensor([3.0, 4.5]), reference) == pytest.approx(0.1)


def test_the_speed_grid_starts_with_the_study_model_and_covers_the_issue_s_axes() -> None:
    rows = load_tool().speed_grid(compile_rows=True)
    assert (rows[0]["depth"], rows[0]["batch"], rows[0]["precision"]) == (34, 8, "bf16")
    assert {r["depth"] for r in rows} == {34, 50, 101}
    assert {r["batch"] for r in rows} == {4, 8}
    assert {r["precision"] for r in rows} == {"fp32", "bf16", "fp16"}
    assert {r["channels_last"] for r in rows} == {True, False}
    assert {r["compile"] for r in rows} == {True, False}
    assert all(r["size"] == "1024x512" for r in rows)
    assert not any(r["compile"] for r in load_tool().speed_grid(compile_rows=False))


def test_bench_train_times_the_training_step_alone_as_the_gpu_check_does(monkeypatch, capsys) -> None:
    """tools/bench_train.py --step: the measurement the GPU check's training grid runs, one row."""
    load_tool()  # tools/ on sys.path
    import bench_train

    argv = ["bench_train.py", "--step", "--depth", "18", "--batch", "2", "--precision", "fp32", "--size", "64x32",
            "--steps", "1", "--warmup", "1"]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as stopped:
        bench_train.main()
    out = capsys.readouterr().out
    assert stopped.value.code == 0, out
    assert "status: ok" in out and "size: 64x32" in out
    assert float(out.split("images_per_s: ")[1].split(",")[0]) > 0
