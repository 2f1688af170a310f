"""The ``escrow`` command: the one composition root.

It alone imports ``smtp/`` and ``web/``, to start them. Exit codes: 0 success,
1 a check failed, 2 a usage or configuration error (one line that names the
setting and how to fix it; never a traceback).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import logging
import os
import signal
import socket
import sys
import warnings
from collections.abc import Awaitable, Callable, Iterator, Sequence
from datetime import datetime
from typing import TextIO

import uvicorn
import uvloop
from cryptography.utils import CryptographyDeprecationWarning
from sqlalchemy.exc import DBAPIError, OperationalError

from escrow import migrate
from escrow.audit import Actor
from escrow.db import Database
from escrow.devcert import ensure_dev_certificate
from escrow.errors import AuditChainBroken, EscrowError, SettingsError, StaffError
from escrow.logs import configure_logging
from escrow.memory import freeze_start_up_objects, return_large_blocks_to_the_system
from escrow.production import check_smtp_certificate, smtp_certificate
from escrow.services import Services, build_services, resolve_master_passphrase
from escrow.settings import Settings, load_settings
from keys import KeysError, VaultKeyring
from smtp.server import start_smtp
from smtp.tls import server_context
from smtp.worker import OutboxWorker
from web.app import create_app

log = logging.getLogger("escrow")

EXIT_OK, EXIT_CHECK_FAILED, EXIT_USAGE = 0, 1, 2


def operator() -> Actor:
    """The person at the command line, as an audit actor."""
    try:
        name = getpass.getuser()
    except (KeyError, OSError):
        name = "unknown"
    return Actor("operator", id=name, remote_addr="cli")


def read_secret(prompt: str, *, from_stdin: bool, confirm: bool = True) -> str:
    if from_stdin:
        value = sys.stdin.readline().rstrip("\r\n")
    else:
        value = getpass.getpass(prompt)
        if confirm and getpass.getpass("Again: ") != value:
            raise StaffError("the two entries differ")
    if not value:
        raise StaffError("an empty value was given")
    return value


# ---------------------------------------------------------------- init / db


async def cmd_init(settings: Settings, _args: argparse.Namespace) -> int:
    """Create the data dir, run migrations, create the vault key if none. Idempotent."""
    settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    passphrase = resolve_master_passphrase(settings, create=True)
    created = VaultKeyring.initialise(settings.keys_dir, passphrase)
    if created:
        print(f"vault key created: {created}")
    else:
        print(f"vault key present: {VaultKeyring.describe(settings.keys_dir)[0].fingerprint}")
    db = Database(settings.database_url)
    try:
        await migrate.upgrade(db)
        print(f"database at revision {await migrate.current_revision(db)}")
    finally:
        await db.dispose()
    if settings.tls_cert is None and settings.is_production and not settings.allow_self_signed:
        print("no SMTP certificate yet: set ESCROW_TLS_CERT and ESCROW_TLS_KEY before serving SMTP")
    elif settings.tls_cert is None:
        cert, _key = ensure_dev_certificate(settings.data_dir / "tls", settings.smtp_hostname)
        print(
            f"development TLS certificate: {cert} (self-signed; set ESCROW_TLS_CERT for real use)"
        )
    return EXIT_OK


async def cmd_db_upgrade(settings: Settings, _args: argparse.Namespace) -> int:
    db = Database(settings.database_url)
    try:
        before = await migrate.current_revision(db)
        await migrate.upgrade(db)
        after = await migrate.current_revision(db)
    finally:
        await db.dispose()
    print(f"database revision {before or 'empty'} -> {after}")
    return EXIT_OK


# ---------------------------------------------------------------- staff


async def cmd_staff_add(services: Services, args: argparse.Namespace) -> int:
    password = read_secret("Password: ", from_stdin=args.password_stdin)
    staff = await services.staff.add(
        args.email, password, name=args.name or "", admin=args.admin, actor=operator()
    )
    print(f"added {staff.email} ({staff.role}), id {staff.id}")
    return EXIT_OK


async def cmd_staff_list(services: Services, _args: argparse.Namespace) -> int:
    rows = await services.staff.list()
    print(f"{'email':40} {'name':24} {'role':6} state")
    for staff in rows:
        print(
            f"{staff.email:40} {staff.name[:24]:24} {staff.role:6} "
            f"{'disabled' if staff.disabled else 'active'}"
        )
    return EXIT_OK


async def cmd_staff_disable(services: Services, args: argparse.Namespace) -> int:
    staff = await services.staff.disable(args.email, actor=operator())
    print(f"disabled {staff.email}")
    return EXIT_OK


async def _staff_id(services: Services, email: str) -> str:
    staff = await services.staff_security.find(email)
    if staff is None:
        raise StaffError(f"no staff account for {email.strip().lower()}")
    return staff.id


async def cmd_staff_app_password_add(services: Services, args: argparse.Namespace) -> int:
    """Create an SMTP app password and print it, once."""
    staff_id = await _staff_id(services, args.email)
    info, secret = await services.staff_security.create_app_password(
        staff_id, args.name, actor=operator()
    )
    print(f"app password {info.name!r} for {args.email.strip().lower()} (shown only now):")
    print(secret)
    return EXIT_OK


async def cmd_staff_app_password_list(services: Services, args: argparse.Namespace) -> int:
    staff_id = await _staff_id(services, args.email)
    print(f"{'name':32} {'created':17} {'last used':17} state")
    for info in await services.staff_security.list_app_passwords(staff_id):
        used = f"{info.last_used_at:%Y-%m-%d %H:%M}Z" if info.last_used_at else "never"
        state = f"revoked {info.revoked_at:%Y-%m-%d}" if info.revoked_at else "live"
        print(f"{info.name[:32]:32} {info.created_at:%Y-%m-%d %H:%M}Z {used:17} {state}")
    return EXIT_OK


async def cmd_staff_app_password_revoke(services: Services, args: argparse.Namespace) -> int:
    staff_id = await _staff_id(services, args.email)
    wanted = " ".join(args.name.split()).casefold()
    live = [
        info
        for info in await services.staff_security.list_app_passwords(staff_id)
        if info.live and info.name.casefold() == wanted
    ]
    if not live:
        raise StaffError(f"no app password named {args.name!r} in use")
    for info in live:
        await services.staff_security.revoke_app_password(staff_id, info.id, actor=operator())
    print(f"revoked app password {live[0].name!r}")
    return EXIT_OK


async def cmd_staff_reset_totp(services: Services, args: argparse.Namespace) -> int:
    """Remove a staff member's second factor; their next console sign-in enrols a new one."""
    staff_id = await _staff_id(services, args.email)
    await services.staff_security.reset_second_factor(staff_id, actor=operator())
    print(f"second factor removed for {args.email.strip().lower()}: they enrol again at sign-in")
    return EXIT_OK


async def cmd_staff_unlock(services: Services, args: argparse.Namespace) -> int:
    """Lift a staff lock after failed sign-in attempts."""
    staff_id = await _staff_id(services, args.email)
    await services.staff_security.unlock(staff_id, actor=operator())
    print(f"unlocked {args.email.strip().lower()}")
    return EXIT_OK


# ---------------------------------------------------------------- recipients


async def cmd_recipient_reset(services: Services, args: argparse.Namespace) -> int:
    """Clear a recipient's passphrase and lock and end their sessions; messages stay readable."""
    recipient = await services.portal.recipients.reset(args.email, operator())
    print(
        f"reset {recipient.email}: their next link asks for a new passphrase "
        "(set a first-access code with `escrow recipient set-code` to require one first)"
    )
    return EXIT_OK


async def cmd_recipient_set_code(services: Services, args: argparse.Namespace) -> int:
    """Set the first-access code asked for before the recipient chooses a passphrase."""
    code = read_secret("First-access code: ", from_stdin=args.code_stdin)
    try:
        recipient = await services.portal.recipients.set_code(args.email, code, operator())
    except ValueError as exc:
        print(f"escrow: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(f"first-access code set for {recipient.email}")
    return EXIT_OK


async def cmd_recipient_unlock(services: Services, args: argparse.Namespace) -> int:
    """Lift a lock after failed sign-in attempts."""
    recipient = await services.portal.recipients.unlock(args.email, operator())
    print(f"unlocked {recipient.email}")
    return EXIT_OK


# ---------------------------------------------------------------- keys


async def cmd_keys_list(settings: Settings, _args: argparse.Namespace) -> int:
    for info in VaultKeyring.describe(settings.keys_dir):
        state = "active" if info.active else "retired"
        print(f"{info.fingerprint}  {info.algorithm}  {info.created:%Y-%m-%d %H:%M}Z  {state}")
    return EXIT_OK


async def cmd_keys_rotate(services: Services, _args: argparse.Namespace) -> int:
    old = services.keyring.active_fingerprint
    new = services.keyring.rotate()
    await services.audit.log("keys.rotated", operator(), detail={"old": old, "new": new})
    print(
        f"new active vault key {new}; {old} kept for older items. Running servers seal to "
        "the new key within 30 seconds. Back up the keys directory now."
    )
    return EXIT_OK


async def cmd_keys_export_public(services: Services, _args: argparse.Namespace) -> int:
    sys.stdout.write(services.keyring.export_public())
    return EXIT_OK


# ---------------------------------------------------------------- audit


async def cmd_audit_verify(services: Services, _args: argparse.Namespace) -> int:
    try:
        result = await services.audit.verify()
    except AuditChainBroken as broken:
        print(f"audit chain BROKEN at event {broken.seq}: {broken.reason}")
        return EXIT_CHECK_FAILED
    print(f"audit chain intact: {result.events} events, last {result.last_seq}")
    return EXIT_OK


def _since(value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise SettingsError(
            f"--since {value!r} is not an ISO 8601 time like 2026-01-31T00:00Z"
        ) from None
    if moment.tzinfo is None:
        raise SettingsError(f"--since {value!r} needs a time zone, e.g. 2026-01-31T00:00Z")
    return moment


async def cmd_audit_export(
    services: Services, args: argparse.Namespace, out: TextIO = sys.stdout
) -> int:
    since = _since(args.since)
    if args.message is not None and len(args.message) > 32:
        raise SettingsError(f"--message {args.message!r} is not a message id (32 hex digits)")
    count = 0
    async for chunk in services.audit.export(args.format, since=since, message_id=args.message):
        out.write(chunk)
        count += 1
    out.flush()
    await services.audit.log(
        "audit.exported",
        operator(),
        message_id=args.message,
        detail={"format": args.format, "since": args.since, "chunks": count},
    )
    return EXIT_OK


# ---------------------------------------------------------------- retention


async def cmd_purge(services: Services, _args: argparse.Namespace) -> int:
    """Apply retention now: expire messages past their TTL, purge content past retention."""
    report = await services.lifecycle.apply_retention()
    print(
        f"expired {report.expired} messages; purged the content of {report.purged} messages "
        f"(older than {services.settings.vault_retention_days} days, none on legal hold)"
    )
    return EXIT_OK


# ---------------------------------------------------------------- serve


class _Uvicorn(uvicorn.Server):
    """uvicorn without its own signal handling: :func:`serve` owns SIGTERM and SIGINT."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def listen(host: str, port: int, setting: str) -> socket.socket:
    """A bound, listening TCP socket, or a SettingsError that says which setting to change."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=512)
    except OSError as exc:
        raise SettingsError(
            f"cannot listen on {host}:{port} ({exc.strerror}); is another server running? "
            f"change {setting}"
        ) from None


async def serve(
    services: Services, *, web: bool = True, smtp: bool = True, worker: bool = True
) -> None:
    """Run the chosen parts on one event loop until SIGTERM or SIGINT, then stop them cleanly."""
    settings = services.settings
    return_large_blocks_to_the_system()
    # Refuse a bad certificate (SettingsError) before anything listens.
    tls = server_context(*smtp_certificate(settings)) if smtp else None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    tasks: list[asyncio.Task[None]] = []
    web_server: _Uvicorn | None = None
    if web:
        config = uvicorn.Config(
            create_app(services),
            host=settings.web_host,
            port=settings.web_port,
            log_config=None,
            access_log=False,
            server_header=False,
            # Client address and scheme from X-Forwarded-* only when a trusted proxy sent them.
            proxy_headers=bool(settings.trusted_proxies),
            forwarded_allow_ips=list(settings.trusted_proxies),
            lifespan="on",
        )
        web_socket = listen(settings.web_host, settings.web_port, "ESCROW_WEB_PORT")
        web_server = _Uvicorn(config)
        tasks.append(asyncio.create_task(web_server.serve(sockets=[web_socket]), name="web"))
        log.info("web listening on http://%s:%d", settings.web_host, settings.web_port)
    smtp_servers: list[asyncio.Server] = []
    if tls is not None:
        try:
            smtp_servers = await start_smtp(services, tls)
        except OSError as exc:
            raise SettingsError(
                f"cannot listen for SMTP on {settings.smtp_host}:{settings.smtp_port}"
                f"{f' or {settings.smtps_port}' if settings.smtps_port else ''} ({exc.strerror}); "
                "is another server running? change ESCROW_SMTP_PORT / ESCROW_SMTPS_PORT"
            ) from None
    if worker:
        tasks.append(asyncio.create_task(OutboxWorker(services).run(stop), name="worker"))
        # Retention runs with the worker: now, then hourly (every replica may; runs are safe together).
        tasks.append(
            asyncio.create_task(services.lifecycle.run_periodically(stop), name="retention")
        )
        if settings.smarthost is None:
            log.warning(
                "DEVELOPMENT: no ESCROW_SMARTHOST; outgoing mail is written to %s",
                settings.mail_capture_dir,
            )
    log.debug("%d start-up objects exempt from garbage collection", freeze_start_up_objects())
    stopper: asyncio.Task[object] = asyncio.create_task(stop.wait(), name="stop")
    done, _pending = await asyncio.wait([stopper, *tasks], return_when=asyncio.FIRST_COMPLETED)
    log.info("stopping")
    stop.set()
    for server in smtp_servers:
        server.close()
    if web_server is not None:
        web_server.should_exit = True
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task
    stopper.cancel()
    for server in smtp_servers:
        await server.wait_closed()
    for finished in done:
        error = None if finished is stopper else finished.exception()
        if error is not None:
            raise error
    log.info("stopped")


async def cmd_serve(services: Services, args: argparse.Namespace) -> int:
    if not args.no_smtp:
        check_smtp_certificate(services.settings)  # before touching the database
    await migrate.upgrade(services.db)
    await serve(services, web=not args.no_web, smtp=not args.no_smtp, worker=not args.no_worker)
    return EXIT_OK


# ---------------------------------------------------------------- plumbing

SettingsCommand = Callable[[Settings, argparse.Namespace], Awaitable[int]]
ServicesCommand = Callable[[Services, argparse.Namespace], Awaitable[int]]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="escrow", description="Secure-email escrow server")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(
        name: str,
        help_text: str,
        parent: argparse._SubParsersAction[argparse.ArgumentParser] = sub,
        *,
        settings_only: SettingsCommand | None = None,
        services: ServicesCommand | None = None,
    ) -> argparse.ArgumentParser:
        cmd = parent.add_parser(name, help=help_text, description=help_text)
        cmd.set_defaults(settings_only=settings_only, services=services)
        return cmd

    add(
        "init",
        "create the data directory, run migrations, create the vault key",
        settings_only=cmd_init,
    )
    serve_cmd = add(
        "serve", "run the SMTP listeners, web server and outbox worker", services=cmd_serve
    )
    serve_cmd.add_argument("--no-smtp", action="store_true")
    serve_cmd.add_argument("--no-web", action="store_true")
    serve_cmd.add_argument("--no-worker", action="store_true")

    staff = sub.add_parser("staff", help="staff accounts").add_subparsers(dest="sub", required=True)
    staff_add = add("add", "create a staff account", staff, services=cmd_staff_add)
    staff_add.add_argument("email")
    staff_add.add_argument("--name")
    staff_add.add_argument("--admin", action="store_true")
    staff_add.add_argument(
        "--password-stdin", action="store_true", help="read the password from stdin"
    )
    add("list", "list staff accounts", staff, services=cmd_staff_list)
    add("disable", "disable a staff account", staff, services=cmd_staff_disable).add_argument(
        "email"
    )
    app_passwords = staff.add_parser(
        "app-password", help="SMTP app passwords (one per mail client)"
    ).add_subparsers(dest="app_password", required=True)
    app_add = add(
        "add",
        "create an app password and print it once",
        app_passwords,
        services=cmd_staff_app_password_add,
    )
    app_add.add_argument("email")
    app_add.add_argument("name", help='the mail client or device, e.g. "iPhone"')
    add(
        "list", "list app passwords", app_passwords, services=cmd_staff_app_password_list
    ).add_argument("email")
    app_revoke = add(
        "revoke", "revoke an app password", app_passwords, services=cmd_staff_app_password_revoke
    )
    app_revoke.add_argument("email")
    app_revoke.add_argument("name")
    add(
        "reset-totp", "remove a staff second factor", staff, services=cmd_staff_reset_totp
    ).add_argument("email")
    add(
        "unlock", "lift a staff lock after failed sign-ins", staff, services=cmd_staff_unlock
    ).add_argument("email")

    recipient = sub.add_parser("recipient", help="recipients (clients)").add_subparsers(
        dest="sub", required=True
    )
    add(
        "reset", "clear a recipient's passphrase and lock", recipient, services=cmd_recipient_reset
    ).add_argument("email")
    set_code = add(
        "set-code",
        "set a first-access code the recipient must give before choosing a passphrase",
        recipient,
        services=cmd_recipient_set_code,
    )
    set_code.add_argument("email")
    set_code.add_argument("--code-stdin", action="store_true", help="read the code from stdin")
    add(
        "unlock", "lift a lock after failed attempts", recipient, services=cmd_recipient_unlock
    ).add_argument("email")

    keys = sub.add_parser("keys", help="vault keys").add_subparsers(dest="sub", required=True)
    add("list", "list vault keys", keys, settings_only=cmd_keys_list)
    add("rotate", "make a new active vault key", keys, services=cmd_keys_rotate)
    add("export-public", "print the active public key", keys, services=cmd_keys_export_public)

    audit = sub.add_parser("audit", help="audit log").add_subparsers(dest="sub", required=True)
    add("verify", "check the hash chain", audit, services=cmd_audit_verify)
    export = add(
        "export", "write audit events to standard output", audit, services=cmd_audit_export
    )
    export.add_argument("--format", choices=("jsonl", "csv"), default="jsonl")
    export.add_argument("--since", metavar="ISO8601")
    export.add_argument("--message", metavar="ID")

    db = sub.add_parser("db", help="database").add_subparsers(dest="sub", required=True)
    add("upgrade", "run pending migrations", db, settings_only=cmd_db_upgrade)
    add(
        "purge",
        "apply retention now: expire messages past their TTL, purge content past retention",
        services=cmd_purge,
    )
    return p


async def _run(settings: Settings, args: argparse.Namespace) -> int:
    if args.settings_only is not None:
        return int(await args.settings_only(settings, args))
    services = build_services(settings)
    try:
        return int(await args.services(services, args))
    finally:
        await services.aclose()


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    # Third-party deprecation notices are for us, not for the operator's terminal.
    # PGPy 0.6.0 looks up ciphers that cryptography has moved to `decrepit` (we use AES only).
    warnings.filterwarnings("ignore", category=CryptographyDeprecationWarning)
    # Everything the server writes (database, keys, captured mail) is private to its user.
    os.umask(0o077)
    try:
        settings = load_settings()
    except SettingsError as exc:
        print(f"escrow: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    configure_logging(settings.log_level, settings.log_format)
    try:
        # uvloop: the SMTP and HTTP protocol handling is loop-bound (see bench/intake.py).
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(_run(settings, args))
    except SettingsError as exc:
        print(f"escrow: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (OperationalError, DBAPIError, OSError) as exc:
        print(
            f"escrow: cannot use the database or data directory ({type(exc).__name__}); "
            "check ESCROW_DATABASE_URL and ESCROW_DATA_DIR",
            file=sys.stderr,
        )
        return EXIT_USAGE
    except KeysError as exc:
        print(f"escrow: vault keys: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (StaffError, EscrowError) as exc:
        print(f"escrow: {exc}", file=sys.stderr)
        return EXIT_CHECK_FAILED
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
