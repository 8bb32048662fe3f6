"""seg/demo.py (``./launch demo``): its counts are checked before any step, and a failing step
is one line (the whole demo runs in CI's fresh clones, not here)."""

from __future__ import annotations

import subprocess

import pytest

from seg import demo


def _no_step(*args, **kwargs):
    raise AssertionError("a step ran")


@pytest.mark.parametrize(
    ("options", "error"),
    [
        (["--stages", "0"], "error: argument --stages: 0: at least 1"),
        (["--folds", "1"], "error: argument --folds: 1: at least 2"),
        (["--processes", "x"], "error: argument --processes: 'x' is not a whole number"),
    ],
)
def test_counts_are_refused_before_the_data_is_made_again(options, error, monkeypatch, capsys):
    monkeypatch.setattr(subprocess, "run", _no_step)
    with pytest.raises(SystemExit) as refused:
        demo.main(options)
    assert refused.value.code == 2 and capsys.readouterr().err.endswith(error + "\n")


def test_a_failing_step_stops_the_demo_in_one_line(monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)  # the demo moves to the repository: back here afterwards
    monkeypatch.setattr(subprocess, "run", lambda command: subprocess.CompletedProcess(command, 3))
    assert demo.main([]) == 3
    assert capsys.readouterr().err == "error: the demo's step 'synthetic Cityscapes' failed (exit 3)\n"
