"""Bounded worker threads for CPU-heavy work (PGPy, Argon2).

The event loop hands such work to a thread and awaits it, so it is never
blocked for more than the hand-off. A semaphore bounds how many run at once:
Argon2 takes 64 MiB a check, and PGPy holds a whole message in memory.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")


class BoundedRunner:
    """Runs callables in threads, at most ``limit`` at a time."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self.limit = limit
        self._semaphore: asyncio.Semaphore | None = None

    async def run(self, func: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Await ``func(*args, **kwargs)`` run in a worker thread, queueing beyond the limit."""
        if self._semaphore is None:
            self._semaphore = asyncio.Semaphore(self.limit)
        async with self._semaphore:
            return await asyncio.to_thread(func, *args, **kwargs)
