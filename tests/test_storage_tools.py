"""The command-line steps on a full or read-only disk: one line naming the path and what to
do, exit 74, checked before the work where the output folder is known, nothing half-written."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from seg.core.cli import Size
from seg.core.storage import EXIT_STORAGE, StorageError, check_writable, storage_problem, writable_problem, writing
from seg.data.pack import Options, pack
from seg.data.synthetic import make_synthetic
from seg.model.deeplab import DeepLabV3Plus
from seg.model.weights import export_weights
from seg.recipe.config import load_config, to_dict
from tests.disks import tmpfs

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tree_model_shards(tmp_path_factory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("storage-tools")
    make_synthetic(root / "cityscapes", counts={"train": 4, "val": 2, "test": 0},
                   cities={"train": 2, "val": 1, "test": 1}, size=Size(32, 64), progress=False)  # fmt: skip
    pack(root / "cityscapes", root / "shards", Options(folds=2, splits=("train", "val")), progress=False)
    config = load_config(REPO / "configs" / "demo.yaml", [f"data.shards={root / 'shards'}"])
    export_weights(DeepLabV3Plus(18, 16).eval(), root / "model.safetensors", {"config": to_dict(config), "metrics": {}})
    return root / "cityscapes", root / "model.safetensors", root / "shards"


def _tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, cwd=REPO)


def _error_line(done: subprocess.CompletedProcess) -> str:
    """The one error line (a progress bar may share stderr; no traceback)."""
    assert done.returncode == EXIT_STORAGE, done.stderr[-3000:]
    lines = [line for line in done.stderr.replace("\r", "\n").splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    return lines[0]


def test_the_one_line_names_the_path_why_and_what_to_do_for_every_kind_of_refusal(tmp_path):
    import errno

    for code, words, fix in [
        (errno.ENOSPC, "no space left on the device", "free space there or write elsewhere"),
        (errno.EDQUOT, "disk quota exceeded", "free space within the quota"),
        (errno.EROFS, "read-only file system", "write to a writable folder"),
        (errno.EACCES, "permission denied", "make it writable for this user"),
    ]:
        line = storage_problem(OSError(code, "x", str(tmp_path / "f")), tmp_path, "saving")
        assert line.startswith(f"saving {tmp_path / 'f'} failed: {words}") and fix in line
    assert storage_problem(FileNotFoundError(errno.ENOENT, "x"), tmp_path) is None  # not the disk's state
    assert storage_problem(ValueError("not about the disk"), tmp_path) is None
    with pytest.raises(StorageError, match="writing"), writing(tmp_path):
        raise OSError(errno.EDQUOT, "quota")
    with pytest.raises(KeyError), writing(tmp_path):
        raise KeyError("anything else passes")


def test_a_file_where_a_folder_is_expected_is_named_in_one_line(tree_model_shards, tmp_path):
    """evaluate/predict/report --out FILE, reduce_folds.py FILE and pack --out FILE/sub all ended in
    NotADirectoryError: 'FILE/tmpXXXX', from the writable check itself."""
    tree, model, _ = tree_model_shards
    file = tmp_path / "results.txt"
    file.write_text("a file, not a folder")
    assert writable_problem(file) == f"{file} is a file, not a folder: give a folder, or move the file away"
    assert f"(where {file / 'sub'} would be made)" in writable_problem(file / "sub")
    with pytest.raises(StorageError, match="is a file, not a folder"):
        check_writable(file / "sub")
    image = next((tree / "leftImg8bit" / "val").rglob("*.png"))
    for done in (
        _tool(str(REPO / "tools" / "evaluate.py"), str(model), "--out", str(file), "--workers", "0"),
        _tool(str(REPO / "tools" / "predict.py"), str(model), str(image), "--out", str(file)),
        _tool(str(REPO / "tools" / "reduce_folds.py"), str(file)),
        _tool(str(REPO / "tools" / "pack_cityscapes.py"), str(tree), "--out", str(file / "sub")),
    ):
        assert f"error: {file} is a file, not a folder" in _error_line(done)
    assert file.read_text() == "a file, not a folder"


def test_pack_on_a_full_disk_says_so_in_one_line_and_leaves_nothing(tree_model_shards, tmp_path):
    tree, _, _ = tree_model_shards
    with tmpfs(tmp_path / "disk", "40k") as disk:  # room for a start, not for the shards
        done = _tool(str(REPO / "tools" / "pack_cityscapes.py"), str(tree), "--out", str(disk / "shards"),
                     "--folds", "2", "--splits", "train,val", "--workers", "2", "--shard-size", "20kB")  # fmt: skip
        line = _error_line(done)
        assert f"packing into {disk / 'shards'} failed: no space left on the device" in line
        assert list(disk.iterdir()) == []  # the partial output was removed


def test_make_synthetic_into_a_read_only_or_full_disk_says_so_in_one_line_and_leaves_nothing(tmp_path):
    """It ended in an OSError traceback (Errno 30, 28), exit 1."""
    tool = (str(REPO / "tools" / "make_synthetic.py"), "--train", "3", "--train-cities", "1", "--val", "0",
            "--test", "0", "--size", "512x256", "--workers", "2")  # fmt: skip
    with tmpfs(tmp_path / "ro", "1m", read_only=True) as ro:
        refused = _tool(tool[0], str(ro / "tree"), *tool[1:])
    assert f"cannot create files in {ro} (read-only file system)" in _error_line(refused)
    with tmpfs(tmp_path / "disk", "200k") as disk:  # room for a start, not for the tree
        filled = _tool(tool[0], str(disk / "tree"), *tool[1:])
        assert f"writing {disk / 'tree'} failed: no space left on the device" in _error_line(filled)
        assert list(disk.iterdir()) == []  # the partial tree was removed


def test_evaluate_into_a_read_only_folder_is_refused_before_any_image(tree_model_shards, tmp_path):
    _, model, _ = tree_model_shards
    with tmpfs(tmp_path / "ro", "1m", read_only=True) as ro:
        done = _tool(str(REPO / "tools" / "evaluate.py"), str(model), "--out", str(ro / "eval"), "--workers", "0")
    line = _error_line(done)
    assert f"cannot create files in {ro} (read-only file system)" in line
    assert "mIoU" not in done.stdout and "images" not in done.stdout  # refused before the work


def test_evaluate_exporting_to_a_disk_that_fills_says_so_in_one_line(tree_model_shards, tmp_path):
    _, model, _ = tree_model_shards
    with tmpfs(tmp_path / "disk", "4k") as disk:  # room for a PNG or so, not for every prediction
        done = _tool(str(REPO / "tools" / "evaluate.py"), str(model), "--out", str(tmp_path / "eval"), "--export",
                     str(disk / "png"), "--workers", "0", "--input-size", "full")  # fmt: skip
    line = _error_line(done)
    assert f"exporting predictions to {disk / 'png'} failed: no space left on the device" in line


def test_predict_report_and_reduce_into_read_only_folders_are_refused(tree_model_shards, tmp_path):
    tree, model, _ = tree_model_shards
    image = next((tree / "leftImg8bit" / "val").rglob("*.png"))
    with tmpfs(tmp_path / "ro", "1m", read_only=True) as ro:
        predicted = _tool(str(REPO / "tools" / "predict.py"), str(model), str(image), "--out", str(ro / "out"))
        reported = _tool(str(REPO / "tools" / "report.py"), str(tmp_path), "--out", str(ro / "report"))
        reduced = _tool(str(REPO / "tools" / "reduce_folds.py"), str(ro))
    assert f"cannot create files in {ro} (read-only file system)" in _error_line(predicted)
    assert f"cannot create files in {ro} (read-only file system)" in _error_line(reported)
    assert f"cannot create files in {ro} (read-only file system)" in _error_line(reduced)


def test_a_model_written_to_a_full_disk_leaves_no_torn_file(tmp_path):
    """export_weights writes through a temporary file: a full disk leaves the old file or none."""
    with tmpfs(tmp_path / "disk", "1m") as disk:
        with pytest.raises(OSError) as failed:
            export_weights(DeepLabV3Plus(18, 16), disk / "model.safetensors", {"metrics": {}})
        assert "no space left" in storage_problem(failed.value, disk / "model.safetensors")
        assert list(disk.iterdir()) == []
    torch.manual_seed(0)
