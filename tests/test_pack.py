import io
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import psutil
import pytest
from PIL import Image

from seg.core import cityscapes as cs
from seg.core.cli import Size
from seg.data import pack as pack_module
from seg.data.manifest import ManifestError, fold_groups, load_manifest, shard_paths, verify
from seg.data.pack import Options, PackError, pack
from seg.data.synthetic import make_synthetic
from tools import pack_cityscapes

from .conftest import TINY

PIL_SIZE = (TINY["size"].width, TINY["size"].height)  # Pillow and the records say (width, height)

REPO = Path(__file__).resolve().parents[1]


def read_shards(out: Path) -> dict[str, dict[str, list[dict[str, bytes]]]]:
    """Every sample of every shard, read with tarfile alone: {group: {shard: [sample]}}."""
    manifest = load_manifest(out)
    result = {}
    for group, info in manifest["groups"].items():
        result[group] = {}
        for shard in info["shards"]:
            samples: dict[str, dict[str, bytes]] = {}
            with tarfile.open(out / shard["name"]) as tar:
                for member in tar:
                    key, ext = member.name.split(".", 1)
                    samples.setdefault(key, {"__key__": key})[ext] = tar.extractfile(member).read()
            result[group][shard["name"]] = list(samples.values())
    return result


def all_files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def leftovers(parent: Path) -> list[str]:
    if not parent.exists():
        return []
    return sorted(p.name for p in parent.iterdir() if ".partial-" in p.name or ".old-" in p.name)


@pytest.fixture(scope="module")
def packed(synthetic_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("packed") / "tiny"
    pack(synthetic_root, out, Options(shard_size=60_000), progress=False)
    return out


def test_every_frame_exactly_once_and_fold_groups_disjoint_and_complete(synthetic_root, packed):
    shards = read_shards(packed)
    keys = Counter(s["__key__"] for group in shards.values() for shard in group.values() for s in shard)
    expected = {p.name.removesuffix(cs.IMAGE_SUFFIX) for p in synthetic_root.glob("leftImg8bit/*/*/*.png")}
    assert set(keys) == expected
    assert set(keys.values()) == {1}

    manifest = load_manifest(packed)
    train_keys = {p.name.removesuffix(cs.IMAGE_SUFFIX) for p in synthetic_root.glob("leftImg8bit/train/*/*.png")}
    fold_keys = [{s["__key__"] for shard in shards[f"train-fold{k}"].values() for s in shard} for k in range(5)]
    for k in range(5):
        train_groups, _ = fold_groups(manifest, k)
        train = {s["__key__"] for g in train_groups for shard in shards[g].values() for s in shard}
        assert train.isdisjoint(fold_keys[k])
        assert train | fold_keys[k] == train_keys
    # city mode: a city never spans two folds
    cities = [{key.split("_")[0] for key in keys_} for keys_ in fold_keys]
    assert sum(len(c) for c in cities) == len(set().union(*cities)) == TINY["cities"]["train"]


def test_samples_hold_original_image_bytes_trainid_labels_and_records(synthetic_root, packed):
    manifest = load_manifest(packed)
    for group, group_shards in read_shards(packed).items():
        for shard, samples in group_shards.items():
            assert len(samples) == next(s["samples"] for s in manifest["groups"][group]["shards"] if s["name"] == shard)
            for sample in samples:
                record = json.loads(sample["json"])
                assert record["key"] == sample["__key__"]
                assert record["fold"] == manifest["groups"][group]["fold"]
                assert (record["height"], record["width"]) == TINY["size"]
                assert sample["image.png"] == (synthetic_root / record["image"]).read_bytes()
                if record["split"] == "test":
                    assert "label.png" not in sample and record["label"] is None
                    continue
                ids = np.asarray(Image.open(synthetic_root / record["label"]))
                label = np.asarray(Image.open(io.BytesIO(sample["label.png"])))
                np.testing.assert_array_equal(label, cs.ID_TO_TRAINID[ids])


def test_manifest_counts_and_class_histograms_match_an_independent_count(synthetic_root, packed):
    manifest = load_manifest(packed)
    # the format's name is on disk in every packed dataset: a module's move must not change it
    assert (manifest["format"], manifest["format_version"]) == ("seg.cityscapes-shards", 1)
    assert manifest["counts"]["train"] == TINY["counts"]["train"]
    assert manifest["counts"]["val"] == TINY["counts"]["val"]
    assert manifest["counts"]["test"] == TINY["counts"]["test"]
    assert sum(manifest["counts"]["folds"]) == TINY["counts"]["train"]
    for group, info in manifest["groups"].items():
        assert info["samples"] == sum(s["samples"] for s in info["shards"])
        if info["split"] == "test":
            assert info["class_pixels"] is None
            continue
        histogram = np.zeros(256, dtype=np.int64)
        for path in synthetic_root.glob(f"gtFine/{info['split']}/*/*{cs.LABEL_IDS_SUFFIX}"):
            if path.parent.name in info["cities"]:
                histogram += np.bincount(cs.ID_TO_TRAINID[np.asarray(Image.open(path))].ravel(), minlength=256)
        assert info["class_pixels"] == histogram[:19].tolist(), group
        assert info["ignore_pixels"] == histogram[255]
    for shard in (s for g in manifest["groups"].values() for s in g["shards"]):
        assert shard["bytes"] == (packed / shard["name"]).stat().st_size


def test_repacking_gives_byte_identical_shards_and_manifest_whatever_the_workers(synthetic_root, packed, tmp_path):
    pack(synthetic_root, tmp_path / "tiny", Options(shard_size=60_000), workers=2, progress=False)
    assert all_files(tmp_path / "tiny") == all_files(packed)
    assert len(list(packed.glob("*.tar"))) > 6  # several shards per group were cut


def test_random_folds_are_balanced_and_seeded(synthetic_root, tmp_path):
    a = pack(synthetic_root, tmp_path / "a", Options(fold_mode="random", folds=4, seed=3), progress=False)
    b = pack(synthetic_root, tmp_path / "b", Options(fold_mode="random", folds=4, seed=4), progress=False)
    assert sorted(a["counts"]["folds"]) == [7, 7, 8, 8]
    fold_keys = [
        sorted(s["__key__"] for shard in read_shards(out)["train-fold0"].values() for s in shard)
        for out in (tmp_path / "a", tmp_path / "b")
    ]
    assert fold_keys[0] != fold_keys[1]
    assert a["options"]["seed"] == 3 and b["options"]["fold_mode"] == "random"


def test_selection_cities_are_held_out_of_every_fold(synthetic_root, tmp_path):
    manifest = pack(synthetic_root, tmp_path / "s", Options(folds=3, selection_cities=("bremen",)), progress=False)
    assert manifest["groups"]["train-selection"]["cities"] == ["bremen"]
    for k in range(3):
        assert "bremen" not in manifest["groups"][f"train-fold{k}"]["cities"]
    selection = manifest["counts"]["selection"]
    assert selection == len(list(synthetic_root.glob("leftImg8bit/train/bremen/*.png"))) > 0
    assert sum(manifest["counts"]["folds"]) + selection == TINY["counts"]["train"]


def test_train_id_labels_are_used_as_they_are_when_present(tmp_path):
    root = tmp_path / "cs"
    make_synthetic(
        root,
        counts={"train": 6, "val": 2, "test": 0},
        cities={"train": 3, "val": 1, "test": 1},
        size=Size(32, 64),
        train_ids=True,
        progress=False,
    )
    manifest = pack(root, tmp_path / "out", Options(folds=3, splits=("train", "val")), progress=False)
    assert manifest["source"]["labels"] == {"labelTrainIds": 8}
    for group in read_shards(tmp_path / "out").values():
        for sample in (s for shard in group.values() for s in shard):
            record = json.loads(sample["json"])
            assert record["label_source"] == "labelTrainIds"
            assert sample["label.png"] == (root / record["label"]).read_bytes()


def test_jpg_image_format_is_an_explicit_lossy_option(synthetic_root, tmp_path):
    pack(synthetic_root, tmp_path / "jpg", Options(image_format="jpg", jpeg_quality=90), progress=False)
    sample = next(iter(read_shards(tmp_path / "jpg")["val"].values()))[0]
    image = Image.open(io.BytesIO(sample["image.jpg"]))
    assert image.format == "JPEG" and image.size == PIL_SIZE
    assert load_manifest(tmp_path / "jpg")["options"]["jpeg_quality"] == 90


def test_verify_passes_then_catches_a_flipped_byte_a_missing_and_a_stray_shard(packed, tmp_path):
    assert verify(packed) == []
    out = tmp_path / "copy"
    out.mkdir()
    for name, data in all_files(packed).items():
        (out / name).write_bytes(data)
    victim = out / "val-000000.tar"
    data = bytearray(victim.read_bytes())
    data[700] ^= 0x01
    victim.write_bytes(bytes(data))
    (out / "test-000000.tar").unlink()
    (out / "stray-000000.tar").write_bytes(b"x")
    problems = verify(out, workers=2)
    assert len(problems) == 3
    assert any("val-000000.tar" in p and "sha256" in p for p in problems)
    assert any("test-000000.tar" in p and "missing" in p for p in problems)
    assert any("stray-000000.tar" in p and "not listed" in p for p in problems)
    assert pack_cityscapes.main(["--verify", str(out)]) == 1


def test_manifest_helpers_name_what_is_wrong(packed, tmp_path):
    manifest = load_manifest(packed)
    with pytest.raises(ManifestError, match="fold 5 does not exist"):
        fold_groups(manifest, 5)
    with pytest.raises(ManifestError, match="group 'nope'"):
        shard_paths(packed, manifest, ["nope"])
    with pytest.raises(ManifestError, match="not found"):
        load_manifest(tmp_path)
    file = tmp_path / "shards.tar"  # was NotADirectoryError: 'shards.tar/manifest.json'
    file.write_bytes(b"x")
    with pytest.raises(ManifestError, match=f"^{file} is a file, not a packed dataset folder"):
        load_manifest(file)
    assert pack_cityscapes.main(["--verify", str(file)]) == 2


# --- bad input: one clear error naming the file, exit code 2, nothing left behind ---------


def _break_missing_label(root: Path) -> str:
    path = next(root.glob(f"gtFine/train/*/*{cs.LABEL_IDS_SUFFIX}"))
    path.unlink()
    return path.name.replace(cs.LABEL_IDS_SUFFIX, cs.IMAGE_SUFFIX)


def _break_missing_image(root: Path) -> str:
    path = next(root.glob("leftImg8bit/val/*/*.png"))
    path.unlink()
    return path.name.replace(cs.IMAGE_SUFFIX, cs.LABEL_IDS_SUFFIX)


def _break_size(root: Path) -> str:
    path = sorted(root.glob(f"gtFine/train/*/*{cs.LABEL_IDS_SUFFIX}"))[-1]
    Image.open(path).resize((32, 16), Image.NEAREST).save(path)
    return path.name


def _break_ids(root: Path) -> str:
    path = sorted(root.glob(f"gtFine/val/*/*{cs.LABEL_IDS_SUFFIX}"))[-1]
    ids = np.asarray(Image.open(path)).copy()
    ids[0, :3] = 200
    Image.fromarray(ids).save(path)
    return path.name


def _break_truncated_image(root: Path) -> str:
    path = sorted(root.glob("leftImg8bit/train/*/*.png"))[-1]
    path.write_bytes(path.read_bytes()[:-40])
    return path.name


def _break_truncated_label(root: Path) -> str:
    path = sorted(root.glob(f"gtFine/train/*/*{cs.LABEL_IDS_SUFFIX}"))[3]
    path.write_bytes(path.read_bytes()[:100])
    return path.name


def _break_folder_named_as_an_image(root: Path) -> str:
    city = sorted(root.glob("leftImg8bit/train/*"))[0]
    (city / f"{city.name}_999999_000019{cs.IMAGE_SUFFIX}").mkdir()
    return f"{city.name}_999999_000019{cs.IMAGE_SUFFIX}"


def _break_empty_split(root: Path) -> str:
    for path in root.glob("leftImg8bit/test/*/*.png"):
        path.unlink()
    return "split 'test' has no images"


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (_break_missing_label, "no label for this image"),
        (_break_missing_image, "label without an image"),
        (_break_size, "does not match its image"),
        (_break_ids, r"values \[200\] are not Cityscapes labelIds"),
        (_break_truncated_image, "truncated or corrupt"),
        (_break_truncated_label, "truncated or corrupt"),
        (_break_empty_split, "--splits"),
        (_break_folder_named_as_an_image, "is not a file"),
    ],
)
@pytest.mark.parametrize("workers", [1, 2])
def test_bad_input_gets_one_clear_error_and_leaves_nothing(tree, tmp_path, capsys, damage, message, workers):
    named = damage(tree)
    out = tmp_path / "shards" / "out"
    code = pack_cityscapes.main([str(tree), "--out", str(out), "--workers", str(workers), "--shard-size", "20KB"])
    err = capsys.readouterr().err
    assert code == 2
    assert named in err and re.search(message, err), err
    assert err.count("error:") == 1
    assert not out.exists() and leftovers(out.parent) == []


def test_more_folds_than_cities_is_refused(synthetic_root, tmp_path, capsys):
    code = pack_cityscapes.main([str(synthetic_root), "--out", str(tmp_path / "o"), "--folds", "7"])
    assert code == 2
    assert "--folds 7 with --fold-mode city needs at least 7 cities" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_existing_output_is_refused_unless_overwrite(synthetic_root, packed, tmp_path, capsys):
    out = tmp_path / "tiny"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert pack_cityscapes.main([str(synthetic_root), "--out", str(out)]) == 2
    assert "already exists: pass --overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
    assert pack_cityscapes.main([str(synthetic_root), "--out", str(out), "--overwrite", "--shard-size", "60000"]) == 0
    assert all_files(out) == all_files(packed)
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize(
    ("where", "relation"),
    [("root", "is"), ("link", "is"), ("parent", "contains"), ("inside", "is inside")],
)
def test_an_out_that_is_holds_or_lies_in_the_root_is_refused_and_the_tree_kept(tree, capsys, where, relation):
    """--overwrite replaces the output whole: packing into the tree (or a folder holding it)
    deleted leftImg8bit/ and gtFine/."""
    (tree.parent / "link").symlink_to(tree)
    out = {"root": tree, "link": tree.parent / "link", "parent": tree.parent, "inside": tree / "shards"}[where]
    before = sorted(p.relative_to(tree) for p in tree.rglob("*"))
    assert pack_cityscapes.main([str(tree), "--out", str(out), "--folds", "3", "--overwrite", "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --out {out} {relation} the Cityscapes root {tree}:") and err.count("\n") == 1, err
    assert sorted(p.relative_to(tree) for p in tree.rglob("*")) == before


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--fold-mode", "random", "--selection-fraction", "-0.5"], "--selection-fraction -0.5: "),
        (["--fold-mode", "random", "--selection-fraction", "nan"], "--selection-fraction nan: "),
        (["--fold-mode", "random", "--selection-fraction", "1"], "--selection-fraction 1.0: "),
        (["--image-format", "jpg", "--jpeg-quality", "1000"], "--jpeg-quality 1000: "),
        (["--image-format", "jpg", "--jpeg-quality", "0"], "--jpeg-quality 0: "),
        (["--jpeg-quality", "-7"], "--jpeg-quality -7: "),
        (["--splits", ","], "--splits names no split"),
        (["--seed", "-1"], "--seed -1: "),
    ],
)
def test_nonsense_options_are_refused_in_one_line_before_anything_is_written(
    synthetic_root, tmp_path, capsys, args, named
):
    """They ran (a negative fraction held half the frames out, quality 1000 was recorded, no
    splits packed an empty dataset) or ended in a traceback (nan, a negative seed)."""
    out = tmp_path / "o"
    assert pack_cityscapes.main([str(synthetic_root), "--out", str(out), "--folds", "3", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {named}") and err.count("\n") == 1, err
    assert list(tmp_path.iterdir()) == []


def test_a_worker_count_below_one_is_refused_as_the_command_line_is_read(synthetic_root, tmp_path, capsys):
    """seg.core.cli.at_least, as every count of every command: argparse's usage, then the error."""
    with pytest.raises(SystemExit) as refused:
        pack_cityscapes.main([str(synthetic_root), "--out", str(tmp_path / "o"), "--workers", "-1"])
    assert refused.value.code == 2
    assert capsys.readouterr().err.endswith("error: argument --workers: -1: at least 1\n")
    assert list(tmp_path.iterdir()) == []


def test_interrupt_mid_pack_leaves_nothing_and_keeps_an_existing_output(synthetic_root, packed, tmp_path, monkeypatch):
    out = tmp_path / "tiny"
    pack(synthetic_root, out, Options(shard_size=60_000), progress=False)
    before = all_files(out)
    real, calls = pack_module.write_shard, []

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(pack_module, "write_shard", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pack(synthetic_root, out, Options(shard_size=60_000), overwrite=True, progress=False)
    assert all_files(out) == before
    assert leftovers(tmp_path) == []


def test_the_command_line_as_a_user_runs_it(synthetic_root, tmp_path):
    out = tmp_path / "shards" / "tiny"
    run = [sys.executable, str(REPO / "tools" / "pack_cityscapes.py")]
    packed = subprocess.run([*run, str(synthetic_root), "--out", str(out)], capture_output=True, text=True)
    assert packed.returncode == 0, packed.stderr
    assert "packed train 30, val 8, test 4 frames" in packed.stdout
    verified = subprocess.run([*run, "--verify", str(out)], capture_output=True, text=True)
    assert verified.returncode == 0 and "every shard matches the manifest" in verified.stdout


def test_pack_errors_are_pack_errors(tree):
    with pytest.raises(PackError, match="--selection-cities nowhere"):
        pack(tree, tree.parent / "o", Options(selection_cities=("nowhere",)), progress=False)


def _children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


@pytest.mark.timeout(240)
def test_the_error_path_never_hangs_with_several_workers_on_a_busy_machine(tree, tmp_path):
    """Issue 11: ``Pool.terminate()`` in the error path could kill a worker that held the
    result queue's lock and then wait forever (about once in 300 errors on a loaded machine).
    Thirty error exits with 4 workers and 2 CPU hogs: each one quick, nothing left behind."""
    for path in sorted(tree.glob(f"gtFine/train/*/*{cs.LABEL_IDS_SUFFIX}"))[1::4]:
        ids = np.asarray(Image.open(path)).copy()
        ids[0, :3] = 200
        Image.fromarray(ids).save(path)
    before = _children()
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    slowest = 0.0
    try:
        for i in range(30):
            out = tmp_path / "shards" / f"out{i}"
            start = time.monotonic()
            with pytest.raises(PackError, match=r"values \[200\] are not Cityscapes labelIds"):
                pack(tree, out, Options(shard_size=1), workers=4, progress=False)
            slowest = max(slowest, time.monotonic() - start)
            assert not out.exists() and leftovers(out.parent) == []
            assert _children() - before == {h.pid for h in hogs}, "pool workers outlived pack()"
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    assert slowest < 60, f"an error exit took {slowest:.0f} s"


# A packer's script starts as in a terminal, whatever the test inherited (an xdist worker ignores SIGINT).
_AS_IN_A_TERMINAL = """
import os, signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, whatever this test inherited
signal.signal(signal.SIGTERM, signal.SIG_DFL)
signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT, signal.SIGTERM])
from seg.data import pack
from seg.core import parallel
"""


def test_ctrl_c_with_workers_stops_them_within_a_sample_and_leaves_nothing(synthetic_root, tmp_path):
    """Ctrl-C reaches the packer only (workers ignore SIGINT); the workers see the stop and
    end within one sample, the packer waits for them and removes its partial output."""
    out, saw_stop = tmp_path / "shards" / "tiny", tmp_path / "worker-saw-the-stop"
    script = (
        _AS_IN_A_TERMINAL
        + f"""
real = pack.write_shard
def write_shard(root, out, job, options):
    if not job.name.startswith("train-fold1-"):
        return real(root, out, job, options)
    os.kill(os.getppid(), signal.SIGINT)
    deadline = time.monotonic() + 60
    while not parallel.stopping() and time.monotonic() < deadline:
        time.sleep(0.01)
    if parallel.stopping():
        open({str(saw_stop)!r}, "a").close()
    return real(root, out, job, options)
pack.write_shard = write_shard
pack.pack({str(synthetic_root)!r}, {str(out)!r}, pack.Options(shard_size=1), workers=2, progress=False)
"""
    )
    packer = subprocess.Popen(
        [sys.executable, "-c", script], cwd=REPO, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        _, stderr = packer.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(packer.pid, signal.SIGKILL)  # leave nothing running
        raise
    assert packer.returncode != 0 and "KeyboardInterrupt" in stderr, stderr
    assert saw_stop.exists()
    assert not out.exists() and leftovers(out.parent) == []
    with pytest.raises(ProcessLookupError):  # no worker outlived the packer
        os.killpg(packer.pid, 0)


def _run_stopped(script: str, timeout: float = 120) -> subprocess.Popen:
    """Run ``script`` to its end in a session of its own (``.stderr`` its text); on a timeout
    nothing of it is left running."""
    child = subprocess.Popen(
        [sys.executable, "-c", script], cwd=REPO, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        _, stderr = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        raise
    child.stderr = stderr
    return child


def _gone(pids: list[int], within: float = 20) -> bool:
    """Whether every pid has ended (a zombie waiting for init to reap it counts) within ``within`` s."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        if not alive:
            return True
        time.sleep(0.1)
    for pid in alive:
        os.kill(pid, signal.SIGKILL)
    return False


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_or_sigterm_of_the_command_stops_its_workers_and_says_so_in_one_line(
    synthetic_root, tmp_path, sig, code
):
    """A kill (SIGTERM) cleans up as a Ctrl-C does, exit 143: it left a full-size partial folder
    and workers running; a Ctrl-C printed a KeyboardInterrupt traceback."""
    out = tmp_path / "shards" / "tiny"
    script = (
        _AS_IN_A_TERMINAL
        + f"""
from tools import pack_cityscapes
real = pack.write_shard
def write_shard(root, out, job, options):
    if job.name.startswith("train-fold1-"):
        os.kill(os.getppid(), {int(sig)})
        deadline = time.monotonic() + 60
        while not parallel.stopping() and time.monotonic() < deadline:
            time.sleep(0.01)
    return real(root, out, job, options)
pack.write_shard = write_shard
sys.exit(pack_cityscapes.main([{str(synthetic_root)!r}, "--out", {str(out)!r}, "--shard-size", "1", "--workers", "2"]))
"""
    )
    done = _run_stopped(script)
    lines = done.stderr.replace("\r", "\n").splitlines()
    assert done.returncode == code and "Traceback" not in done.stderr, done.stderr
    assert (
        f"interrupted: {out} not packed (an existing one is untouched), nothing was left behind; exit {code}" in lines
    )
    assert not out.exists() and leftovers(out.parent) == [] and not (out.parent / ".tiny.lease").exists()
    with pytest.raises(ProcessLookupError):  # no worker outlived the packer
        os.killpg(done.pid, 0)


def test_a_packer_killed_hard_takes_its_workers_along_and_a_rerun_removes_what_it_left(
    synthetic_root, tmp_path, capsys
):
    """SIGKILL (the OOM killer, a second TERM's kill -9) leaves the partial folder: the workers
    die with the packer (they ran on, re-parented to init), and the next pack removes it."""
    out, pids = tmp_path / "shards" / "tiny", tmp_path / "worker-pids"
    script = f"""
import os, signal, time
from seg.data import pack
real = pack.write_shard
def write_shard(root, out, job, options):
    with open({str(pids)!r}, "a") as f:
        f.write(f"{{os.getpid()}}\\n")
    if job.name.startswith("train-fold1-"):
        os.kill(os.getppid(), signal.SIGKILL)
        time.sleep(60)
    return real(root, out, job, options)
pack.write_shard = write_shard
pack.pack({str(synthetic_root)!r}, {str(out)!r}, pack.Options(shard_size=1), workers=2, progress=False)
"""
    done = _run_stopped(script)
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert _gone(sorted({int(pid) for pid in pids.read_text().split()})), "workers outlived the packer"
    assert len(leftovers(out.parent)) == 1 and (out.parent / ".tiny.lease").exists()
    assert pack_cityscapes.main([str(synthetic_root), "--out", str(out), "--folds", "3", "--workers", "1"]) == 0
    assert "taking over the lease of pack_cityscapes into" in capsys.readouterr().out
    assert leftovers(out.parent) == [] and sorted(p.name for p in out.parent.iterdir()) == ["tiny"]


def test_resize_stores_the_train_split_at_the_training_size_and_keeps_val_and_test(synthetic_root, tmp_path):
    out = tmp_path / "resized"
    pack(synthetic_root, out, Options(folds=3, resize=(16, 32)), progress=False)
    manifest = load_manifest(out)
    assert manifest["options"]["resize"] == {"height": 16, "width": 32}
    for group, group_shards in read_shards(out).items():
        pixels = np.zeros(256, dtype=np.int64)
        for samples in group_shards.values():
            for sample in samples:
                record = json.loads(sample["json"])
                image = Image.open(io.BytesIO(sample["image.png"]))
                stored = (32, 16) if record["split"] == "train" else PIL_SIZE
                assert image.size == (record["width"], record["height"]) == stored
                assert (record["source_width"], record["source_height"]) == PIL_SIZE
                if record["split"] == "test":
                    continue
                # the label: the full-resolution trainIds resized with nearest neighbours
                ids = Image.fromarray(cs.ID_TO_TRAINID[np.asarray(Image.open(synthetic_root / record["label"]))])
                expected = np.asarray(ids.resize(stored, Image.NEAREST))
                label = np.asarray(Image.open(io.BytesIO(sample["label.png"])))
                np.testing.assert_array_equal(label, expected)
                pixels += np.bincount(label.ravel(), minlength=256)
                if record["split"] == "train":  # the image: Pillow's bilinear (antialiased) resize
                    source = Image.open(synthetic_root / record["image"]).convert("RGB")
                    resized = np.asarray(source.resize(stored, Image.BILINEAR))
                    np.testing.assert_array_equal(np.asarray(image), resized)
        if manifest["groups"][group]["class_pixels"] is not None:  # class weights see what training sees
            assert manifest["groups"][group]["class_pixels"] == pixels[: cs.NUM_CLASSES].tolist()


def test_resize_larger_than_the_frames_is_refused(synthetic_root, tmp_path):
    with pytest.raises(PackError, match="larger than the image"):
        pack(synthetic_root, tmp_path / "big", Options(resize=(64, 128)), progress=False)
    assert leftovers(tmp_path) == []


def test_a_resize_the_wrong_way_round_is_refused_naming_the_swap(synthetic_root, tmp_path, capsys):
    """--resize is WIDTHxHEIGHT: 32x48 on 64x32 landscape frames would store portrait, squashed images."""
    out = tmp_path / "swapped"
    assert pack_cityscapes.main([str(synthetic_root), "--out", str(out), "--resize", "32x48", "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "--resize 32x48 is WIDTHxHEIGHT: 32 wide, 48 high, portrait" in err
    assert "64x32, landscape; did you mean 48x32?" in err
    assert re.search(r"but the train frames \(e\.g\. \w+_leftImg8bit\.png\) are 64x32", err), err  # not "is"
    assert not out.exists() and leftovers(tmp_path) == []
