"""Atomic writes: a file or a whole directory appears complete or not at all.

What appears gets the modes a plain ``open()`` or ``mkdir`` would give it under the
process's umask (``tempfile`` creates its files 0600 and folders 0700, which on a shared
cluster would hide shards, models and results from the rest of a team); a file that
replaces an existing one keeps that file's mode, as writing it in place would.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path


class OutputExistsError(FileExistsError):
    """The output is already there and the caller did not ask to overwrite it."""


def current_umask() -> int:
    """The process's umask, read without changing it where Linux shows it (``os.umask``
    alone can only read it by setting it, a race with any other thread creating files)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``path`` that becomes ``path`` on success.

    On any exception (Ctrl-C included) the temporary directory is removed and an existing
    ``path`` is left untouched. With ``overwrite`` an existing ``path`` is replaced only
    after the new one is complete. A hard kill can leave a ``.<name>.partial-*`` directory,
    never a ``path`` that looks complete but is not. The directory gets a plain ``mkdir``'s
    mode (0777 less the umask).
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path} already exists: pass --overwrite to replace it, or choose another output")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=path.parent))
    try:
        tmp.chmod(0o777 & ~current_umask())  # mkdtemp's 0700, as mkdir would have made it
        yield tmp
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_leftovers(directory: str | os.PathLike, name: str = "*") -> list[Path]:
    """Remove what hard kills of atomic writes left in ``directory``: ``atomic_directory``'s
    ``.<name>.partial-*`` and ``.<name>.old-*`` folders, ``atomic_write_bytes``' ``.<name>.*.tmp``
    files (``name``: one output's name, or every one). Only for the folder's one writer (the
    holder of its lease): another writer's work in progress looks the same. What was removed."""
    directory = Path(directory)
    found = [
        p for pattern in (f".{name}.partial-*", f".{name}.old-*", f".{name}.*.tmp") for p in directory.glob(pattern)
    ]
    for leftover in found:
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)
    return found


@contextlib.contextmanager
def leased_atomic_directory(path: str | os.PathLike, what: str, overwrite: bool = False) -> Iterator[Path]:
    """``atomic_directory`` by the one writer of ``path``: it holds the lease ``.<name>.lease``
    beside it throughout (seg/core/lease.py; another live writer is refused with LeaseHeldError)
    and so may first remove what killed earlier writers of ``path`` left (``remove_leftovers``)."""
    from seg.core.lease import acquire  # here, not above: the lease builds on this module

    path = Path(path)
    with acquire(path.parent / f".{path.name}.lease", what):
        remove_leftovers(path.parent, path.name)
        with atomic_directory(path, overwrite) as tmp:
            yield tmp


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file, fsync and rename. The file gets
    a plain ``open()``'s mode: an existing file's, else 0666 less the umask."""
    atomic_write_all({path: data})


def atomic_write_all(files: Mapping[str | os.PathLike, bytes]) -> None:
    """Write several files as a set: every one to a temporary file first (fsync'd), renamed
    into place only once all are written, so a full disk or Ctrl-C while writing leaves none
    of them new (an earlier set untouched), never some. Modes as :func:`atomic_write_bytes`."""
    staged: list[tuple[str, Path]] = []
    try:
        for path, data in files.items():
            staged.append((_write_temporary(Path(path), data), Path(path)))
        for tmp, path in staged:
            os.replace(tmp, path)
    except BaseException:
        for tmp, _ in staged:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        raise


def _write_temporary(path: Path, data: bytes) -> str:
    """``data`` in a fsync'd temporary file beside ``path``, with the mode ``path`` will have."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        mode = 0o666 & ~current_umask()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)  # mkstemp's 0600, as open() would have made it
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return tmp


def plain_modes(root: str | os.PathLike) -> None:
    """Give ``root`` and everything under it the modes a plain ``open()``/``mkdir`` would
    have: for what a library wrote privately (safetensors' ``save_file`` makes its files
    0600), before it is renamed into place."""
    mask = current_umask()
    root = Path(root)
    for path in [root, *root.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)
