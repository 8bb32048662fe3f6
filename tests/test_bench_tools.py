"""The benchmarks' command lines (tools/bench_*.py): a count, size, device or path that means
nothing is refused in one line before any work (argparse's usage and error, exit 2; a folder
that can't be written, EXIT_STORAGE), and bench_loader's JSON says what it measured."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

from seg.core.storage import EXIT_STORAGE
from seg.data.synthetic import make_synthetic
from tests.disks import tmpfs

REPO = Path(__file__).resolve().parents[1]


def tool(name: str):
    """tools/NAME.py as a module, tools/ on sys.path as when run as a script (the benchmarks
    import each other)."""
    if str(REPO / "tools") not in sys.path:
        sys.path.insert(0, str(REPO / "tools"))
    return importlib.import_module(name)


def no_work(*args, **kwargs):
    raise AssertionError("the work started: the arguments should have been refused first")


def refused(capsys: pytest.CaptureFixture[str], main, argv: list[str], code: int = 2) -> str:
    """The error line ``main(argv)`` exits ``code`` with (after argparse's usage, if any)."""
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == code
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return captured.err.strip().splitlines()[-1]


@pytest.mark.parametrize(
    ("name", "argv", "line"),
    [
        ("bench_model", ["--repeat", "0"], "argument --repeat: 0: at least 1"),
        ("bench_model", ["--depths", "19"], "argument --depths: invalid choice: 19 (choose from 18, 34, 50, 101)"),
        ("bench_model", ["--output-stride", "4"], "argument --output-stride: invalid choice: 4"),
        ("bench_loader", ["--frames", "0"], "argument --frames: 0: at least 4"),
        ("bench_loader", ["--repeats", "0"], "argument --repeats: 0: at least 1"),
        ("bench_loader", ["--seconds", "0"], "--seconds 0: the time per measurement must be above 0"),
        ("bench_loader", ["--seconds", "nan"], "--seconds nan: the time per measurement must be above 0"),
        ("bench_pack", ["--images", "4"], "argument --images: 4: at least 6"),
        ("bench_pack", ["--workers", "1", "0"], "argument --workers: 0: at least 1"),
        ("bench_pack", ["--repeat", "0"], "argument --repeat: 0: at least 1"),
        ("bench_train", ["configs/demo.yaml", "--frames", "4"], "argument --frames: 4: at least 6"),
        ("bench_train", ["--step", "--batch", "0"], "argument --batch: 0: at least 1"),
        ("bench_train", ["--step", "--steps", "0"], "argument --steps: 0: at least 1"),
        ("bench_train", ["--processes", "0"], "argument --processes: 0: at least 1"),
        ("bench_train", ["--step", "--json", "x.json"], "--json x.json: writes the profile of --step --profile"),
        ("bench_reduce", ["--recalibrate", "-1"], "argument --recalibrate: -1: at least 0"),
        ("bench_eval", ["--threads", "0"], "argument --threads: 0: at least 1"),
    ],
)
def test_a_bad_count_is_refused_in_the_tool_s_own_options(capsys, name: str, argv: list[str], line: str) -> None:
    """Found by a user: --repeat 0 divided by zero, --depths 19 was a traceback, --images 4 and
    --frames 4 named make_synthetic's --train and --train-cities, options these tools don't have."""
    assert line in refused(capsys, tool(name).main, argv)


def test_bench_eval_refuses_what_evaluate_refuses_before_building_the_model(capsys, monkeypatch) -> None:
    bench_eval = tool("bench_eval")
    monkeypatch.setattr(bench_eval, "DeepLabV3Plus", no_work)
    line = refused(capsys, bench_eval.main, ["--scales", "0"])
    assert line.startswith("error: --scales 0: each scale must be a finite factor above 0")
    line = refused(capsys, bench_eval.main, ["--modes", "slide", "--crop", "64x32", "--stride", "128x64"])
    assert line.startswith("error: --stride 128x64 is longer than the slide window 64x32 (--crop)")


def test_a_device_this_machine_lacks_is_refused_as_the_command_line_is_read(capsys, monkeypatch) -> None:
    """Found by a user: bench_eval --device cuda on a CPU machine ended in torch's AssertionError."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    expected = "argument --device: cuda: this machine has no CUDA GPU that torch can use; use cpu"
    for name in ("bench_eval", "bench_model"):
        assert refused(capsys, tool(name).main, ["--device", "cuda"]).endswith(expected)
    assert "'gpu' is not a device" in refused(capsys, tool("bench_eval").main, ["--device", "gpu"])


def test_an_output_path_that_cannot_be_written_is_refused_before_any_work(capsys, monkeypatch, tmp_path) -> None:
    """Found by a user: --json into a missing folder ran the whole benchmark, then a traceback."""
    bench_loader, bench_train = tool("bench_loader"), tool("bench_train")
    monkeypatch.setattr(bench_loader, "make_synthetic", no_work)
    monkeypatch.setattr(bench_loader, "pack_shards", no_work)
    monkeypatch.setattr(bench_train, "step_only", no_work)
    profile = ["--step", "--profile", "--json"]
    for main, before in ((bench_loader.main, []), (bench_train.main, profile[:-1])):
        option = [*before, "--json"]
        line = refused(capsys, main, [*option, str(tmp_path / "missing" / "out.json")])
        assert f"--json {tmp_path / 'missing' / 'out.json'}: its folder {tmp_path / 'missing'} does not exist" in line
        assert f"--json {tmp_path}: is a folder: give a file name" in refused(capsys, main, [*option, str(tmp_path)])
    with tmpfs(tmp_path / "ro", "1m", read_only=True) as read_only:
        for main, before in ((bench_loader.main, []), (bench_train.main, profile[:-1])):
            line = refused(capsys, main, [*before, "--json", str(read_only / "out.json")], code=EXIT_STORAGE)
            assert line == (f"error: --json {read_only / 'out.json'}: cannot create files in {read_only} "
                            f"(read-only file system): write to a writable folder")  # fmt: skip


def test_bench_loader_s_json_says_what_was_measured_and_names_the_true_frame_size(capsys, tmp_path) -> None:
    """Found by a user: a bare list of rows, no sizes, settings or machine, and rows labelled
    "full-size PNG" for 64x32 frames."""
    root = tmp_path / "cityscapes"
    make_synthetic(root, counts={"train": 4, "val": 0, "test": 0}, cities={"train": 2, "val": 1, "test": 1},
                   size=(32, 64), progress=False)  # fmt: skip
    out = tmp_path / "loader.json"
    argv = ["--root", str(root), "--size", "48x32", "--seconds", "0.01", "--repeats", "1", "--json", str(out)]
    assert tool("bench_loader").main(argv) == 0
    report = json.loads(out.read_text())
    settings = report["settings"]
    assert settings["frame_size"] == "64x32" and settings["training_input_size"] == "48x32"
    assert settings["train_frames"] == 4 and settings["seconds"] == 0.01 and settings["repeats"] == 1
    assert settings["root"] == str(root)
    environment = report["environment"]
    assert environment["torch"] and environment["cpu_cores"] >= 1 and environment["date"].startswith("20")
    rows = report["rows"]
    shards = {r["shards"] for r in rows}
    assert shards == {"64x32 PNG (full size)", "64x32 JPEG (full size)", "48x32 PNG (train size)"}
    assert all(r["images_per_s"] > 0 for r in rows)
    printed = capsys.readouterr().out
    assert "frames 64x32, input 48x32" in printed and "full-size" not in printed
