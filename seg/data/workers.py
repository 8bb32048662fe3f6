"""The loader's worker processes: how many a run gets (``data.workers``, ``auto`` for the
machine, fixed at the run's first start) and how they take the trainer's signals (they
leave them to the trainer, which saves; a dead worker would crash it instead)."""

from __future__ import annotations

import multiprocessing.context
import os
import signal
import threading
from typing import Any

import torch
from accelerate.utils.environment import get_cpu_distributed_information

from seg.core.parallel import die_with_parent

AUTO = "auto"  # data.workers, data.channels_last: for the machine (resolve_workers, seg.recipe.config.resolve_auto)


def loader_options(workers: int, pin_memory: bool) -> dict[str, Any]:
    # The streams seed themselves; a private generator keeps the DataLoader from drawing its
    # base seed from the global RNG, whose state a resumed run must find where it was.
    generator = torch.Generator().manual_seed(0)
    options: dict[str, Any] = {"num_workers": workers, "pin_memory": pin_memory, "generator": generator}
    if workers > 0:
        options |= {"persistent_workers": True, "prefetch_factor": 4, "multiprocessing_context": WorkerContext()}
        options["worker_init_fn"] = ignore_signals
    return options


def available_cores() -> int:
    """The cores this process may use: its CPU affinity (taskset, a cgroup's cpuset), capped by
    Slurm's allocation (SLURM_CPUS_PER_TASK), which a job without CPU binding does not enforce."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity on this platform (macOS)
        cores = os.cpu_count() or 1
    slurm = os.environ.get("SLURM_CPUS_PER_TASK", "")
    return min(cores, int(slurm)) if slurm.isdigit() and int(slurm) > 0 else cores


def auto_workers() -> int:
    """``data.workers: auto`` on this machine: the cores this process may use, shared among the
    run's processes on this machine (accelerate's local world size), at least one."""
    return max(available_cores() // max(get_cpu_distributed_information().local_world_size, 1), 1)


def resolve_workers(value: int | str, recorded: int | None = None) -> int:
    """The loader workers of a run: an explicit count as it is; ``auto`` the count ``recorded``
    by the run's first start (the number of workers shapes the training stream: each worker
    draws its own share of an epoch), else this machine's (``auto_workers``)."""
    if value != AUTO:
        return int(value)
    return recorded if recorded is not None else auto_workers()


def workers_problem(counts: list[int]) -> str | None:
    """Why processes whose loaders have these worker counts (one per rank) cannot train one
    run, or None: each count sets a rank's steps per epoch and its stream, so all must agree."""
    if len(set(counts)) <= 1:
        return None
    return (
        f"data.workers resolved to {', '.join(map(str, counts))} on the run's processes (ranks 0 to "
        f"{len(counts) - 1}): machines with different cores; set data.workers to a number"
    )


TRAINER_SIGNALS = {signal.SIGTERM, signal.SIGUSR1, signal.SIGINT}


class WorkerProcess(multiprocessing.context.ForkProcess):
    """A loader worker forked with the trainer's signals blocked. Between the fork and
    ``ignore_signals`` the worker runs torch's handlers (TERM kills it) and Python's (INT
    raises): a Slurm preemption's TERM to every process, landing just as an evaluation
    starts its workers, killed one and crashed the trainer. Blocked, a signal waits for
    ``ignore_signals`` to deal with it; the trainer's own mask is back right after the fork."""

    def start(self) -> None:
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, TRAINER_SIGNALS)
        try:
            super().start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class WorkerContext(multiprocessing.context.ForkContext):
    Process = WorkerProcess


def ignore_signals(worker: int) -> None:
    """DataLoader worker init: the trainer's signals are the trainer's. Workers share its
    process group, so a Slurm preemption (TERM to every process), a job script's USR1 and a
    terminal's Ctrl-C reach them too; torch's worker handler would die of TERM and Python's
    would raise KeyboardInterrupt, and the trainer would crash on its dead worker instead of
    saving. USR1 and INT are ignored; TERM is ignored unless the trainer sends it (torch and
    multiprocessing end leftover workers with it, and wait for them)."""
    for sig in (signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)  # discards one that arrived since the fork
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # before the thread: it inherits the mask
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR1, signal.SIGINT})  # blocked by WorkerProcess
    trainer = os.getppid()
    threading.Thread(target=_exit_on_parents_term, args=(trainer,), daemon=True).start()
    # A trainer killed outright (the OOM killer, SIGKILL) left busy workers running, ignoring TERM:
    # torch's own watchdog looks at the parent only between batches.
    die_with_parent(trainer)


def _exit_on_parents_term(parent: int) -> None:
    while True:
        if signal.sigwaitinfo({signal.SIGTERM}).si_pid == parent:
            os._exit(0)
