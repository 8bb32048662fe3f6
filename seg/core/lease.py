"""One writer per run folder: a lease file, created atomically and kept alive by a heartbeat.

A fold's training, a stage's reduction and a local chain's stage each hold one while they
write. ``flock`` is not to be trusted across the nodes of a shared filesystem (NFS, Lustre),
so the lease is a file made by ``link(2)`` from a complete temporary file, which fails when
the name exists, on those filesystems too. It records who holds it (host, pid and the pid's
start time, Slurm job and restart count, since when); the holder touches it every
``HEARTBEAT_S`` seconds. A lease whose holder is gone is taken over, with a line saying so:

- on the same host, at once when the pid is dead (or is another process now);
- the same Slurm job on a later restart (a requeue) reclaims its own lease at once;
- from another host, when its heartbeat is older than ``STALE_S`` seconds (clocks across
  nodes must agree within that: NTP does).

Anyone else is refused with :class:`LeaseHeldError`, whose message names the holder and the ways on.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil

from seg.core.atomic import current_umask

HEARTBEAT_S = float(os.environ.get("SEG_LEASE_HEARTBEAT_S", 30))
STALE_S = float(os.environ.get("SEG_LEASE_STALE_S", 300))  # ten missed heartbeats


class LeaseHeldError(RuntimeError):
    """Another live writer holds the lease: the message names it and what to do."""


def _me(what: str) -> dict[str, Any]:
    pid = os.getpid()
    return {
        "what": what,
        "host": socket.gethostname(),
        "pid": pid,
        "pid_started": psutil.Process(pid).create_time(),
        "slurm_job": os.environ.get("SLURM_JOB_ID"),
        "slurm_restart": int(os.environ.get("SLURM_RESTART_COUNT", 0)),
        "since": time.time(),
        "token": uuid.uuid4().hex,
    }


def describe_holder(holder: dict[str, Any]) -> str:
    """``training (host n1, pid 4242, Slurm job 77, since 2026-12-07 10:03:12)``"""
    job = f", Slurm job {holder['slurm_job']}" if holder.get("slurm_job") else ""
    since = datetime.fromtimestamp(holder.get("since", 0)).strftime("%Y-%m-%d %H:%M:%S")
    return f"{holder.get('what', '?')} (host {holder.get('host')}, pid {holder.get('pid')}{job}, since {since})"


def gone(holder: dict[str, Any], heartbeat_age: float) -> str | None:
    """Why ``holder`` no longer holds its lease, or None while it may still be writing."""
    me = _me("")
    requeued = me["slurm_restart"] > int(holder.get("slurm_restart", 0))
    if holder.get("slurm_job") and holder["slurm_job"] == me["slurm_job"] and requeued:
        return f"Slurm job {holder['slurm_job']} was requeued (restart {me['slurm_restart']})"
    if holder.get("host") == me["host"]:
        try:
            started = psutil.Process(int(holder["pid"])).create_time()
        except (psutil.NoSuchProcess, KeyError, TypeError, ValueError):
            return f"pid {holder.get('pid')} is not running on this host"
        if abs(started - float(holder.get("pid_started", started))) > 1:
            return f"pid {holder['pid']} is another process now"
        return None
    if heartbeat_age > STALE_S:
        return f"no heartbeat for {heartbeat_age:.0f} s (a holder on another host is gone after {STALE_S:.0f} s)"
    return None


@dataclass
class Lease:
    """A held lease: touched by a heartbeat thread until :meth:`release`."""

    path: Path
    record: dict[str, Any]
    lost: str | None = None  # why it was lost while held (taken over after a long stall), if it was

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"lease {self.path}", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            holder = _read(self.path)
            if holder is None or holder.get("token") != self.record["token"]:
                if holder is not None or not self.path.exists():
                    self.lost = f"{self.path} was taken over" + (f" by {describe_holder(holder)}" if holder else "")
                    return
                continue  # unreadable for a moment (a filesystem hiccup): try again at the next beat
            with contextlib.suppress(OSError):  # a full disk still takes a utime; anything else: next beat
                os.utime(self.path)

    def release(self) -> None:
        """Stop the heartbeat and remove the lease, if it is still ours."""
        self._stop.set()
        self._thread.join(timeout=5)
        holder = _read(self.path)
        if holder is not None and holder.get("token") == self.record["token"]:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read(path: Path) -> dict[str, Any] | None:
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) else None


def _create(path: Path, record: dict[str, Any]) -> bool:
    """Make ``path`` hold ``record`` unless it exists: a complete temporary file linked to the
    name (atomic on NFS as well; a lost reply is told apart by the link count)."""
    tmp = path.with_name(f".{path.name}.{record['token']}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666 & ~current_umask())
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)
        return os.stat(tmp).st_nlink == 2
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _take_over(path: Path, holder: dict[str, Any]) -> bool:
    """Move ``holder``'s stale lease out of the way; False if someone else moved it first. A
    lease that turns out to be newer than the one judged stale is put back."""
    moved = path.with_name(f".{path.name}.stale-{holder.get('token', 'unknown')}-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(path, moved)
    except FileNotFoundError:
        return False
    try:
        if (_read(moved) or {}).get("token") == holder.get("token"):
            return True
        with contextlib.suppress(FileExistsError):
            os.link(moved, path)  # a fresh holder's lease: back in place
        return False
    finally:
        moved.unlink(missing_ok=True)


def _standing(path: Path) -> tuple[dict[str, Any], float] | None:
    """The lease at ``path``: its holder and its heartbeat's age in seconds; None when there is
    none. An unreadable one (a foreign file) is judged by its age alone."""
    holder = _read(path)
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return None
    return holder or {"what": "an unreadable lease", "since": time.time() - age}, age


def clear_if_gone(path: str | os.PathLike) -> str | None:
    """Remove the lease at ``path`` when its holder is gone: the lease a writer leaves when it is
    killed after its last write (its run finished, nothing will take the lease again). Says
    whose it was and why, in one line; None when there is none, or its holder may be alive
    (from another host, until ``STALE_S`` without a heartbeat): that one is left."""
    path = Path(path)
    standing = _standing(path)
    if standing is None:
        return None
    holder, age = standing
    why = gone(holder, age)
    if why is None or not _take_over(path, holder):
        return None
    return f"{path}: removed the lease of {describe_holder(holder)}, left behind: {why}"


def acquire(path: str | os.PathLike, what: str, announce: bool = True) -> Lease:
    """Hold the lease at ``path`` (its folder is made if missing), taking over one whose holder
    is gone (saying so when ``announce``); raises :class:`LeaseHeldError` while a live writer holds it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = _me(what)
    for _ in range(5):
        if _create(path, record):
            return Lease(path, record)
        standing = _standing(path)
        if standing is None:
            continue  # released meanwhile: try again
        holder, age = standing
        why = gone(holder, age)
        if why is None:
            raise LeaseHeldError(
                f"{path.parent} is being written by {describe_holder(holder)}, last heartbeat {age:.0f} s ago: "
                f"wait for it to finish or stop it; a holder that is gone is taken over (on its host at once, from "
                f"another host after {STALE_S:.0f} s without a heartbeat); if you know it is gone, remove {path}"
            )
        if _take_over(path, holder) and announce:
            print(f"{path}: taking over the lease of {describe_holder(holder)}: {why}", flush=True)
    raise LeaseHeldError(f"{path}: could not take the lease (others kept taking it): try again")
