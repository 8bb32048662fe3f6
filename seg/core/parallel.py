"""Run a function over items in worker processes, with a shutdown that cannot deadlock.

``multiprocessing.Pool.terminate()`` (also what ``with Pool(...)`` does on exit) kills the
workers with SIGTERM; a worker killed while it holds the result queue's lock leaves the
pool's task handler blocked in ``SimpleQueue.put`` and ``terminate()`` waiting for it
forever. Seen once in a few hundred error exits on a loaded machine.

``unordered`` never kills a worker. On an error, Ctrl-C or an early exit it cancels the
tasks not yet started, sets a stop event that long tasks poll between steps (``check_stop``),
and waits for the running ones, which then end within one step. It keeps at most
``2 * workers`` tasks submitted at a time, so the executor's queues never fill up.
"""

from __future__ import annotations

import contextlib
import itertools
import multiprocessing
import signal
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


def _worker_init(stop: Any) -> None:
    global _stop
    _stop = stop
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and cleans up
    # Not the parent's handler (seg.core.signals.interrupt_once would raise here, with a
    # traceback): a TERM ends a worker, as the executor's terminate() of a broken pool expects.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


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
    processes that ignore SIGINT; leaving the ``with`` block (normally, by an exception or
    by Ctrl-C) stops the workers cleanly and returns only when they are all gone.
    """
    if workers <= 1:
        yield map(fn, items)
        return
    context = multiprocessing.get_context("fork")
    stop = context.Event()
    submitted: set[Future] = set()
    executor = ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_init, initargs=(stop,))
    try:
        yield _results(executor, fn, iter(items), 2 * workers, submitted)
    finally:
        stop.set()
        for future in list(submitted):
            future.cancel()
        executor.shutdown(wait=True, cancel_futures=True)
