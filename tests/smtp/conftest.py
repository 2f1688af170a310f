"""Real SMTP peers for the SMTP tests.

* :class:`Sink`: a smarthost, aiosmtpd in a thread of its own, that keeps
  every message it accepts (and can refuse chosen recipients, or be stopped
  to play an outage).
* ``make_escrow``: starts our listeners with :func:`smtp.server.start_smtp`
  and, unless told not to, an :class:`~smtp.worker.OutboxWorker`, both on the
  test's event loop, against the ``db_url`` database (SQLite and PostgreSQL).
* Blocking ``smtplib`` helpers (:func:`submit`, :func:`signed_in`, ...) for a
  client that speaks STARTTLS against the development certificate. While the
  server runs on the test's loop, call them through ``asyncio.to_thread``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import smtplib
import socket
import ssl
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser, Parser
from pathlib import Path
from typing import Any, Protocol

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP as AioSMTP
from aiosmtpd.smtp import Envelope, Session
from sqlalchemy import select

from escrow.audit import Actor
from escrow.devcert import ensure_dev_certificate
from escrow.models import AuditEvent, Base
from escrow.services import Services, build_services
from escrow.settings import Settings, load_settings
from smtp.server import start_smtp
from smtp.tls import server_context
from smtp.worker import OutboxWorker
from tests.conftest import fast_hasher, initialise, make_environ

STAFF_EMAIL = "dr.hale@riverside.example"
STAFF_PASSWORD = "correct horse battery staple"
PUBLIC_URL = "https://secure.riverside.example"
NOTIFY_FROM = "secure@riverside.example"
INTERNAL_DOMAIN = "riverside.example"
OPERATOR = Actor("operator", id="tests")


# ---------------------------------------------------------------- waiting


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def eventually(
    check: Callable[[], Any], *, timeout: float = 20.0, what: str = "condition"
) -> Any:
    """Poll ``check`` (sync or async) until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        await asyncio.sleep(0.02)


def eventually_sync(
    check: Callable[[], Any], *, timeout: float = 20.0, what: str = "condition"
) -> Any:
    """:func:`eventually` for tests without an event loop of their own."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.02)


# ---------------------------------------------------------------- the smarthost sink


@dataclass(frozen=True)
class Received:
    """One message as the sink accepted it."""

    mail_from: str
    rcpt_tos: tuple[str, ...]
    data: bytes
    mail_options: tuple[str, ...]

    def parsed(self) -> EmailMessage:
        # The bytes parser would keep UTF-8 header fields (RFC 6532) as surrogates.
        try:
            message = Parser(policy=policy.default).parsestr(self.data.decode("utf-8"))
        except UnicodeDecodeError:
            message = BytesParser(policy=policy.default).parsebytes(self.data)
        assert isinstance(message, EmailMessage)
        return message


class _SinkHandler:
    def __init__(self, sink: Sink) -> None:
        self.sink = sink

    async def handle_RCPT(
        self,
        server: AioSMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        if address.lower() in self.sink.refuse:
            return "550 5.1.1 No such mailbox here"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: AioSMTP, session: Session, envelope: Envelope) -> str:
        received = Received(
            mail_from=str(envelope.mail_from),
            rcpt_tos=tuple(envelope.rcpt_tos),
            data=bytes(envelope.original_content or b""),
            mail_options=tuple(envelope.mail_options),
        )
        with self.sink.lock:
            self.sink.messages.append(received)
        return "250 2.0.0 Queued"


class Sink:
    """A smarthost on 127.0.0.1: aiosmtpd in its own thread, keeping what it accepts.

    ``refuse`` holds addresses refused at RCPT with ``550``. :meth:`stop`
    takes the port down (an outage); :meth:`start` brings it back on the same port.
    """

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.messages: list[Received] = []
        self.refuse: set[str] = set()
        self.lock = threading.Lock()
        self._controller: Controller | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        assert self._controller is None, "sink already running"
        controller = Controller(
            _SinkHandler(self),
            hostname="127.0.0.1",
            port=self.port,
            ready_timeout=10,
            enable_SMTPUTF8=True,
        )
        controller.start()
        self._controller = controller

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    def received(self) -> list[Received]:
        with self.lock:
            return list(self.messages)

    def to(self, address: str) -> list[Received]:
        """Messages whose envelope includes ``address`` (case-insensitive)."""
        wanted = address.lower()
        return [m for m in self.received() if wanted in (r.lower() for r in m.rcpt_tos)]

    async def wait_for_count(self, count: int, *, timeout: float = 20.0) -> list[Received]:
        """Wait until at least ``count`` messages arrived; returns all of them."""
        await eventually(
            lambda: len(self.received()) >= count,
            timeout=timeout,
            what=f"{count} message(s) at the sink (have {len(self.received())})",
        )
        return self.received()


@pytest.fixture
def sink() -> Iterator[Sink]:
    running = Sink()
    running.start()
    try:
        yield running
    finally:
        running.stop()


# ---------------------------------------------------------------- our server


@dataclass
class EscrowServer:
    """Our SMTP listeners (and optionally the outbox worker) running on the test's loop."""

    services: Services
    port: int
    smtps_port: int
    cafile: Path
    servers: list[asyncio.Server]
    worker: OutboxWorker
    _stop: asyncio.Event | None = None
    _task: asyncio.Task[None] | None = None

    @property
    def settings(self) -> Settings:
        return self.services.settings

    def start_worker(self) -> None:
        assert self._task is None, "worker already running"
        self._stop = asyncio.Event()
        self._task = asyncio.create_task(self.worker.run(self._stop), name="test-worker")

    async def stop_worker(self) -> None:
        if self._task is not None and self._stop is not None:
            self._stop.set()
            await asyncio.wait_for(self._task, 30)
        self._task = self._stop = None

    async def add_staff(self, email: str = STAFF_EMAIL, password: str = STAFF_PASSWORD) -> str:
        """Create a staff account; returns its id."""
        staff = await self.services.staff.add(email, password, name="Dr Hale", actor=OPERATOR)
        return staff.id

    async def close(self) -> None:
        await self.stop_worker()
        for server in self.servers:
            server.close()
        for server in self.servers:
            # Python 3.12 waits for open client connections here; a failed test may leave one.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(server.wait_closed(), 5)
        await self.services.aclose()


class MakeEscrow(Protocol):
    def __call__(self, *, worker: bool = ..., **env: str) -> Awaitable[EscrowServer]: ...


def escrow_environ(data_dir: Path, db_url: str, sink: Sink | None, **extra: str) -> dict[str, str]:
    """The settings environment of a test instance: free ports, the sink as smarthost."""
    env = make_environ(
        data_dir,
        db_url,
        ESCROW_SMTP_PORT=str(free_port()),
        ESCROW_SMTPS_PORT=str(free_port()),
        ESCROW_WEB_PORT=str(free_port()),
        ESCROW_PUBLIC_URL=PUBLIC_URL,
        ESCROW_NOTIFY_FROM=NOTIFY_FROM,
        ESCROW_OUTBOX_RETRY_SECONDS="60",
    )
    if sink is not None:
        env["ESCROW_SMARTHOST"] = sink.address
        env["ESCROW_SMARTHOST_TLS"] = "none"
    env.update(extra)
    return env


@contextlib.asynccontextmanager
async def running_escrow(
    data_dir: Path, db_url: str, sink: Sink | None, *, worker: bool = True, **env: str
) -> AsyncIterator[EscrowServer]:
    """Initialise, build the services, bind the listeners and (optionally) run the worker."""
    environ = escrow_environ(data_dir, db_url, sink, **env)
    settings = load_settings(environ, dotenv_path=data_dir.parent / "no.env")
    await initialise(settings)
    services = build_services(settings, hasher=fast_hasher())
    cert, key = ensure_dev_certificate(settings.data_dir / "tls", settings.smtp_hostname)
    try:
        servers = await start_smtp(services, server_context(cert, key))
    except BaseException:
        await services.aclose()
        raise
    assert settings.smtps_port is not None
    escrow = EscrowServer(
        services=services,
        port=settings.smtp_port,
        smtps_port=settings.smtps_port,
        cafile=cert,
        servers=servers,
        worker=OutboxWorker(services),
    )
    if worker:
        escrow.start_worker()
    try:
        yield escrow
    finally:
        await escrow.close()


@pytest.fixture
async def make_escrow(tmp_path: Path, db_url: str, sink: Sink) -> AsyncIterator[MakeEscrow]:
    """Start an escrow instance with extra ``ESCROW_*`` settings; stopped after the test.

    Every instance of one test shares the data dir and database, like replicas.
    """
    async with contextlib.AsyncExitStack() as stack:

        async def make(*, worker: bool = True, **env: str) -> EscrowServer:
            return await stack.enter_async_context(
                running_escrow(tmp_path / "var", db_url, sink, worker=worker, **env)
            )

        yield make


@pytest.fixture
async def escrow(make_escrow: MakeEscrow) -> EscrowServer:
    """The default instance: one internal domain, worker running, one staff account."""
    server = await make_escrow(ESCROW_INTERNAL_DOMAINS=INTERNAL_DOMAIN)
    await server.add_staff()
    return server


# ---------------------------------------------------------------- database views


async def audit_events(services: Services, action: str | None = None) -> list[AuditEvent]:
    async with services.db.read() as session:
        query = select(AuditEvent).order_by(AuditEvent.seq)
        if action is not None:
            query = query.where(AuditEvent.action == action)
        return list((await session.scalars(query)).all())


async def dump_tables(services: Services) -> dict[str, list[dict[str, Any]]]:
    """Every row of every table, as plain mappings."""
    tables: dict[str, list[dict[str, Any]]] = {}
    async with services.db.read() as session:
        for table in Base.metadata.sorted_tables:
            rows = (await session.execute(select(table))).mappings().all()
            tables[table.name] = [dict(row) for row in rows]
    return tables


async def count_rows(services: Services, table: str) -> int:
    return len((await dump_tables(services))[table])


def leaks(tables: dict[str, list[dict[str, Any]]], needles: Sequence[str]) -> list[str]:
    """``table.column`` names of every value that contains one of ``needles``."""
    found = []
    for name, rows in tables.items():
        for row in rows:
            for column, value in row.items():
                if isinstance(value, bytes | bytearray | memoryview):
                    blob = bytes(value)
                    if any(n.encode() in blob or n.lower().encode() in blob for n in needles):
                        found.append(f"{name}.{column}")
                elif value is not None:
                    text = value if isinstance(value, str) else json.dumps(value, default=str)
                    if any(n.lower() in text.lower() for n in needles):
                        found.append(f"{name}.{column}")
    return found


# ---------------------------------------------------------------- the client (blocking)


def client_context(cafile: Path) -> ssl.SSLContext:
    """Verifies our development certificate (its SAN holds 127.0.0.1)."""
    return ssl.create_default_context(cafile=str(cafile))


def connect(port: int, *, source: str = "127.0.0.1", timeout: float = 30) -> smtplib.SMTP:
    """A plain connection from ``source`` (any 127.0.0.0/8 address works on loopback)."""
    return smtplib.SMTP(
        "127.0.0.1",
        port,
        local_hostname="client.test",
        timeout=timeout,
        source_address=(source, 0),
    )


def secured(port: int, cafile: Path, *, source: str = "127.0.0.1") -> smtplib.SMTP:
    """Connected, EHLO, STARTTLS, EHLO again."""
    client = connect(port, source=source)
    try:
        client.ehlo()
        code, _ = client.starttls(context=client_context(cafile))
        assert code == 220
        client.ehlo()
    except BaseException:
        client.close()
        raise
    return client


def signed_in(
    port: int, cafile: Path, login: str = STAFF_EMAIL, password: str = STAFF_PASSWORD
) -> smtplib.SMTP:
    """Connected over STARTTLS and authenticated."""
    client = secured(port, cafile)
    try:
        client.login(login, password)
    except BaseException:
        client.close()
        raise
    return client


@dataclass(frozen=True)
class Reply:
    code: int
    text: str


def transact(
    client: smtplib.SMTP,
    mail_from: str,
    rcpt_to: Sequence[str],
    data: bytes,
    *,
    mail_options: Sequence[str] = (),
) -> Reply:
    """MAIL, RCPT, DATA on an open session; the first refusal or the final DATA reply."""
    code, text = client.mail(mail_from, list(mail_options))
    if code != 250:
        client.rset()
        return Reply(code, text.decode("utf-8", "replace"))
    for address in rcpt_to:
        code, text = client.rcpt(address)
        if code not in (250, 251):
            client.rset()
            return Reply(code, text.decode("utf-8", "replace"))
    try:
        code, text = client.data(data)
    except smtplib.SMTPDataError as refused:
        return Reply(refused.smtp_code, refused.smtp_error.decode("utf-8", "replace"))
    return Reply(code, text.decode("utf-8", "replace"))


def submit(
    port: int,
    cafile: Path,
    mail_from: str,
    rcpt_to: Sequence[str],
    data: bytes,
    *,
    login: str | None = STAFF_EMAIL,
    password: str = STAFF_PASSWORD,
    tls: bool = True,
    source: str = "127.0.0.1",
    mail_options: Sequence[str] = (),
) -> Reply:
    """One whole submission on a new connection (STARTTLS and AUTH unless told otherwise)."""
    if login is not None:
        client = signed_in(port, cafile, login, password)
    elif tls:
        client = secured(port, cafile, source=source)
    else:
        client = connect(port, source=source)
        client.ehlo()
    try:
        return transact(client, mail_from, rcpt_to, data, mail_options=mail_options)
    finally:
        with contextlib.suppress(smtplib.SMTPException, OSError):
            client.quit()
        client.close()


def simple_message(
    sender: str,
    to: Sequence[str],
    *,
    subject: str = "Session notes",
    body: str = "See you on Thursday.\n",
    message_id: str | None = None,
    headers: dict[str, str] | None = None,
) -> bytes:
    message = EmailMessage(policy=policy.SMTP)
    message["From"] = sender
    message["To"] = ", ".join(to)
    message["Subject"] = subject
    if message_id is not None:
        message["Message-ID"] = message_id
    for name, value in (headers or {}).items():
        message[name] = value
    message.set_content(body)
    return message.as_bytes()


def in_thread(func: Callable[..., Any], *args: Any, **kwargs: Any) -> Awaitable[Any]:
    """Run a blocking client helper off the loop that serves it."""
    return asyncio.to_thread(func, *args, **kwargs)
