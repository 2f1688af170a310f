"""Typed errors raised by the vault keyring.

Messages name files and fingerprints only: never a passphrase, never
plaintext, never key material.
"""

from __future__ import annotations


class KeysError(Exception):
    """Base class for every error the keys package raises."""


class KeysMissing(KeysError):
    """The keys directory holds no vault key; the operator must run `escrow init`."""


class WrongPassphrase(KeysError):
    """The master passphrase does not unlock the active vault key."""


class KeyFileCorrupt(KeysError):
    """A key file is unreadable or invalid, or ACTIVE names no known key."""


class UnknownKey(KeysError):
    """A fingerprint was asked for that this keyring does not hold."""


class DecryptionFailed(KeysError):
    """Ciphertext is not for any vault key, was tampered with, or is malformed."""
