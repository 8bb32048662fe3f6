#!/usr/bin/env python
"""The wheels seg needs on a machine that can't reach a package index and already holds some
packages (a GPU node's image with CUDA torch, say): downloaded here, for that machine's Python
and platform, leaving out what it has.

    # there:  python3 -m pip freeze > have.txt            (or a list of names, one a line)
    python tools/offline_wheels.py --have have.txt --python-version 3.12 --dest wheels/
    # there:  python3 -m pip install --no-index --no-deps --target /tmp/site wheels/*.whl
    #         PYTHONPATH=/tmp/site SEG_PYTHON=python3 ./launch gpu-check

pip resolves a whole tree or nothing: ``pip download`` would fetch torch again (kornia and
accelerate need it: gigabytes of CUDA wheels), and pip has no "assume installed". So this
walks the tree itself: each requirement of seg (setup.cfg) that ``--have`` doesn't meet is
downloaded alone (``pip download --no-deps``, binary only, for the target's tags), and its
own requirements (markers evaluated for the target, extras left out) are walked the same
way. Requirements of one package that disagree get one wheel that meets them all. A
package ``--have`` names without a version (a plain list) is taken to fit; ``pip freeze``'s
versions are checked, and one too old or too new gets a wheel that fits beside it (first on
PYTHONPATH). Exit 1 when a requirement has no wheel for the target (each named).
"""

from __future__ import annotations

import argparse
import configparser
import re
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
# manylinux tags pip matches exactly (README of pip download): the common ones, newest first
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")  # fmt: skip


def seg_requirements() -> list[Requirement]:
    """setup.cfg's install_requires (comments and blank lines aside)."""
    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    lines = config["options"]["install_requires"].splitlines()
    return [Requirement(line.strip()) for line in lines if line.strip() and not line.strip().startswith("#")]


def have_versions(path: Path) -> dict[str, Version | None]:
    """What the target holds, by name: ``pip freeze`` output (``name==1.0`` gives the version;
    ``name @ url`` none) or a plain list of names (no versions)."""
    have: dict[str, Version | None] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            requirement = Requirement(line.split(" @ ")[0])
        except InvalidRequirement:
            raise SystemExit(f"error: {path}: {line!r} is neither a package name nor `pip freeze` output") from None
        pinned = [s.version for s in requirement.specifier if s.operator == "=="]
        have[canonicalize_name(requirement.name)] = Version(pinned[0]) if pinned else None
    return have


def wheel_requirements(wheel: Path) -> list[Requirement]:
    """The Requires-Dist lines of a wheel's METADATA."""
    with zipfile.ZipFile(wheel) as archive:
        (metadata,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        text = archive.read(metadata).decode()
    return [
        Requirement(line.split(":", 1)[1].strip()) for line in text.splitlines() if line.startswith("Requires-Dist:")
    ]


def applies(requirement: Requirement, python_version: str) -> bool:
    """Whether a requirement holds on the target (Linux x86-64, CPython ``python_version``),
    installed without extras."""
    if requirement.marker is None:
        return True
    environment = {"python_version": python_version, "python_full_version": f"{python_version}.0",
                   "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
                   "os_name": "posix", "implementation_name": "cpython", "platform_python_implementation": "CPython",
                   "extra": ""}  # fmt: skip
    return requirement.marker.evaluate(environment)


def download(requirement: Requirement, dest: Path, python_version: str) -> Path | None:
    """One wheel for ``requirement`` (no dependencies) into ``dest``; None when pip finds none."""
    before = set(dest.glob("*.whl"))
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
               "--python-version", python_version, "--implementation", "cp", "--dest", str(dest),
               *(f"--platform={p}" for p in PLATFORMS), str(requirement)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:  # pip's own reason (no such version, or no index reached), for the log
        print(f"pip download {requirement}: {(done.stderr.strip().splitlines() or ['failed'])[-1]}", file=sys.stderr)
        return None
    name = canonicalize_name(requirement.name)
    named = {w: parse_wheel_filename(w.name)[1] for w in dest.glob("*.whl") if parse_wheel_filename(w.name)[0] == name}
    # none new: pip found it downloaded before (a rerun into the same folder)
    fitting = [w for w in named if w not in before] or [
        w for w, version in named.items() if requirement.specifier.contains(version, prereleases=True)
    ]
    return max(fitting, key=named.__getitem__, default=None)


Fetch = Callable[[Requirement, Path, str], "Path | None"]


def collect(
    have: dict[str, Version | None],
    dest: Path,
    python_version: str,
    roots: list[Requirement] | None = None,
    fetch: Fetch = download,
) -> tuple[dict[str, Path], list[str]]:
    """Every wheel the target lacks, walking the requirements from ``roots`` (seg's); and the
    problems. What the target has is left out unless its version (when ``have`` knows it) is
    one a requirement refuses: then a wheel that fits comes too, to stand before it on the
    path. ``fetch``: how one wheel is got (``download``)."""
    dest.mkdir(parents=True, exist_ok=True)
    wanted: list[tuple[Requirement, str]] = [(r, "seg") for r in (seg_requirements() if roots is None else roots)]
    wheels: dict[str, Path] = {}
    asked: dict[str, list[tuple[Requirement, str]]] = {}  # name -> every requirement of it met so far
    missing: dict[str, Requirement] = {}  # name -> the requirement no wheel met
    while wanted:
        requirement, by = wanted.pop(0)
        name = canonicalize_name(requirement.name)
        if not applies(requirement, python_version):
            continue
        if name in have and name not in wheels and name not in missing:
            version = have[name]
            if version is None or requirement.specifier.contains(version, prereleases=True):
                continue
            print(f"the target's {requirement.name} {version} does not satisfy {requirement} (for {by})", flush=True)
        asked.setdefault(name, []).append((requirement, by))
        if name in wheels and requirement.specifier.contains(parse_wheel_filename(wheels[name].name)[1], True):
            continue
        # first met, or the wheel taken for an earlier requirement misses this one: one for all of them
        combined = Requirement(requirement.name)
        for earlier, _ in asked[name]:
            combined.specifier &= earlier.specifier
        wheel = fetch(combined, dest, python_version)
        if wheel is None:
            missing[name] = combined
            continue
        missing.pop(name, None)
        if name in wheels:
            wheels[name].unlink()
        wheels[name] = wheel
        print(f"{wheel.name}  (for {by})", flush=True)
        wanted += [(r, name) for r in wheel_requirements(wheel)]
    problems = [
        f"{combined} (needed by {', '.join(sorted({b for _, b in asked[name]}))}): no wheel for CPython "
        f"{python_version} on Linux x86-64"
        for name, combined in sorted(missing.items())
    ]
    return wheels, problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--have", type=Path, required=True, help="what the target holds: `pip freeze` or names")
    parser.add_argument("--python-version", default="3.12", help="the target's Python, major.minor (default 3.12)")
    parser.add_argument("--dest", type=Path, required=True, help="the folder the wheels go to")
    args = parser.parse_args(argv)
    if not re.fullmatch(r"3\.\d+", args.python_version):
        print(f"error: --python-version {args.python_version!r}: major.minor, e.g. 3.12 (`python3 --version` there)",
              file=sys.stderr)  # fmt: skip
        return 2
    if args.dest.exists() and not args.dest.is_dir():
        print(f"error: --dest {args.dest}: a file, not a folder", file=sys.stderr)
        return 2
    if not args.have.is_file():
        print(f"error: --have {args.have}: no such file (`python3 -m pip freeze > have.txt` on the target)",
              file=sys.stderr)  # fmt: skip
        return 2
    wheels, problems = collect(have_versions(args.have), args.dest, args.python_version)
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    print(f"{len(wheels)} wheels in {args.dest}; there: python3 -m pip install --no-index --no-deps "
          f"--target DIR {args.dest}/*.whl, then PYTHONPATH=DIR")  # fmt: skip
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
