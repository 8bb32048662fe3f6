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


def load_chain_tool():
    spec = importlib.util.spec_from_file_location("chain_check", REPO / "tools" / "chain_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.timeout(600)
def test_tiny_mode_runs_every_part_and_writes_its_json(tmp_path: Path) -> None:
    """Both tiny checks, side by side (one test, so the suite waits for the slower only): the
    microbenchmark (tools/gpu_check.py --tiny) and the chain (tools/chain_check.py --tiny, which
    ./launch gpu-check --chain runs)."""
    out, chain_out = tmp_path / "check.json", tmp_path / "chain.json"
    tool, chain_tool = str(REPO / "tools" / "gpu_check.py"), str(REPO / "tools" / "chain_check.py")
    chain = subprocess.Popen([sys.executable, chain_tool, "--tiny", "--json", str(chain_out)],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)  # fmt: skip
    try:
        done = subprocess.run([sys.executable, tool, "--tiny", "--json", str(out)], capture_output=True, text=True,
                              cwd=tmp_path, timeout=540)  # fmt: skip
        chain_output, _ = chain.communicate(timeout=540)
    finally:
        chain.kill()
    assert chain.returncode == 0, chain_output[-3000:]
    check_tiny_chain(json.loads(chain_out.read_text()), chain_output)
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
    check_tiny_profile(report["profile"], done.stdout)
    assert [r["loss"] for r in report["loss"]] == ["softmax alone", "cross entropy", "dice", "combined (study)", "ohem"]
    assert all(r["ms"] > 0 and r["size"] == "64x32" for r in report["loss"])
    assert "loss forward + backward, batch 1 at 64x32" in done.stdout
    (evaluation,) = report["eval"]
    assert evaluation["status"] == "ok" and evaluation["images_per_s"] > 0
    full, small = report["loader"]
    assert full["pipeline"] == "full-size PNG (256x128), geometry in the worker"  # the tiny frames' true size
    assert small["pipeline"] == "train-size PNG (128x64), geometry on the device"
    assert full["images_per_s_per_core"] > 0 and small["images_per_s_per_core"] > 0
    assert report["passed"] is True
    assert "all checks passed" in done.stdout
    assert "| bf16 | pass |" in done.stdout  # the printed table


def test_a_json_path_that_cannot_be_written_is_refused_before_any_check(capsys, monkeypatch, tmp_path) -> None:
    """Found by a user: --json into a missing folder ran every check (54 s), then a traceback."""
    from seg.core.storage import EXIT_STORAGE
    from tests.disks import tmpfs

    gpu, chain = load_tool(), load_chain_tool()

    def no_work(*args, **kwargs):
        raise AssertionError("the checks started: the path should have been refused first")

    monkeypatch.setattr(gpu, "environment", no_work)
    monkeypatch.setattr(chain, "check", no_work)

    def refused(main, path: Path, code: int) -> str:
        with pytest.raises(SystemExit) as stopped:
            main(["--tiny", "--json", str(path)])
        assert stopped.value.code == code
        err = capsys.readouterr().err
        assert "Traceback" not in err
        return err.strip().splitlines()[-1]

    missing = tmp_path / "missing" / "check.json"
    for main in (gpu.main, chain.main):
        assert f"--json {missing}: its folder {missing.parent} does not exist: make it" in refused(main, missing, 2)
        assert f"--json {tmp_path}: is a folder: give a file name" in refused(main, tmp_path, 2)
    with tmpfs(tmp_path / "ro", "1m", read_only=True) as read_only:
        for main in (gpu.main, chain.main):
            assert refused(main, read_only / "check.json", EXIT_STORAGE) == (
                f"error: --json {read_only / 'check.json'}: cannot create files in {read_only} (read-only file "
                f"system): write to a writable folder"
            )
        assert chain.main(["--tiny", "--keep", str(read_only / "work")]) == EXIT_STORAGE
        assert f"--keep {read_only / 'work'}: cannot create files in {read_only}" in capsys.readouterr().err


def test_chain_check_refuses_a_count_that_means_nothing(capsys) -> None:
    """--steps 0 was taken for the default, silently."""
    chain = load_chain_tool()
    for option, least in (("--steps", 1), ("--warmup", 0)):
        with pytest.raises(SystemExit) as stopped:
            chain.main(["--tiny", option, str(least - 1)])
        assert stopped.value.code == 2
        assert capsys.readouterr().err.endswith(f"error: argument {option}: {least - 1}: at least {least}\n")


def check_tiny_profile(profile: dict, output: str) -> None:
    """The profile of the tiny row (tools/profile_step.py): every category, shares summing to
    1, the top ops with their times, printed."""
    assert profile["status"] == "ok" and profile["device"] == "cpu" and profile["steps"] == 1
    categories = profile["categories"]
    assert list(categories) == ["loss", "augmentation", "upsampling", "convolution", "batchnorm_activation",
                                "optimizer", "copy_sync", "other"]  # fmt: skip
    assert sum(c["share"] for c in categories.values()) == pytest.approx(1, abs=1e-3)
    assert sum(c["ms_per_step"] for c in categories.values()) == pytest.approx(profile["busy_ms_per_step"], rel=1e-2)
    # every part of the step ran and was found (the tiny model upsamples too)
    assert all(categories[c]["ms_per_step"] > 0 for c in ("loss", "augmentation", "convolution", "optimizer"))
    assert 0 < profile["busy_ms_per_step"] <= profile["wall_ms_per_step"] * 1.01
    top = profile["top_ops"]
    assert top and all(o["ms_per_step"] > 0 and 0 < o["share"] <= 1 and o["count_per_step"] > 0 for o in top)
    assert [o["ms_per_step"] for o in top] == sorted((o["ms_per_step"] for o in top), reverse=True)
    assert profile["host_syncs_per_step"]["aten::_local_scalar_dense"] >= 1  # train_step's finite-loss check
    assert "| category | ms per step | share |" in output and "| op | calls per step | ms per step | share |" in output


def test_ops_fall_into_the_issue_s_categories_by_name() -> None:
    load_tool()  # tools/ on sys.path
    from profile_step import category_of

    expected = {
        "aten::convolution": "convolution",
        "aten::cudnn_convolution": "convolution",
        "aten::mkldnn_convolution": "convolution",
        "aten::convolution_backward": "convolution",
        "aten::native_batch_norm": "batchnorm_activation",
        "aten::cudnn_batch_norm": "batchnorm_activation",  # batch norm, though cudnn's
        "aten::native_batch_norm_backward": "batchnorm_activation",
        "aten::relu_": "batchnorm_activation",
        "aten::threshold_backward": "batchnorm_activation",  # ReLU's backward
        "aten::upsample_bilinear2d": "upsampling",
        "aten::upsample_bilinear2d_backward": "upsampling",
        "aten::grid_sampler_2d": "upsampling",
        "aten::_log_softmax": "loss",
        "aten::_log_softmax_backward_data": "loss",
        "aten::nll_loss2d_forward": "loss",
        "autograd::engine::evaluate_function: NllLoss2DBackward0": "loss",
        "aten::_softmax": "loss",  # Dice's softmax
        "aten::one_hot": "loss",
        "aten::_foreach_add_": "optimizer",
        "aten::_foreach_norm": "optimizer",  # clip_grad_norm_
        "aten::_fused_adam_": "optimizer",
        "Optimizer.step#Adam.step": "optimizer",
        "Optimizer.zero_grad#Adam.zero_grad": "optimizer",
        "aten::copy_": "copy_sync",
        "aten::_to_copy": "copy_sync",  # autocast's casts
        "aten::to": "copy_sync",
        "aten::_local_scalar_dense": "copy_sync",  # .item()
        "cudaStreamSynchronize": "copy_sync",
        "cudaDeviceSynchronize": "copy_sync",
        "Memcpy HtoD (Pageable -> Device)": "copy_sync",
        "seg::loss": "loss",
        "seg::augment": "augmentation",
    }
    assert {name: category_of(name) for name in expected} == expected
    for name in ("aten::mul", "aten::add_", "aten::empty", "seg::step", "aten::tolist", "aten::topk"):
        assert category_of(name) is None, name  # "other", or their ancestor's
    # only the ranges claim every op inside them
    assert [n for n in expected if category_of(n, whole_range=True)] == [
        "Optimizer.step#Adam.step", "Optimizer.zero_grad#Adam.zero_grad", "seg::loss", "seg::augment"]  # fmt: skip


def test_an_op_counts_for_the_range_it_ran_in_and_its_backward_for_its_forward_s() -> None:
    """The loss's and the augmentation's ranges claim every op in them, whatever its name says;
    an op's backward goes where its forward went; the rest by name or "other"."""
    load_tool()  # tools/ on sys.path
    import torch
    import torch.nn.functional as F
    from torch.profiler import ProfilerActivity, profile, record_function

    from profile_step import categorise, category_times

    weight = torch.randn(4, 3, 3, 3, requires_grad=True)
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        with record_function("seg::augment"):
            images = F.interpolate(torch.rand(1, 3, 8, 8), scale_factor=2.0, mode="bilinear")  # not "upsampling"
        logits = F.conv2d(images, weight)
        with record_function("seg::loss"):
            loss = (logits * logits).mean()  # aten::mul: no category by name
        loss.backward()
    categorised = categorise(profiler.events())
    by_name = {}
    for event, category in categorised:
        by_name.setdefault(event.name, set()).add(category)
    assert by_name["aten::upsample_bilinear2d"] == {"augmentation"}
    assert by_name["aten::mul"] == {"loss"}  # the forward's, and the backward's under MulBackward0
    assert by_name["autograd::engine::evaluate_function: MulBackward0"] == {"loss"}
    assert by_name["aten::convolution_backward"] == by_name["aten::conv2d"] == {"convolution"}
    assert by_name["aten::rand"] == {"augmentation"} and by_name["seg::loss"] == {"loss"}
    times = category_times(profiler.events(), cuda=False)
    assert sum(times.values()) == pytest.approx(sum(e.self_cpu_time_total for e, _ in categorised))
    assert times["loss"] > 0 and times["augmentation"] > 0 and times["upsampling"] == 0


def test_on_cuda_each_kernel_counts_once_for_the_op_that_launched_it() -> None:
    """CUDA's profile, as torch.profiler hands it over (events made here: no GPU needed): an
    op's self device time holds its kernels, which also come as events of their own; a range
    (``seg::loss``) launches none, whatever device time its device-side span shows."""
    load_tool()  # tools/ on sys.path
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    from profile_step import category_times

    def event(name, device_us, parent=None, device=DeviceType.CPU, annotation=False, start=0):
        return SimpleNamespace(name=name, self_device_time_total=device_us, cpu_parent=parent, device_type=device,
                               is_user_annotation=annotation, sequence_nr=-1, time_range=SimpleNamespace(start=start),
                               self_cpu_time_total=1.0)  # fmt: skip

    loss = event("seg::loss", 50.0, annotation=True)
    softmax = event("aten::_softmax", 30.0, parent=loss, start=1)
    conv = event("aten::cudnn_convolution", 100.0, start=2)
    launch = event("cudaLaunchKernel", 0.0, parent=conv, start=3)
    kernels = [event("sm90_xmma_fprop", 100.0, device=DeviceType.CUDA), event("softmax_kernel", 30.0,
               device=DeviceType.CUDA), event("seg::loss", 50.0, device=DeviceType.CUDA, annotation=True)]  # fmt: skip
    times = category_times([loss, softmax, conv, launch, *kernels], cuda=True)
    assert times == {**dict.fromkeys(times, 0.0), "loss": 30.0, "convolution": 100.0}


def check_tiny_chain(report: dict, output: str) -> None:
    """The chain check's tiny run: the study's chain ran on 2 folds and every number is there."""
    assert report["passed"] is True and report["tiny"] is True
    assert [f["fold"] for f in report["folds"]] == [0, 1]
    for fold in report["folds"]:
        assert fold["steps"] == 4 and fold["workers"] == 0  # tiny: data.workers=0
        assert fold["sustained_images_per_s"] > 0 and 0 <= fold["data_wait_share"] <= 1
        assert fold["peak_memory_mb"] > 0 and fold["fold_eval_samples"] > 0
        seconds = fold["seconds"]
        assert seconds["wall"] >= seconds["train"] + seconds["fold_evaluation"] > 0
        assert fold["gpu_utilisation_pct"] is None  # no GPU to sample
    phases = report["phases_s"]
    assert {"synthetic_and_pack", "fold0", "fold1", "reduction", "final_evaluation"} <= set(phases)
    assert 0 <= report["final"]["val_miou_pct"] <= 100 and report["final"]["samples"] == 2
    projection = report["projection"]
    assert projection["assumes"]["stages"] == 4 and projection["assumes"]["epochs"] == 20  # configs/study.yaml's
    assert projection["hours"] > 0 and all(v >= 0 for v in projection["seconds"].values())
    assert "seg.cv" in report["command"] and "--stages 1" in report["command"]
    assert "| fold | images/s (sustained) |" in output and "chain check: passed" in output


def test_the_sustained_rate_leaves_out_the_warm_up_and_weighs_windows_by_their_time() -> None:
    tool = load_chain_tool()

    def record(step: int, rate: float, waited: float) -> dict:
        return {"step": step, "train/images_per_s": rate, "train/images_per_s_per_process": rate,
                "train/data_wait_s": waited, "train/memory_mb": 100.0 + step}  # fmt: skip

    # batch 2, log every 10 steps: 20 images a window; the first window (the warm-up) is slow
    records = [record(10, 2.0, 9.0), {"step": 10, "fold/miou": 0.5}, record(20, 20.0, 0.1), record(30, 10.0, 0.2)]
    windows = tool.training_windows(records, batch=2)
    assert [w["seconds"] for w in windows] == [10.0, 1.0, 2.0] and windows[-1]["memory_mb"] == 130.0
    rate = tool.sustained(windows, warmup=10)
    assert rate["images_per_s"] == pytest.approx(40 / 3) and rate["data_wait_share"] == pytest.approx(0.1)
    assert tool.sustained(windows, warmup=0)["images_per_s"] == pytest.approx(60 / 13)
    assert tool.sustained(windows, warmup=30) == {"images_per_s": None, "data_wait_share": None}


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
    assert {r["batch"] for r in rows} == {4, 8, 16}
    assert {r["optimizer"] for r in rows} == {"fused", "foreach"}
    assert {r["finite_check"] for r in rows} == {True, False}
    assert len({tuple(r.items()) for r in rows}) == len(rows)  # no row twice
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
            "--steps", "1", "--warmup", "1", "--optimizer", "foreach", "--no-finite-check"]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as stopped:
        bench_train.main()
    out = capsys.readouterr().out
    assert stopped.value.code == 0, out
    assert "status: ok" in out and "size: 64x32" in out and "optimizer: foreach, finite_check: False" in out
    assert float(out.split("images_per_s: ")[1].split(",")[0]) > 0


def test_the_finite_loss_verdict_raises_and_the_bench_can_leave_it_out_to_time_its_wait() -> None:
    """seg.training.step.train_step's check_finite: training's verdict on a NaN loss, and the
    GPU check's row without it (what the verdict's read-back costs a step)."""
    load_tool()  # tools/ on sys.path
    import torch

    from seg.training.step import train_step

    from bench_train import fresh_accelerator

    def nan_loss(logits, target):
        return logits.sum() * float("nan"), {}

    with fresh_accelerator("fp32", cpu=True) as accelerator:
        model = torch.nn.Linear(3, 2)
        optimizer = torch.optim.Adam(model.parameters(), fused=True)
        model, optimizer = accelerator.prepare(model, optimizer)
        x, y = torch.ones(4, 3), torch.zeros(4)
        with pytest.raises(FloatingPointError, match="not finite"):
            train_step(model, x, y, nan_loss, optimizer, accelerator, 1.0)
        loss, _, stepped = train_step(model, x, y, nan_loss, optimizer, accelerator, 1.0, check_finite=False)
        assert loss.isnan() and stepped  # left out: nothing looked at the loss
