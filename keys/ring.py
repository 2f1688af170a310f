"""The vault keyring: every vault key, unlocked once, behind an intent-named API."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import TracebackType

from keys import openpgp, store
from keys.errors import (
    DecryptionFailed,
    KeyFileCorrupt,
    KeysError,
    KeysMissing,
    UnknownKey,
    WrongPassphrase,
)
from keys.openpgp import VaultKey

log = logging.getLogger(__name__)

DEFAULT_USER_ID = "Escrow vault <vault@escrow.invalid>"
# How often sealing looks for a key another process made (`escrow keys rotate`).
REFRESH_SECONDS = 30.0


@dataclass(frozen=True)
class KeyInfo:
    """What can be said about a vault key without its passphrase."""

    fingerprint: str  # 40 upper-case hex digits
    created: datetime  # timezone-aware, UTC
    algorithm: str  # primary/encryption subkey, e.g. "ed25519/cv25519"
    active: bool  # new items are sealed to this key


@dataclass(frozen=True)
class _State:
    keys: tuple[VaultKey, ...]  # newest first
    active: VaultKey


class VaultKeyring:
    """All vault keys of one keys directory, unlocked in memory until `close()`.

    Build it with `VaultKeyring.open(...)`. `encrypt` and `decrypt` may be
    called from many threads at once and take no lock: they read an immutable
    snapshot of the keys, and neither mutates the PGPy key objects. `rotate`,
    `refresh` and `close` replace that snapshot under a lock, so they are
    serialised with each other but never block encryption or decryption.

    Keys made by another process (``escrow keys rotate`` while servers run,
    or a replica that restarted first) are picked up without a restart:
    `decrypt` looks for new key files before it gives up on a message, and
    `encrypt` checks for a new ACTIVE key every :data:`REFRESH_SECONDS`.
    """

    def __init__(
        self,
        keys_dir: Path,
        passphrase: str,
        state: _State,
        stack: contextlib.ExitStack[bool | None],
    ) -> None:
        """Internal: use `VaultKeyring.open`."""
        self._keys_dir = keys_dir
        self._passphrase = passphrase  # kept to protect keys made by rotate()
        self._state: _State | None = state
        self._stack = stack
        self._lock = threading.Lock()
        self.refresh_seconds = REFRESH_SECONDS
        self._checked = time.monotonic()
        # Key files that did not load, by fingerprint: (mtime_ns, size) when tried.
        self._unusable: dict[str, tuple[int, int]] = {}

    @staticmethod
    def initialise(
        keys_dir: Path, passphrase: str, *, user_id: str = DEFAULT_USER_ID
    ) -> str | None:
        """Create the first vault key if `keys_dir` holds none; safe to repeat.

        Creates `keys_dir` (mode 0700) if needed, writes the protected key file
        and then ACTIVE, each durably (mode 0600). Returns the new fingerprint,
        or None if a key already existed; in that case only an ACTIVE file
        missing after an interrupted first run is written, and no passphrase
        is checked. Raises ValueError for an empty passphrase.
        """
        if not passphrase:
            raise ValueError("the master passphrase must not be empty")
        store.ensure_dir(keys_dir)
        existing = store.list_fingerprints(keys_dir)
        if existing:
            if len(existing) == 1 and store.read_active(keys_dir) is None:
                store.write_active(keys_dir, existing[0])
            return None
        fingerprint, armored = openpgp.generate(passphrase, user_id)
        store.write_key(keys_dir, fingerprint, armored)
        store.write_active(keys_dir, fingerprint)
        return fingerprint

    @staticmethod
    def describe(keys_dir: Path) -> list[KeyInfo]:
        """List the vault keys from their public parts, newest first; needs no passphrase.

        Raises KeysMissing if there is no key, KeyFileCorrupt if a key file or
        ACTIVE is invalid.
        """
        keys, active = _load(keys_dir)
        return _infos(_newest_first(keys, active), active)

    @classmethod
    def open(cls, keys_dir: Path, passphrase: str) -> VaultKeyring:
        """Load every vault key and unlock each once; the material stays in memory until close().

        Raises KeysMissing if there is no key, WrongPassphrase if the
        passphrase does not unlock the active key, KeyFileCorrupt if a key file
        or ACTIVE is invalid or an older key does not unlock with the
        passphrase that unlocks the active key.
        """
        keys, active = _load(keys_dir)
        stack = contextlib.ExitStack()
        try:
            # The active key first: a wrong passphrase costs one S2K, not one per key.
            active.unlock(passphrase, stack)
            for key in keys:
                if key is active:
                    continue
                try:
                    key.unlock(passphrase, stack)
                except WrongPassphrase:
                    raise KeyFileCorrupt(
                        f"key {key.fingerprint} does not unlock with the passphrase"
                        " that unlocks the active key"
                    ) from None
        except BaseException:
            stack.close()
            raise
        return cls(keys_dir, passphrase, _State(_newest_first(keys, active), active), stack)

    @property
    def active_fingerprint(self) -> str:
        """The fingerprint new items are sealed to. Raises KeysError once closed."""
        return self._current().active.fingerprint

    def list(self) -> list[KeyInfo]:
        """The keys this keyring holds, newest first. Raises KeysError once closed."""
        state = self._current()
        return _infos(state.keys, state.active)

    def rotate(self) -> str:
        """Make a new key, protected by the same passphrase, and make it ACTIVE.

        The key file is written durably before ACTIVE names it; older keys stay
        on disk and in memory for decryption. Returns the new fingerprint.
        Raises KeysError once closed.
        """
        with self._lock:
            state = self._current()
            user_id = state.active.user_id or DEFAULT_USER_ID
            fingerprint, armored = openpgp.generate(self._passphrase, user_id)
            key = VaultKey(armored, fingerprint)
            key.unlock(self._passphrase, self._stack)
            store.write_key(self._keys_dir, fingerprint, armored)
            store.write_active(self._keys_dir, fingerprint)
            self._state = _State(_newest_first([key, *state.keys], key), key)
            return fingerprint

    def export_public(self, fingerprint: str | None = None) -> str:
        """The armored public key of `fingerprint` (the active key by default).

        Raises UnknownKey if this keyring holds no such key, KeysError once closed.
        """
        state = self._current()
        if fingerprint is None:
            return state.active.export_public()
        wanted = fingerprint.replace(" ", "").upper()
        for key in state.keys:
            if key.fingerprint == wanted:
                return key.export_public()
        raise UnknownKey(f"no vault key {wanted}")

    def refresh_due(self) -> bool:
        """Whether the next :meth:`encrypt` will first look for new key files (disk reads)."""
        return time.monotonic() - self._checked >= self.refresh_seconds

    def encrypt(self, data: bytes, *, refresh: bool = True) -> tuple[bytes, str]:
        """Seal `data` to the active key.

        Returns (ciphertext, fingerprint of the primary key used). The
        ciphertext is a binary OpenPGP message: AES-256 with MDC, uncompressed,
        literal data in format 'b', decryptable by GnuPG with the key file.
        Raises KeysError if the keyring is closed or encryption fails.
        """
        if refresh and self.refresh_due():
            self._try_refresh(wait=False)
        active = self._current().active
        return active.encrypt(data), active.fingerprint

    def decrypt(self, ciphertext: bytes) -> bytes:
        """Open a message sealed to any key of this keyring, old or active.

        Returns the bytes exactly as sealed. Raises DecryptionFailed if the
        message is for none of our keys, tampered with, truncated or not
        OpenPGP at all; it never returns altered plaintext. Raises KeysError if
        the keyring is closed.
        """
        keys = self._current().keys
        try:
            return openpgp.decrypt(ciphertext, keys)
        except DecryptionFailed:
            # Perhaps sealed by another process to a key made since we loaded ours
            # (this thread's refresh, or another's since the snapshot, may find it).
            self._try_refresh(wait=True)
            if self._current().keys is keys:
                raise
        return openpgp.decrypt(ciphertext, self._current().keys)

    def refresh(self, *, wait: bool = True) -> bool:
        """Load key files another process added, and follow ACTIVE; True if anything changed.

        Keys already held are never dropped (older items need them). A new
        key file must unlock with this keyring's passphrase, else it is left
        out (KeyFileCorrupt is raised only by `open`), logged once, and not
        tried again until the file changes. With ``wait=False``
        this returns False at once if another thread is refreshing. Raises
        KeysError once closed.
        """
        if not self._lock.acquire(blocking=wait):
            return False
        try:
            self._checked = time.monotonic()
            state = self._current()
            held = {key.fingerprint: key for key in state.keys}
            added = []
            for fingerprint in store.list_fingerprints(self._keys_dir):
                if fingerprint in held:
                    continue
                path = store.key_path(self._keys_dir, fingerprint)
                try:
                    stat = path.stat()
                except OSError:
                    continue
                version = (stat.st_mtime_ns, stat.st_size)
                if self._unusable.get(fingerprint) == version:
                    continue
                try:
                    key = VaultKey(store.read_key_text(self._keys_dir, fingerprint), fingerprint)
                    key.unlock(self._passphrase, self._stack)
                except (KeysError, OSError) as exc:
                    if fingerprint not in self._unusable:
                        log.warning(
                            "vault key file %s left out (%s); `escrow keys list` checks it",
                            path.name,
                            type(exc).__name__,
                        )
                    self._unusable[fingerprint] = version
                    continue
                held[fingerprint] = key
                added.append(key)
            named = store.read_active(self._keys_dir)
            active = held.get(named, state.active) if named is not None else state.active
            if not added and active is state.active:
                return False
            self._state = _State(_newest_first(list(held.values()), active), active)
            return True
        finally:
            self._lock.release()

    def _try_refresh(self, *, wait: bool) -> bool:
        """`refresh`, where a keys directory that cannot be read now only means "no change"."""
        try:
            return self.refresh(wait=wait)
        except KeysError:
            return False

    def close(self) -> None:
        """Clear the unlocked key material and forget the passphrase; safe to repeat.

        Call it only when no encrypt or decrypt is in flight.
        """
        with self._lock:
            self._state = None
            self._passphrase = ""
            self._stack.close()

    def __enter__(self) -> VaultKeyring:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = self._state
        if state is None:
            return "<VaultKeyring closed>"
        return f"<VaultKeyring active={state.active.fingerprint} keys={len(state.keys)}>"

    def _current(self) -> _State:
        state = self._state
        if state is None:
            raise KeysError("the vault keyring is closed")
        return state


def _load(keys_dir: Path) -> tuple[list[VaultKey], VaultKey]:
    """Parse every key file and find the active key."""
    fingerprints = store.list_fingerprints(keys_dir)
    if not fingerprints:
        raise KeysMissing(f"no vault key in {keys_dir}; run `escrow init` to create one")
    keys = [VaultKey(store.read_key_text(keys_dir, f), f) for f in fingerprints]
    active_fingerprint = store.read_active(keys_dir)
    if active_fingerprint is None:
        raise KeyFileCorrupt(f"{keys_dir / store.ACTIVE_NAME} is missing")
    active = next((k for k in keys if k.fingerprint == active_fingerprint), None)
    if active is None:
        raise KeyFileCorrupt(f"ACTIVE names {active_fingerprint}, which has no key file")
    return keys, active


def _newest_first(keys: list[VaultKey], active: VaultKey) -> tuple[VaultKey, ...]:
    # Creation times have one-second resolution; keys made in the same second
    # put the active one first, then order by fingerprint.
    return tuple(sorted(keys, key=lambda k: (k.created, k is active, k.fingerprint), reverse=True))


def _infos(keys: tuple[VaultKey, ...], active: VaultKey) -> list[KeyInfo]:
    return [
        KeyInfo(
            fingerprint=k.fingerprint, created=k.created, algorithm=k.algorithm, active=k is active
        )
        for k in keys
    ]
