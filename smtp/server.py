"""The SMTP listeners: authenticated submission into the escrow.

* Submission (``ESCROW_SMTP_PORT``) requires STARTTLS before anything but
  EHLO/NOOP/QUIT, and offers AUTH only after it; the optional implicit-TLS
  listener (``ESCROW_SMTPS_PORT``) is encrypted from the first byte.
* AUTH PLAIN and LOGIN take a staff member's app passwords, or the account
  password while no second factor is enrolled
  (:meth:`escrow.staff_security.StaffSecurity.authenticate_smtp`), checked with
  Argon2 in worker threads, never on the event loop; the staff id rides in
  ``AuthResult.auth_data``.
* Without AUTH, mail is accepted only from ``ESCROW_TRUSTED_NETWORKS``.
* The envelope sender must be the signed-in staff member's address (or an
  alias an admin allowed).
* ``250`` after DATA means :meth:`escrow.intake.Intake.accept` committed;
  any failure answers ``451`` so the client keeps the message and retries.
* Concurrent large messages are bounded (aiosmtpd holds each in memory).
* No exception text ever reaches the client: see :mod:`smtp.status`.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import inspect
import ipaddress
import logging
import re
import ssl
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import aiosmtpd.smtp
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from escrow.audit import Actor
from escrow.intake import Submission
from escrow.logs import mask_address
from escrow.services import Services
from smtp import status
from smtp.data import BlockDataSMTP

log = logging.getLogger(__name__)

MAX_RECIPIENTS = 100
# Messages declaring SIZE above this take a "large" slot; the slots bound memory.
LARGE_MESSAGE_BYTES = 1024 * 1024
# Memory budget for large messages in flight at once. Each costs several times its size
# at its peak: the DATA buffer and the unstuffed message, then the ciphertext being
# built and its final copy. Budgeted at 4 copies, ten concurrent 20 MB messages peak under 400 MB
# resident (bench/intake.py).
LARGE_MESSAGE_BUDGET = 256 * 1024 * 1024
LARGE_MESSAGE_COPIES = 4
MAX_AUTH_FAILURES_PER_CONNECTION = 3

# A path aiosmtpd's RFC 5322 parser would take apart the same way: dot-atom local part,
# host-name domain, then nothing or whitespace and parameters (no comment).
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_SIMPLE_PATH = re.compile(
    rf"<({_ATEXT}(?:\.{_ATEXT})*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)>(?:[ \t]+(?![ \t(])|$)"
)


class _AuthMembers:
    """What aiosmtpd's ``SMTP.__init__`` asks of ``inspect``, answered from a per-class cache.

    aiosmtpd 1.4 finds its AUTH mechanisms on every connection with
    ``inspect.getmembers(self)``, which reads every attribute of the protocol
    object (properties included): about an eighth of the intake's CPU time
    with one connection per message. It keeps only names starting with
    ``auth_``; this returns exactly those, sorted as ``getmembers`` does.
    """

    signature = staticmethod(inspect.signature)

    def __init__(self) -> None:
        self._names: dict[type, tuple[str, ...]] = {}

    def __getattr__(self, name: str) -> Any:
        # Anything else a later aiosmtpd asks of inspect: the real thing.
        return getattr(inspect, name)

    def getmembers(self, obj: object) -> list[tuple[str, Any]]:
        if isinstance(obj, type) or inspect.ismodule(obj):
            return inspect.getmembers(obj)
        names = self._names.get(type(obj))
        if names is None:
            names = self._names[type(obj)] = tuple(
                name for name in dir(type(obj)) if name.startswith("auth_")
            )
        own = [name for name in getattr(obj, "__dict__", {}) if name.startswith("auth_")]
        return sorted((name, getattr(obj, name)) for name in {*names, *own})


aiosmtpd.smtp.inspect = _AuthMembers()  # type: ignore[attr-defined,assignment]


@dataclass(frozen=True)
class StaffLogin:
    """What a successful AUTH leaves in ``session.auth_data``."""

    staff_id: str
    email: str


class _Pending:
    """Credentials parsed by aiosmtpd, waiting for the (async) check."""

    def __init__(self, credentials: LoginPassword) -> None:
        self.credentials = credentials

    def __repr__(self) -> str:
        return "_Pending(...)"


def peer_ip(session: Session) -> str:
    peer = session.peer
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return ""


@functools.lru_cache(maxsize=4096)
def in_networks(
    ip: str, networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
) -> bool:
    """Whether ``ip`` lies in one of ``networks`` (asked on every connection, so remembered)."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return any(address in network for network in networks)


def plain_address(value: str) -> str | None:
    """``value`` if it is one bare ``local@domain`` address, else None."""
    if not value or len(value) > 320 or any(c.isspace() or c in '<>,;"()[]\\' for c in value):
        return None
    local, at, domain = value.rpartition("@")
    if not at or not local or not domain or domain.startswith(".") or domain.endswith("."):
        return None
    return value


class _Session(Session):
    """aiosmtpd's session without its deprecated ``login_data`` notice.

    aiosmtpd 1.4 sets ``login_data`` itself after every successful AUTH and logs
    a deprecation warning each time; nothing here reads it (the staff member
    rides in ``auth_data``), so the operator's log should not hear of it.
    """

    @property
    def login_data(self) -> Any:
        return self._login_data

    @login_data.setter
    def login_data(self, value: Any) -> None:
        self._login_data = value


class EscrowSMTP(BlockDataSMTP):
    """aiosmtpd's SMTP with asynchronous AUTH and bounded large messages."""

    def __init__(self, handler: EscrowHandler, *, implicit_tls: bool, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.command_size_limits = command_limits()
        self.implicit_tls = implicit_tls
        self.auth_failures = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self._original_transport is None and getattr(self, "transport", None) is None
        super().connection_made(transport)
        if first and not self.implicit_tls and self.event_handler.plaintext_allowed(self.session):
            # An admin let this trusted network relay without TLS (ESCROW_TRUSTED_NETWORKS_REQUIRE_TLS=false).
            self.require_starttls = False

    def _create_session(self) -> Session:
        return _Session(self.loop)

    @property
    def secure(self) -> bool:
        return self.implicit_tls or self._tls_protocol is not None

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        # The common path without the RFC 5322 parser (a tenth of the intake's CPU
        # time); anything unusual still goes through aiosmtpd's own parsing, which
        # also decodes an RFC 2047 encoded word ("=?") in the local part.
        simple = _SIMPLE_PATH.match(arg)
        if simple is None or "=?" in simple.group(1):
            return super()._getaddr(arg)
        address = simple.group(1)
        if self.local_part_limit and len(address.rpartition("@")[0]) > self.local_part_limit:
            return None, None
        return address, arg[simple.end() :]

    # aiosmtpd calls its authenticator synchronously; Argon2 must not run on the
    # loop. So the parsing hooks hand back the credentials and we check them here.
    def _authenticate(self, mechanism: str, auth_data: Any) -> Any:
        return _Pending(auth_data)

    async def auth_PLAIN(self, _: Any, args: list[str]) -> AuthResult:
        return await self._finish_auth(await super().auth_PLAIN(_, args))

    async def auth_LOGIN(self, _: Any, args: list[str]) -> AuthResult:
        return await self._finish_auth(await super().auth_LOGIN(_, args))

    async def _finish_auth(self, result: Any) -> AuthResult:
        if not isinstance(result, _Pending):
            assert isinstance(result, AuthResult)
            return result
        handler: EscrowHandler = self.event_handler
        return await handler.authenticate(self, result.credentials)

    async def smtp_DATA(self, arg: str) -> None:
        declared = declared_size(self.envelope.mail_options if self.envelope else [])
        if declared > LARGE_MESSAGE_BYTES:
            async with self.event_handler.large_slots:
                await super().smtp_DATA(arg)
        else:
            await super().smtp_DATA(arg)


class Replicator:
    """Makes a listener's protocol objects: the first with aiosmtpd's constructor, then copies.

    aiosmtpd 1.4 derives its configuration afresh for every connection: it
    lists the protocol's and the handler's methods with ``dir()``, checks the
    TLS context and formats a log line. All of it comes out the same for every
    connection of a listener. A copy takes that configuration from the first
    object, as it was before its connection began, and gets its own stream
    reader (``asyncio.StreamReaderProtocol.__init__``), its own per-connection
    state as aiosmtpd's constructor leaves it, and its own bound methods. No
    reference to the first object is kept. ``tests/smtp/test_protocol.py``
    compares copies with constructed objects.
    """

    # Per-connection state, as aiosmtpd's constructor (and ours) leave it.
    _FRESH: ClassVar[dict[str, Any]] = {
        "_timeout_handle": None,
        "_tls_handshake_okay": True,
        "_tls_protocol": None,
        "_original_transport": None,
        "session": None,
        "envelope": None,
        "transport": None,
        "_handler_coroutine": None,
        "auth_failures": 0,
    }
    # Made anew for each object below: methods bound to it, and its own command limits.
    _OWN = ("_smtp_methods", "_auth_methods", "command_size_limits")

    def __init__(self, build: Callable[[], EscrowSMTP]) -> None:
        self._build = build
        self._shared: dict[str, Any] | None = None
        self._kind: type[EscrowSMTP] = EscrowSMTP
        self._smtp_functions: dict[str, Any] = {}
        self._auth: dict[str, Any] = {}

    def __call__(self) -> EscrowSMTP:
        if self._shared is None:
            first = self._build()
            loop = first.loop
            stream_state = vars(
                asyncio.StreamReaderProtocol(
                    asyncio.StreamReader(loop=loop),
                    client_connected_cb=first._cb_client_connected,
                    loop=loop,
                )
            )
            self._kind = type(first)
            self._shared = {
                name: value
                for name, value in vars(first).items()
                if name not in stream_state and name not in self._FRESH and name not in self._OWN
            }
            self._smtp_functions = {
                name: _unbound(method) for name, method in first._smtp_methods.items()
            }
            self._auth = {
                # The class's own mechanisms unbound; a handler's stay bound to it.
                name: attr._replace(method=_unbound(attr.method)) if attr.is_builtin else attr
                for name, attr in first._auth_methods.items()
            }
            return first
        protocol = self._kind.__new__(self._kind)
        loop = self._shared["loop"]
        asyncio.StreamReaderProtocol.__init__(
            protocol,
            asyncio.StreamReader(loop=loop, limit=protocol.line_length_limit),
            client_connected_cb=protocol._cb_client_connected,
            loop=loop,
        )
        state = vars(protocol)
        state.update(self._shared)
        state.update(self._FRESH)
        protocol.command_size_limits = command_limits()
        protocol._smtp_methods = {
            name: types.MethodType(function, protocol)
            for name, function in self._smtp_functions.items()
        }
        protocol._auth_methods = {
            name: attr._replace(method=types.MethodType(attr.method, protocol))
            if attr.is_builtin
            else attr
            for name, attr in self._auth.items()
        }
        return protocol


def _unbound(method: Any) -> Any:
    """The function behind a bound method (so the object it was bound to can go)."""
    return method.__func__


def command_limits() -> collections.defaultdict[str, int]:
    """Command-length limits for one connection (EHLO raises MAIL's for SIZE and SMTPUTF8).

    aiosmtpd keeps them on the class, shared by every connection, and clears
    them whenever a protocol object is constructed; each connection owns its
    own here.
    """
    return collections.defaultdict(lambda: SMTP.command_size_limit)


def declared_size(mail_options: list[str]) -> int:
    for option in mail_options:
        name, _, value = option.partition("=")
        if name.upper() == "SIZE" and value.isdigit():
            return int(value)
    return 0


class EscrowHandler:
    """The aiosmtpd handler: decides per command, stores in DATA, answers from the status table."""

    def __init__(self, services: Services, *, max_message_bytes: int) -> None:
        self.services = services
        self.settings = services.settings
        self.large_slots = asyncio.Semaphore(
            max(1, LARGE_MESSAGE_BUDGET // (LARGE_MESSAGE_COPIES * max_message_bytes))
        )

    def trusted(self, session: Session) -> bool:
        return in_networks(peer_ip(session), self.settings.trusted_networks)

    def plaintext_allowed(self, session: Session) -> bool:
        return not self.settings.trusted_networks_require_tls and self.trusted(session)

    def actor(self, session: Session, staff_id: str = "") -> Actor:
        return Actor("smtp", id=staff_id, remote_addr=peer_ip(session))

    async def authenticate(self, server: EscrowSMTP, credentials: LoginPassword) -> AuthResult:
        session = server.session
        assert session is not None
        login = credentials.login.decode("utf-8", "replace").strip()
        password = credentials.password.decode("utf-8", "replace")
        if server.auth_failures >= MAX_AUTH_FAILURES_PER_CONNECTION:
            return AuthResult(success=False, handled=False, message=status.AUTH_THROTTLED)
        result = await self.services.staff_security.authenticate_smtp(
            login, password, actor=self.actor(session)
        )
        if result is None:
            server.auth_failures += 1
            await self.services.audit.log(
                "smtp.auth_failed",
                self.actor(session),
                outcome="denied",
                detail={"login": mask_address(login)},
            )
            log.info("SMTP AUTH failed for %s from %s", mask_address(login), peer_ip(session))
            return AuthResult(success=False, handled=False)
        staff = result.staff
        # App password names are chosen by staff ("iPhone"): never health information.
        detail = (
            {"app_password": result.app_password_name}
            if result.app_password_name is not None
            else {"account_password": True}
        )
        await self.services.audit.log("smtp.auth_ok", self.actor(session, staff.id), detail=detail)
        return AuthResult(success=True, auth_data=StaffLogin(staff.id, staff.email))

    async def handle_MAIL(
        self,
        server: EscrowSMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        login = session.auth_data if session.authenticated else None
        if not isinstance(login, StaffLogin) and not self.trusted(session):
            return status.AUTH_REQUIRED if server.secure else status.RELAY_DENIED
        if not address:
            return status.NULL_SENDER
        if plain_address(address) is None:
            return status.BAD_SENDER
        if isinstance(login, StaffLogin):
            staff = await self.services.staff.get(login.staff_id)
            if (
                staff is None
                or staff.disabled
                or not await self.services.staff.sender_allowed(staff, address)
            ):
                log.info(
                    "refused envelope sender %s for staff %s", mask_address(address), login.staff_id
                )
                return status.SENDER_NOT_OWNED
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return status.SENDER_OK

    async def handle_RCPT(
        self,
        server: EscrowSMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        if plain_address(address) is None:
            return status.BAD_RECIPIENT
        if len(envelope.rcpt_tos) >= MAX_RECIPIENTS:
            return status.TOO_MANY_RECIPIENTS
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return status.RECIPIENT_OK

    async def handle_DATA(self, server: EscrowSMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.original_content or envelope.content
        if not isinstance(content, bytes) or not content.strip():
            return status.EMPTY
        if len(content) > self.settings.max_message_bytes:
            return status.TOO_BIG
        login = session.auth_data if session.authenticated else None
        submission = Submission(
            mail_from=envelope.mail_from or "",
            recipients=list(envelope.rcpt_tos),
            content=content,
            staff_id=login.staff_id if isinstance(login, StaffLogin) else None,
            remote_addr=peer_ip(session),
        )
        try:
            accepted = await self.services.intake.accept(submission)
        except Exception as exc:
            # Nothing was committed; the client keeps the message and retries.
            log.error("message not stored (%s); answered 451", type(exc).__name__)
            return status.NOT_STORED
        log.info(
            "accepted message %s: %d escrowed, %d passed through",
            accepted.message_id or "-",
            accepted.escrowed,
            accepted.passed_through,
        )
        return status.ACCEPTED

    async def handle_exception(self, error: Exception) -> str:
        # The default would send str(error) to the client.
        log.error("SMTP session error (%s)", type(error).__name__)
        return status.TRY_LATER


async def start_smtp(services: Services, tls_context: ssl.SSLContext) -> list[asyncio.Server]:
    """Bind the submission listener (and the implicit-TLS one if configured)."""
    settings = services.settings
    handler = EscrowHandler(services, max_message_bytes=settings.max_message_bytes)
    loop = asyncio.get_running_loop()
    common: dict[str, Any] = {
        "data_size_limit": settings.max_message_bytes,
        "enable_SMTPUTF8": True,
        "decode_data": False,
        "hostname": settings.smtp_hostname,
        "ident": "escrow",
        "timeout": 300,
        # Given, not looked up: aiosmtpd would otherwise do so under a warnings filter,
        # on every connection.
        "loop": loop,
    }

    submission = Replicator(
        lambda: EscrowSMTP(
            handler,
            implicit_tls=False,
            tls_context=tls_context,
            require_starttls=True,
            auth_require_tls=True,
            **common,
        )
    )
    # Encrypted from the first byte: AUTH is safe without STARTTLS.
    implicit = Replicator(
        lambda: EscrowSMTP(handler, implicit_tls=True, auth_require_tls=False, **common)
    )

    servers = [await loop.create_server(submission, settings.smtp_host, settings.smtp_port)]
    log.info("SMTP submission (STARTTLS) on %s:%d", settings.smtp_host, settings.smtp_port)
    if settings.smtps_port is not None:
        servers.append(
            await loop.create_server(
                implicit, settings.smtp_host, settings.smtps_port, ssl=tls_context
            )
        )
        log.info("SMTP implicit TLS on %s:%d", settings.smtp_host, settings.smtps_port)
    return servers
