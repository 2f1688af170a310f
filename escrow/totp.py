"""The secrets of staff security: TOTP codes, recovery codes and app passwords.

Pure functions, no database and no I/O; :mod:`escrow.staff_security` stores
and audits. TOTP is RFC 6238 with the parameters every authenticator app
understands (SHA-1, 30 s, 6 digits), checked one step either side of now.
Recovery codes and app passwords come from :mod:`secrets` and are typed by
people, so they are normalised (case, spaces, hyphens) before hashing and
before checking.
"""

from __future__ import annotations

import hmac
import io
import re
import secrets
import string
from datetime import datetime

import pyotp
import segno

TOTP_PERIOD_SECONDS = 30
TOTP_DIGITS = 6
# Steps accepted either side of now: clocks drift and people type slowly.
TOTP_WINDOW = 1
RECOVERY_CODE_COUNT = 10
# Lower-case letters and digits: easy to read out and type on a phone.
_ALPHABET = string.ascii_lowercase + string.digits
# 10 characters of 36: about 52 bits, for a one-time code behind the account lockout.
RECOVERY_CODE_CHARS = 10
# 4 groups of 4 characters of 36: about 83 bits, a secret nobody guesses over SMTP.
APP_PASSWORD_GROUPS = 4
APP_PASSWORD_GROUP_CHARS = 4
_BASE32_SECRET = re.compile(r"[A-Z2-7]{16,128}")


def normalise_code(value: str) -> str:
    """What a person meant to type: lower case, without spaces or hyphens."""
    return "".join(value.split()).replace("-", "").lower()


# ---------------------------------------------------------------- TOTP


def new_totp_secret() -> str:
    """A fresh random TOTP secret, base32 (160 bits, as RFC 4226 recommends)."""
    return pyotp.random_base32(32)


def is_totp_secret(secret: str) -> bool:
    return _BASE32_SECRET.fullmatch(secret) is not None


def provisioning_uri(secret: str, email: str, issuer: str) -> str:
    """The ``otpauth://`` URI an authenticator app reads from the QR code."""
    return pyotp.TOTP(secret, digits=TOTP_DIGITS, interval=TOTP_PERIOD_SECONDS).provisioning_uri(
        name=email, issuer_name=issuer
    )


def qr_svg(uri: str, *, title: str = "QR code for your authenticator app") -> str:
    """``uri`` as a QR code in SVG markup to embed in a page.

    No XML declaration, no ``<style>`` element and no ``style`` attribute (only
    presentation attributes), so a strict Content-Security-Policy allows it. A
    white quiet zone is drawn, so it scans on a dark page too.
    """
    code = segno.make(uri, error="m")
    buffer = io.BytesIO()
    code.save(
        buffer,
        kind="svg",
        xmldecl=False,
        svgns=True,
        nl=False,
        scale=4,
        dark="#000",
        light="#fff",
        title=title,
        svgclass="totp-qr",
        lineclass=None,
    )
    return buffer.getvalue().decode("utf-8")


def time_step(moment: datetime) -> int:
    """The RFC 6238 time step ``moment`` falls in."""
    return int(moment.timestamp()) // TOTP_PERIOD_SECONDS


def looks_like_totp(code: str) -> bool:
    return len(code) == TOTP_DIGITS and code.isascii() and code.isdigit()


def matching_step(secret: str, code: str, moment: datetime, *, after: int | None) -> int | None:
    """The time step within the window whose code is ``code``, or None.

    Steps at or before ``after`` (the last one accepted) are never matched, so
    a code cannot be used twice, nor an older one after a newer.
    """
    if not looks_like_totp(code) or not is_totp_secret(secret):
        return None
    totp = pyotp.TOTP(secret, digits=TOTP_DIGITS, interval=TOTP_PERIOD_SECONDS)
    current = time_step(moment)
    for step in range(current - TOTP_WINDOW, current + TOTP_WINDOW + 1):
        if after is not None and step <= after:
            continue
        if hmac.compare_digest(totp.generate_otp(step), code):
            return step
    return None


# ---------------------------------------------------------------- recovery codes


def _random(chars: int) -> str:
    return "".join(secrets.choice(_ALPHABET) for _ in range(chars))


def new_recovery_codes(count: int = RECOVERY_CODE_COUNT) -> list[str]:
    """``count`` fresh one-time codes, shown as ``abcde-12345``."""
    codes = []
    for _ in range(count):
        raw = _random(RECOVERY_CODE_CHARS)
        half = RECOVERY_CODE_CHARS // 2
        codes.append(f"{raw[:half]}-{raw[half:]}")
    return codes


def looks_like_recovery_code(normalised: str) -> bool:
    return len(normalised) == RECOVERY_CODE_CHARS and all(c in _ALPHABET for c in normalised)


# ---------------------------------------------------------------- app passwords


def new_app_password() -> str:
    """A fresh app password, shown as ``abcd-efgh-ijkl-mnop`` (hash its normalised form)."""
    return "-".join(_random(APP_PASSWORD_GROUP_CHARS) for _ in range(APP_PASSWORD_GROUPS))


def looks_like_app_password(normalised: str) -> bool:
    return len(normalised) == APP_PASSWORD_GROUPS * APP_PASSWORD_GROUP_CHARS and all(
        c in _ALPHABET for c in normalised
    )
