"""Settings: every ``ESCROW_*`` variable of the operator contract, read once.

Values come from the process environment first, then from ``./.env``. Every
secret also accepts ``NAME_FILE``, a path whose contents are the value (the
Docker secrets convention). :func:`load_settings` builds one frozen
:class:`Settings` at start-up; nothing reads the environment at import time.
A wrong value raises :class:`~escrow.errors.SettingsError` naming the
variable and how to fix it; the command line turns that into exit code 2.
"""

from __future__ import annotations

import ipaddress
import os
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from escrow.errors import SettingsError

SmarthostTLS = Literal["starttls", "tls", "none"]
ReplyMode = Literal["deliver", "notify"]
LogFormat = Literal["text", "json"]


class Secret:
    """A string that never shows itself in a repr, a log line or a traceback."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """The secret value; call only where it is used."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and secrets.compare_digest(self._value, other._value)

    def __hash__(self) -> int:
        return hash(("Secret", len(self._value)))

    def __bool__(self) -> bool:
        return bool(self._value)


@dataclass(frozen=True)
class Settings:
    """The effective configuration. Built by :func:`load_settings`; never mutated."""

    data_dir: Path
    # repr=False: the URL may carry the database password (ESCROW_DATABASE_PASSWORD).
    database_url: str = field(repr=False)
    keys_dir: Path
    master_passphrase: Secret | None
    public_url: str
    practice_name: str
    notify_from: str
    internal_domains: frozenset[str]
    trusted_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    smtp_host: str
    smtp_port: int
    smtps_port: int | None
    tls_cert: Path | None
    tls_key: Path | None
    web_host: str
    web_port: int
    smarthost: tuple[str, int] | None
    smarthost_tls: SmarthostTLS
    smarthost_user: str | None
    smarthost_password: Secret | None
    max_message_mb: int
    outbox_retry_seconds: int
    outbox_give_up_days: float
    message_ttl_days: int
    session_idle_minutes: int
    session_max_hours: int
    reply_mode: ReplyMode
    vault_retention_days: int
    consent_text_file: Path | None
    quick_exit_url: str
    staff_require_totp: bool
    read_receipts: bool
    log_level: str
    log_format: LogFormat
    smtp_hostname: str = "localhost"
    trusted_networks_require_tls: bool = True
    practice_contact: str = ""
    allow_self_signed: bool = False
    trusted_proxies: tuple[str, ...] = ()

    @property
    def is_production(self) -> bool:
        """PostgreSQL or an https public URL: development conveniences are refused."""
        return self.database_url.startswith("postgresql") or self.public_url.startswith("https://")

    @property
    def master_secret_file(self) -> Path:
        """Where a development master passphrase is generated when none is given."""
        return self.data_dir / "master.secret"

    @property
    def mail_capture_dir(self) -> Path:
        """Where outgoing mail is written when no smarthost is configured."""
        return self.data_dir / "mail"

    @property
    def secure_cookies(self) -> bool:
        return self.public_url.startswith("https://")

    @property
    def max_message_bytes(self) -> int:
        return self.max_message_mb * 1024 * 1024


def read_dotenv(path: Path) -> dict[str, str]:
    """Parse a ``.env`` file: ``NAME=value`` lines, ``#`` comments, optional quotes.

    As in Docker Compose, `` #`` after an unquoted value starts a comment;
    quote a value that must contain it (``NAME="a #b"``).
    """
    values: dict[str, str] = {}
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return values
    except OSError as exc:
        raise SettingsError(f"{path}: cannot read ({exc.strerror})") from None
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export ") :].lstrip()
        name, sep, value = line.partition("=")
        if not sep or not name.strip():
            raise SettingsError(f"{path} line {number}: expected NAME=value")
        value = value.strip()
        if value[:1] in ("'", '"'):
            end = value.find(value[0], 1)
            rest = value[end + 1 :].strip() if end > 0 else ""
            if end < 0 or (rest and not rest.startswith("#")):
                raise SettingsError(f"{path} line {number}: unbalanced quotes around the value")
            value = value[1:end]
        else:
            value = re.split(r"\s#", value, maxsplit=1)[0].rstrip()
        values[name.strip()] = value
    return values


class _Reader:
    """Looks names up in the environment, then ``.env``, and parses them."""

    def __init__(self, environ: Mapping[str, str], dotenv: Mapping[str, str]) -> None:
        self._environ = environ
        self._dotenv = dotenv

    def raw(self, name: str) -> str | None:
        for source in (self._environ, self._dotenv):
            value = source.get(name)
            if value is not None and value.strip() != "":
                return value.strip()
        return None

    def text(self, name: str, default: str) -> str:
        value = self.raw(name)
        return default if value is None else value

    def secret(self, name: str) -> Secret | None:
        direct = self.raw(name)
        file_name = self.raw(f"{name}_FILE")
        if direct is not None and file_name is not None:
            raise SettingsError(f"{name} and {name}_FILE are both set; keep one of them")
        if file_name is not None:
            try:
                value = Path(file_name).read_text(encoding="utf-8").rstrip("\r\n")
            except OSError as exc:
                raise SettingsError(
                    f"{name}_FILE={file_name}: cannot read the file ({exc.strerror})"
                ) from None
            if not value:
                raise SettingsError(f"{name}_FILE={file_name}: the file is empty")
            return Secret(value)
        return None if direct is None else Secret(direct)

    def integer(self, name: str, default: int, *, minimum: int, maximum: int) -> int:
        value = self.raw(name)
        if value is None:
            return default
        try:
            number = int(value)
        except ValueError:
            raise SettingsError(
                f"{name}={value!r} is not a whole number; set it between {minimum} and {maximum}"
            ) from None
        if not minimum <= number <= maximum:
            raise SettingsError(
                f"{name}={number} is out of range; set it between {minimum} and {maximum}"
            )
        return number

    def number(self, name: str, default: float, *, minimum: float, maximum: float) -> float:
        value = self.raw(name)
        if value is None:
            return default
        try:
            number = float(value)
        except ValueError:
            raise SettingsError(f"{name}={value!r} is not a number") from None
        if not minimum <= number <= maximum:
            raise SettingsError(
                f"{name}={number} is out of range; set it between {minimum} and {maximum}"
            )
        return number

    def boolean(self, name: str, default: bool) -> bool:
        value = self.raw(name)
        if value is None:
            return default
        lowered = value.lower()
        if lowered in {"1", "true", "yes", "on"}:
            return True
        if lowered in {"0", "false", "no", "off"}:
            return False
        raise SettingsError(f"{name}={value!r} is not a yes/no value; use true or false")

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.text(name, default).lower()
        if value not in choices:
            raise SettingsError(f"{name}={value!r} is not one of: {', '.join(choices)}")
        return value

    def path(self, name: str, default: Path | None, *, base: Path) -> Path | None:
        value = self.raw(name)
        if value is None:
            return default
        path = Path(value).expanduser()
        return path if path.is_absolute() else base / path


def _port(name: str, value: int) -> int:
    if not 1 <= value <= 65535:
        raise SettingsError(f"{name}={value} is not a TCP port; use 1 to 65535")
    return value


def _database_url(url: str, data_dir: Path) -> str:
    scheme = url.split("://", 1)[0] if "://" in url else ""
    if scheme in {"sqlite", "sqlite+aiosqlite"}:
        return "sqlite+aiosqlite" + url[len(scheme) :]
    if scheme in {"postgresql", "postgres", "postgresql+asyncpg"}:
        return "postgresql+asyncpg" + url[len(scheme) :]
    raise SettingsError(
        f"ESCROW_DATABASE_URL has an unsupported scheme {scheme + '://' if scheme else repr(url)}; "
        "use postgresql+asyncpg://user@host/db or sqlite+aiosqlite:///path/escrow.db "
        f"(default: sqlite+aiosqlite:///{data_dir / 'escrow.db'})"
    )


def _address(name: str, value: str) -> str:
    local, at, domain = value.rpartition("@")
    if not at or not local or not domain or any(c.isspace() for c in value):
        raise SettingsError(f"{name}={value!r} is not a mail address like no-reply@example.org")
    return value


def _public_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in {"http", "https"} or not parts.netloc:
        raise SettingsError(
            f"ESCROW_PUBLIC_URL={value!r} must be an http(s) URL such as https://secure.example.org"
        )
    if parts.query or parts.fragment:
        raise SettingsError("ESCROW_PUBLIC_URL must not carry a query or fragment")
    return value.rstrip("/")


def _networks(value: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    networks = []
    for item in (part.strip() for part in value.split(",")):
        if not item:
            continue
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise SettingsError(
                f"ESCROW_TRUSTED_NETWORKS: {item!r} is not a network; use CIDRs like 192.0.2.0/24"
            ) from None
    return tuple(networks)


def _with_database_password(url: str, password: Secret | None) -> str:
    """Put ``ESCROW_DATABASE_PASSWORD`` into a PostgreSQL URL that carries none.

    The password can then come from a secrets file (``ESCROW_DATABASE_PASSWORD_FILE``)
    while the URL itself stays in plain configuration.
    """
    if password is None:
        return url
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise SettingsError("ESCROW_DATABASE_URL is not a valid database URL") from None
    if parsed.get_backend_name() != "postgresql":
        raise SettingsError(
            "ESCROW_DATABASE_PASSWORD applies only to a postgresql+asyncpg:// "
            "ESCROW_DATABASE_URL; unset it for SQLite"
        )
    if parsed.password is not None:
        raise SettingsError(
            "ESCROW_DATABASE_URL already holds a password and ESCROW_DATABASE_PASSWORD is set "
            "too; remove the password from the URL and keep the secret"
        )
    return parsed.set(password=password.reveal()).render_as_string(hide_password=False)


def _proxies(value: str) -> tuple[str, ...]:
    proxies = []
    for item in (part.strip() for part in value.split(",")):
        if not item:
            continue
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise SettingsError(
                f"ESCROW_TRUSTED_PROXIES: {item!r} is not an address or network; "
                "use addresses or CIDRs like 172.28.73.10 or 10.0.0.0/24"
            ) from None
        proxies.append(item)
    return tuple(proxies)


def _smarthost(value: str | None) -> tuple[str, int] | None:
    if value is None:
        return None
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit():
        raise SettingsError(
            f"ESCROW_SMARTHOST={value!r} must be host:port, e.g. smtp.example.org:587"
        )
    return host, _port("ESCROW_SMARTHOST", int(port))


def load_settings(
    environ: Mapping[str, str] | None = None, *, dotenv_path: Path | None = None
) -> Settings:
    """Read every ``ESCROW_*`` setting into one frozen :class:`Settings`.

    ``environ`` defaults to ``os.environ``; ``dotenv_path`` to ``./.env``.
    Raises :class:`SettingsError` with a one-line explanation on bad input.
    """
    env = os.environ if environ is None else environ
    dotenv = read_dotenv(dotenv_path if dotenv_path is not None else Path.cwd() / ".env")
    r = _Reader(env, dotenv)

    cwd = Path.cwd()
    data_dir = r.path("ESCROW_DATA_DIR", cwd / "var", base=cwd)
    assert data_dir is not None
    data_dir = data_dir.resolve()
    database_url = _database_url(
        r.text("ESCROW_DATABASE_URL", f"sqlite+aiosqlite:///{data_dir / 'escrow.db'}"), data_dir
    )
    database_url = _with_database_password(database_url, r.secret("ESCROW_DATABASE_PASSWORD"))
    keys_dir = r.path("ESCROW_KEYS_DIR", data_dir / "keys", base=cwd)
    assert keys_dir is not None

    tls_cert = r.path("ESCROW_TLS_CERT", None, base=cwd)
    tls_key = r.path("ESCROW_TLS_KEY", None, base=cwd)
    if (tls_cert is None) != (tls_key is None):
        raise SettingsError("set both ESCROW_TLS_CERT and ESCROW_TLS_KEY, or neither")
    for name, tls_path in (("ESCROW_TLS_CERT", tls_cert), ("ESCROW_TLS_KEY", tls_key)):
        if tls_path is not None and not tls_path.is_file():
            raise SettingsError(f"{name}={tls_path}: no such file")

    smtps = r.raw("ESCROW_SMTPS_PORT")
    smtps_port = (
        _port("ESCROW_SMTPS_PORT", r.integer("ESCROW_SMTPS_PORT", 0, minimum=1, maximum=65535))
        if smtps is not None
        else None
    )
    message_ttl_days = r.integer("ESCROW_MESSAGE_TTL_DAYS", 90, minimum=1, maximum=36500)
    retention = r.integer("ESCROW_VAULT_RETENTION_DAYS", 2555, minimum=1, maximum=36500)
    if retention < message_ttl_days:
        raise SettingsError(
            f"ESCROW_VAULT_RETENTION_DAYS={retention} is shorter than ESCROW_MESSAGE_TTL_DAYS="
            f"{message_ttl_days}; retention must be at least the TTL"
        )
    consent = r.path("ESCROW_CONSENT_TEXT_FILE", None, base=cwd)
    if consent is not None and not consent.is_file():
        raise SettingsError(f"ESCROW_CONSENT_TEXT_FILE={consent}: no such file")
    log_level = r.text("ESCROW_LOG_LEVEL", "INFO").upper()
    if log_level not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
        raise SettingsError(f"ESCROW_LOG_LEVEL={log_level!r}; use DEBUG, INFO, WARNING or ERROR")
    quick_exit = r.text("ESCROW_QUICK_EXIT_URL", "https://www.wikipedia.org/")
    if urlsplit(quick_exit).scheme not in {"http", "https"}:
        raise SettingsError(f"ESCROW_QUICK_EXIT_URL={quick_exit!r} must be an http(s) URL")

    public_url = _public_url(r.text("ESCROW_PUBLIC_URL", "http://127.0.0.1:8080"))

    return Settings(
        data_dir=data_dir,
        database_url=database_url,
        keys_dir=keys_dir.resolve(),
        master_passphrase=r.secret("ESCROW_MASTER_PASSPHRASE"),
        public_url=public_url,
        practice_name=r.text("ESCROW_PRACTICE_NAME", "Your practice"),
        notify_from=_address(
            "ESCROW_NOTIFY_FROM", r.text("ESCROW_NOTIFY_FROM", "no-reply@localhost")
        ),
        internal_domains=frozenset(
            d.strip().lower().lstrip("@")
            for d in r.text("ESCROW_INTERNAL_DOMAINS", "").split(",")
            if d.strip()
        ),
        trusted_networks=_networks(r.text("ESCROW_TRUSTED_NETWORKS", "")),
        smtp_host=r.text("ESCROW_SMTP_HOST", "127.0.0.1"),
        smtp_port=_port(
            "ESCROW_SMTP_PORT", r.integer("ESCROW_SMTP_PORT", 2525, minimum=1, maximum=65535)
        ),
        smtps_port=smtps_port,
        tls_cert=tls_cert,
        tls_key=tls_key,
        web_host=r.text("ESCROW_WEB_HOST", "127.0.0.1"),
        web_port=_port(
            "ESCROW_WEB_PORT", r.integer("ESCROW_WEB_PORT", 8080, minimum=1, maximum=65535)
        ),
        smarthost=_smarthost(r.raw("ESCROW_SMARTHOST")),
        smarthost_tls=r.choice("ESCROW_SMARTHOST_TLS", "starttls", ("starttls", "tls", "none")),  # type: ignore[arg-type]
        smarthost_user=r.raw("ESCROW_SMARTHOST_USER"),
        smarthost_password=r.secret("ESCROW_SMARTHOST_PASSWORD"),
        max_message_mb=r.integer("ESCROW_MAX_MESSAGE_MB", 25, minimum=1, maximum=200),
        outbox_retry_seconds=r.integer("ESCROW_OUTBOX_RETRY_SECONDS", 60, minimum=1, maximum=3600),
        outbox_give_up_days=r.number("ESCROW_OUTBOX_GIVE_UP_DAYS", 5, minimum=0.0001, maximum=60),
        message_ttl_days=message_ttl_days,
        session_idle_minutes=r.integer("ESCROW_SESSION_IDLE_MINUTES", 15, minimum=1, maximum=1440),
        session_max_hours=r.integer("ESCROW_SESSION_MAX_HOURS", 8, minimum=1, maximum=168),
        reply_mode=r.choice("ESCROW_REPLY_MODE", "deliver", ("deliver", "notify")),  # type: ignore[arg-type]
        vault_retention_days=retention,
        consent_text_file=consent,
        quick_exit_url=quick_exit,
        staff_require_totp=r.boolean("ESCROW_STAFF_REQUIRE_TOTP", True),
        read_receipts=r.boolean("ESCROW_READ_RECEIPTS", False),
        log_level=log_level,
        log_format=r.choice("ESCROW_LOG_FORMAT", "text", ("text", "json")),  # type: ignore[arg-type]
        smtp_hostname=r.text("ESCROW_SMTP_HOSTNAME", urlsplit(public_url).hostname or "localhost"),
        trusted_networks_require_tls=r.boolean("ESCROW_TRUSTED_NETWORKS_REQUIRE_TLS", True),
        practice_contact=r.text("ESCROW_PRACTICE_CONTACT", ""),
        allow_self_signed=r.boolean("ESCROW_ALLOW_SELF_SIGNED", False),
        trusted_proxies=_proxies(r.text("ESCROW_TRUSTED_PROXIES", "")),
    )
