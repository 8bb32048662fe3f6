import contextlib
import itertools
import random
import shutil
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from seg.core import cityscapes as cs
from seg.data.augment import IMAGENET_MEAN, IMAGENET_STD, DeviceAugment, cut_on_device, elastic
from seg.data.loader import (
    DataError,
    EvalStream,
    TrainStream,
    eval_loader,
    shards_of,
    steps_per_epoch,
    train_loader,
)
from seg.data.manifest import FoldSplit, ManifestError, load_manifest
from seg.data.pack import Options, pack
from seg.data.transforms import TrainGeometry, _cat_max_ok, decoded_sample, eval_sample, train_sample
from seg.data.workers import auto_workers, ignore_signals, loader_options, resolve_workers, workers_problem

GEOMETRY = TrainGeometry(size=(16, 32), base_size=(32, 64))


@pytest.fixture(scope="module")
def many_shards(synthetic_root, tmp_path_factory) -> Path:
    """Train folds of 1-3 samples per shard: more shards than most ranks x workers."""
    out = tmp_path_factory.mktemp("data") / "many"
    pack(synthetic_root, out, Options(shard_size=25_000, folds=3, fold_mode="random"), progress=False)
    return out


@pytest.fixture(scope="module")
def one_shard_per_group(synthetic_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "few"
    pack(synthetic_root, out, Options(folds=3, fold_mode="random"), progress=False)
    return out


def group_keys(directory: Path, group: str) -> list[str]:
    keys = []
    for shard in shards_of(directory, [group]):
        with tarfile.open(shard.path) as tar:
            keys += sorted({m.name.split(".")[0] for m in tar})
    return keys


def loader_and_steps(
    split: FoldSplit, geometry: TrainGeometry, batch_size: int, world_size: int = 1, workers: int = 2, **options
) -> tuple[torch.utils.data.DataLoader, int]:
    """train_loader, and the batches per epoch a run takes from it (seg.recipe.identity.run_length's)."""
    loader = train_loader(split, geometry, batch_size, world_size=world_size, workers=workers, **options)
    return loader, steps_per_epoch(split.train_samples, batch_size, world_size, workers)


@pytest.mark.parametrize("dataset", ["many_shards", "one_shard_per_group"])
@pytest.mark.parametrize(("world", "workers"), [(1, 0), (1, 3), (2, 2), (3, 1), (4, 2), (5, 0)])
def test_eval_reads_every_sample_exactly_once_across_ranks_and_workers(request, dataset, world, workers):
    directory = request.getfixturevalue(dataset)
    expected = Counter(group_keys(directory, "val") + group_keys(directory, "train-fold1"))
    seen: Counter = Counter()
    per_rank = []
    for rank in range(world):
        loader, total = eval_loader(directory, ["val", "train-fold1"], batch_size=2, rank=rank, world_size=world,
                                    workers=workers)  # fmt: skip
        keys = [key for batch in loader for key in batch["key"]]
        per_rank.append(len(keys))
        seen.update(keys)
    assert total == sum(expected.values())
    assert seen == expected
    assert max(per_rank) - min(per_rank) <= max(workers, 1)  # contiguous ranges: balanced


def test_a_rank_with_no_samples_yields_nothing_and_does_not_fail(one_shard_per_group):
    shards = shards_of(one_shard_per_group, ["val"])
    total = sum(s.samples for s in shards)
    empty = EvalStream(shards, rank=0, world_size=total + 1)  # N samples over N + 1 ranks: rank 0 gets none
    assert empty.range(0, 1) == (0, 0)
    assert list(empty) == []
    others = [
        item["key"] for rank in range(1, total + 1) for item in EvalStream(shards, rank=rank, world_size=total + 1)
    ]
    assert len(others) == len(set(others)) == total


def test_eval_labels_keep_full_resolution_when_images_are_resized(one_shard_per_group):
    loader, _ = eval_loader(one_shard_per_group, ["val"], batch_size=1, size=(16, 32), workers=0)
    batch = next(iter(loader))
    assert batch["image"].shape == (1, 3, 16, 32) and batch["image"].dtype == torch.uint8
    assert batch["label"].shape == (1, 32, 64)


@pytest.mark.parametrize("dataset", ["many_shards", "one_shard_per_group"])
@pytest.mark.parametrize(("world", "workers"), [(1, 0), (2, 2), (3, 2)])
def test_every_rank_takes_the_same_number_of_full_batches(request, dataset, world, workers):
    directory = request.getfixturevalue(dataset)
    counts = []
    for rank in range(world):
        split = FoldSplit.of(directory, 0)
        loader, steps = loader_and_steps(split, GEOMETRY, batch_size=3, rank=rank, world_size=world, workers=workers)
        batches = iter(loader)
        for _epoch in range(2):
            sizes = [len(next(batches)["key"]) for _ in range(steps)]
            assert sizes == [3] * steps
        counts.append(steps)
    assert len(set(counts)) == 1
    train_samples = sum(load_manifest(directory)["counts"]["folds"][1:])
    assert counts[0] * 3 * world >= train_samples  # an epoch covers the fold's data in expectation


def _epochs(directory: Path, start_epoch: int, epochs: int, workers: int = 2) -> list[dict]:
    loader, steps = loader_and_steps(FoldSplit.of(directory, 2), GEOMETRY, batch_size=2, rank=1, world_size=2,
                                     workers=workers, seed=7, start_epoch=start_epoch)  # fmt: skip
    batches = iter(loader)
    return [next(batches) for _ in range(steps * epochs)]


def test_the_stream_after_a_restart_at_an_epoch_is_the_same(many_shards):
    uninterrupted = _epochs(many_shards, start_epoch=0, epochs=3)
    restarted = _epochs(many_shards, start_epoch=1, epochs=2)
    steps = len(uninterrupted) // 3
    for a, b in zip(uninterrupted[steps:], restarted, strict=True):
        assert a["key"] == b["key"]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    assert [b["key"] for b in uninterrupted[:steps]] != [b["key"] for b in uninterrupted[steps : 2 * steps]]


def test_the_stream_depends_on_the_seed_and_the_rank(many_shards):
    def keys(seed: int, rank: int) -> list[str]:
        split = FoldSplit.of(many_shards, 0)
        loader, steps = loader_and_steps(split, GEOMETRY, batch_size=2, rank=rank, world_size=2, workers=0, seed=seed)
        batches = iter(loader)
        return [k for _ in range(steps) for k in next(batches)["key"]]

    assert keys(0, 0) == keys(0, 0)
    assert keys(0, 0) != keys(1, 0)
    assert keys(0, 0) != keys(0, 1)


# --- geometry keeps image and label aligned ------------------------------------------------


def colour_coded(height: int = 128, width: int = 256, seed: int = 0) -> tuple[Image.Image, Image.Image]:
    """A label of random 32-pixel blocks and an image whose colour is the label's palette colour."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 19, size=(height // 32, width // 32), dtype=np.uint8)
    label = np.kron(blocks, np.ones((32, 32), dtype=np.uint8))
    label[:4] = 255
    return Image.fromarray(cs.colorize(label)), Image.fromarray(label)


def alignment(image: np.ndarray, label: np.ndarray) -> float:
    """Share of labelled pixels whose colour is nearest to their own class's palette colour
    (HWC image); resampling blends colours only along block edges."""
    keep = label != 255
    distance = ((image[..., None, :].astype(int) - cs.PALETTE.astype(int)) ** 2).sum(-1)
    return float((distance.argmin(-1)[keep] == label[keep]).mean())


def sample_on(path: str, image: Image.Image, label: Image.Image, geometry: TrainGeometry, rng) -> tuple:
    """A training sample cut in the worker (``cpu``) or on the device, from the same draws."""
    if path == "cpu":
        return train_sample(image, label, geometry, rng)
    raw = decoded_sample(np.array(image), np.array(label), geometry, rng)
    images, labels = cut_on_device(raw["image"][None], raw["label"][None], raw["window"][None], raw["flip"][None],
                                   geometry.size)  # fmt: skip
    return images[0], labels[0]


@pytest.mark.parametrize("path", ["cpu", "device"])
@pytest.mark.parametrize("mode", ["resize", "scale-crop"])
@pytest.mark.parametrize("level", ["none", "standard", "advanced"])
def test_geometry_keeps_labels_aligned_with_the_image(mode, level, path):
    image, label = colour_coded()
    geometry = TrainGeometry(mode=mode, level=level, size=(32, 48), base_size=(128, 256), scale_range=(0.25, 2.0))
    rng = np.random.default_rng(0)
    misaligned = []
    for _ in range(40):
        image_t, label_t = sample_on(path, image, label, geometry, rng)
        assert image_t.shape == (3, 32, 48) and label_t.shape == (32, 48)
        out_image, out_label = image_t.permute(1, 2, 0).numpy(), label_t.numpy()
        assert alignment(out_image, out_label) > 0.8
        misaligned.append(alignment(out_image[:, ::-1], out_label))
    # a flip applied to one side only would score like this: far lower
    assert np.mean(misaligned) < 0.5


@pytest.mark.parametrize("path", ["cpu", "device"])
def test_scale_crop_pads_small_scales_with_ignore(path):
    image, label = colour_coded()
    geometry = TrainGeometry("scale-crop", size=(64, 128), level="none", base_size=(64, 128), scale_range=(0.5, 0.5))
    image_t, label_t = sample_on(path, image, label, geometry, np.random.default_rng(0))
    # the 256x128 source scaled to 64x32 fills the top-left; the rest is padding
    assert (label_t[32:] == 255).all() and (label_t[:, 64:] == 255).all()
    assert (image_t[:, 32:] == 0).all() and (image_t[:, :, 64:] == 0).all()
    assert (label_t[4:32, :64] != 255).all()


def test_cat_max_ratio_rejects_windows_of_one_class():
    label = Image.fromarray(np.zeros((32, 32), np.uint8))
    assert not _cat_max_ok(label, (0, 0, 16, 16), 0.75)
    mixed = np.zeros((32, 32), np.uint8)
    mixed[:, 16:] = 5
    assert _cat_max_ok(Image.fromarray(mixed), (0, 0, 32, 32), 0.75)
    sidewalk = Image.fromarray(np.ones((32, 32), np.uint8))  # padding beyond the image is not class 0
    assert not _cat_max_ok(sidewalk, (-16, -16, 48, 48), 0.75)


def test_elastic_moves_labels_with_the_image():
    torch.manual_seed(0)  # the displacement field: the thresholds hold with wide margins over 300 seeds
    image, label = colour_coded(seed=1)
    images = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 255
    labels = torch.from_numpy(np.array(label))[None]
    moved, moved_labels = elastic(images, labels, alpha=0.05)
    assert (moved_labels != labels).float().mean() > 0.02  # it did move things
    out = (moved[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    assert alignment(out, moved_labels[0].numpy()) > 0.9
    assert alignment(out, labels[0].numpy()) < alignment(out, moved_labels[0].numpy())


def test_device_augment_normalises_and_level_none_changes_nothing_else():
    images = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    labels = torch.randint(0, 19, (2, 8, 8), dtype=torch.uint8)
    out, out_labels = DeviceAugment("none")(images, labels)
    expected = (images.float() / 255 - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(
        1, 3, 1, 1
    )
    torch.testing.assert_close(out, expected)
    assert out_labels.dtype == torch.long and torch.equal(out_labels, labels.long())
    augmented, _ = DeviceAugment("advanced", channels_last=True)(images, labels)
    assert augmented.is_contiguous(memory_format=torch.channels_last)


def test_the_advanced_blend_and_deformation_change_the_samples_they_draw_and_keep_labels_aligned(monkeypatch):
    """DeviceAugment.blend_and_deform draws its samples on the host (no read-back from the
    device): forced to every sample, the blend recolours each image and leaves labels be; the
    deformation moves each label with its image; drawn for none, nothing changes."""
    image, label = colour_coded(seed=2)
    images = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].repeat(2, 1, 1, 1).float() / 255
    labels = torch.from_numpy(np.array(label))[None].repeat(2, 1, 1)
    augment = DeviceAugment("advanced")
    monkeypatch.setattr(DeviceAugment, "BLEND_P", 0.0)
    monkeypatch.setattr(DeviceAugment, "DEFORM_P", 0.0)
    same, same_labels = augment.blend_and_deform(images.clone(), labels)
    assert torch.equal(same, images) and torch.equal(same_labels, labels)
    monkeypatch.setattr(DeviceAugment, "BLEND_P", 1.0)
    blended, blended_labels = augment.blend_and_deform(images.clone(), labels)
    assert all(not torch.equal(blended[i], images[i]) for i in range(2)) and torch.equal(blended_labels, labels)
    monkeypatch.setattr(DeviceAugment, "BLEND_P", 0.0)
    monkeypatch.setattr(DeviceAugment, "DEFORM_P", 1.0)
    torch.manual_seed(0)  # the displacement fields (elastic's own test holds over 300 seeds)
    moved, moved_labels = augment.blend_and_deform(images.clone(), labels)
    for i in range(2):
        assert (moved_labels[i] != labels[i]).float().mean() > 0.02
        out = (moved[i].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        assert alignment(out, moved_labels[i].numpy()) > 0.9
    unlabelled, _ = augment.blend_and_deform(images.clone(), None)  # nothing to move the labels of
    assert torch.equal(unlabelled, images)


def test_eval_sample_resizes_only_the_image():
    image, label = colour_coded()
    image_t, label_t = eval_sample(image, label, (32, 64))
    assert image_t.shape == (3, 32, 64) and label_t.shape == (128, 256)
    torch.testing.assert_close(label_t, torch.from_numpy(np.array(label)))


# --- bad input ----------------------------------------------------------------------------


def _copy(directory: Path, tmp_path: Path) -> Path:
    out = tmp_path / directory.name
    shutil.copytree(directory, out)
    return out


def test_missing_or_changed_shards_are_refused_before_training(one_shard_per_group, tmp_path):
    directory = _copy(one_shard_per_group, tmp_path)
    shard = directory / "train-fold1-000000.tar"
    data = bytearray(shard.read_bytes())
    data[600] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ManifestError, match=r"train-fold1-000000.tar: sha256 .* does not match"):
        train_loader(FoldSplit.of(directory, 0), GEOMETRY, batch_size=2, workers=0)
    (directory / "val-000000.tar").unlink()
    with pytest.raises(ManifestError, match=r"val-000000.tar: missing"):
        eval_loader(directory, ["val"], checksums=False)


def _corrupt_member(directory: Path, tmp_path: Path) -> tuple[Path, str, str]:
    """Overwrite the middle of one image inside a val shard (same size: only decoding fails)."""
    directory = _copy(directory, tmp_path)
    shard = directory / "val-000000.tar"
    with tarfile.open(shard) as tar:
        member = next(m for m in tar if m.name.endswith(".image.png"))
    data = bytearray(shard.read_bytes())
    middle = member.offset_data + member.size // 2
    data[middle : middle + 64] = bytes(64)
    shard.write_bytes(bytes(data))
    return directory, str(shard), member.name.split(".")[0]


def test_a_corrupt_member_is_an_error_naming_shard_and_key_or_skipped_and_counted(one_shard_per_group, tmp_path):
    directory, shard, key = _corrupt_member(one_shard_per_group, tmp_path)
    shards = shards_of(directory, ["val"], checksums=False)
    with pytest.raises(DataError, match=rf"{shard}: sample {key} cannot be decoded"):
        list(EvalStream(shards))
    seen = [item["key"] for item in EvalStream(shards, on_error="skip")]
    assert key not in seen and len(seen) == sum(s.samples for s in shards) - 1


def test_a_truncated_shard_is_an_error_naming_it_or_skipped_and_counted(one_shard_per_group, tmp_path):
    directory = _copy(one_shard_per_group, tmp_path)
    shard = directory / "val-000000.tar"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    (directory / "manifest.json").write_text(
        (directory / "manifest.json")
        .read_text()
        .replace(str(one_shard_per_group.joinpath("val-000000.tar").stat().st_size), str(shard.stat().st_size), 1)
    )
    shards = shards_of(directory, ["val"], checksums=False)
    with pytest.raises(DataError, match=rf"{shard}: unreadable after sample"):
        list(EvalStream(shards))
    seen = list(EvalStream(shards, on_error="skip"))
    assert 0 < len(seen) < sum(s.samples for s in shards)  # evaluation reports expected - seen

    # training: the loss is counted in the items' "skipped" field, never silent
    stream = TrainStream(shards, GEOMETRY, samples_per_epoch=20, on_error="skip")
    items = list(stream.epoch(0))
    assert len(items) == 20 and sum(item["skipped"] for item in items) > 0
    with pytest.raises(DataError, match=str(shard)):
        list(TrainStream(shards, GEOMETRY, samples_per_epoch=20).epoch(0))


def _truncate_mid_member(directory: Path, tmp_path: Path) -> tuple[Path, Path, list[str], str]:
    """A copy whose first train-fold1 shard is cut in the middle of a member, the manifest
    left as it was (as a torn copy would leave it): its keys and the first one torn."""
    directory = _copy(directory, tmp_path)
    shard = directory / "train-fold1-000000.tar"
    with tarfile.open(shard) as tar:
        members = [m for m in tar if m.isreg()]
    keys = list(dict.fromkeys(m.name.split(".")[0] for m in members))
    torn = members[len(members) // 2]
    shard.write_bytes(shard.read_bytes()[: torn.offset_data + torn.size // 2])
    return directory, shard, keys, torn.name.split(".")[0]


def test_a_truncated_shard_without_checksums_trains_on_what_is_readable_or_is_refused_naming_the_key(
    one_shard_per_group, tmp_path
):
    directory, shard, keys, torn = _truncate_mid_member(one_shard_per_group, tmp_path)
    readable = keys.index(torn)
    # on_error=skip: the loader accepts it; an epoch counts every sample the shard lacks
    loader = train_loader(
        FoldSplit.of(directory, 0), GEOMETRY, batch_size=2, workers=0, checksums=False, on_error="skip"
    )
    (shards,) = shards_of(directory, ["train-fold1"], checksums=False, sizes=False)
    stream = TrainStream([shards], GEOMETRY, samples_per_epoch=readable * 3, on_error="skip")
    items = list(stream.epoch(0))
    assert {item["key"] for item in items} <= set(keys[:readable]) and len(items) == readable * 3
    assert sum(item["skipped"] for item in items) >= len(keys) - readable
    raw = [sample["__key__"] for _, sample in itertools.islice(stream._raw(random.Random(0)), readable + 1)]
    assert raw == [*keys[:readable], None]  # every complete sample, then the loss of all the rest at once:
    assert next(s for _, s in stream._raw(random.Random(0)) if s["__key__"] is None)["lost"] == len(keys) - readable
    assert next(iter(loader))["image"].shape[0] == 2
    # on_error=raise: refused up front, naming the shard and its first unreadable sample
    with pytest.raises(
        ManifestError, match=rf"{shard}: unreadable after sample {keys[readable - 1]}; first unreadable sample {torn}"
    ):
        train_loader(FoldSplit.of(directory, 0), GEOMETRY, batch_size=2, workers=0, checksums=False)
    with pytest.raises(DataError, match=rf"first unreadable sample {torn}"):
        list(TrainStream([shards], GEOMETRY, samples_per_epoch=len(keys)).epoch(0))


def test_a_shard_cut_at_a_member_boundary_is_short_not_silent(one_shard_per_group, tmp_path):
    directory = _copy(one_shard_per_group, tmp_path)
    shard = directory / "val-000000.tar"
    with tarfile.open(shard) as tar:
        members = [m for m in tar if m.isreg()]
    cut = members[len(members) // 2]
    shard.write_bytes(shard.read_bytes()[: cut.offset])  # tarfile reads this as a shorter tar
    (shards,) = shards_of(directory, ["val"], checksums=False, sizes=False)
    with pytest.raises(DataError, match=rf"ends after \d+ of its {shards.samples} samples"):
        list(EvalStream([shards]))
    assert 0 < len(list(EvalStream([shards], on_error="skip"))) < shards.samples


def test_shards_packed_at_the_training_size_train_at_that_size_and_refuse_any_other(synthetic_root, tmp_path):
    out = tmp_path / "resized"
    pack(synthetic_root, out, Options(folds=3, resize=(16, 32)), progress=False)
    split, geometry = FoldSplit.of(out, 0), TrainGeometry(size=(16, 32))
    loader, steps = loader_and_steps(split, geometry, batch_size=2, workers=0, seed=0)
    batch = next(iter(loader))
    assert batch["image"].shape == (2, 3, 16, 32) and batch["label"].shape == (2, 16, 32) and steps > 0
    labelled = batch["label"][batch["label"] != cs.IGNORE_INDEX]
    assert labelled.numel() > 0 and int(labelled.max()) < cs.NUM_CLASSES
    with pytest.raises(ManifestError, match=r"stored at 32x16 .* data.size is 64x32: set data.size=\[16,32\]"):
        train_loader(FoldSplit.of(out, 0), TrainGeometry(size=(32, 64)), batch_size=2, workers=0)
    with pytest.raises(ManifestError, match=r"scale-crop .* pack without --resize"):
        train_loader(
            FoldSplit.of(out, 0),
            TrainGeometry("scale-crop", size=(16, 32), base_size=(32, 64)),
            batch_size=2,
            workers=0,
        )
    # val keeps its full resolution: evaluation compares with the original labels
    val = next(iter(eval_loader(out, ["val"], size=(16, 32), workers=0)[0]))
    assert val["image"].shape == (1, 3, 16, 32) and val["label"].shape == (1, 32, 64)


@pytest.mark.parametrize("mode", ["resize", "scale-crop"])
def test_geometry_on_the_device_matches_the_workers_from_the_same_stream(one_shard_per_group, mode):
    """Same seed, same draws: the same samples, windows and flips; the cut itself differs only
    by the sub-pixel part of the window (whole source pixels on the device)."""
    geometry = TrainGeometry(mode, size=(16, 32), base_size=(32, 64), level="standard")
    options = {"batch_size": 4, "workers": 0, "seed": 3}
    cpu = next(iter(train_loader(FoldSplit.of(one_shard_per_group, 0), geometry, **options)))
    raw = next(iter(train_loader(FoldSplit.of(one_shard_per_group, 0), geometry, geometry_on_device=True, **options)))
    assert raw["key"] == cpu["key"] and raw["image"].shape[1:] == (32, 64, 3)
    images, labels = cut_on_device(raw["image"], raw["label"], raw["window"], raw["flip"], geometry.size)
    assert images.shape == cpu["image"].shape and labels.shape == cpu["label"].shape
    assert (labels == cpu["label"]).float().mean() > 0.8
    assert (images.float() - cpu["image"].float()).abs().mean() < 24


def test_a_whole_frame_at_its_own_size_is_cut_exactly_on_the_device():
    image, label = colour_coded(height=64, width=96)
    frames = torch.from_numpy(np.array(image))[None]  # (N, H, W, 3), as decoded
    images = frames.permute(0, 3, 1, 2)
    labels = torch.from_numpy(np.array(label))[None]
    window = torch.tensor([[0.0, 0.0, 96.0, 64.0]], dtype=torch.float64)
    out_images, out_labels = cut_on_device(frames, labels, window, torch.tensor([False]), (64, 96))
    assert torch.equal(out_images, images) and torch.equal(out_labels, labels)
    flipped, flipped_labels = cut_on_device(frames, labels, window, torch.tensor([True]), (64, 96))
    assert torch.equal(flipped, images.flip(-1)) and torch.equal(flipped_labels, labels.flip(-1))
    # half size: the label is Pillow's nearest, the image close to Pillow's antialiased bilinear
    half, half_labels = cut_on_device(frames, labels, window, torch.tensor([False]), (32, 48))
    np.testing.assert_array_equal(half_labels[0].numpy(), np.asarray(label.resize((48, 32), Image.NEAREST)))
    pillow = np.asarray(image.resize((48, 32), Image.BILINEAR)).astype(int)
    assert np.abs(half[0].permute(1, 2, 0).numpy().astype(int) - pillow).mean() < 3


def test_the_cut_flips_each_sample_it_draws_without_asking_the_device_which():
    """A boolean index (``images[flips]``) would read the flips back from the device (nonzero)
    every step: the cut selects with torch.where instead."""
    image, label = colour_coded(height=64, width=96)
    frames = torch.from_numpy(np.array(image))[None].repeat(3, 1, 1, 1)
    labels = torch.from_numpy(np.array(label))[None].repeat(3, 1, 1)
    windows = torch.tensor([[0.0, 0.0, 96.0, 64.0]] * 3, dtype=torch.float64)
    with torch.profiler.profile() as profiled:
        images, cut_labels = cut_on_device(frames, labels, windows, torch.tensor([True, False, True]), (64, 96))
    whole = frames.permute(0, 3, 1, 2)
    assert [torch.equal(images[i], whole[i].flip(-1) if i != 1 else whole[i]) for i in range(3)] == [True] * 3
    assert [torch.equal(cut_labels[i], labels[i].flip(-1) if i != 1 else labels[i]) for i in range(3)] == [True] * 3
    reads = [e.name for e in profiled.events() if e.name in ("aten::nonzero", "aten::_local_scalar_dense")]
    assert reads == []


class _Numbers(torch.utils.data.IterableDataset):
    def __iter__(self):
        return iter(range(10_000))


def _slow_worker_init(worker: int) -> None:
    """The worker's start-up, slowed: its window before ``ignore_signals`` is wide open."""
    time.sleep(2)
    ignore_signals(worker)


@pytest.mark.timeout(120)
def test_a_loader_worker_survives_a_term_that_lands_while_it_starts():
    """A Slurm preemption's TERM reaches every process, an evaluation's workers starting up
    included; a worker killed then crashed the trainer instead of letting it save."""
    options = loader_options(1, pin_memory=False) | {"worker_init_fn": _slow_worker_init}
    batches = iter(DataLoader(_Numbers(), batch_size=2, **options))
    (worker,) = psutil.Process().children()
    subprocess.run(["kill", "-TERM", str(worker.pid)], check=True)  # not from the trainer: must be ignored
    assert [next(batches).tolist() for _ in range(3)] == [[0, 1], [2, 3], [4, 5]]
    assert worker.is_running() and worker.status() != psutil.STATUS_ZOMBIE
    del batches  # the loader ends its worker with the trainer's own TERM: it must still go
    worker.wait(timeout=30)


_TRAINER = """
import time
from torch.utils.data import DataLoader, IterableDataset
from seg.data.workers import loader_options

class Busy(IterableDataset):
    def __iter__(self):
        yield 0
        time.sleep(120)  # busy decoding, say: torch's watchdog never looks at its parent
        yield 1

batches = iter(DataLoader(Busy(), batch_size=None, **loader_options(1, pin_memory=False)))
next(batches)
print("ready", flush=True)
time.sleep(120)
"""


@pytest.mark.timeout(120)
def test_a_loader_worker_dies_with_a_trainer_killed_outright():
    """The OOM killer's SIGKILL of a trainer left its busy workers running (and ignoring TERM)."""
    repo = Path(__file__).resolve().parents[1]
    trainer = subprocess.Popen([sys.executable, "-c", _TRAINER], stdout=subprocess.PIPE, text=True, cwd=repo)
    workers = []
    try:
        assert trainer.stdout.readline() == "ready\n"
        workers = psutil.Process(trainer.pid).children()
        assert len(workers) == 1
        trainer.kill()
        trainer.wait(timeout=30)
        workers[0].wait(timeout=20)  # psutil.TimeoutExpired while it lives on
    finally:
        trainer.kill()
        for worker in workers:
            with contextlib.suppress(psutil.NoSuchProcess):
                worker.kill()


@pytest.mark.parametrize(
    ("affinity", "slurm", "local", "workers"),
    [
        (16, None, None, 16),
        (16, "8", None, 8),
        (4, "8", None, 4),
        (16, "8", "2", 4),
        (3, None, "4", 1),
        (16, "x", None, 16),
    ],
)
def test_auto_workers_are_the_cores_this_process_may_use_shared_among_the_local_processes(
    monkeypatch, affinity, slurm, local, workers
):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(affinity)))
    for name, value in (("SLURM_CPUS_PER_TASK", slurm), ("LOCAL_WORLD_SIZE", local)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    assert auto_workers() == workers
    assert resolve_workers("auto") == workers and resolve_workers("auto", recorded=3) == 3
    assert resolve_workers(2, recorded=3) == 2  # an explicit count, as it always was


def test_ranks_whose_auto_workers_differ_are_refused_naming_the_counts():
    assert workers_problem([4, 4]) is None and workers_problem([2]) is None
    assert workers_problem([4, 2]) == (
        "data.workers resolved to 4, 2 on the run's processes (ranks 0 to 1): machines with different "
        "cores; set data.workers to a number"
    )
