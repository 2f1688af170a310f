"""Upgrades keep data: a database made at the first revision ("0001"), with rows of every
kind written in plain SQL against that schema, is upgraded to head (in one jump, and one
revision at a time), and then the schema equals a fresh head schema and the services
read and use the old data. Concurrent upgrades (replicas starting together) are safe.

The SQL below is pinned to the 0001 schema on purpose and never follows the models:
each later migration has to carry these rows forward, which is what this test checks.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import func, inspect, select, text

from escrow import migrate
from escrow.audit import GENESIS, event_hash
from escrow.cpu import BoundedRunner
from escrow.db import Database
from escrow.links import LinkTokens, token_hash
from escrow.models import AuditEvent, Base, Delivery, OutboxJob, Recipient, VaultItem
from escrow.services import Services, build_services
from escrow.settings import Settings
from escrow.vault import Vault
from keys import VaultKeyring
from smtp.worker import OutboxWorker
from tests.conftest import MASTER, fast_hasher

FIRST = "0001"
STAFF = "dr.hale@riverside.example"
ALIAS = "intake@riverside.example"
CLIENT = "ana@clients.example"
PASSWORD = "correct horse battery staple"
CLIENT_PASSPHRASE = "violet kettle mountain radio"
CONTENT = (
    b"From: dr.hale@riverside.example\r\nTo: ana@clients.example\r\nSubject: Before the upgrade\r\n"
    b"Message-ID: <old-1@riverside.example>\r\n\r\nWritten at schema 0001.\r\n"
)
IDS = {
    "staff": "a" * 32,
    "recipient": "b" * 32,
    "message": "c" * 32,
    "vault_item": "d" * 32,
    "delivery": "e" * 32,
    "outbox": "f" * 32,
    "session": "0" * 32,
}


def revisions_after_first() -> list[str]:
    """Every revision after 0001, oldest first."""
    script = ScriptDirectory.from_config(migrate.alembic_config())
    ordered = [r.revision for r in reversed(list(script.walk_revisions()))]
    assert ordered[0] == FIRST
    return ordered[1:]


@dataclass(frozen=True)
class Written:
    fingerprint: str
    audit_events: int


class At0001:
    """Writes rows with the 0001 schema's own column names, in plain SQL."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.now = datetime.now(UTC).replace(microsecond=0)

    def ts(self, moment: datetime) -> Any:
        # SQLAlchemy keeps SQLite timestamps as naive UTC text; PostgreSQL takes timestamptz.
        if self.db.dialect == "sqlite":
            return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")
        return moment

    async def insert(self, sql: str, **values: Any) -> None:
        async with self.db.write() as session:
            await session.execute(text(sql), values)

    async def write(self, keys_dir: Path) -> Written:
        VaultKeyring.initialise(keys_dir, MASTER)
        keyring = VaultKeyring.open(keys_dir, MASTER)
        try:
            vault = Vault(keyring, BoundedRunner(1))
            sealed = vault.seal_sync(CONTENT)
            notice = vault.seal_sync(b'{"token": "from-0001"}')
        finally:
            keyring.close()
        hasher = fast_hasher()
        now, ts = self.now, self.ts
        await self.insert(
            "INSERT INTO staff (id, email, name, role, password_hash, totp_secret, disabled,"
            " failed_logins, locked_until, created_at, last_login_at) VALUES (:id, :email,"
            " 'Dr Hale', 'admin', :hash, NULL, :no, 0, NULL, :at, NULL)",
            id=IDS["staff"],
            email=STAFF,
            hash=hasher.hash_sync(PASSWORD),
            no=False,
            at=ts(now),
        )
        await self.insert(
            "INSERT INTO staff_alias (address, staff_id) VALUES (:address, :staff)",
            address=ALIAS,
            staff=IDS["staff"],
        )
        await self.insert(
            "INSERT INTO recipient (id, email, display_name, passphrase_hash, passphrase_set_at,"
            " access_code_hash, consent_at, failed_attempts, locked_until, created_at) VALUES"
            " (:id, :email, '', :hash, :at, NULL, :at, 0, NULL, :at)",
            id=IDS["recipient"],
            email=CLIENT,
            hash=hasher.hash_sync(CLIENT_PASSPHRASE),
            at=ts(now),
        )
        await self.insert(
            "INSERT INTO message (id, thread_id, direction, sender, staff_id, recipient_id,"
            " parent_id, rfc_message_id, size, created_at, expires_at, revoked_at, revoked_by,"
            " legal_hold, expired_at, purged_at) VALUES (:id, :id, 'outbound', :sender, :staff,"
            " NULL, NULL, '<old-1@riverside.example>', :size, :at, :expires, NULL, NULL, :no,"
            " NULL, NULL)",
            id=IDS["message"],
            sender=STAFF,
            staff=IDS["staff"],
            size=len(CONTENT),
            at=ts(now),
            expires=ts(now + timedelta(days=90)),
            no=False,
        )
        await self.insert(
            "INSERT INTO vault_item (id, message_id, fingerprint, sha256, size, ciphertext,"
            " created_at) VALUES (:id, :message, :fingerprint, :sha256, :size, :ciphertext, :at)",
            id=IDS["vault_item"],
            message=IDS["message"],
            fingerprint=sealed.fingerprint,
            sha256=sealed.sha256,
            size=len(CONTENT),
            ciphertext=sealed.ciphertext,
            at=ts(now),
        )
        link = LinkTokens(MASTER).token_for(IDS["delivery"])
        await self.insert(
            "INSERT INTO delivery (id, message_id, recipient_id, token_hash, status, created_at,"
            " notified_at, opened_at, read_at, replied_at) VALUES (:id, :message, :recipient,"
            " :hash, 'queued', :at, NULL, NULL, NULL, NULL)",
            id=IDS["delivery"],
            message=IDS["message"],
            recipient=IDS["recipient"],
            hash=token_hash(link),
            at=ts(now),
        )
        await self.insert(
            "INSERT INTO outbox (id, kind, message_id, delivery_id, mail_from, rcpt_to, payload,"
            " attempts, next_attempt_at, claimed_until, claimed_by, last_error, created_at,"
            " done_at, outcome) VALUES (:id, 'notification', :message, :delivery, :sender,"
            " :rcpt, :payload, 0, :at, NULL, NULL, NULL, :at, NULL, NULL)",
            id=IDS["outbox"],
            message=IDS["message"],
            delivery=IDS["delivery"],
            sender="secure@riverside.example",
            rcpt=json.dumps([CLIENT]),
            payload=notice.ciphertext,
            at=ts(now),
        )
        await self.insert(
            "INSERT INTO session (id, token_hash, principal_type, principal_id, csrf_secret,"
            " stage, created_at, last_seen_at, expires_at, ended_at, remote_addr, user_agent)"
            " VALUES (:id, :hash, 'recipient', :recipient, :csrf, 'full', :at, :at, :expires,"
            " NULL, '192.0.2.7', 'Mail client')",
            id=IDS["session"],
            hash="9" * 64,
            recipient=IDS["recipient"],
            csrf="8" * 64,
            at=ts(now),
            expires=ts(now + timedelta(hours=8)),
        )
        events = await self.write_audit_chain(
            [
                ("staff.added", "operator", "", None),
                ("message.accepted", "staff", IDS["staff"], IDS["message"]),
                ("passphrase.set", "recipient", IDS["recipient"], IDS["message"]),
            ]
        )
        return Written(fingerprint=sealed.fingerprint, audit_events=events)

    async def write_audit_chain(self, events: list[tuple[str, str, str, str | None]]) -> int:
        prev = GENESIS
        for seq, (action, actor_type, actor_id, message_id) in enumerate(events, start=1):
            event = AuditEvent(
                seq=seq,
                at=self.now + timedelta(seconds=seq),
                actor_type=actor_type,
                actor_id=actor_id,
                action=action,
                message_id=message_id,
                delivery_id=None,
                remote_addr="",
                user_agent="",
                outcome="ok",
                detail="{}",
                prev_hash=prev,
            )
            event.hash = event_hash(event)
            await self.insert(
                "INSERT INTO audit_event (seq, at, actor_type, actor_id, action, message_id,"
                " delivery_id, remote_addr, user_agent, outcome, detail, prev_hash, hash) VALUES"
                " (:seq, :at, :actor_type, :actor_id, :action, :message_id, NULL, '', '', 'ok',"
                " '{}', :prev_hash, :hash)",
                seq=seq,
                at=self.ts(event.at),
                actor_type=actor_type,
                actor_id=actor_id,
                action=action,
                message_id=message_id,
                prev_hash=prev,
                hash=event.hash,
            )
            prev = event.hash
        return len(events)


def _diff(connection: Any) -> list[Any]:
    context = MigrationContext.configure(connection, opts={"compare_type": True})
    return list(compare_metadata(context, Base.metadata))


async def schema_differences(db: Database) -> list[Any]:
    async with db.engine.connect() as conn:
        return await conn.run_sync(_diff)


async def use_the_old_data(services: Services, written: Written) -> None:
    """Every kind of row written at 0001 is read and used through today's services."""
    staff = await services.staff.authenticate(STAFF, PASSWORD)
    assert staff is not None
    assert staff.id == IDS["staff"]
    assert staff.role == "admin"
    assert await services.staff.sender_allowed(staff, ALIAS)

    async with services.db.read() as session:
        item = (
            await session.scalars(select(VaultItem).where(VaultItem.message_id == IDS["message"]))
        ).one()
        recipient = await session.get(Recipient, IDS["recipient"])
        delivery = await session.get(Delivery, IDS["delivery"])
    assert item.fingerprint == written.fingerprint
    assert await services.vault.open_item(item) == CONTENT
    assert recipient is not None
    assert (await services.hasher.check(recipient.passphrase_hash, CLIENT_PASSPHRASE)).ok
    assert delivery is not None
    # The link the worker sends today still finds the delivery made before the upgrade.
    assert delivery.token_hash == token_hash(services.links.token_for(delivery.id))

    verified = await services.audit.verify()
    assert verified.events == written.audit_events

    # The pending notification from before the upgrade is delivered after it.
    assert await OutboxWorker(services).run_once() == 1
    async with services.db.read() as session:
        job = await session.get(OutboxJob, IDS["outbox"])
        delivery = await session.get(Delivery, IDS["delivery"])
        pending = await session.scalar(
            select(func.count()).select_from(OutboxJob).where(OutboxJob.done_at.is_(None))
        )
    assert job is not None
    assert job.outcome == "sent"
    assert delivery is not None
    assert delivery.status == "notified"
    assert pending == 0
    assert len(list(services.settings.mail_capture_dir.glob("*.eml"))) == 1
    assert (await services.audit.verify()).events == written.audit_events + 1


@pytest.mark.parametrize("path", ["one jump", "one revision at a time"])
async def test_data_written_at_0001_survives_the_upgrade_to_head(
    settings: Settings, path: str
) -> None:
    db = Database(settings.database_url)
    try:
        await migrate.upgrade(db, FIRST)
        assert await migrate.current_revision(db) == FIRST
        written = await At0001(db).write(settings.keys_dir)

        if path == "one jump":
            await migrate.upgrade(db)
        else:
            for revision in revisions_after_first():
                await migrate.upgrade(db, revision)
                assert await migrate.current_revision(db) == revision
        assert await migrate.current_revision(db) == migrate.head_revision()
        # The upgraded schema is exactly what a fresh database at head has.
        assert await schema_differences(db) == []
    finally:
        await db.dispose()

    services = build_services(settings, hasher=fast_hasher())
    try:
        await use_the_old_data(services, written)
    finally:
        await services.aclose()


async def test_upgrading_at_head_changes_nothing(settings: Settings) -> None:
    db = Database(settings.database_url)
    try:
        await migrate.upgrade(db, FIRST)
        written = await At0001(db).write(settings.keys_dir)
        await migrate.upgrade(db)
        async with db.engine.connect() as conn:
            tables = await conn.run_sync(lambda c: sorted(inspect(c).get_table_names()))
        await migrate.upgrade(db)
        await migrate.upgrade(db)
        async with db.engine.connect() as conn:
            assert await conn.run_sync(lambda c: sorted(inspect(c).get_table_names())) == tables
    finally:
        await db.dispose()
    services = build_services(settings, hasher=fast_hasher())
    try:
        assert (await services.audit.verify()).events == written.audit_events
    finally:
        await services.aclose()


REPLICAS = 4


async def test_replicas_starting_together_upgrade_once(db_url: str) -> None:
    """Several processes (here: engines, each with its own connections) run the start-up
    upgrade at the same moment on an empty database. All succeed, quickly, and the schema
    is at head exactly once.

    On SQLite this once failed one run in twenty: the first connections to a brand-new
    file race to switch it to WAL while another already writes, and the loser waits out
    the 30 s busy timeout and fails with "database is locked". The migration lock is now
    taken before the first connection (see the next test)."""
    databases = [Database(db_url) for _ in range(REPLICAS)]
    try:
        await asyncio.gather(*(migrate.upgrade(db) for db in databases))
        for db in databases:
            assert await migrate.current_revision(db) == migrate.head_revision()
        assert await schema_differences(databases[0]) == []
        async with databases[0].read() as session:
            versions = (
                await session.execute(text("SELECT version_num FROM alembic_version"))
            ).all()
        assert [v[0] for v in versions] == [migrate.head_revision()]
    finally:
        for db in databases:
            await db.dispose()


@asynccontextmanager
async def migration_lock_held_elsewhere(db_url: str) -> AsyncIterator[None]:
    """Hold the migration lock the way another process would, until the block ends."""
    lock_file = migrate.sqlite_lock_file(db_url)
    if lock_file is not None:
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            yield
        finally:
            os.close(fd)
        return
    conn = await asyncpg.connect(db_url.replace("postgresql+asyncpg://", "postgresql://", 1))
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", migrate.PG_MIGRATION_LOCK_KEY)
        yield
    finally:
        await conn.close()


async def _tables(db_url: str) -> set[str]:
    if db_url.startswith("sqlite"):
        database = Path(db_url.split("///", 1)[1])
        if not database.exists():
            return set()
    db = Database(db_url)
    try:
        async with db.engine.connect() as conn:
            return set(await conn.run_sync(lambda c: inspect(c).get_table_names()))
    finally:
        await db.dispose()


async def test_an_upgrade_waits_while_another_process_migrates(db_url: str) -> None:
    """While the migration lock is held elsewhere, an upgrade touches nothing (on SQLite
    it does not even open the database file); once it is released, the upgrade runs."""
    db = Database(db_url)
    try:
        async with migration_lock_held_elsewhere(db_url):
            waiting = asyncio.create_task(migrate.upgrade(db))
            # Not synchronisation: with the lock held the upgrade cannot finish however
            # long we look; the second only bounds how long a missing lock takes to show.
            done, _ = await asyncio.wait({waiting}, timeout=1.0)
            assert not done, "the upgrade ran while another process held the migration lock"
            assert await _tables(db_url) == set()
        await waiting
        assert await migrate.current_revision(db) == migrate.head_revision()
    finally:
        await db.dispose()
