"""Argon2id hashing for staff passwords, recipient passphrases and codes.

Parameters are a module constant: RFC 9106's second recommended option
(t=3, m=64 MiB, p=4). Inputs are capped in length before hashing, and a
successful check reports when the stored hash should be replaced because the
parameters changed.

Promise: hashing never starves the rest of the server. Each hash computes its
four lanes on one thread (the result is the same as with four threads; on two
cores it takes about 150 ms instead of 100 ms), and at most one hash runs per
CPU beyond the first. So a burst of sign-ins queues behind itself while the
event loop keeps a CPU for pages and mail: measured in ``bench/reading.py``.
Hashes in flight also bound memory, 64 MiB each.
"""

from __future__ import annotations

import base64
import hmac
import os
from dataclasses import dataclass

from argon2 import Parameters, Type, extract_parameters, low_level
from argon2.exceptions import InvalidHashError
from argon2.low_level import ARGON2_VERSION, core, error_to_str, ffi

from escrow.cpu import BoundedRunner

# RFC 9106 section 4, second recommended option ("low memory").
ARGON2_TIME_COST = 3
ARGON2_MEMORY_KIB = 64 * 1024
ARGON2_PARALLELISM = 4
SALT_BYTES = 16
HASH_BYTES = 32
# The CFFI library under argon2-cffi's low-level API, for its constants.
lib = low_level.lib  # type: ignore[attr-defined]
# Longer inputs are refused before hashing (a cheap denial of service otherwise).
MAX_SECRET_CHARS = 256


def default_concurrency() -> int:
    """Hashes at once: one per CPU, less one kept for the event loop (at least one)."""
    return max(1, (os.cpu_count() or 1) - 1)


@dataclass(frozen=True)
class Check:
    """Outcome of a check: ``ok``, and a fresh hash to store when ``ok`` and stale."""

    ok: bool
    new_hash: str | None = None


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


def _raw(secret: bytes, salt: bytes, params: Parameters) -> bytes:
    """Argon2 of ``secret`` with every lane computed on the calling thread (GIL released)."""
    out = ffi.new("uint8_t[]", params.hash_len)
    password = ffi.new("uint8_t[]", secret)
    salt_buffer = ffi.new("uint8_t[]", salt)
    context = ffi.new(
        "argon2_context *",
        {
            "out": out,
            "outlen": params.hash_len,
            "pwd": password,
            "pwdlen": len(secret),
            "salt": salt_buffer,
            "saltlen": len(salt),
            "secret": ffi.NULL,
            "secretlen": 0,
            "ad": ffi.NULL,
            "adlen": 0,
            "t_cost": params.time_cost,
            "m_cost": params.memory_cost,
            "lanes": params.parallelism,
            "threads": 1,
            "version": params.version,
            "allocate_cbk": ffi.NULL,
            "free_cbk": ffi.NULL,
            "flags": lib.ARGON2_DEFAULT_FLAGS,
        },
    )
    status = core(context, params.type.value)
    if status != lib.ARGON2_OK:
        raise ValueError(f"argon2 failed: {error_to_str(status)}")
    return bytes(ffi.buffer(out, params.hash_len))


class SecretHasher:
    """Hashes and checks secrets off the event loop, at most ``concurrency`` at once.

    Hashes are standard PHC strings (``$argon2id$v=19$m=…,t=…,p=…$salt$hash``),
    interchangeable with argon2-cffi's ``PasswordHasher``.
    """

    def __init__(
        self,
        *,
        time_cost: int = ARGON2_TIME_COST,
        memory_kib: int = ARGON2_MEMORY_KIB,
        parallelism: int = ARGON2_PARALLELISM,
        concurrency: int = 0,
    ) -> None:
        self._params = Parameters(
            type=Type.ID,
            version=ARGON2_VERSION,
            salt_len=SALT_BYTES,
            hash_len=HASH_BYTES,
            time_cost=time_cost,
            memory_cost=memory_kib,
            parallelism=parallelism,
        )
        self._runner = BoundedRunner(concurrency or default_concurrency())
        # Checked against when no hash is stored, so an unknown account costs the same.
        self._dummy = self.hash_sync("no account has this secret")

    def hash_sync(self, secret: str) -> str:
        if len(secret) > MAX_SECRET_CHARS:
            raise ValueError(f"secrets are limited to {MAX_SECRET_CHARS} characters")
        p = self._params
        salt = os.urandom(p.salt_len)
        digest = _raw(secret.encode("utf-8"), salt, p)
        return (
            f"$argon2id$v={p.version}$m={p.memory_cost},t={p.time_cost},p={p.parallelism}"
            f"${_b64(salt)}${_b64(digest)}"
        )

    def _matches(self, stored: str, secret: str) -> Parameters | None:
        """The stored hash's parameters if ``secret`` matches it, else None."""
        try:
            params = extract_parameters(stored)
            salt_text, digest_text = stored.rsplit("$", 2)[1:]
            salt, digest = _unb64(salt_text), _unb64(digest_text)
        except (InvalidHashError, ValueError):
            return None
        if params.type is not Type.ID or params.version != ARGON2_VERSION:
            return None
        if len(digest) != params.hash_len or params.memory_cost > 1024 * 1024:
            return None  # damaged, or a cost no hash of ours has (1 GiB)
        try:
            computed = _raw(secret.encode("utf-8"), salt, params)
        except ValueError:
            return None
        return params if hmac.compare_digest(computed, digest) else None

    def check_sync(self, stored: str | None, secret: str) -> Check:
        if len(secret) > MAX_SECRET_CHARS:
            return Check(ok=False)
        matched = self._matches(stored or self._dummy, secret)
        if matched is None or not stored:  # None or "": only the dummy was checked
            return Check(ok=False)
        if matched != self._params:  # made with other parameters (what PasswordHasher compares)
            return Check(ok=True, new_hash=self.hash_sync(secret))
        return Check(ok=True)

    async def hash(self, secret: str) -> str:
        """An Argon2id hash of ``secret``; raises ValueError past the length cap."""
        return await self._runner.run(self.hash_sync, secret)

    async def check(self, stored: str | None, secret: str) -> Check:
        """Whether ``secret`` matches ``stored`` (None: never matches, same cost)."""
        return await self._runner.run(self.check_sync, stored, secret)
