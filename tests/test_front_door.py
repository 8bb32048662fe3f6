"""./launch's help comes before its setup: asking how to use a command builds nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(60)


def launch(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = os.environ | {"SEG_VENV": str(tmp_path / "venv")}
    return subprocess.run(["bash", str(REPO / "launch"), *args], capture_output=True, text=True, env=env, timeout=50)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("cv", "--help"), "./launch cv configs/X.yaml --stages"),
        (("cv", "configs/demo.yaml", "-h"), "The cross-validation chain"),
        (("demo", "--help"), "The whole system on this machine"),
        (("--help",), "seg's front door"),
    ],
)
def test_help_prints_without_setting_up_a_venv(tmp_path, args, expected):
    done = launch(tmp_path, *args)
    assert done.returncode == 0, done.stderr
    assert expected in done.stdout
    assert "setting up" not in done.stdout + done.stderr
    assert not (tmp_path / "venv").exists()


def test_no_command_is_still_a_usage_error(tmp_path):
    done = launch(tmp_path)
    assert done.returncode == 2 and "./launch cv" in done.stdout
    assert not (tmp_path / "venv").exists()


def test_seg_python_runs_that_interpreter_as_it_is_with_seg_from_the_checkout(tmp_path):
    """SEG_PYTHON: an image that holds seg's requirements (a GPU node's, or one fed by
    tools/offline_wheels.py) runs the commands with no setup, as slurm/fold.sh does."""
    fake = tmp_path / "python"  # it holds every requirement (asked on its standard input), and says how it was run
    fake.write_text('#!/bin/sh\nif [ "$1" = - ]; then cat >/dev/null; exit; fi\n'
                    'echo "args: $*"\necho "path: $PYTHONPATH"\necho "cwd: $PWD"\n')  # fmt: skip
    fake.chmod(0o755)
    env = os.environ | {"SEG_VENV": str(tmp_path / "venv"), "SEG_PYTHON": str(fake), "PYTHONPATH": "/elsewhere"}
    elsewhere = tmp_path / "work"  # a user's own folder: the config's path is theirs, not the checkout's
    elsewhere.mkdir()
    done = subprocess.run(["bash", str(REPO / "launch"), "cv", "my.yaml", "--stages", "1"], cwd=elsewhere,
                          capture_output=True, text=True, env=env, timeout=50)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "args: -m seg.cv my.yaml --stages 1" in done.stdout
    assert f"path: {REPO}:/elsewhere" in done.stdout and f"cwd: {elsewhere}" in done.stdout
    assert "setting up" not in done.stdout + done.stderr and not (tmp_path / "venv").exists()
    assert "SEG_PYTHON=python3 uses that interpreter" in launch(tmp_path, "--help").stdout  # the whole header


def test_a_seg_python_that_is_no_interpreter_is_refused_in_one_line(tmp_path):
    env = os.environ | {"SEG_VENV": str(tmp_path / "venv"), "SEG_PYTHON": str(tmp_path / "nope")}
    done = subprocess.run(["bash", str(REPO / "launch"), "cv", "--help"], capture_output=True, text=True, env=env,
                          timeout=50)  # fmt: skip
    assert done.returncode == 2
    nope, venv = tmp_path / "nope", tmp_path / "venv"
    assert done.stderr == (f"launch: SEG_PYTHON={nope} is no interpreter here: name one that holds seg's "
                           f"requirements (python3, a path), or unset it to set up {venv}\n")  # fmt: skip
    assert not (tmp_path / "venv").exists()


def test_a_seg_python_without_segs_requirements_is_refused_naming_them(tmp_path):
    bare = tmp_path / "python"  # an interpreter without its site-packages: none of seg's requirements
    bare.write_text(f'#!/bin/sh\nexec {sys.executable} -S "$@"\n')
    bare.chmod(0o755)
    env = os.environ | {"SEG_VENV": str(tmp_path / "venv"), "SEG_PYTHON": str(bare)}
    env.pop("PYTHONPATH", None)
    done = subprocess.run(["bash", str(REPO / "launch"), "cv", "configs/demo.yaml"], capture_output=True, text=True,
                          env=env, timeout=50)  # fmt: skip
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith(f"launch: SEG_PYTHON={bare} lacks seg's requirements torch, numpy, pillow, ")
    assert "psutil" in done.stderr and done.stderr.count("\n") == 1
