"""A ``250`` is a promise: kill the server mid-stream, restart it, and every accepted message is announced.

The server runs as the operator runs it (``escrow init``, ``escrow staff add
--password-stdin``, ``escrow serve``) in a subprocess; the smarthost sink runs
in this process. Several clients send at once; the server gets SIGKILL while
they do.
"""

from __future__ import annotations

import asyncio
import os
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import threading
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select, update

from escrow.db import Database
from escrow.models import Delivery, Message, OutboxJob, Recipient, VaultItem, utcnow
from tests.smtp.conftest import (
    STAFF_EMAIL,
    STAFF_PASSWORD,
    Sink,
    escrow_environ,
    eventually_sync,
    signed_in,
    simple_message,
)

CLIENT_THREADS = 6
MESSAGES_PER_CLIENT = 12
KILL_AFTER_ACCEPTED = 15


def escrow_command(*args: str) -> list[str]:
    script = Path(sys.executable).with_name("escrow")
    if script.exists():
        return [str(script), *args]
    return [sys.executable, "-m", "escrow.cli", *args]


def process_environ(settings_env: dict[str, str]) -> dict[str, str]:
    """This process's environment without any ESCROW_* of the developer's, plus the test's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ESCROW_")}
    env.update(settings_env)
    env["ESCROW_LOG_LEVEL"] = "INFO"
    # An https public URL means production; the test runs on the development certificate.
    env["ESCROW_ALLOW_SELF_SIGNED"] = "true"
    return env


def run(env: dict[str, str], cwd: Path, *args: str, stdin: str | None = None) -> str:
    done = subprocess.run(
        escrow_command(*args),
        env=env,
        cwd=cwd,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, f"escrow {' '.join(args)}: {done.stdout}{done.stderr}"
    return done.stdout


def smtp_ready(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as probe:
            return probe.recv(3) == b"220"
    except OSError:
        return False


class Server:
    """``escrow serve --no-web`` in a subprocess, its log in a file."""

    def __init__(self, env: dict[str, str], cwd: Path, log: Path) -> None:
        self.env, self.cwd, self.log = env, cwd, log
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        port = int(self.env["ESCROW_SMTP_PORT"])
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                escrow_command("serve", "--no-web"),
                env=self.env,
                cwd=self.cwd,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        eventually_sync(
            lambda: self._alive() and smtp_ready(port), timeout=60, what="escrow serve to listen"
        )

    def _alive(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            pytest.fail(f"escrow serve exited:\n{self.log.read_text(errors='replace')}")
        return True

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(30)


class Ledger:
    """What each client was told, per message (keyed by its unique recipient)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.accepted: set[str] = set()
        self.refused: dict[str, int] = {}
        self.unanswered: set[str] = set()

    def count_accepted(self) -> int:
        with self.lock:
            return len(self.accepted)


def client(number: int, port: int, cafile: Path, ledger: Ledger) -> None:
    """Send messages on one connection until done or the server goes away."""
    try:
        session = signed_in(port, cafile)
    except (OSError, smtplib.SMTPException):
        return
    try:
        for i in range(MESSAGES_PER_CLIENT):
            recipient = f"client{number}-{i}@example.net"
            data = simple_message(STAFF_EMAIL, [recipient], subject=f"Session {number}/{i}")
            try:
                session.sendmail(STAFF_EMAIL, [recipient], data)
            except (smtplib.SMTPRecipientsRefused, smtplib.SMTPDataError) as refused:
                code = getattr(refused, "smtp_code", 0)
                with ledger.lock:
                    ledger.refused[recipient] = code
            except (OSError, smtplib.SMTPException, ssl.SSLError):
                with ledger.lock:
                    ledger.unanswered.add(recipient)
                return
            else:
                with ledger.lock:
                    ledger.accepted.add(recipient)
    finally:
        session.close()


async def expire_leases(db_url: str) -> None:
    db = Database(db_url)
    try:
        async with db.write() as session:
            await session.execute(
                update(OutboxJob)
                .where(OutboxJob.done_at.is_(None), OutboxJob.claimed_until.is_not(None))
                .values(claimed_until=utcnow() - timedelta(seconds=1))
            )
    finally:
        await db.dispose()


async def stored_state(db_url: str) -> dict[str, object]:
    db = Database(db_url)
    try:
        async with db.read() as session:
            messages = (await session.scalars(select(Message.id))).all()
            items = dict(
                (
                    await session.execute(
                        select(VaultItem.message_id, func.count()).group_by(VaultItem.message_id)
                    )
                ).all()
            )
            with_ciphertext = set(
                (
                    await session.scalars(
                        select(VaultItem.message_id).where(VaultItem.ciphertext.is_not(None))
                    )
                ).all()
            )
            deliveries = (
                await session.execute(
                    select(Delivery.id, Delivery.message_id, Recipient.email).join(
                        Recipient, Recipient.id == Delivery.recipient_id
                    )
                )
            ).all()
            notification_jobs = dict(
                (
                    await session.execute(
                        select(OutboxJob.delivery_id, func.count())
                        .where(OutboxJob.kind == "notification")
                        .group_by(OutboxJob.delivery_id)
                    )
                ).all()
            )
    finally:
        await db.dispose()
    return {
        "messages": list(messages),
        "items": items,
        "with_ciphertext": with_ciphertext,
        "deliveries": [tuple(row) for row in deliveries],
        "notification_jobs": notification_jobs,
    }


@pytest.mark.slow
def test_every_accepted_message_is_announced_after_a_kill(
    tmp_path: Path, db_url: str, sink: Sink
) -> None:
    env = process_environ(escrow_environ(tmp_path / "var", db_url, sink))
    port = int(env["ESCROW_SMTP_PORT"])
    run(env, tmp_path, "init")
    run(env, tmp_path, "staff", "add", STAFF_EMAIL, "--password-stdin", stdin=STAFF_PASSWORD + "\n")
    cafile = tmp_path / "var" / "tls" / "dev-cert.pem"
    server = Server(env, tmp_path, tmp_path / "serve.log")
    ledger = Ledger()
    try:
        server.start()
        assert cafile.is_file()
        threads = [
            threading.Thread(target=client, args=(n, port, cafile, ledger), daemon=True)
            for n in range(CLIENT_THREADS)
        ]
        for thread in threads:
            thread.start()
        eventually_sync(
            lambda: ledger.count_accepted() >= KILL_AFTER_ACCEPTED,
            timeout=60,
            what=f"{KILL_AFTER_ACCEPTED} accepted messages",
        )
        server.kill()
        for thread in threads:
            thread.join(60)
            assert not thread.is_alive()

        accepted = set(ledger.accepted)
        total = CLIENT_THREADS * MESSAGES_PER_CLIENT
        assert len(accepted) >= KILL_AFTER_ACCEPTED
        assert len(accepted) < total, "the kill came after every message was sent"
        assert ledger.refused == {}

        # Jobs the killed worker had leased wait for the lease to run out (minutes, by
        # design, since another replica may hold them); let it run out now.
        asyncio.run(expire_leases(db_url))
        server.start()
        eventually_sync(
            lambda: accepted <= {r for m in sink.received() for r in m.rcpt_tos},
            timeout=90,
            what="a notification for every accepted message",
        )
    finally:
        server.stop()

    state = asyncio.run(stored_state(db_url))
    messages = state["messages"]
    items = state["items"]
    deliveries = state["deliveries"]
    jobs = state["notification_jobs"]
    assert isinstance(messages, list) and isinstance(items, dict)
    assert isinstance(deliveries, list) and isinstance(jobs, dict)
    # Nothing half-stored: each message has its one vault item, its delivery and its job.
    assert len(messages) >= len(accepted)
    for message_id in messages:
        assert items.get(message_id) == 1, message_id
        assert message_id in state["with_ciphertext"]  # type: ignore[operator]
    by_message: dict[str, list[str]] = {}
    for delivery_id, message_id, email in deliveries:
        by_message.setdefault(message_id, []).append(email)
        assert jobs.get(delivery_id) == 1, delivery_id
    assert sorted(by_message) == sorted(messages)
    assert all(len(emails) == 1 for emails in by_message.values())
    assert accepted <= {emails[0] for emails in by_message.values()}
