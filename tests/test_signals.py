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


def test_one_process_agrees_on_its_signals_without_its_device() -> None:
    """seg/training/preempt.py: with nothing to agree with, the flags stay on the host (on a GPU,
    reading them back every step would wait for the step before). A meta device holds no
    values: a flag that went there could not be read back."""
    from types import SimpleNamespace

    import torch

    from seg.training.preempt import agreed_signal
    from seg.training.records import EXIT_INTERRUPTED

    run = SimpleNamespace(device=torch.device("meta"), world=1, failure=None)
    signals = Signals()
    assert agreed_signal(run, signals, 2.0) == (0, 2.0)  # type: ignore[arg-type]
    signals.interrupted = True
    assert agreed_signal(run, signals) == (EXIT_INTERRUPTED, 0.0)  # type: ignore[arg-type]
