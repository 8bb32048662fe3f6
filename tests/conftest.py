from __future__ import annotations

import importlib.metadata
import shutil
from pathlib import Path

import pytest

from seg.core.cli import Size
from seg.data.synthetic import make_synthetic

# A tiny synthetic Cityscapes: 6 train cities (uneven sizes), 2 val cities, 2 test cities.
TINY = {"counts": {"train": 30, "val": 8, "test": 4}, "cities": {"train": 6, "val": 2, "test": 2}, "size": Size(32, 64)}


def pytest_configure(config: pytest.Config) -> None:
    """``--dist loadgroup`` keeps an xdist_group on one worker, and the Slurm tests rely on it
    (one cluster per machine). pytest 9.2 with pytest-xdist 3.8 silently stops the grouping
    (pytest-xdist#1386): the Slurm tests then split over the workers and one waits for the
    other's whole session. Refuse that pair instead of running twice as long."""
    if getattr(config.option, "dist", "no") != "loadgroup":
        return
    xdist = tuple(int(part) for part in importlib.metadata.version("pytest-xdist").split(".")[:2])
    if pytest.version_tuple[:2] >= (9, 2) and xdist <= (3, 8):
        raise pytest.UsageError(
            f"pytest {pytest.__version__} with pytest-xdist {'.'.join(map(str, xdist))} does not group "
            f"--dist loadgroup (pytest-xdist#1386): install the test extras (pip install -e '.[test]', pytest<9.2)"
        )


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A read-only tiny synthetic tree shared by the session: copy it before changing it."""
    root = tmp_path_factory.mktemp("synthetic") / "cityscapes"
    make_synthetic(root, seed=0, progress=False, **TINY)
    return root


@pytest.fixture
def tree(synthetic_root: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny tree, free to damage."""
    root = tmp_path / "cityscapes"
    shutil.copytree(synthetic_root, root)
    return root
