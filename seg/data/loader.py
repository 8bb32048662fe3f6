"""Training and evaluation pipelines over the packed shards (webdataset tar files).

Training: an endless, resampled stream per (rank, worker). Each epoch every worker draws
shards with replacement and yields exactly its share of a fixed number of batches, so
every rank takes the same number of steps however the shards divide (fewer shards than
ranks x workers included), and the order is a pure function of (seed, epoch, rank,
worker): a run restarted at epoch e sees the stream an uninterrupted run saw.

Evaluation: the samples of the chosen groups, in manifest order, cut into ranks x workers
contiguous ranges: every sample exactly once, whatever the number of shards; a rank may
get none and must still join the metric reduction.
"""

from __future__ import annotations

import math
import random
import tarfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys

from seg.data.decode import decode_jpeg, decode_png, jpeg_array, png_array
from seg.data.manifest import FoldSplit, ManifestError, load_manifest, verify
from seg.data.remote import Store, is_remote, local_copy
from seg.data.transforms import TrainGeometry, decoded_sample, eval_sample, train_sample
from seg.data.workers import loader_options, resolve_workers

ON_ERROR = ("raise", "skip")


class DataError(RuntimeError):
    """A shard or a sample that cannot be read: the message names the shard and the key."""


@dataclass(frozen=True)
class Shard:
    path: str  # a local file, or the shard's URL (``store`` fetches it)
    samples: int
    name: str = ""
    bytes: int = 0
    sha256: str = ""
    store: Store | None = None
    cache: str | None = None  # data.cache_dir: remote shards kept there once fetched


def shards_of(
    directory: str | Path, groups: list[str], checksums: bool = True, sizes: bool = True, cache: str | None = None
) -> list[Shard]:
    """The shards of ``groups``, after checking them against the manifest.

    Missing shards or wrong sizes (and, with ``checksums``, wrong sha256) raise a
    ManifestError listing every problem, before any training starts; a shard shorter than
    the manifest says is named with its first unreadable sample. ``sizes=False`` (with
    ``checksums=False``) checks presence only: readers then count what a truncated shard
    lacks (``on_error="skip"``). The shards of a remote dataset (a URL, seg.data.remote) are
    checked as each arrives instead (size and sha256, always), and kept in ``cache``.
    """
    manifest = load_manifest(directory)
    unknown = [g for g in groups if g not in manifest["groups"]]
    if unknown:
        raise ManifestError(f"{directory}: no group {unknown[0]!r}; the manifest has {sorted(manifest['groups'])}")
    listed = [s for g in groups for s in manifest["groups"][g]["shards"]]
    if is_remote(directory):
        store = Store.of(str(directory))
        return [
            Shard(store.url(s["name"]), s["samples"], s["name"], s["bytes"], s["sha256"], store, cache) for s in listed
        ]
    listed = [(Path(directory) / s["name"], s) for s in listed]
    if checksums or sizes:
        problems = verify(directory, groups=groups, checksums=checksums)
        problems += [_first_unreadable(p, s["samples"]) for p, s in listed if _shorter(p, s["bytes"])]
    else:
        problems = [f"{p}: missing (listed in the manifest)" for p, _ in listed if not p.is_file()]
    if problems:
        raise ManifestError("shards do not match the manifest:\n  " + "\n  ".join(problems) + "\nrepack the dataset")
    return [Shard(str(path), s["samples"]) for path, s in listed]


def _shorter(path: Path, size: int) -> bool:
    return path.is_file() and path.stat().st_size < size


def _first_unreadable(path: Path, samples: int) -> str:
    try:
        for _ in read_shard(str(path), samples):
            pass
    except DataError as e:
        return str(e)
    return f"{path}: all {samples} samples readable, but shorter than the manifest says"


def _members(path: str, problem: list[tuple[str | None, Exception]]) -> Iterator[dict[str, Any]]:
    # webdataset's tar_file_iterator opens tars in stream mode ("r|*"), which reads 10 KB
    # records through Python: 16 ms per 3 MB frame here. A seekable "r:" open reads each
    # member in one call; webdataset's group_by_keys still assembles the samples.
    # A torn member ends the members quietly, noted in ``problem`` with its sample's key, so
    # that group_by_keys still hands over the complete sample before it.
    with tarfile.open(path, mode="r:") as tar:
        member = None
        try:
            for member in tar:
                if member.isreg():
                    yield {"fname": member.name, "data": tar.extractfile(member).read(), "__url__": path}
        except (tarfile.TarError, OSError, EOFError) as e:
            problem.append((member.name.split("/")[-1].split(".")[0] if member else None, e))


@contextmanager
def _local(shard: Shard) -> Iterator[str]:
    """A local file of ``shard``: itself, or its remote bytes fetched and checked (seg.data.remote)."""
    if shard.store is None:
        yield shard.path
        return
    with local_copy(shard.store, shard.name, shard.bytes, shard.sha256, shard.cache) as path:
        yield str(path)


def shard_samples(shard: Shard) -> Iterator[dict[str, Any]]:
    """``read_shard`` of a local or a remote shard (messages name its URL)."""
    with _local(shard) as path:
        yield from read_shard(path, shard.samples, shown=shard.path)


def read_shard(path: str, samples: int | None = None, shown: str | None = None) -> Iterator[dict[str, Any]]:
    """The raw samples of one shard ({"__key__", "image.png": bytes, ...}), in order.

    A torn shard yields its complete samples, then raises DataError naming the shard (as
    ``shown``, default ``path``), the last sample read and the first that is not; so does a
    shard that ends cleanly before its manifest's ``samples`` (a tar cut at a member boundary
    reads as a shorter tar).
    """
    key, count, problem = None, 0, []
    try:
        for sample in group_by_keys(_members(path, problem)):
            if problem and sample["__key__"] == problem[0][0]:
                break  # the torn sample itself: incomplete
            key, count = sample["__key__"], count + 1
            yield sample
    except (tarfile.TarError, OSError, ValueError, EOFError) as e:
        problem.append((None, e))
    where = f"after sample {key}" if key else "at its start"
    path = shown or path
    if problem:
        first, error = problem[0]
        torn = f"; first unreadable sample {first}" if first and first != key else ""
        raise DataError(f"{path}: unreadable {where}{torn} ({error}); verify the shards (--verify) and repack")
    if samples is not None and count < samples:
        raise DataError(
            f"{path}: unreadable {where}: it ends after {count} of its {samples} samples (truncated); "
            f"verify the shards (--verify) and repack"
        )


def decode(sample: dict[str, Any], shard: str, arrays: bool = False) -> tuple[Any, Any]:
    """Image (RGB) and label (trainIds; None if the sample has none) of a raw sample: Pillow
    images, or with ``arrays`` (H, W, 3) and (H, W) uint8 arrays."""
    key = sample["__key__"]
    try:
        png = "image.png" in sample
        if arrays:
            image = png_array(sample["image.png"], "RGB") if png else jpeg_array(sample["image.jpg"])
            label = png_array(sample["label.png"], "L") if "label.png" in sample else None
        else:
            image = decode_png(sample["image.png"], "RGB") if png else decode_jpeg(sample["image.jpg"])
            label = decode_png(sample["label.png"], "L") if "label.png" in sample else None
    except KeyError as e:
        raise DataError(f"{shard}: sample {key} has no {e.args[0]} member; repack the dataset") from None
    except Exception as e:  # each decoder raises its own types for broken data
        raise DataError(f"{shard}: sample {key} cannot be decoded ({e}); verify and repack the dataset") from None
    sizes = (image.shape[:2], label.shape) if arrays else (image.size, label.size if label is not None else None)
    if label is not None and sizes[0] != sizes[1]:
        raise DataError(f"{shard}: sample {key}: label {sizes[1]} and image {sizes[0]} differ; repack")
    return image, label


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


class TrainStream(IterableDataset):
    """Endless seeded stream of training samples; ``samples_per_epoch`` per worker per epoch.

    Each item: ``image`` (3, H, W) uint8, ``label`` (H, W) uint8, ``key``, and ``skipped``:
    the samples dropped as unreadable (``on_error="skip"``) since the previous item. With
    ``geometry_on_device``, the whole decoded frame instead, with its ``window`` and ``flip``
    (``seg.data.augment.cut_on_device`` cuts it): the same random draws, so the same stream.
    The shuffle buffer holds raw (encoded) samples: about 3 MB each for Cityscapes PNGs,
    so 32 cost ~100 MB per worker.
    """

    def __init__(
        self,
        shards: list[Shard],
        geometry: TrainGeometry,
        samples_per_epoch: int,
        seed: int = 0,
        rank: int = 0,
        start_epoch: int = 0,
        shuffle_buffer: int = 32,
        on_error: str = "raise",
        geometry_on_device: bool = False,
    ) -> None:
        if not shards:
            raise ValueError("no training shards")
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error {on_error!r}: choose from {', '.join(ON_ERROR)}")
        self.shards, self.geometry, self.samples_per_epoch = shards, geometry, samples_per_epoch
        self.seed, self.rank, self.start_epoch = seed, rank, start_epoch
        self.shuffle_buffer, self.on_error = shuffle_buffer, on_error
        self.geometry_on_device = geometry_on_device

    def _raw(self, rng: random.Random) -> Iterator[tuple[str, dict[str, Any]]]:
        while True:
            shard = rng.choice(self.shards)  # with replacement: no rank or worker ever runs dry
            read = 0
            try:
                for sample in shard_samples(shard):
                    read += 1
                    yield shard.path, sample
            except DataError:
                if self.on_error == "raise":
                    raise
                # the rest of this shard is lost: counted (at least one, the torn sample)
                yield shard.path, {"__key__": None, "lost": max(shard.samples - read, 1)}

    def epoch(self, epoch: int) -> Iterator[dict[str, Any]]:
        worker, _ = _worker()
        rng = random.Random(f"train/{self.seed}/{epoch}/{self.rank}/{worker}")
        numpy_rng = np.random.default_rng(rng.getrandbits(64))
        shuffled = wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)(self._raw(rng))
        produced = skipped = 0
        if self.samples_per_epoch == 0:
            return
        for shard, raw in shuffled:
            if raw["__key__"] is None:
                skipped += raw["lost"]
                continue
            try:
                image, label = decode(raw, shard, arrays=self.geometry_on_device)
                if label is None:
                    raise DataError(f"{shard}: sample {raw['__key__']} has no label; training needs labels")
            except DataError:
                if self.on_error == "raise":
                    raise
                skipped += 1
                continue
            if self.geometry_on_device:
                sample = decoded_sample(image, label, self.geometry, numpy_rng)
            else:
                image_tensor, label_tensor = train_sample(image, label, self.geometry, numpy_rng)
                sample = {"image": image_tensor, "label": label_tensor}
            yield sample | {"key": raw["__key__"], "skipped": skipped}
            produced, skipped = produced + 1, 0
            if produced == self.samples_per_epoch:
                return

    def __iter__(self) -> Iterator[dict[str, Any]]:
        epoch = self.start_epoch
        while True:
            yield from self.epoch(epoch)
            epoch += 1


class EvalStream(IterableDataset):
    """Every sample of ``shards`` exactly once across ranks and workers, in contiguous ranges.

    Each item: ``image`` (3, h, w) uint8 (full resolution, or resized to ``size``), ``label``
    (H, W) uint8 at the original resolution (absent for unlabelled splits), ``key``.
    """

    def __init__(
        self,
        shards: list[Shard],
        size: tuple[int, int] | None = None,
        rank: int = 0,
        world_size: int = 1,
        on_error: str = "raise",
    ) -> None:
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error {on_error!r}: choose from {', '.join(ON_ERROR)}")
        self.shards, self.size, self.rank, self.world_size, self.on_error = shards, size, rank, world_size, on_error

    def range(self, worker: int, num_workers: int) -> tuple[int, int]:
        """The [start, stop) of global sample indices that this rank's ``worker`` reads."""
        total = sum(s.samples for s in self.shards)
        slots = self.world_size * num_workers
        slot = self.rank * num_workers + worker
        return slot * total // slots, (slot + 1) * total // slots

    def __iter__(self) -> Iterator[dict[str, Any]]:
        start, stop = self.range(*_worker())
        offset = 0
        for shard in self.shards:
            first, offset = offset, offset + shard.samples
            if offset <= start or first >= stop:
                continue  # no sample of this shard is ours: not even opened
            try:
                for index, raw in enumerate(shard_samples(shard), start=first):
                    if index >= stop:
                        break
                    if index < start:
                        continue
                    try:
                        image, label = decode(raw, shard.path)
                    except DataError:
                        if self.on_error == "raise":
                            raise
                        continue
                    image_tensor, label_tensor = eval_sample(image, label, self.size)
                    item = {"image": image_tensor, "key": raw["__key__"]}
                    if label_tensor is not None:
                        item["label"] = label_tensor
                    yield item
            except DataError:
                if self.on_error == "raise":
                    raise
                # the rest of a truncated shard is lost; evaluation reports expected - seen


def steps_per_epoch(samples: int, batch_size: int, world_size: int, workers: int) -> int:
    """Batches per rank per epoch: one pass over ``samples`` in expectation, rounded up to a
    multiple of the loader's workers so that each worker yields whole epochs."""
    steps = math.ceil(samples / (batch_size * world_size))
    per = max(workers, 1)
    return math.ceil(steps / per) * per


def packed_size(manifest: dict[str, Any]) -> tuple[int, int] | None:
    """(H, W) the train split was stored at (``pack --resize``), or None: original resolution."""
    resize = manifest["options"].get("resize")
    return (resize["height"], resize["width"]) if resize else None


def train_loader(
    split: FoldSplit,
    geometry: TrainGeometry,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    workers: int = 2,
    seed: int = 0,
    start_epoch: int = 0,
    shuffle_buffer: int = 32,
    on_error: str = "raise",
    pin_memory: bool = False,
    checksums: bool = True,
    geometry_on_device: bool = False,
    cache: str | None = None,
) -> DataLoader:
    """The loader of a fold's training stream, the same on every rank.

    Iterate the loader once and take ``steps_per_epoch(...)`` batches per epoch (the run's
    length, seg.recipe.identity.run_length): worker streams are endless and aligned to epochs.
    """
    problem = geometry.source_problem(packed_size(split.manifest))
    if problem:
        raise ManifestError(f"{split.directory}: {problem}")
    groups = list(split.train_groups)
    shards = shards_of(split.directory, groups, checksums=checksums, sizes=on_error == "raise", cache=cache)
    steps = steps_per_epoch(split.train_samples, batch_size, world_size, workers)
    stream = TrainStream(
        shards,
        geometry,
        samples_per_epoch=steps // max(workers, 1) * batch_size,
        seed=seed,
        rank=rank,
        start_epoch=start_epoch,
        shuffle_buffer=shuffle_buffer,
        on_error=on_error,
        geometry_on_device=geometry_on_device,
    )
    return DataLoader(stream, batch_size=batch_size, **loader_options(workers, pin_memory))


def eval_loader(
    directory: str | Path,
    groups: list[str],
    batch_size: int = 1,
    size: tuple[int, int] | None = None,
    rank: int = 0,
    world_size: int = 1,
    workers: int = 2,
    on_error: str = "raise",
    pin_memory: bool = False,
    checksums: bool = True,
    cache: str | None = None,
) -> tuple[DataLoader, int]:
    """A loader over every sample of ``groups`` exactly once across ranks, and that total."""
    shards = shards_of(directory, groups, checksums=checksums, sizes=on_error == "raise", cache=cache)
    stream = EvalStream(shards, size=size, rank=rank, world_size=world_size, on_error=on_error)
    options = loader_options(workers, pin_memory) | {"persistent_workers": False}
    return DataLoader(stream, batch_size=batch_size, **options), sum(s.samples for s in shards)


def eval_loader_of(
    data: Mapping[str, Any],
    groups: list[str],
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool = False,
    shards: str | Path | None = None,
) -> tuple[DataLoader, int]:
    """``eval_loader`` as a run's ``data`` config section sets it: its shards (unless
    ``shards`` names others), eval_size, workers, on_error and cache_dir, one image per batch.
    The checksums are checked once at the run's start, not at every evaluation."""
    size = tuple(data["eval_size"]) if data["eval_size"] else None
    directory = shards if shards is not None else data["shards"]
    workers = resolve_workers(data["workers"])  # any count reads every sample once: none is recorded
    return eval_loader(
        directory,
        groups,
        1,
        size,
        rank,
        world_size,
        workers,
        data["on_error"],
        pin_memory,
        checksums=False,
        cache=data.get("cache_dir"),
    )
