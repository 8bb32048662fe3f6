"""The trainer's signals, remembered rather than acted on: the training loop asks at each
step, and every rank stops at the same step (seg/train.py).

SIGTERM (a Slurm preemption, ``scancel``) and SIGUSR1 (a job script's warning before the
time limit) ask for a save and a requeue; SIGINT (Ctrl-C) for a save and a stop. Only the
standard library here: seg/train.py installs these before its heavy imports, so a signal
during start-up is not lost.

A tool with nothing to save (a pack, a synthetic tree) takes SIGTERM as a Ctrl-C instead
(``interrupt_once``): the same clean-up, its own exit code (143).
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from types import FrameType
from typing import Any

PREEMPT = (signal.SIGTERM, signal.SIGUSR1)
INTERRUPT = (signal.SIGINT,)


class Signals:
    """Which of the trainer's signals arrived since ``install``."""

    def __init__(self, interrupts: tuple[signal.Signals, ...] = INTERRUPT) -> None:
        self.interrupts = interrupts  # the signals that ask for a stop by hand (the others: a preemption)
        self.preempted = False
        self.interrupted = False
        self._previous: dict[int, Any] = {}

    @property
    def stop_requested(self) -> bool:
        """Whether any of them arrived: a preemption or a Ctrl-C both ask whatever runs to stop
        where it is (a training saves first)."""
        return self.preempted or self.interrupted

    def install(self) -> Signals:
        """Catch the signals (again: idempotent); remembers the handlers it replaces."""
        for sig in (*PREEMPT, *self.interrupts):
            previous = signal.signal(sig, self._catch)
            self._previous.setdefault(sig, previous)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _catch(self, signum: int, frame: FrameType | None) -> None:
        if signum in self.interrupts:
            self.interrupted = True
        else:
            self.preempted = True


class Drill:
    """A signal this process sends itself after a given training step, as a cluster would:
    ``SEG_DRILL=STEP:SIGNAL[:RANK]`` (e.g. ``5:TERM``, ``3:USR1:1``, ``4:KILL``; rank 0 by
    default). It rehearses a job script's requeue path at a known step, and lets the tests
    stop a run at an exact step instead of racing it."""

    def __init__(self, spec: str | None) -> None:
        self.step, self.signal, self.rank = -1, None, 0
        if not spec:
            return
        parts = spec.split(":")
        try:
            self.step = int(parts[0])
            self.signal = signal.Signals[f"SIG{parts[1].upper().removeprefix('SIG')}"]
            self.rank = int(parts[2]) if len(parts) > 2 else 0
        except (IndexError, KeyError, ValueError):
            raise ValueError(f"SEG_DRILL={spec!r}: expected STEP:SIGNAL[:RANK], e.g. 5:TERM or 3:USR1:1") from None

    def after(self, step: int, rank: int) -> None:
        """Called after each training step: signal this process if it is the drill's step and rank."""
        if self.signal is not None and step == self.step and rank == self.rank:
            signal.raise_signal(self.signal)


class Terminated(KeyboardInterrupt):
    """SIGTERM raised where a Ctrl-C raises KeyboardInterrupt (inside ``interrupt_once``), so
    that what cleans up after a Ctrl-C (a partial output, a worker pool) cleans up after a kill."""

    signum = signal.SIGTERM


def interrupt_exit_code(interrupt: KeyboardInterrupt) -> int:
    """The shell's code for the signal that raised ``interrupt``: 130 (Ctrl-C) or 143 (SIGTERM)."""
    return 128 + getattr(interrupt, "signum", signal.SIGINT)


@contextlib.contextmanager
def interrupt_once() -> Iterator[None]:
    """Inside, the first Ctrl-C raises KeyboardInterrupt and the first SIGTERM :class:`Terminated`;
    later ones are ignored, since raised again they would break off the clean-up the first one
    started (a worker pool's shutdown broken off midway waited for its workers forever). A
    signal ignored from the start (``nohup``, a script's ``&``) stays ignored. The handlers
    before are back after."""

    def _raise(signum: int, frame: FrameType | None) -> None:
        for sig in previous:
            signal.signal(sig, signal.SIG_IGN)
        raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()

    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(sig) != signal.SIG_IGN:
            previous[sig] = signal.signal(sig, _raise)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
