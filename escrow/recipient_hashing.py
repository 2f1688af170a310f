"""Argon2id for recipients, on low-priority threads of their own.

Promise: a burst of client sign-ins queues behind itself and yields the CPU
to everything else (reading pages, mail intake) instead of competing with
the event loop: sign-ins get slower under load, reading less so. The pool
also bounds memory (64 MiB per check in flight). Niceness is per thread on
Linux, and Argon2's own lane threads inherit it; elsewhere it is skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor

from escrow.passwords import Check, SecretHasher

ARGON2_THREADS = 2
ARGON2_NICE = 10


def _lower_priority() -> None:
    # Linux nice values are per thread, and Argon2's own lane threads inherit this one's.
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), ARGON2_NICE)


class RecipientHashing:
    """Hashes and checks recipient secrets on :data:`ARGON2_THREADS` threads at :data:`ARGON2_NICE`."""

    def __init__(self, hasher: SecretHasher, threads: int = 0) -> None:
        self._hasher = hasher
        self._pool = ThreadPoolExecutor(
            max_workers=threads or ARGON2_THREADS,
            thread_name_prefix="recipient-argon2",
            initializer=_lower_priority,
        )

    async def hash(self, secret: str) -> str:
        return await asyncio.get_running_loop().run_in_executor(
            self._pool, self._hasher.hash_sync, secret
        )

    async def check(self, stored: str | None, secret: str) -> Check:
        return await asyncio.get_running_loop().run_in_executor(
            self._pool, self._hasher.check_sync, stored, secret
        )
