"""Vault keys: the only package that speaks OpenPGP (through PGPy).

`VaultKeyring` creates, unlocks and rotates the vault keys kept in the keys
directory, and seals and opens bytes with them.
"""

from __future__ import annotations

from keys.errors import (
    DecryptionFailed,
    KeyFileCorrupt,
    KeysError,
    KeysMissing,
    UnknownKey,
    WrongPassphrase,
)
from keys.ring import DEFAULT_USER_ID, KeyInfo, VaultKeyring

__all__ = [
    "DEFAULT_USER_ID",
    "DecryptionFailed",
    "KeyFileCorrupt",
    "KeyInfo",
    "KeysError",
    "KeysMissing",
    "UnknownKey",
    "VaultKeyring",
    "WrongPassphrase",
]
