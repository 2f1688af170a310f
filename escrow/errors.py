"""Typed errors of the escrow domain. Messages never carry secrets or health information."""

from __future__ import annotations


class EscrowError(Exception):
    """Base of every error the domain raises on purpose."""


class SettingsError(EscrowError):
    """A setting is missing or wrong; the message names it and how to fix it."""


class StorageError(EscrowError):
    """The database or disk could not store something; the caller should retry later."""


class VaultError(EscrowError):
    """A vault item could not be sealed or opened."""


class VaultIntegrityError(VaultError):
    """A vault item's ciphertext does not match its recorded SHA-256, or does not decrypt."""


class NotFound(EscrowError):
    """The thing asked for does not exist (or the asker may not know it does)."""


class StaffError(EscrowError):
    """A staff account operation was refused (duplicate address, unknown account)."""


class LifecycleError(EscrowError):
    """A revocation or legal hold was refused: unknown message or not allowed (one error for both)."""


class AuditChainBroken(EscrowError):
    """The audit hash chain does not verify; ``seq`` is the first bad event."""

    def __init__(self, seq: int, reason: str) -> None:
        super().__init__(f"audit event {seq}: {reason}")
        self.seq = seq
        self.reason = reason
