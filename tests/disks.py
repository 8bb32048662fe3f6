"""Real full and read-only file systems for the storage tests: size-limited tmpfs mounts
(root only, as CI runs; elsewhere the tests skip saying why)."""

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


@contextmanager
def tmpfs(folder: Path, size: str, read_only: bool = False) -> Iterator[Path]:
    """``folder`` as a tmpfs of ``size`` (mount's notation: ``300m``, ``40k``; read-only: empty
    and unwritable) until the end."""
    if os.geteuid() != 0:
        pytest.skip("mounting a size-limited tmpfs needs root (CI runs as root)")
    folder.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def resize(folder: Path, size: str) -> None:
    """Grow (or shrink) a tmpfs mounted by :func:`tmpfs`: the user freed space."""
    subprocess.run(["mount", "-o", f"remount,size={size}", str(folder)], check=True)
