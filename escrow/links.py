"""Link tokens: the secret in each notification's URL.

A token is HMAC-SHA256 of the delivery id under a key derived from the
master passphrase, so it is never stored: the database keeps only its
SHA-256 (to find the delivery), and the worker recomputes the token when it
sends the notification. A stolen database (even with the keys directory)
yields no usable link without the master passphrase.
"""

from __future__ import annotations

import base64
import hashlib
import hmac

_CONTEXT = b"escrow link token v1"


class LinkTokens:
    """Makes and hashes link tokens. Holds the derived key only in memory."""

    __slots__ = ("_key",)

    def __init__(self, master_passphrase: str) -> None:
        self._key = hmac.new(master_passphrase.encode("utf-8"), _CONTEXT, hashlib.sha256).digest()

    def __repr__(self) -> str:
        return "LinkTokens(...)"

    def token_for(self, delivery_id: str) -> str:
        """The 32-byte token for ``delivery_id``, URL-safe base64 without padding."""
        mac = hmac.new(self._key, delivery_id.encode("ascii"), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac).rstrip(b"=").decode("ascii")


def token_hash(token: str) -> str:
    """What the database stores to find a delivery by its token."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()
