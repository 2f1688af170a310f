"""Backup and restore, exactly as deploy/README.md tells an operator to do them.

An instance with staff, messages (sealed under two vault keys: one rotation), delivered
notifications and audit events is backed up: the database (``pg_dump -Fc``, or SQLite's
``VACUUM INTO``) and the keys directory (``tar``), with the master passphrase kept apart.
Restored into an empty database and a new keys directory, services built with the same
passphrase read every message back byte for byte, the links in the notifications sent
before the backup still open the messages for their recipients, and the audit chain
verifies. Runs on SQLite and on PostgreSQL (``db_url``).
"""

from __future__ import annotations

import asyncio
import base64
import re
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from escrow.audit import Actor
from escrow.cpu import BoundedRunner
from escrow.errors import VaultIntegrityError
from escrow.intake import Submission
from escrow.models import VaultItem
from escrow.recipients import LinkTarget
from escrow.services import Services, build_services
from escrow.settings import Settings, load_settings
from escrow.vault import Vault
from keys import VaultKeyring
from smtp.worker import OutboxWorker
from tests.conftest import MASTER, PG_ADMIN_DSN, _pg_admin, fast_hasher, make_environ, require

STAFF = "dr.hale@riverside.example"
PASSWORD = "correct horse battery staple"
OPERATOR = Actor("operator", id="tests")
CLIENT = Actor("recipient", remote_addr="198.51.100.7", user_agent="Browser")


def libpq(url: str) -> str:
    """The SQLAlchemy URL as a libpq connection string for the PostgreSQL client tools."""
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)


@pytest.fixture
def restore_target(db_url: str, tmp_path: Path) -> Iterator[str]:
    """An empty database of the same kind as ``db_url``: the restore target."""
    if not db_url.startswith("postgresql"):
        (tmp_path / "restored" / "var").mkdir(parents=True)
        yield f"sqlite+aiosqlite:///{tmp_path / 'restored' / 'var' / 'escrow.db'}"
        return
    name = f"escrow_r_{secrets.token_hex(6)}"
    asyncio.run(_pg_admin(f'CREATE DATABASE "{name}"'))
    base = PG_ADMIN_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://", 1)
    try:
        yield f"{base}/{name}"
    finally:
        asyncio.run(_pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def mime(n: int) -> bytes:
    """A message with a binary attachment: every byte must come back."""
    attachment = bytes(range(256)) * 4 + secrets.token_bytes(64)
    encoded = base64.encodebytes(attachment).decode().replace("\n", "\r\n")
    return (
        f"From: {STAFF}\r\nTo: client{n}@clients.example\r\nSubject: Session {n}\r\n"
        f"Message-ID: <backup-{n}@riverside.example>\r\nMIME-Version: 1.0\r\n"
        'Content-Type: multipart/mixed; boundary="b"\r\n\r\n'
        f'--b\r\nContent-Type: text/plain; charset="utf-8"\r\n\r\nNotes for session {n}: ü\r\n'
        f'--b\r\nContent-Type: application/octet-stream\r\nContent-Disposition: attachment; filename="f{n}.bin"\r\n'
        f"Content-Transfer-Encoding: base64\r\n\r\n{encoded}--b--\r\n"
    ).encode()


async def populate(services: Services) -> dict[str, bytes]:
    """Staff, three messages (the last under a rotated key), notifications sent, audit events."""
    staff = await services.staff.add(STAFF, PASSWORD, name="Dr Hale", actor=OPERATOR)
    originals: dict[str, bytes] = {}
    for n in range(3):
        if n == 2:
            services.keyring.rotate()
            await services.audit.log("keys.rotated", OPERATOR)
        content = mime(n)
        accepted = await services.intake.accept(
            Submission(
                mail_from=STAFF,
                recipients=[f"client{n}@clients.example"],
                content=content,
                staff_id=staff.id,
                remote_addr="192.0.2.10",
            )
        )
        assert accepted.message_id is not None
        originals[accepted.message_id] = content
    assert await OutboxWorker(services).run_once() == 3
    return originals


def back_up_database(settings: Settings, backup: Path) -> Path:
    """deploy/README.md, "Back up": the database."""
    if settings.database_url.startswith("postgresql"):
        require(shutil.which("pg_dump") is not None, "pg_dump (PostgreSQL client) is not installed")
        dump = backup / "escrow.dump"
        with dump.open("wb") as out:
            subprocess.run(
                ["pg_dump", "-Fc", "-d", libpq(settings.database_url)], stdout=out, check=True
            )
        return dump
    # SQLite: a consistent copy while the server runs (WAL mode), without the sqlite3 tool.
    copy = backup / "escrow.db"
    database = settings.database_url.split("///", 1)[1]
    subprocess.run(
        [
            sys.executable,
            "-c",
            f"import sqlite3; sqlite3.connect('{database}').execute(\"VACUUM INTO '{copy}'\")",
        ],
        check=True,
    )
    return copy


def restore_database(dump: Path, target_url: str) -> None:
    """deploy/README.md, "Restore": into an empty database."""
    if target_url.startswith("postgresql"):
        require(shutil.which("pg_restore") is not None, "pg_restore is not installed")
        with dump.open("rb") as source:
            subprocess.run(
                ["pg_restore", "--clean", "--if-exists", "--no-owner", "-d", libpq(target_url)],
                stdin=source,
                check=True,
            )
    else:
        shutil.copyfile(dump, target_url.split("///", 1)[1])


async def read_everything(services: Services, originals: dict[str, bytes]) -> None:
    async with services.db.read() as session:
        items = (
            await session.scalars(select(VaultItem).where(VaultItem.message_id.in_(originals)))
        ).all()
    assert len(items) == len(originals)
    assert len({item.fingerprint for item in items}) == 2  # sealed under both keys
    for item in items:
        assert item.message_id is not None
        assert await services.vault.open_item(item) == originals[item.message_id]


def links_sent(services: Services) -> list[str]:
    """The link tokens of the notifications the instance sent (captured as .eml files)."""
    pattern = re.compile(rb"/m/([A-Za-z0-9_-]{20,})")
    tokens = {
        match.group(1).decode()
        for eml in services.settings.mail_capture_dir.glob("*.eml")
        for match in pattern.finditer(eml.read_bytes())
    }
    return sorted(tokens)


async def open_as_the_recipients(services: Services, tokens: list[str]) -> set[str]:
    """Follow each link as its recipient would; the subjects of the messages they read."""
    subjects = set()
    for token in tokens:
        target = await services.portal.recipients.open_link(token, CLIENT)
        assert isinstance(target, LinkTarget), "a link sent before the backup no longer works"
        who = Actor("recipient", target.recipient_id, CLIENT.remote_addr, CLIENT.user_agent)
        opened = await services.portal.mailbox.open(target.recipient_id, target.message_id, who)
        assert opened.content is not None
        assert opened.content.text is not None
        assert "Notes for session" in opened.content.text
        assert len(opened.content.attachments) == 1
        subjects.add(opened.content.subject)
    return subjects


async def test_backup_and_restore_as_documented(
    services: Services, tmp_path: Path, restore_target: str
) -> None:
    originals = await populate(services)
    before = await services.audit.verify()
    assert before.events >= 8  # staff.added, 3 accepted, 3 notified, keys.rotated

    backup = tmp_path / "backup"
    backup.mkdir()
    dump = back_up_database(services.settings, backup)
    # The keys directory, with tar as in the README (the master passphrase is NOT in it).
    keys_archive = backup / "escrow-keys.tar.gz"
    subprocess.run(
        ["tar", "-C", str(services.settings.keys_dir), "-czf", str(keys_archive), "."],
        check=True,
    )

    # A new machine: an empty database, an empty keys directory, the same passphrase.
    restore_database(dump, restore_target)
    restored_settings = load_settings(
        make_environ(tmp_path / "restored" / "var", restore_target),
        dotenv_path=tmp_path / "no.env",
    )
    restored_settings.keys_dir.mkdir(parents=True)
    subprocess.run(
        ["tar", "-C", str(restored_settings.keys_dir), "-xzf", str(keys_archive)], check=True
    )

    restored = build_services(restored_settings, hasher=fast_hasher())
    try:
        assert restored.keyring.active_fingerprint == services.keyring.active_fingerprint
        await read_everything(restored, originals)
        after = await restored.audit.verify()
        assert (after.events, after.last_seq) == (before.events, before.last_seq)
        assert (await restored.staff.authenticate(STAFF, PASSWORD)) is not None
        # The links in the mail clients already received lead to their messages: the
        # link keys come from the master passphrase, the delivery rows from the dump.
        tokens = links_sent(services)
        assert len(tokens) == 3
        assert await open_as_the_recipients(restored, tokens) == {f"Session {n}" for n in range(3)}
        # The restored instance keeps working: new events extend the same chain.
        await restored.audit.log("backup.restored", OPERATOR)
        extended = await restored.audit.verify()
        assert extended.events > before.events + 3  # link.opened, message.viewed, the above
        assert extended.last_seq == extended.events
    finally:
        await restored.aclose()


async def test_the_database_backup_alone_reveals_no_content(
    services: Services, tmp_path: Path
) -> None:
    originals = await populate(services)
    (tmp_path / "backup").mkdir()
    dump = back_up_database(services.settings, tmp_path / "backup")
    raw = dump.read_bytes()
    for content in originals.values():
        assert b"Notes for session" not in raw
        assert content[-200:] not in raw
    # Without the keys directory, a new vault key cannot open the old items.
    other_keys = tmp_path / "other-keys"
    VaultKeyring.initialise(other_keys, MASTER)
    stranger = VaultKeyring.open(other_keys, MASTER)
    try:
        async with services.db.read() as session:
            item = (await session.scalars(select(VaultItem).limit(1))).one()
        assert item.ciphertext is not None
        with pytest.raises(VaultIntegrityError):
            Vault(stranger, BoundedRunner(1)).open_sync(item.ciphertext)
    finally:
        stranger.close()
