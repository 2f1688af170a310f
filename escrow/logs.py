"""Logging set-up, and helpers that keep personal data out of log lines.

Log lines carry ids, fingerprints and masked addresses, never message
content, subjects, attachment names, passphrases or tokens.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime


def mask_address(address: str) -> str:
    """``jane.doe@example.org`` -> ``j***@example.org``: enough to tell mailboxes apart."""
    local, at, domain = address.rpartition("@")
    if not at:
        return "***"
    return f"{local[:1]}***@{domain}"


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message, and ``extra`` fields."""

    # color_message: uvicorn's copy of the message with terminal colour codes.
    _standard = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
        "message",
        "color_message",
    }

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in self._standard and not key.startswith("_"):
                entry[key] = value if isinstance(value, str | int | float | bool) else str(value)
        if record.exc_info and record.exc_info[0] is not None:
            entry["error"] = record.exc_info[0].__name__
        return json.dumps(entry, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """Readable lines; exceptions show only their type (their text may quote input)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def formatException(self, ei: object) -> str:
        exc_type = ei[0] if isinstance(ei, tuple) else None
        return f"  ({getattr(exc_type, '__name__', 'error')}; details withheld)"


def configure_logging(level: str, fmt: str) -> None:
    """Send every log record to standard error, in ``text`` or ``json`` form."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Library loggers that would echo protocol data (mail content) or query parameters
    # (addresses, hashes, ciphertext) at DEBUG; sqlalchemy.engine logs parameters at INFO.
    for noisy in (
        "mail.log",
        "aiosmtpd",
        "aiosmtplib",
        "uvicorn.access",
        "aiosqlite",
        "asyncpg",
        "sqlalchemy",
        "multipart",
        "python_multipart",
    ):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))
