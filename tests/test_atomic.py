"""seg/core/atomic.py: what appears is complete, and readable as a plain open()/mkdir would make it."""

import contextlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from seg.core.atomic import (
    atomic_directory,
    atomic_write_bytes,
    leased_atomic_directory,
    plain_modes,
    remove_leftovers,
)
from seg.core.cli import Size
from seg.core.lease import LeaseHeldError
from seg.data.pack import Options, pack
from seg.data.synthetic import make_synthetic
from seg.model.weights import export_weights


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def modes(root: Path) -> dict[str, int]:
    """The mode of ``root`` and of everything under it, by relative path."""
    return {".": mode(root)} | {p.relative_to(root).as_posix(): mode(p) for p in root.rglob("*")}


@pytest.mark.parametrize(("mask", "file_mode", "dir_mode"), [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_files_and_folders_get_the_modes_of_a_plain_open_and_mkdir(tmp_path, mask, file_mode, dir_mode):
    with umask(mask):
        atomic_write_bytes(tmp_path / "a.json", b"{}\n")
        with atomic_directory(tmp_path / "folder") as tmp:
            (tmp / "inside.txt").write_text("x")
            (tmp / "sub").mkdir()
        make_synthetic(tmp_path / "cityscapes", counts={"train": 4, "val": 1, "test": 1},
                       cities={"train": 2, "val": 1, "test": 1}, size=Size(16, 32), progress=False)  # fmt: skip
        pack(tmp_path / "cityscapes", tmp_path / "shards", Options(folds=2), progress=False)
        export_weights(torch.nn.Linear(2, 2), tmp_path / "model.safetensors", {"config": {}})
    assert mode(tmp_path / "a.json") == file_mode
    assert modes(tmp_path / "folder") == {".": dir_mode, "inside.txt": file_mode, "sub": dir_mode}
    shards = modes(tmp_path / "shards")
    assert shards.pop(".") == dir_mode and "manifest.json" in shards and len(shards) > 3
    assert set(shards.values()) == {file_mode}, shards
    assert {m for p, m in modes(tmp_path / "cityscapes").items() if (tmp_path / "cityscapes" / p).is_dir()} == {
        dir_mode
    }
    assert mode(tmp_path / "model.safetensors") == mode(tmp_path / "model.json") == file_mode
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_a_replaced_file_keeps_its_mode_and_a_failed_write_leaves_the_old_one(tmp_path):
    from seg.core.atomic import current_umask

    with umask(0o027):
        assert current_umask() == 0o027 and current_umask() == 0o027  # read without changing it
    target = tmp_path / "summary.json"
    target.write_text("old")
    target.chmod(0o640)
    with umask(0o022):
        atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new" and mode(target) == 0o640

    class BoomError(Exception):
        pass

    with pytest.raises(BoomError), atomic_directory(tmp_path / "out") as tmp:
        (tmp / "half").write_text("x")
        raise BoomError
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


@pytest.mark.parametrize(("mask", "file_mode", "dir_mode"), [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_what_a_library_wrote_privately_gets_plain_modes(tmp_path, mask, file_mode, dir_mode):
    from safetensors.torch import save_file

    state = tmp_path / "state"
    (state / "sub").mkdir(parents=True)
    save_file({"w": torch.zeros(2)}, str(state / "model.safetensors"))  # safetensors writes 0600
    (state / "sub" / "random_states.pkl").write_bytes(b"x")
    with umask(mask):
        plain_modes(state)
    assert modes(state) == {".": dir_mode, "sub": dir_mode, "model.safetensors": file_mode,
                            "sub/random_states.pkl": file_mode}  # fmt: skip


def test_remove_leftovers_takes_what_hard_kills_left_and_nothing_else(tmp_path: Path):
    for folder in (".reduced.partial-ab12", ".reduced.old-cd34", ".other.partial-ef56"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "model.safetensors").write_bytes(b"x")
    for file in (".summary.json.k1ll.tmp", ".lease", "summary.json", ".reduce.lease"):
        (tmp_path / file).write_text("{}")
    removed = remove_leftovers(tmp_path, "reduced")
    assert sorted(p.name for p in removed) == [".reduced.old-cd34", ".reduced.partial-ab12"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".lease",
        ".other.partial-ef56",
        ".reduce.lease",
        ".summary.json.k1ll.tmp",
        "summary.json",
    ]
    assert sorted(p.name for p in remove_leftovers(tmp_path)) == [".other.partial-ef56", ".summary.json.k1ll.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lease", ".reduce.lease", "summary.json"]


def test_the_one_writer_of_an_output_removes_what_killed_writers_of_it_left(tmp_path: Path):
    """A pack or synthetic tree killed hard leaves ``.NAME.partial-*``: the next writer of NAME
    removes it, holding NAME's lease, so another live writer's work in progress is safe."""
    for folder in (".out.partial-k1ll", ".out.old-k1ll", ".other.partial-k1ll"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "shard.tar").write_bytes(b"x")
    with leased_atomic_directory(tmp_path / "out", "a test") as tmp:
        assert sorted(p.name for p in tmp_path.iterdir()) == [".other.partial-k1ll", ".out.lease", tmp.name]
        with pytest.raises(LeaseHeldError, match="a test"), leased_atomic_directory(tmp_path / "out", "a second"):
            pass
        assert tmp.is_dir()  # the refused writer left it alone
        (tmp / "shard.tar").write_bytes(b"y")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.partial-k1ll", "out"]
