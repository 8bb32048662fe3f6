"""Whether two experiments' stages can be compared fold by fold, and what they differ in.

Folds pair when they hold out the same images: the same shards (their manifest's sha256),
or shards whose fold groups and selection set are the same images. What makes the
experiments differ (the point of comparing them) comes from their stages' identities
(seg/recipe/identity.py), else their configs.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from seg.core.runs import working_directories
from seg.data.manifest import (
    MANIFEST,
    SELECTION_GROUP,
    ManifestError,
    fold_group,
    load_manifest,
    location,
    manifest_sha256,
    sha256_file,
)
from seg.data.remote import is_remote
from seg.recipe.identity import NOT_IDENTITY, differences, stage_identity
from seg.results.records import FoldRecord, StageRecord, read_json


class CompareError(ValueError):
    """A file that cannot be read or is malformed, or a request that cannot be met: the
    message names the file or the experiments and says why."""


class NotComparableError(CompareError):
    """Two experiments whose folds cannot be paired: different data, fold assignment or
    selection set, or a fold on one side only."""


@dataclass
class Shards:
    """The shards an experiment's stage trained on, as far as they can be identified."""

    path: str  # data.shards, as the config names it
    manifest_path: Path | str | None  # where its manifest.json was found (a URL for remote shards; None: not found)
    manifest: dict[str, Any] | None
    digest: str | None  # sha256 of the manifest without source.root (see shards_identity)
    file_sha256: str | None = None  # sha256 of the manifest file found now (what an identity records)
    recorded: str | None = None  # the manifest sha256 the folds' identities recorded when they trained

    def stale(self) -> bool:
        """Whether the manifest found now is not the one the folds trained on (repacked in place)."""
        return self.recorded is not None and self.manifest is not None and self.file_sha256 != self.recorded

    def as_trained(self) -> Shards:
        """These shards with a stale manifest taken as not found: it says nothing of the folds' data."""
        return Shards(self.path, None, None, None, None, self.recorded) if self.stale() else self


@dataclass
class ComparedStage:
    """One stage of one experiment, as the comparison reads it (seg.results.records)."""

    path: Path  # runs/<experiment>
    label: str
    record: StageRecord
    shards: Shards | None  # None when no fold has a config
    evaluations: list[tuple[str, dict[str, Any]]]  # (label, metrics.json) of the reduced model on val
    notes: list[str] = field(default_factory=list)

    @property
    def stage(self) -> int:
        return self.record.stage

    @property
    def folds(self) -> dict[int, FoldRecord]:
        return {f.fold: f for f in self.record.folds}

    @property
    def reduction(self) -> dict[str, Any] | None:
        return self.record.reduction

    def finished(self) -> dict[int, FoldRecord]:
        return {k: f for k, f in self.folds.items() if f.finished}

    def setup(self) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        """(the stage's identity, seg.recipe.identity.stage_identity of its first finished fold that
        recorded one; the first config there is): what the experiment is."""
        identity = next((f.identity for f in self.finished().values() if f.identity is not None), None)
        config = next((f.config for f in self.folds.values() if f.config is not None), None)
        return stage_identity(identity), config


def shards_identity(shards: str, experiment: Path, runs_dir: str | None = None) -> Shards:
    """Find the manifest of ``shards`` (as config.yaml names it) and hash it.

    A fold's summary.json records only the sha256 of the manifest it trained on (its identity;
    compare.py sets ``recorded``, which decides when both sides have one); its config.yaml names
    the shards folder (``data.shards``), relative to where the training ran when it is not
    absolute. That is tried from here, then from the experiment folder less ``train.runs_dir``
    and the experiment's name (runs/<experiment> -> the repository root). The manifest lists
    every shard's sha256, sample count and fold/selection group, so a sha256 of it identifies
    the data: the canonical JSON of the manifest without ``source.root`` (the folder the tree
    was packed from, which changes no byte of the shards; packing is deterministic, so two
    packs of one tree with the same options hash the same wherever they were made).
    """
    if is_remote(shards):  # read from where training read it; unreachable now: compared as not found
        try:
            manifest = load_manifest(shards)
        except ManifestError:
            return Shards(shards, None, None, None)
        digest = manifest_digest(manifest)
        return Shards(shards, location(shards, MANIFEST), manifest, digest, manifest_sha256(shards))
    candidates = (
        [Path(shards)]
        if Path(shards).is_absolute()
        else [Path.cwd() / shards, *(root / shards for root in working_directories(experiment, runs_dir))]
    )
    for directory in candidates:
        path = directory / MANIFEST
        if path.is_file():
            manifest = read_json(path)
            if not isinstance(manifest.get("groups"), dict) or not isinstance(manifest.get("options"), dict):
                raise CompareError(f"{path}: not a seg manifest (no groups or options)")
            return Shards(shards, path, manifest, manifest_digest(manifest), sha256_file(path))
    return Shards(shards, None, None, None)


def manifest_digest(manifest: dict[str, Any]) -> str:
    """sha256 of the manifest's canonical JSON, ``source.root`` left out (see shards_identity)."""
    content = dict(manifest)
    if isinstance(content.get("source"), dict):
        content["source"] = {k: v for k, v in content["source"].items() if k != "root"}
    return hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _group_identity(manifest: dict[str, Any], group: str) -> tuple[Any, ...] | None:
    """Which images a group holds, as far as the manifest says: its cities and image count,
    and in random mode also the seeded draw (mode, seed) that picked them. Not the shards'
    bytes: the same images re-encoded are the same assignment, other data (below)."""
    entry = manifest["groups"].get(group)
    if entry is None:
        return None
    options = manifest["options"]
    draw = (options.get("fold_mode"), options.get("seed")) if options.get("fold_mode") == "random" else None
    return entry.get("samples"), tuple(entry.get("cities", [])), draw


def group_text(manifest: dict[str, Any], group: str) -> str:
    entry = manifest["groups"].get(group)
    if entry is None:
        return "none"
    options = manifest["options"]
    draw = f" (random draw, seed {options.get('seed')})" if options.get("fold_mode") == "random" else ""
    return f"{entry.get('samples')} images of {', '.join(entry.get('cities', [])) or '?'}{draw}"


def data_differences(a: ComparedStage, b: ComparedStage) -> tuple[list[str], list[str]]:
    """(why the folds of ``b`` cannot be paired with ``a``'s, notes on how it was checked)."""
    if a.shards is None or b.shards is None:
        missing = a if a.shards is None else b
        return [
            f"{missing.label}: no fold of stage{missing.stage} has a config.yaml or model.json naming its shards"
        ], []
    ra, rb = a.shards.recorded, b.shards.recorded
    if ra is not None and ra == rb:  # the same manifest when each trained, wherever (and whatever) it is now
        return [], []
    stale = [e for e in (a, b) if e.shards.stale()]
    notes = [f"{e.label}: {stale_text(e.shards)}" for e in stale]
    da, db = a.shards.as_trained(), b.shards.as_trained()
    if da.manifest is None or db.manifest is None:
        lost = ", ".join(f"{e.label} ({s.path})" for e, s in ((a, da), (b, db)) if s.manifest is None)
        if ra is not None and rb is not None:  # both recorded, differently: no path can say they agree
            gone = "; ".join(stale_text(e.shards) for e in stale) or f"the manifest of {lost} is not there"
            return [
                f"different shards: {a.label}'s folds trained on manifest sha256 {ra}, {b.label}'s on {rb} "
                f"(their summary.json identities), and nothing shows they hold the same images ({gone})"
            ], notes
        if da.path == db.path:
            return [], [
                *notes,
                f"{a.label} vs {b.label}: manifest.json not found for {lost}; same shards path, content not checked",
            ]
        return [
            f"different shards: {a.label} trained on {da.path}, {b.label} on {db.path}, and the manifest of "
            f"{lost} is not there to show they hold the same data"
        ], notes
    if da.digest == db.digest:
        return [], notes
    ma, mb = da.manifest, db.manifest
    why = []
    folds_a, folds_b = ma["options"].get("folds"), mb["options"].get("folds")
    if folds_a != folds_b:
        why.append(f"different fold assignment: {a.label}'s shards have {folds_a} folds, {b.label}'s {folds_b}")
    else:
        for k in range(int(folds_a or 0)):
            if _group_identity(ma, fold_group(k)) != _group_identity(mb, fold_group(k)):
                why.append(
                    f"different fold assignment: fold {k} holds out {group_text(ma, fold_group(k))} in "
                    f"{a.label} ({da.path}) but {group_text(mb, fold_group(k))} in {b.label} ({db.path})"
                )
                break
    if _group_identity(ma, SELECTION_GROUP) != _group_identity(mb, SELECTION_GROUP):
        why.append(
            f"different selection set: {group_text(ma, SELECTION_GROUP)} in {a.label}, "
            f"{group_text(mb, SELECTION_GROUP)} in {b.label}"
        )
    if not why:  # the same images in the same groups, other bytes (image format, labels, source)
        keys = sorted(
            {
                f"options.{k}"
                for k in set(ma["options"]) | set(mb["options"])
                if ma["options"].get(k) != mb["options"].get(k)
            }
            | {
                f"groups.{g}"
                for g in set(ma["groups"]) | set(mb["groups"])
                if ma["groups"].get(g) != mb["groups"].get(g)
            }
        )
        why.append(
            f"different shards: manifest hash {da.digest[:12]} ({da.manifest_path}) in {a.label} vs {db.digest[:12]} "
            f"({db.manifest_path}) in {b.label}" + (f", differing in {', '.join(keys)}" if keys else "")
        )
    return why, notes


def stale_text(shards: Shards) -> str:
    """Why a manifest found now says nothing of the data the folds trained on."""
    return (
        f"{shards.manifest_path} now has sha256 {shards.file_sha256}, not the {shards.recorded} the folds "
        "recorded (repacked since)"
    )


def setup_differences(baseline: ComparedStage, other: ComparedStage) -> dict[str, Any]:
    """What makes ``other`` another experiment than ``baseline``: seg.recipe.identity's differences
    of their stages' identities (resolved config, start model, data, global batch), else,
    for folds that recorded none, of their configs less what does not change a run."""
    (ia, ca), (ib, cb) = baseline.setup(), other.setup()
    if ia is not None and ib is not None:
        changes, source = differences(ia, ib, may_differ=()), "the folds' recorded identities (summary.json)"
    elif ca is not None and cb is not None:
        ignored = tuple(f"config.{key}" for key in NOT_IDENTITY)
        changes = differences({"config": ca}, {"config": cb}, may_differ=ignored)
        source = "the folds' configs (no identity recorded)"
    else:
        changes, source = [], "nothing: a side has no config"
    return {"baseline": baseline.label, "candidate": other.label, "from": source, "differences": changes}


def setup_line(entry: dict[str, Any]) -> str:
    """One line for a person: ``B vs A: config.data.level: 'standard' -> 'none'``."""
    what = "; ".join(entry["differences"]) or "no difference in resolved config, start model or data"
    return f"{entry['candidate']} vs {entry['baseline']} (from {entry['from']}): {what}"


def pair_folds(a: ComparedStage, b: ComparedStage, allow_missing: bool) -> tuple[list[int], list[str]]:
    """The folds both experiments finished, and notes on what was left out; a fold folder on
    one side only is refused unless ``allow_missing``."""
    notes = []
    only_a, only_b = sorted(set(a.folds) - set(b.folds)), sorted(set(b.folds) - set(a.folds))
    for side, other, only in ((a, b, only_a), (b, a, only_b)):
        if only:
            missing = (
                f"fold {fold_list(only)} of {side.label} {'is' if len(only) == 1 else 'are'} missing from {other.label}"
            )
            if not allow_missing:
                raise NotComparableError(
                    f"{missing} ({other.path / f'stage{other.stage}'} has folds {fold_list(sorted(other.folds))}); "
                    f"pass --allow-missing to compare the common folds"
                )
            notes.append(f"{missing}: left out (--allow-missing)")
    common = sorted(set(a.finished()) & set(b.finished()))
    unfinished = sorted((set(a.folds) & set(b.folds)) - set(common))
    if unfinished:
        notes.append(f"{a.label} vs {b.label}: fold {fold_list(unfinished)} not finished on both sides; left out")
    if not common:
        raise NotComparableError(f"{a.label} and {b.label} have no fold finished on both sides in stage{a.stage}")
    return common, notes


def fold_list(numbers: list[int]) -> str:
    return ", ".join(map(str, numbers))


def other_shards(result: dict[str, Any], shards: Shards, experiment: Path) -> str | None:
    """Why an evaluation (tools/evaluate.py's metrics.json) is not on the pack the experiment's
    folds trained on; None when it is. By the manifest sha256 it records when it does, else by
    the manifest now at the shards path it names."""
    trained = shards.recorded or shards.file_sha256
    recorded = result.get("manifest_sha256")
    if isinstance(recorded, str) and trained is not None:
        return None if recorded == trained else f"manifest sha256 {recorded[:12]}, the folds' {trained[:12]}"
    path = result.get("shards")
    if not isinstance(path, str):
        return "its metrics.json names no shards"
    if path == shards.path:
        return None
    found = shards_identity(path, experiment)
    if found.manifest is not None and trained in (found.file_sha256, None) and found.digest == shards.digest:
        return None  # the same pack elsewhere
    what = f"manifest sha256 {found.file_sha256[:12]}" if found.file_sha256 else "its manifest not found"
    return f"shards {path} ({what}), the folds' {shards.path}"
