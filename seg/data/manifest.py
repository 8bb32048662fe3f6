"""The shard set's manifest: what a packed dataset holds, and checking it against disk.

A packed dataset is a directory of webdataset tar shards plus ``manifest.json``. The
training split is stored in fold groups ``train-fold{k}``: fold k trains on every other
fold group and validates on its own, so nothing is filtered at read time. An optional
``train-selection`` group is held out of every fold for model selection; ``val`` is the
official validation split and ``test`` the official test split (images only).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from seg.core import parallel
from seg.data.remote import RemoteError, Store, is_remote, local_copy

FORMAT = "seg.cityscapes-shards"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SELECTION_GROUP = "train-selection"


class ManifestError(ValueError):
    """The manifest is missing, malformed, or does not match the shards on disk."""


def fold_group(fold: int) -> str:
    return f"train-fold{fold}"


def group_fold(group: str) -> int | None:
    """``train-fold3`` -> 3; any other group -> None."""
    return int(group.removeprefix("train-fold")) if group.startswith("train-fold") else None


@dataclass(frozen=True)
class FoldSplit:
    """One fold of a packed dataset, resolved once from its manifest: the groups it trains on,
    the group it is validated on, and what the manifest says of them. Training, the run's
    identity and the loaders all take this."""

    directory: str  # a folder or a URL (seg.data.remote), as data.shards names it
    manifest: dict[str, Any]
    fold: int
    train_groups: tuple[str, ...]
    val_group: str

    @classmethod
    def of(cls, directory: str | Path, fold: int, manifest: dict[str, Any] | None = None) -> FoldSplit:
        """Fold ``fold`` of the dataset in ``directory``; ManifestError if there is no such fold."""
        manifest = manifest if manifest is not None else load_manifest(directory)
        train_groups, val_group = fold_groups(manifest, fold)
        return cls(str(directory), manifest, fold, tuple(train_groups), val_group)

    @property
    def train_samples(self) -> int:
        return sum(self.manifest["groups"][g]["samples"] for g in self.train_groups)

    def class_pixels(self) -> list[list[int]]:
        """Per-class pixel counts of each training group (for class weights)."""
        return [self.manifest["groups"][g]["class_pixels"] for g in self.train_groups]


def location(directory: str | Path, name: str) -> str:
    """Where file ``name`` of the dataset at ``directory`` (a folder or a URL) is."""
    return Store.of(str(directory)).url(name) if is_remote(directory) else str(Path(directory) / name)


def manifest_bytes(directory: str | Path) -> bytes:
    """The bytes of the manifest of the dataset at ``directory`` (a folder or a URL)."""
    try:
        if is_remote(directory):
            return Store.of(str(directory)).read(MANIFEST)
        return (Path(directory) / MANIFEST).read_bytes()
    except FileNotFoundError:
        raise ManifestError(
            f"{Path(directory) / MANIFEST} not found: is {directory} a packed dataset (tools/pack_cityscapes.py)?"
        ) from None
    except NotADirectoryError:
        raise ManifestError(
            f"{directory} is a file, not a packed dataset folder (tools/pack_cityscapes.py makes one)"
        ) from None
    except RemoteError as e:
        raise ManifestError(str(e)) from None


def manifest_sha256(directory: str | Path) -> str:
    return hashlib.sha256(manifest_bytes(directory)).hexdigest()


def load_manifest(directory: str | Path) -> dict[str, Any]:
    """Read and check the manifest of the dataset at ``directory`` (a folder or a URL)."""
    data = manifest_bytes(directory)
    path = location(directory, MANIFEST)
    try:
        manifest = json.loads(data)
    except json.JSONDecodeError as e:
        raise ManifestError(f"{path} is not valid JSON ({e}): repack the dataset") from None
    if manifest.get("format") != FORMAT:
        raise ManifestError(f"{path}: format {manifest.get('format')!r} is not {FORMAT!r}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ManifestError(
            f"{path}: format_version {manifest.get('format_version')!r}, this version of seg reads "
            f"{FORMAT_VERSION}: repack the dataset with this version"
        )
    return manifest


def fold_groups(manifest: dict[str, Any], fold: int) -> tuple[list[str], str]:
    """The training groups and the validation group of ``fold``."""
    folds = manifest["options"]["folds"]
    if not 0 <= fold < folds:
        raise ManifestError(f"fold {fold} does not exist: the dataset was packed with {folds} folds (0..{folds - 1})")
    return [fold_group(k) for k in range(folds) if k != fold], fold_group(fold)


def shard_paths(directory: str | Path, manifest: dict[str, Any], groups: list[str]) -> list[str]:
    """Paths of the shards of ``groups``, in order."""
    paths = []
    for group in groups:
        if group not in manifest["groups"]:
            raise ManifestError(
                f"group {group!r} is not in {location(directory, MANIFEST)}: it has {sorted(manifest['groups'])}"
            )
        paths += [location(directory, shard["name"]) for shard in manifest["groups"][group]["shards"]]
    return paths


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def _check_shard(args: tuple[str, dict[str, Any], bool]) -> str | None:
    directory, shard, checksum = args
    if is_remote(directory):  # fetched whole, its size and sha256 computed as it arrives
        try:
            with local_copy(Store.of(directory), shard["name"], shard["bytes"], shard["sha256"], cache=None):
                return None
        except RemoteError as e:
            return str(e)
    path = Path(directory) / shard["name"]
    if not path.is_file():
        return f"{path}: missing (listed in the manifest)"
    size = path.stat().st_size
    if size != shard["bytes"]:
        return f"{path}: {size} bytes, the manifest says {shard['bytes']}"
    if not checksum:
        return None
    digest = sha256_file(path)
    if digest != shard["sha256"]:
        return f"{path}: sha256 {digest} does not match the manifest's {shard['sha256']}"
    return None


def _check_shard_numbered(numbered: tuple[int, tuple[str, dict[str, Any], bool]]) -> tuple[int, str | None]:
    return numbered[0], _check_shard(numbered[1])


def verify(
    directory: str | Path, workers: int = 1, groups: list[str] | None = None, checksums: bool = True
) -> list[str]:
    """Check shards against the manifest (presence, size and, with ``checksums``, sha256);
    return the problems. A remote dataset (seg.data.remote) is read whole: every shard fetched and
    checked as it arrives, whatever ``checksums``.

    ``groups=None`` checks every group and also reports ``.tar`` files of a local folder that
    the manifest does not list; otherwise only the shards of ``groups`` are checked.
    """
    manifest = load_manifest(directory)
    selected = manifest["groups"] if groups is None else {g: manifest["groups"][g] for g in groups}
    listed = [(str(directory), s, checksums) for group in selected.values() for s in group["shards"]]
    problems = []
    if groups is None and not is_remote(directory):
        names = {s["name"] for group in manifest["groups"].values() for s in group["shards"]}
        stray = sorted(Path(directory).glob("*.tar"))
        problems += [f"{p}: not listed in the manifest" for p in stray if p.name not in names]
    with parallel.unordered(_check_shard_numbered, enumerate(listed), workers) as numbered:
        results = dict(numbered)
    return problems + [results[i] for i in range(len(listed)) if results[i]]
