import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from seg.core import cityscapes as cs
from seg.core.atomic import OutputExistsError
from seg.data.synthetic import CITIES, FRAME, Frame, frame_rng, make_synthetic, paint_labels, png_bytes, render_image

from .conftest import TINY

REPO = Path(__file__).resolve().parents[1]


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_writes_the_official_layout(synthetic_root):
    images = sorted(synthetic_root.glob("leftImg8bit/*/*/*.png"))
    assert len(images) == sum(TINY["counts"].values())
    pattern = re.compile(r"leftImg8bit/(train|val|test)/([a-z]+)/\2_\d{6}_\d{6}_leftImg8bit\.png")
    for image in images:
        relative = image.relative_to(synthetic_root).as_posix()
        assert pattern.fullmatch(relative), relative
        split, city = image.parts[-3], image.parts[-2]
        assert city in CITIES[split]
        stem = image.name.removesuffix(cs.IMAGE_SUFFIX)
        for suffix in (cs.LABEL_IDS_SUFFIX, cs.COLOR_SUFFIX):
            label = synthetic_root / "gtFine" / split / city / f"{stem}{suffix}"
            assert label.is_file()
        assert Image.open(image).size == (TINY["size"].width, TINY["size"].height)
    for split, n_cities in TINY["cities"].items():
        assert len(list((synthetic_root / "leftImg8bit" / split).iterdir())) == n_cities


def test_same_seed_same_bytes_other_seed_other_scenes(synthetic_root, tmp_path):
    make_synthetic(tmp_path / "again", seed=0, progress=False, workers=2, **TINY)
    make_synthetic(tmp_path / "other", seed=1, progress=False, **TINY)
    assert _files(tmp_path / "again") == _files(synthetic_root)
    original = synthetic_root / "leftImg8bit/val/frankfurt/frankfurt_000000_000019_leftImg8bit.png"
    other = tmp_path / "other" / original.relative_to(synthetic_root)
    assert original.read_bytes() != other.read_bytes()


def test_refuses_an_existing_tree(synthetic_root):
    with pytest.raises(OutputExistsError, match="--overwrite"):
        make_synthetic(synthetic_root, progress=False, **TINY)


def _scene(index: int, width: int = 256, height: int = 128) -> tuple[np.ndarray, np.ndarray]:
    rng = frame_rng(0, Frame("train", CITIES["train"][index % 5], index))
    ids = paint_labels(rng, width, height)
    return ids, render_image(rng, ids)


def test_all_19_classes_and_ignore_ids_occur_across_a_small_set():
    seen = set()
    for index in range(20):
        ids, _ = _scene(index)
        seen |= set(np.unique(ids).tolist())
    train_ids = {int(cs.ID_TO_TRAINID[i]) for i in seen}
    assert train_ids == set(range(19)) | {255}
    for name in ("ego vehicle", "out of roi", "rectification border"):
        assert cs.LABEL_BY_NAME[name].id in seen, name


def test_classes_have_their_own_appearance():
    """A per-pixel nearest-mean-colour classifier, fit on some scenes, works on others:
    colour alone carries much of the class (texture and context carry the rest)."""
    scenes = [_scene(i) for i in range(24)]

    def pixels(subset):
        ids = np.concatenate([cs.ID_TO_TRAINID[s[0]].ravel() for s in subset])
        rgb = np.concatenate([s[1].reshape(-1, 3) for s in subset]).astype(np.float32)
        keep = ids != 255
        return ids[keep], rgb[keep]

    fit_ids, fit_rgb = pixels(scenes[:20])
    assert set(np.unique(fit_ids).tolist()) == set(range(19))
    means = np.stack([fit_rgb[fit_ids == c].mean(0) for c in range(19)])
    test_ids, test_rgb = pixels(scenes[20:])
    predicted = np.argmin(((test_rgb[:, None, :] - means[None]) ** 2).sum(-1), axis=1)
    assert (predicted == test_ids).mean() > 0.6


def test_full_resolution_images_are_textured_like_real_ones():
    _, image = _scene(0, 2048, 1024)
    assert image.shape == (1024, 2048, 3)
    # Real leftImg8bit PNGs are about 2-2.5 MB; flat colour would compress to a few kB.
    assert len(png_bytes(image)) > 1_500_000
    assert FRAME == 19


def test_a_portrait_size_is_written_with_a_warning_naming_the_swap(tmp_path, capsys):
    """A portrait scene can be meant, so make_synthetic warns (naming the likely swap) and writes it."""
    from tools.make_synthetic import main

    out = tmp_path / "tall"
    args = [str(out), "--train", "1", "--train-cities", "1", "--val", "0", "--val-cities", "0"]
    assert main([*args, "--test", "0", "--test-cities", "0", "--size", "32x64", "--workers", "1"]) == 0
    err = capsys.readouterr().err
    assert "warning: --size 32x64 is WIDTHxHEIGHT: 32 wide, 64 high, portrait" in err and "did you mean 64x32?" in err
    (image,) = out.glob("leftImg8bit/train/*/*.png")
    assert Image.open(image).size == (32, 64)
    assert main([str(tmp_path / "wide"), "--train", "1", "--train-cities", "1", "--val", "0", "--val-cities", "0",
                 "--test", "0", "--test-cities", "0", "--size", "64x32", "--workers", "1"]) == 0  # fmt: skip
    assert "warning" not in capsys.readouterr().err


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_or_sigterm_stops_the_workers_and_leaves_nothing(tmp_path, sig, code):
    """SIGTERM left a full-size partial tree and its workers running; now it is a Ctrl-C's exit."""
    out = tmp_path / "tree"
    script = f"""
import os, signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, whatever this test inherited
signal.signal(signal.SIGTERM, signal.SIG_DFL)
signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT, signal.SIGTERM])
from seg.core import parallel
from seg.data import synthetic
from tools.make_synthetic import main
real = synthetic.write_frame
def write_frame(root, frame, *args):
    if frame.split == "val":
        os.kill(os.getppid(), {int(sig)})
        while not parallel.stopping():
            time.sleep(0.01)
    return real(root, frame, *args)
synthetic.write_frame = write_frame
sys.exit(main([{str(out)!r}, "--train", "4", "--train-cities", "2", "--val", "2", "--val-cities", "1", "--test", "0",
               "--size", "64x32", "--workers", "2"]))
"""
    child = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)  # fmt: skip
    try:
        _, stderr = child.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        raise
    assert child.returncode == code and "Traceback" not in stderr, stderr
    assert f"interrupted: {out} not written (an existing one is untouched), nothing was left behind; exit {code}" in (
        stderr.replace("\r", "\n").splitlines()
    )
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ProcessLookupError):  # no worker outlived it
        os.killpg(child.pid, 0)


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--seed", "-1"], "--seed -1: "),
        (["--train", "0", "--val", "0", "--test", "0"], "--train, --val, --test are all 0"),
        (["--val", "-2"], "--val -2: "),
    ],
)
def test_nonsense_counts_seeds_and_workers_are_refused_in_one_line(tmp_path, capsys, args, named):
    """They were taken (an empty tree, negative workers) or named no option (a negative seed)."""
    from tools.make_synthetic import main

    assert main([str(tmp_path / "tree"), "--size", "64x32", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {named}") and err.count("\n") == 1, err
    assert list(tmp_path.iterdir()) == []


def test_a_worker_count_below_one_is_refused_as_the_command_line_is_read(tmp_path, capsys):
    from tools.make_synthetic import main

    with pytest.raises(SystemExit) as refused:
        main([str(tmp_path / "tree"), "--size", "64x32", "--workers", "-3"])
    assert refused.value.code == 2 and capsys.readouterr().err.endswith("error: argument --workers: -3: at least 1\n")
    assert list(tmp_path.iterdir()) == []
