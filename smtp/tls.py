"""TLS for the SMTP listeners: TLS 1.2 or newer, forward-secret AEAD ciphers only."""

from __future__ import annotations

import ssl
from pathlib import Path

# TLS 1.2 suites (1.3 suites are fixed by OpenSSL and all modern): ECDHE + AEAD.
TLS12_CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
)


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A server context that refuses TLS 1.0/1.1 and weak ciphers."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(TLS12_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    context.load_cert_chain(cert, key)
    return context
