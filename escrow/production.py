"""Start-up checks that refuse development conveniences in production.

Production means PostgreSQL or an https ``ESCROW_PUBLIC_URL``
(:attr:`~escrow.settings.Settings.is_production`). There, a missing master
passphrase is refused by :func:`escrow.services.resolve_master_passphrase`,
and SMTP refuses a self-signed certificate (the generated development one,
or a configured one that signs itself) unless the operator opts in with
``ESCROW_ALLOW_SELF_SIGNED=true``: mail clients would reject it, or their
users would learn to click through the warning.
"""

from __future__ import annotations

import logging
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from escrow.devcert import ensure_dev_certificate
from escrow.errors import SettingsError
from escrow.settings import Settings

log = logging.getLogger(__name__)


def is_self_signed(cert_path: Path) -> bool:
    """True if the first certificate in the PEM file at ``cert_path`` signed itself."""
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except (OSError, ValueError):
        # Unreadable: the TLS set-up reports it with its own error.
        return False
    if cert.issuer != cert.subject:
        return False
    try:
        cert.verify_directly_issued_by(cert)
    except (InvalidSignature, TypeError, ValueError):
        return False
    return True


def check_smtp_certificate(settings: Settings) -> None:
    """Raise :class:`SettingsError` if production SMTP would present a self-signed certificate.

    Development (SQLite and an http public URL) always passes, as does the
    explicit opt-in ``ESCROW_ALLOW_SELF_SIGNED=true``.
    """
    if not settings.is_production or settings.allow_self_signed:
        return
    if settings.tls_cert is None:
        raise SettingsError(
            "SMTP has no certificate: set ESCROW_TLS_CERT and ESCROW_TLS_KEY to the PEM "
            "certificate chain and key for the SMTP host name (or, to use a self-signed "
            "development certificate anyway, set ESCROW_ALLOW_SELF_SIGNED=true)"
        )
    if is_self_signed(settings.tls_cert):
        raise SettingsError(
            f"ESCROW_TLS_CERT={settings.tls_cert} is self-signed and mail clients will refuse "
            "it: set ESCROW_TLS_CERT and ESCROW_TLS_KEY to a certificate from a public CA "
            "(or, to use it anyway, set ESCROW_ALLOW_SELF_SIGNED=true)"
        )


def smtp_certificate(settings: Settings) -> tuple[Path, Path]:
    """The SMTP certificate and key: the configured pair, else the development one.

    Runs :func:`check_smtp_certificate` first, so in production this raises
    :class:`SettingsError` rather than fall back to a self-signed certificate.
    """
    check_smtp_certificate(settings)
    if settings.tls_cert is not None and settings.tls_key is not None:
        return settings.tls_cert, settings.tls_key
    cert, key = ensure_dev_certificate(settings.data_dir / "tls", settings.smtp_hostname)
    log.warning("DEVELOPMENT: SMTP uses a self-signed certificate; set ESCROW_TLS_CERT/KEY")
    return cert, key
