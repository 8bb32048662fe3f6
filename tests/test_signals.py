"""seg/core/signals.py: the trainer's signals are remembered, and either kind asks to stop."""

from __future__ import annotations

import signal

import pytest

from seg.core.signals import Signals


@pytest.mark.parametrize(
    ("sig", "preempted", "interrupted"),
    [(signal.SIGTERM, True, False), (signal.SIGUSR1, True, False), (signal.SIGINT, False, True)],
)
def test_a_preemption_or_a_ctrl_c_asks_to_stop(sig: signal.Signals, preempted: bool, interrupted: bool) -> None:
    signals = Signals().install()
    try:
        assert not signals.stop_requested
        signal.raise_signal(sig)
        assert (signals.preempted, signals.interrupted, signals.stop_requested) == (preempted, interrupted, True)
    finally:
        signals.restore()
