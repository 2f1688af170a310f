"""Argon2id hashing for staff passwords, recipient passphrases and codes.

Parameters are a module constant: RFC 9106's second recommended option
(t=3, m=64 MiB, p=4). Inputs are capped in length before hashing, hashing
and checking run in bounded worker threads, and a successful check reports
when the stored hash should be replaced because the parameters changed.
"""

from __future__ import annotations

from dataclasses import dataclass

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from escrow.cpu import BoundedRunner

# RFC 9106 section 4, second recommended option ("low memory").
ARGON2_TIME_COST = 3
ARGON2_MEMORY_KIB = 64 * 1024
ARGON2_PARALLELISM = 4
# Longer inputs are refused before hashing (a cheap denial of service otherwise).
MAX_SECRET_CHARS = 256


@dataclass(frozen=True)
class Check:
    """Outcome of a check: ``ok``, and a fresh hash to store when ``ok`` and stale."""

    ok: bool
    new_hash: str | None = None


class SecretHasher:
    """Hashes and checks secrets off the event loop, at most ``concurrency`` at once."""

    def __init__(
        self,
        *,
        time_cost: int = ARGON2_TIME_COST,
        memory_kib: int = ARGON2_MEMORY_KIB,
        parallelism: int = ARGON2_PARALLELISM,
        concurrency: int = 2,
    ) -> None:
        self._hasher = PasswordHasher(
            time_cost=time_cost, memory_cost=memory_kib, parallelism=parallelism
        )
        self._runner = BoundedRunner(concurrency)
        # Checked against when no hash is stored, so an unknown account costs the same.
        self._dummy = self._hasher.hash("no account has this secret")

    def hash_sync(self, secret: str) -> str:
        if len(secret) > MAX_SECRET_CHARS:
            raise ValueError(f"secrets are limited to {MAX_SECRET_CHARS} characters")
        return self._hasher.hash(secret)

    def check_sync(self, stored: str | None, secret: str) -> Check:
        if len(secret) > MAX_SECRET_CHARS:
            return Check(ok=False)
        try:
            self._hasher.verify(stored or self._dummy, secret)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return Check(ok=False)
        if not stored:  # None or "": only the dummy was checked
            return Check(ok=False)
        if self._hasher.check_needs_rehash(stored):
            return Check(ok=True, new_hash=self._hasher.hash(secret))
        return Check(ok=True)

    async def hash(self, secret: str) -> str:
        """An Argon2id hash of ``secret``; raises ValueError past the length cap."""
        return await self._runner.run(self.hash_sync, secret)

    async def check(self, stored: str | None, secret: str) -> Check:
        """Whether ``secret`` matches ``stored`` (None: never matches, same cost)."""
        return await self._runner.run(self.check_sync, stored, secret)
