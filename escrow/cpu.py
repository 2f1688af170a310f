"""Bounded worker threads for CPU-heavy work (PGPy, Argon2).

The event loop hands such work to a thread and awaits it, so it is never
blocked for more than the hand-off. A semaphore bounds how many run at once:
Argon2 takes 64 MiB a check, and PGPy holds a whole message in memory.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import ParamSpec, TypeVar

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")


# Niceness of background threads: under contention the Linux scheduler gives a nice-10
# thread about a tenth of the CPU share of a nice-0 one (the event loop).
BACKGROUND_NICE = 10


def _lower_thread_priority() -> None:
    """Make the calling thread (and threads it starts) yield the CPU to the event loop.

    Linux keeps a niceness per thread and new threads inherit it, so this also
    covers the threads libargon2 starts for its lanes. Elsewhere it does nothing.
    """
    if sys.platform != "linux":
        return
    try:
        thread = threading.get_native_id()
        niceness = os.getpriority(os.PRIO_PROCESS, thread) + BACKGROUND_NICE
        os.setpriority(os.PRIO_PROCESS, thread, min(19, niceness))
    except OSError as exc:  # a container may forbid it: run at normal priority
        log.debug("cannot lower worker thread priority (%s)", exc.strerror)


def background_threads(count: int, name: str) -> ThreadPoolExecutor:
    """Threads for work that may wait (password hashing), at low scheduling priority.

    Argon2 keeps every core busy for tens of milliseconds a check; at normal
    priority a burst of sign-ins would slow every page and SMTP reply with it.
    """
    return ThreadPoolExecutor(count, thread_name_prefix=name, initializer=_lower_thread_priority)


class BoundedRunner:
    """Runs callables in threads, at most ``limit`` at a time.

    In the loop's default executor, or in ``executor`` when one is given.
    """

    def __init__(self, limit: int, executor: Executor | None = None) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self.limit = limit
        self._executor = executor
        self._semaphore: asyncio.Semaphore | None = None

    async def run(self, func: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Await ``func(*args, **kwargs)`` run in a worker thread, queueing beyond the limit."""
        if self._semaphore is None:
            self._semaphore = asyncio.Semaphore(self.limit)
        async with self._semaphore:
            if self._executor is None:
                return await asyncio.to_thread(func, *args, **kwargs)
            call = functools.partial(func, *args, **kwargs)
            return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    def close(self) -> None:
        """Let the executor's threads end once idle (a default executor is the loop's)."""
        if self._executor is not None:
            self._executor.shutdown(wait=False)
