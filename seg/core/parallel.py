"""Run a function over items in worker processes, with a shutdown that cannot deadlock.

``multiprocessing.Pool.terminate()`` (also what ``with Pool(...)`` does on exit) kills the
workers with SIGTERM; a worker killed while it holds the result queue's lock leaves the
pool's task handler blocked in ``SimpleQueue.put`` and ``terminate()`` waiting for it
forever. Seen once in a few hundred error exits on a loaded machine.

``unordered`` never kills a worker. On an error, Ctrl-C or an early exit it cancels the
tasks not yet started, sets a stop event that long tasks poll between steps (``check_stop``),
and waits for the running ones, which then end within one step. It keeps at most
``2 * workers`` tasks submitted at a time, so the executor's queues never fill up. A parent
killed outright (SIGKILL) takes its workers with it (Linux), instead of leaving them running.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import multiprocessing
import os
import signal
import sys
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from typing import Any, TypeVar

T = TypeVar("T")

_stop: Any = None  # in a worker of ``unordered``: the pool's stop event


class StoppedError(Exception):
    """Raised in a worker by ``check_stop`` when the parent has given up on the pool."""


def stopping() -> bool:
    """True in a worker whose parent is shutting the pool down (error, Ctrl-C)."""
    return _stop is not None and _stop.is_set()


def check_stop() -> None:
    """In a long task, between steps: end the task at once if the parent is shutting down."""
    if stopping():
        raise StoppedError("the parent is shutting the worker pool down")


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(parent: int) -> None:
    """Have the kernel SIGKILL this worker when its parent dies (Linux; elsewhere nothing). A
    parent killed before it could stop its workers (SIGKILL, OOM) otherwise leaves them
    running, re-parented to init. prctl(PR_SET_PDEATHSIG) has no binding in the standard
    library, hence ctypes. It fires when the parent's forking thread ends: the fork context
    starts every worker at the first submit, from the thread that iterates (the main one), as
    a DataLoader starts its workers (seg.data.workers) from the thread that iterates it."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent:  # it died before the prctl: nobody is left to take the results
        os._exit(1)


def _worker_init(stop: Any, parent: int) -> None:
    global _stop
    _stop = stop
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and cleans up
    # Not the parent's handler (seg.core.signals.interrupt_once would raise here, with a
    # traceback): a TERM ends a worker, as the executor's terminate() of a broken pool expects.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    die_with_parent(parent)


def _results(
    executor: ProcessPoolExecutor, fn: Callable[..., T], items: Iterator, limit: int, submitted: set[Future]
) -> Iterator[T]:
    def fill() -> None:
        for item in itertools.islice(items, limit - len(submitted)):
            submitted.add(executor.submit(fn, item))

    fill()
    while submitted:
        done, _ = wait(submitted, return_when=FIRST_COMPLETED)
        for future in done:
            submitted.discard(future)
            yield future.result()  # a worker's exception is raised here, in the parent
        fill()


@contextlib.contextmanager
def unordered(fn: Callable[..., T], items: Iterable, workers: int) -> Iterator[Iterator[T]]:
    """Yield an iterator over ``fn(item)`` for every item, in completion order.

    ``workers <= 1`` runs in this process. Otherwise ``fn`` runs in ``workers`` forked
    processes that ignore SIGINT and die with this one; leaving the ``with`` block (normally, by an exception or
    by Ctrl-C) stops the workers cleanly and returns only when they are all gone.
    """
    if workers <= 1:
        yield map(fn, items)
        return
    context = multiprocessing.get_context("fork")
    stop = context.Event()
    submitted: set[Future] = set()
    executor = ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_init, initargs=(stop, os.getpid()))
    try:
        yield _results(executor, fn, iter(items), 2 * workers, submitted)
    finally:
        stop.set()
        for future in list(submitted):
            future.cancel()
        executor.shutdown(wait=True, cancel_futures=True)
