"""The trainer's signals, remembered rather than acted on: the training loop asks at each
step, and every rank stops at the same step (seg/train.py).

SIGTERM (a Slurm preemption, ``scancel``) and SIGUSR1 (a job script's warning before the
time limit) ask for a save and a requeue; SIGINT (Ctrl-C) for a save and a stop. Only the
standard library here: seg/train.py installs these before its heavy imports, so a signal
during start-up is not lost.
"""

from __future__ import annotations

import signal
from types import FrameType
from typing import Any

PREEMPT = (signal.SIGTERM, signal.SIGUSR1)
INTERRUPT = (signal.SIGINT,)


class Signals:
    """Which of the trainer's signals arrived since ``install``."""

    def __init__(self) -> None:
        self.preempted = False
        self.interrupted = False
        self._previous: dict[int, Any] = {}

    def install(self) -> Signals:
        """Catch the signals (again: idempotent); remembers the handlers it replaces."""
        for sig in (*PREEMPT, *INTERRUPT):
            previous = signal.signal(sig, self._catch)
            self._previous.setdefault(sig, previous)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _catch(self, signum: int, frame: FrameType | None) -> None:
        if signum in INTERRUPT:
            self.interrupted = True
        else:
            self.preempted = True
