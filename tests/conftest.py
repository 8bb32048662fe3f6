from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from seg.synthetic import make_synthetic

# A tiny synthetic Cityscapes: 6 train cities (uneven sizes), 2 val cities, 2 test cities.
TINY = {"counts": {"train": 30, "val": 8, "test": 4}, "cities": {"train": 6, "val": 2, "test": 2}, "size": (64, 32)}


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
