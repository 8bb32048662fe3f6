"""A disk that is full, over quota, read-only or forbidden, told in one line: the path, what
failed, why, and what to do; every command exits EXIT_STORAGE on it.

Libraries report these failures in their own ways: ``open`` and ``os`` raise OSError with an
errno, torch.save raises RuntimeError ("file write failed"), safetensors its own error type
with the OS message inside. :func:`storage_problem` turns any of them into the line, by the
errno where there is one and by looking at the disk where there is not.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from seg.core.atomic import atomic_write_bytes

EXIT_STORAGE = 74  # sysexits' EX_IOERR: the disk, not the input or the code

_REASONS = {
    errno.ENOSPC: ("no space left on the device", "free space there or write elsewhere"),
    errno.EDQUOT: ("disk quota exceeded", "free space within the quota (quota -s) or write elsewhere"),
    errno.EROFS: ("read-only file system", "write to a writable folder"),
    errno.EACCES: ("permission denied", "make it writable for this user (chmod/chown) or write elsewhere"),
    errno.EPERM: ("operation not permitted", "make it writable for this user (chmod/chown) or write elsewhere"),
}
_FULL_BELOW = 1 << 20  # under this many free bytes a failed write is taken for a full disk


class NoRoomError(OSError):
    """A write foreseen not to fit (``needed`` bytes): refused before it fills the disk."""

    def __init__(self, path: str | os.PathLike, needed: int) -> None:
        super().__init__(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        self.needed = needed


def existing_parent(path: str | os.PathLike) -> Path:
    """``path`` itself or its nearest ancestor that exists."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_bytes(path: str | os.PathLike) -> int:
    """Free bytes on the file system that holds (or would hold) ``path``."""
    return shutil.disk_usage(existing_parent(path)).free


def megabytes(n: float) -> str:
    return f"{n / 2**20:.0f} MB" if n >= 2**20 else f"{n / 2**10:.0f} kB"


def _line(doing: str, path: Path, code: int, needed: int | None = None) -> str:
    reason, fix = _REASONS[code]
    if code == errno.ENOSPC:
        more = f", {megabytes(needed)} needed" if needed else ""
        reason = f"{reason} ({megabytes(free_bytes(path))} free{more})"
    return f"{doing} {path} failed: {reason}: {fix}"


def storage_problem(error: BaseException, path: str | os.PathLike, doing: str = "writing") -> str | None:
    """The one line for ``error``, raised while ``doing`` ``path``, when the disk is the cause
    (full, over quota, read-only, forbidden); None when it is something else."""
    path = Path(path)
    code = getattr(error, "errno", None)
    if code in _REASONS:
        return _line(doing, Path(getattr(error, "filename", None) or path), code, getattr(error, "needed", None))
    if isinstance(error, OSError) and code is not None:
        return None  # another OS error (no such file, ...): not the disk's state
    # torch and safetensors wrap the OS error: look at the disk itself
    if free_bytes(path) < _FULL_BELOW:
        return _line(doing, path, errno.ENOSPC)
    problem = writable_problem(path.parent if not path.is_dir() else path)
    return f"{doing} {path} failed: {problem}" if problem else None


def writable_problem(folder: str | os.PathLike) -> str | None:
    """Why files can't be created in ``folder`` (or where it would be made), or None: tried
    with a real temporary file, since ``access`` answers for the permission bits only."""
    where = existing_parent(folder)
    if not where.is_dir():  # a file where a folder is (or would be made): no disk error, a wrong path
        inside = "" if where == Path(folder).absolute() else f" (where {folder} would be made)"
        return f"{where} is a file, not a folder{inside}: give a folder, or move the file away"
    try:
        with tempfile.TemporaryFile(dir=where):
            pass
    except OSError as e:
        if e.errno in _REASONS:
            reason, fix = _REASONS[e.errno]
            return f"cannot create files in {where} ({reason}): {fix}"
        raise
    return None


class StorageError(Exception):
    """A write the disk refused: the message is its one line (:func:`storage_problem`)."""


@contextlib.contextmanager
def writing(path: str | os.PathLike, doing: str = "writing") -> Iterator[None]:
    """Inside, a failure for the disk's sake becomes a StorageError with its one line; any
    other error passes as it is. A command checks ``path`` first (:func:`check_writable`)."""
    try:
        yield
    except StorageError:
        raise
    except Exception as e:
        if (problem := storage_problem(e, path, doing)) is None:
            raise
        raise StorageError(problem) from None


def check_writable(folder: str | os.PathLike) -> None:
    """Before the work starts: StorageError when files can't be created where ``folder`` is
    (or would be made), so a command fails at once, not after hours of work."""
    if problem := writable_problem(folder):
        raise StorageError(problem)


def write_json_result(path: str | os.PathLike, data: Any, indent: int = 2) -> str | None:
    """A command's result as JSON in ``path`` (``--json FILE``, checked before the work with
    :func:`check_output_file`), atomically; the disk's one line when the write fails for the
    disk's sake (it filled meanwhile), else None."""
    try:
        with writing(path):
            atomic_write_bytes(path, (json.dumps(data, indent=indent) + "\n").encode())
    except StorageError as e:
        return str(e)
    return None


def output_file_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` can't name a file to write, for a wrong path (not the disk's state): it is
    a folder, or its folder is missing or a file; None when it can."""
    path = Path(path)
    if path.is_dir():
        return f"is a folder: give a file name, such as {path / 'result.json'}"
    folder = path.absolute().parent
    if not folder.exists():
        return f"its folder {folder} does not exist: make it (mkdir -p {folder}) or write into an existing folder"
    if not folder.is_dir():
        return f"{folder} is a file, not a folder: give a path in a folder"
    return None


def check_output_file(parser: argparse.ArgumentParser, option: str, path: str | os.PathLike) -> None:
    """Before the work starts, for a file a command writes when it ends (``--json FILE``): a
    path that can't name a file is refused as a usage error (exit 2), a folder where files
    can't be created as the disk's (EXIT_STORAGE), each in one line, so that the command fails
    at once, not after its whole run."""
    if problem := output_file_problem(path):
        parser.error(f"{option} {path}: {problem}")
    if problem := writable_problem(Path(path).absolute().parent):
        parser.exit(EXIT_STORAGE, f"error: {option} {path}: {problem}\n")
