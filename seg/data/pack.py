"""Pack a Cityscapes tree into fold-grouped webdataset shards with a manifest.

Three steps: ``scan`` pairs images with labels, ``assign_groups`` puts the training
split into fold groups (and an optional held-out selection group), ``plan_shards`` cuts
each group into shards of a target size; then the shards are written in parallel, one
shard per task, into a temporary directory that is renamed into place when complete.
Everything is a pure function of the input tree and the options, so packing twice gives
byte-identical shards and manifest.
"""

from __future__ import annotations

import hashlib
import io
import json
import zlib
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import webdataset as wds
from PIL import Image
from tqdm import tqdm

from seg.core import cityscapes as cs
from seg.core import parallel
from seg.core.atomic import leased_atomic_directory
from seg.core.cli import format_size, orientation_mismatch
from seg.core.png import encode_gray8, encode_rgb8
from seg.data.manifest import FORMAT, FORMAT_VERSION, MANIFEST, SELECTION_GROUP, fold_group, group_fold

FOLD_MODES = ("city", "random")
IMAGE_FORMATS = ("png", "jpg")


class PackError(ValueError):
    """Bad input: the message names the file and what to do."""


@dataclass(frozen=True)
class Source:
    """One frame of the tree: paths relative to the root."""

    key: str
    split: str
    city: str
    image: str
    label: str | None = None  # None for the test split
    label_kind: str | None = None  # "labelTrainIds" or "labelIds"


@dataclass(frozen=True)
class Options:
    folds: int = 5
    fold_mode: str = "city"
    seed: int = 0
    selection_cities: tuple[str, ...] = ()
    selection_fraction: float = 0.0
    splits: tuple[str, ...] = cs.SPLITS
    shard_size: int = 256 * 2**20
    image_format: str = "png"
    jpeg_quality: int = 95
    # (H, W) the train split's frames are stored at (image bilinear, label nearest), or None
    # for the original resolution; val and test always keep theirs (see pack())
    resize: tuple[int, int] | None = None


# --- scanning --------------------------------------------------------------------------


def _stems(directory: Path, suffix: str, root: Path) -> dict[str, Path]:
    stems = {}
    for path in sorted(directory.glob(f"*/*{suffix}")):
        if not path.is_file():  # a folder so named would fail at its read, deep in a worker
            raise PackError(f"{path}: is not a file, yet named like one of the tree's PNGs; move it out of {root}")
        stem = path.name[: -len(suffix)]
        try:
            city, _, _ = cs.parse_stem(stem)
        except ValueError as e:
            raise PackError(f"{path}: {e}; rename it or move it out of {root}") from None
        if city != path.parent.name:
            raise PackError(
                f"{path}: file of city {city!r} in folder {path.parent.name!r}; move it to its city's folder"
            )
        stems[stem] = path
    return stems


def scan(root: str | Path, splits: tuple[str, ...] = cs.SPLITS) -> dict[str, list[Source]]:
    """Pair every image with its label (test: images only), per split, sorted by key."""
    root = Path(root)
    if not (root / "leftImg8bit").is_dir():
        raise PackError(f"{root}: no leftImg8bit/ folder; point at the Cityscapes root (leftImg8bit/ and gtFine/)")
    result = {}
    for split in splits:
        if split not in cs.SPLITS:
            raise PackError(f"unknown split {split!r}: choose from {', '.join(cs.SPLITS)}")
        images = _stems(root / "leftImg8bit" / split, cs.IMAGE_SUFFIX, root)
        if not images:
            raise PackError(
                f"split {split!r} has no images under {root / 'leftImg8bit' / split}: "
                f"check the root, or leave the split out with --splits"
            )
        if split == "test":
            result[split] = [Source(stem, split, cs.parse_stem(stem)[0], _rel(p, root)) for stem, p in images.items()]
            continue
        ids = _stems(root / "gtFine" / split, cs.LABEL_IDS_SUFFIX, root)
        train_ids = _stems(root / "gtFine" / split, cs.LABEL_TRAINIDS_SUFFIX, root)
        for stem in sorted((ids.keys() | train_ids.keys()) - images.keys()):
            label = train_ids.get(stem) or ids[stem]
            city, seq, frame = cs.parse_stem(stem)
            raise PackError(
                f"{label}: label without an image (expected {root / cs.image_path(split, city, seq, frame)}); "
                f"restore the image or remove the label"
            )
        samples = []
        for stem, image in images.items():
            city, seq, frame = cs.parse_stem(stem)
            if stem in train_ids:
                label, kind = train_ids[stem], "labelTrainIds"
            elif stem in ids:
                label, kind = ids[stem], "labelIds"
            else:
                raise PackError(
                    f"{image}: no label for this image (expected {root / cs.label_path(split, city, seq, frame)}); "
                    f"restore the gtFine file or remove the image"
                )
            samples.append(Source(stem, split, city, _rel(image, root), _rel(label, root), kind))
        result[split] = samples
    keys = [s.key for samples in result.values() for s in samples]
    if len(keys) != len(set(keys)):
        duplicate = next(k for k in keys if keys.count(k) > 1)
        raise PackError(f"{root}: frame {duplicate} appears in more than one split; each frame must be in one split")
    return result


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


# --- folds and shards --------------------------------------------------------------------


def _rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def assign_groups(train: list[Source], options: Options) -> dict[str, list[Source]]:
    """Split the training samples into ``train-fold{k}`` groups and ``train-selection``."""
    k = options.folds
    if k < 2:
        raise PackError(f"--folds {k}: cross-validation needs at least 2 folds")
    cities = sorted({s.city for s in train})
    unknown = sorted(set(options.selection_cities) - set(cities))
    if unknown:
        raise PackError(
            f"--selection-cities {','.join(unknown)}: not in the train split, whose cities are {', '.join(cities)}"
        )
    selection = [s for s in train if s.city in options.selection_cities]
    rest = [s for s in train if s.city not in options.selection_cities]
    if options.selection_fraction:
        if options.fold_mode != "random":
            raise PackError(
                "--selection-fraction takes random frames, which leaks near-duplicates between a city's frames "
                "in --fold-mode city: use --selection-cities there"
            )
        order = _rng(options.seed, "selection").permutation(len(rest))
        n = round(options.selection_fraction * len(rest))
        chosen = set(order[:n].tolist())
        selection += [s for i, s in enumerate(rest) if i in chosen]
        rest = [s for i, s in enumerate(rest) if i not in chosen]

    folds: list[list[Source]] = [[] for _ in range(k)]
    if options.fold_mode == "city":
        by_city = defaultdict(list)
        for s in rest:
            by_city[s.city].append(s)
        if len(by_city) < k:
            raise PackError(
                f"--folds {k} with --fold-mode city needs at least {k} cities in the train split, found "
                f"{len(by_city)} ({', '.join(sorted(by_city))}) besides the selection cities: "
                f"use fewer folds or --fold-mode random"
            )
        # Largest city first into the smallest fold: balanced by image count, deterministic.
        for city in sorted(by_city, key=lambda c: (-len(by_city[c]), c)):
            smallest = min(range(k), key=lambda i: (len(folds[i]), i))
            folds[smallest] += by_city[city]
    elif options.fold_mode == "random":
        if len(rest) < k:
            raise PackError(f"--folds {k}: the train split has only {len(rest)} frames besides the selection subset")
        for position, index in enumerate(_rng(options.seed, "folds").permutation(len(rest))):
            folds[position % k].append(rest[index])
    else:
        raise PackError(f"--fold-mode {options.fold_mode!r}: choose from {', '.join(FOLD_MODES)}")

    groups = {fold_group(i): sorted(fold, key=lambda s: s.key) for i, fold in enumerate(folds)}
    if selection:
        groups[SELECTION_GROUP] = sorted(selection, key=lambda s: s.key)
    return groups


@dataclass(frozen=True)
class ShardJob:
    name: str
    group: str
    fold: int | None
    samples: tuple[Source, ...]
    planned_bytes: int


def plan_shards(root: Path, groups: dict[str, list[Source]], options: Options) -> list[ShardJob]:
    """Cut each group, in a seeded shuffled order, into shards of about ``shard_size`` bytes.

    Shuffling before cutting mixes a group's cities within each shard, which is what a
    shard-level shuffle plus a sample buffer needs at training time.
    """
    jobs = []
    for group, samples in groups.items():
        order = [samples[i] for i in _rng(options.seed, group).permutation(len(samples))]
        shards: list[list[Source]] = [[]]
        sizes = [0]
        for sample in order:
            sample_bytes = sum((root / p).stat().st_size for p in (sample.image, sample.label) if p)
            if shards[-1] and sizes[-1] + sample_bytes > options.shard_size:
                shards.append([])
                sizes.append(0)
            shards[-1].append(sample)
            sizes[-1] += sample_bytes
        for index, (shard, size) in enumerate(zip(shards, sizes, strict=True)):
            jobs.append(ShardJob(f"{group}-{index:06d}.tar", group, group_fold(group), tuple(shard), size))
    return jobs


# --- writing ----------------------------------------------------------------------------


class _HashingWriter:
    """A write-only file wrapper that hashes and counts what passes through."""

    def __init__(self, f: BinaryIO) -> None:
        self.f, self.sha256, self.bytes = f, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.bytes += len(data)
        return self.f.write(data)


@dataclass
class ShardResult:
    name: str
    group: str
    samples: int
    bytes: int
    sha256: str
    train_id_pixels: list[int]  # 256 bins, trainIds (255 = ignore)


def _read_png(path: Path, data: bytes, what: str) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
        if what == "image":
            image.verify()  # chunk structure and CRCs, without decoding the pixels
            image = Image.open(io.BytesIO(data))
        else:
            image.load()
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... for broken files
        raise PackError(f"{path}: cannot read this PNG ({e}); it is truncated or corrupt: re-extract it") from None
    if image.format != "PNG":
        raise PackError(f"{path}: is a {image.format} file, not a PNG; Cityscapes files are PNG")
    return image


def _label(
    root: Path, source: Source, size: tuple[int, int], resize: tuple[int, int] | None
) -> tuple[bytes, np.ndarray]:
    """The trainId label PNG and its 256-bin trainId histogram, resized to ``resize`` (H, W)
    with nearest neighbours when given."""
    path = root / source.label
    data = path.read_bytes()
    label = _read_png(path, data, "label")
    if label.mode != "L":
        raise PackError(f"{path}: mode {label.mode}, expected an 8-bit grayscale PNG of Cityscapes {source.label_kind}")
    if label.size != size:
        raise PackError(
            f"{path}: size {label.size[0]}x{label.size[1]} does not match its image {root / source.image} "
            f"({size[0]}x{size[1]}); a label must have its image's resolution"
        )
    histogram = np.array(label.histogram(), dtype=np.int64)
    valid = cs.VALID_IDS if source.label_kind == "labelIds" else cs.VALID_TRAIN_IDS
    bad = sorted(set(np.flatnonzero(histogram).tolist()) - valid)
    if bad:
        raise PackError(
            f"{path}: values {bad} are not Cityscapes {source.label_kind} (valid: {min(valid)}..{max(valid)}); "
            f"is this the right file?"
        )
    if source.label_kind == "labelTrainIds" and resize is None:
        return data, histogram  # already what we store: keep the original bytes
    train_ids = label if source.label_kind == "labelTrainIds" else label.point(cs.ID_TO_TRAINID.tolist())
    if resize is not None:
        train_ids = train_ids.resize(resize[::-1], Image.NEAREST)  # Pillow takes (W, H)
    train_ids = np.asarray(train_ids)
    return encode_gray8(train_ids), np.bincount(train_ids.ravel(), minlength=256).astype(np.int64)


def _sample(root: Path, source: Source, fold: int | None, options: Options) -> tuple[dict[str, Any], np.ndarray]:
    image_path = root / source.image
    image_data = image_path.read_bytes()
    image = _read_png(image_path, image_data, "image")
    source_size = image.size
    resize = options.resize if source.split == "train" else None
    if resize is not None:
        if resize[0] > image.height or resize[1] > image.width:
            raise PackError(
                f"{image_path}: --resize {format_size(resize)} is larger than the image "
                f"({image.width}x{image.height}); packing stores frames at or below their resolution"
            )
        image = image.convert("RGB").resize(resize[::-1], Image.BILINEAR)  # Pillow filters: no aliasing
        if options.image_format == "png":
            image_data = encode_rgb8(np.asarray(image))
    if options.image_format == "jpg":
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format="JPEG", quality=options.jpeg_quality)
        image_data = buffer.getvalue()
    record = {
        "key": source.key,
        "city": source.city,
        "split": source.split,
        "fold": fold,
        "width": image.size[0],
        "height": image.size[1],
        "source_width": source_size[0],
        "source_height": source_size[1],
        "image": source.image,
        "label": source.label,
        "label_source": source.label_kind,
    }
    sample = {"__key__": source.key, f"image.{options.image_format}": image_data}
    histogram = np.zeros(256, dtype=np.int64)
    if source.label is not None:
        sample["label.png"], histogram = _label(root, source, source_size, resize)
    sample["json"] = json.dumps(record, sort_keys=True).encode()
    return sample, histogram


def write_shard(root: Path, out: Path, job: ShardJob, options: Options) -> ShardResult:
    """Write one shard; its bytes depend only on the job and the options."""
    histogram = np.zeros(256, dtype=np.int64)
    with open(out / job.name, "wb") as f:
        hashing = _HashingWriter(f)
        # mtime, owner and mode fixed so that a repack gives the same bytes.
        writer = wds.TarWriter(hashing, user="seg", group="seg", mode=0o444, encoder=False, mtime=0)
        try:
            for source in job.samples:
                parallel.check_stop()  # the parent gave up (an error in another shard, Ctrl-C): stop now
                sample, sample_histogram = _sample(root, source, job.fold, options)
                writer.write(sample)
                histogram += sample_histogram
        finally:
            writer.close()  # also on error, while the file is open (the directory is discarded then)
    return ShardResult(
        job.name, job.group, len(job.samples), hashing.bytes, hashing.sha256.hexdigest(), histogram.tolist()
    )


def _write_shard_star(args: tuple) -> ShardResult:
    return write_shard(*args)


def build_manifest(root: Path, groups: dict[str, list[Source]], results: list[ShardResult], options: Options) -> dict:
    by_group: dict[str, list[ShardResult]] = defaultdict(list)
    for result in sorted(results, key=lambda r: r.name):
        by_group[result.group].append(result)
    manifest_groups = {}
    for group, samples in groups.items():
        shards = by_group[group]
        pixels = np.sum([r.train_id_pixels for r in shards], axis=0, dtype=np.int64)
        labelled = samples[0].label is not None
        manifest_groups[group] = {
            "split": samples[0].split,
            "fold": group_fold(group),
            "cities": sorted({s.city for s in samples}),
            "samples": len(samples),
            "class_pixels": pixels[: cs.NUM_CLASSES].tolist() if labelled else None,
            "ignore_pixels": int(pixels[cs.IGNORE_INDEX]) if labelled else None,
            "shards": [{"name": r.name, "samples": r.samples, "bytes": r.bytes, "sha256": r.sha256} for r in shards],
        }
    kinds = defaultdict(int)
    for samples in groups.values():
        for s in samples:
            if s.label_kind:
                kinds[s.label_kind] += 1
    counts: dict[str, Any] = defaultdict(int)
    for g in manifest_groups.values():
        counts[g["split"]] += g["samples"]
    counts["folds"] = (
        [manifest_groups[fold_group(k)]["samples"] for k in range(options.folds)] if "train" in counts else []
    )
    counts["selection"] = manifest_groups.get(SELECTION_GROUP, {}).get("samples", 0)
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "source": {"root": str(root.resolve()), "labels": dict(sorted(kinds.items()))},
        "options": {
            "folds": options.folds,
            "fold_mode": options.fold_mode,
            "seed": options.seed,
            "selection_cities": list(options.selection_cities),
            "selection_fraction": options.selection_fraction,
            "splits": list(options.splits),
            "shard_size": options.shard_size,
            "image_format": options.image_format,
            "jpeg_quality": options.jpeg_quality if options.image_format == "jpg" else None,
            # the train split's stored size (val and test keep their resolution), or null
            "resize": {"height": options.resize[0], "width": options.resize[1]} if options.resize else None,
        },
        "classes": {"names": list(cs.CLASS_NAMES), "ignore_index": cs.IGNORE_INDEX},
        "counts": dict(counts),
        "groups": manifest_groups,
    }


def check_resize(root: Path, train: list[Source], resize: tuple[int, int] | None) -> None:
    """Refuse a --resize (H, W) that lies the other way than the train frames (read from the
    first frame's header), before anything is written: typed HxW where WIDTHxHEIGHT is meant,
    it would store squashed frames."""
    if resize is None or not train:
        return
    first = root / train[0].image
    try:
        with Image.open(first) as image:
            frame = (image.height, image.width)
    except OSError as e:
        raise PackError(f"{first}: cannot read the image ({e}); is it a complete PNG?") from None
    swapped = orientation_mismatch("--resize", resize, frame, f"the train frames (e.g. {first.name})")
    if swapped:
        raise PackError(swapped)


def check_options(options: Options) -> None:
    """Refuse options that mean nothing, before anything is read or written (``nan`` fails
    every comparison, so each range is written as what is accepted)."""
    if options.image_format not in IMAGE_FORMATS:
        raise PackError(f"--image-format {options.image_format!r}: choose from {', '.join(IMAGE_FORMATS)}")
    if options.shard_size <= 0:
        raise PackError(f"--shard-size {options.shard_size}: must be positive")
    if not options.splits:
        raise PackError(f"--splits names no split: give some of {','.join(cs.SPLITS)}")
    if options.seed < 0:
        raise PackError(f"--seed {options.seed}: a seed is 0 or more")
    if not 0 <= options.selection_fraction < 1:
        raise PackError(
            f"--selection-fraction {options.selection_fraction}: a share of the train frames, at least 0 and "
            f"below 1 (e.g. 0.05)"
        )
    if not 1 <= options.jpeg_quality <= 100:
        raise PackError(f"--jpeg-quality {options.jpeg_quality}: libjpeg's quality runs from 1 to 100 (default 95)")


def check_out(root: Path, out: Path) -> None:
    """Refuse an output that is the input tree, holds it or lies inside it (symlinks resolved):
    the output is replaced whole (--overwrite), which would delete the tree it reads; one
    inside the tree would be scanned as part of it by the next pack."""
    source, target = root.resolve(), out.resolve()
    if target == source:
        relation = "is"
    elif source.is_relative_to(target):
        relation = "contains"
    elif target.is_relative_to(source):
        relation = "is inside"
    else:
        return
    raise PackError(
        f"--out {out} {relation} the Cityscapes root {root}: packing there would replace or mix with its "
        f"input; choose an --out outside {root}"
    )


def pack(
    root: str | Path,
    out: str | Path,
    options: Options = Options(),
    workers: int = 1,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Pack the tree at ``root`` into ``out``; return the manifest. Atomic: all or nothing."""
    root = Path(root)
    check_options(options)
    check_out(root, Path(out))
    splits = scan(root, options.splits)
    groups: dict[str, list[Source]] = {}
    if "train" in splits:
        groups.update(assign_groups(splits["train"], options))
    for split in ("val", "test"):
        if split in splits:
            groups[split] = splits[split]
    check_resize(root, splits.get("train", []), options.resize)
    jobs = plan_shards(root, groups, options)

    with leased_atomic_directory(out, f"pack_cityscapes into {out}", overwrite) as tmp:
        args = [(root, tmp, job, options) for job in sorted(jobs, key=lambda j: -j.planned_bytes)]
        results = []
        bar = tqdm(total=sum(len(j.samples) for j in jobs), desc="pack", unit="img", disable=not progress)
        try:
            # On an error or Ctrl-C, leaving this block cancels the shards not yet started and
            # waits for the running ones, which stop within one sample (seg/core/parallel.py).
            with parallel.unordered(_write_shard_star, args, workers) as outputs:
                for result in outputs:
                    results.append(result)
                    bar.update(result.samples)
        finally:
            bar.close()
        manifest = build_manifest(root, groups, results, options)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest
