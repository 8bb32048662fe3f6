"""seg/core/signals.py: the trainer's signals are remembered, and either kind asks to stop."""

from __future__ import annotations

import signal

import pytest

from seg.core.signals import Signals, Terminated, interrupt_exit_code, interrupt_once


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


@pytest.mark.parametrize(
    ("sig", "raised", "code"), [(signal.SIGINT, KeyboardInterrupt, 130), (signal.SIGTERM, Terminated, 143)]
)
def test_a_tool_takes_the_first_ctrl_c_or_term_as_an_interrupt_and_ignores_later_ones(sig, raised, code) -> None:
    """pack_cityscapes and make_synthetic: a second signal while the first one's clean-up ran
    broke off the worker pool's shutdown, which then waited for its workers forever."""
    # as in a terminal, whatever this test inherited (an xdist worker ignores SIGINT: kept ignored)
    inherited = {signal.SIGINT: signal.signal(signal.SIGINT, signal.default_int_handler),
                 signal.SIGTERM: signal.signal(signal.SIGTERM, signal.SIG_DFL)}  # fmt: skip
    try:
        before = {s: signal.getsignal(s) for s in inherited}
        with pytest.raises(raised) as caught, interrupt_once():
            try:
                signal.raise_signal(sig)
            finally:  # the clean-up: neither signal breaks it off now
                signal.raise_signal(signal.SIGTERM)
                signal.raise_signal(signal.SIGINT)
        assert type(caught.value) is raised and interrupt_exit_code(caught.value) == code
        assert {s: signal.getsignal(s) for s in before} == before
    finally:
        for s, handler in inherited.items():
            signal.signal(s, handler)


def test_a_signal_ignored_from_the_start_stays_ignored() -> None:
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)  # as nohup leaves SIGHUP, a script's & SIGINT
    try:
        with interrupt_once():
            signal.raise_signal(signal.SIGTERM)
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, previous)
