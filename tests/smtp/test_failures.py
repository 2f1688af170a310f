"""Faults inside the server: the client gets a 4xx it can retry, never exception text; nothing half-stored."""

from __future__ import annotations

import logging

import pytest
from sqlalchemy import text

from tests.smtp.conftest import (
    STAFF_EMAIL,
    EscrowServer,
    audit_events,
    count_rows,
    in_thread,
    signed_in,
    simple_message,
    submit,
    transact,
)

CLIENTS = ["alex.client@example.net", "sam.client@example.org"]
SECRET = "disk-says-no-7f3a9c"
TELLTALES = (SECRET, "Error", "sqlalchemy", "asyncpg", "sqlite", "Traceback", "outbox")


async def refuse_outbox_writes(escrow: EscrowServer) -> None:
    """A database that fails every write to the outbox table, as a full disk would."""
    statements = (
        [
            f"CREATE TRIGGER refuse_outbox BEFORE INSERT ON outbox "
            f"BEGIN SELECT RAISE(ABORT, '{SECRET}'); END"
        ]
        if escrow.services.db.dialect == "sqlite"
        else [
            f"CREATE FUNCTION refuse_outbox() RETURNS trigger LANGUAGE plpgsql AS "
            f"$$ BEGIN RAISE EXCEPTION '{SECRET}'; END $$",
            "CREATE TRIGGER refuse_outbox BEFORE INSERT ON outbox "
            "FOR EACH ROW EXECUTE FUNCTION refuse_outbox()",
        ]
    )
    async with escrow.services.db.write() as session:
        for statement in statements:
            await session.execute(text(statement))


async def heal_outbox(escrow: EscrowServer) -> None:
    async with escrow.services.db.write() as session:
        await session.execute(
            text(
                "DROP TRIGGER refuse_outbox"
                + ("" if escrow.services.db.dialect == "sqlite" else " ON outbox")
            )
        )


async def test_storage_failure_answers_451_and_stores_nothing(
    escrow: EscrowServer, caplog: pytest.LogCaptureFixture
) -> None:
    await refuse_outbox_writes(escrow)
    data = simple_message(STAFF_EMAIL, CLIENTS, subject="Intake form")
    caplog.set_level(logging.INFO)

    client = await in_thread(signed_in, escrow.port, escrow.cafile)
    try:
        failed = await in_thread(transact, client, STAFF_EMAIL, CLIENTS, data)
        assert failed.code == 451, failed
        assert not any(t.lower() in failed.text.lower() for t in TELLTALES), failed.text

        for table in ("message", "vault_item", "delivery", "outbox", "recipient"):
            assert await count_rows(escrow.services, table) == 0, table
        assert await audit_events(escrow.services, "message.accepted") == []
        assert SECRET not in caplog.text

        # The client keeps the message and retries; once storage is back it is accepted.
        await heal_outbox(escrow)
        retried = await in_thread(transact, client, STAFF_EMAIL, CLIENTS, data)
        assert retried.code == 250, retried
    finally:
        await in_thread(client.quit)
    assert await count_rows(escrow.services, "message") == 1
    assert await count_rows(escrow.services, "delivery") == 2


async def test_intake_exception_text_never_reaches_the_client(
    escrow: EscrowServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(*_args: object) -> None:
        raise RuntimeError(f"cannot write /var/lib/escrow: {SECRET}")

    monkeypatch.setattr(escrow.services.intake, "accept", broken)
    reply = await in_thread(
        submit,
        escrow.port,
        escrow.cafile,
        STAFF_EMAIL,
        CLIENTS,
        simple_message(STAFF_EMAIL, CLIENTS),
    )
    assert reply.code == 451
    assert not any(t.lower() in reply.text.lower() for t in (*TELLTALES, "RuntimeError", "/var"))


async def test_unexpected_error_in_a_command_is_421_without_detail(
    escrow: EscrowServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """aiosmtpd's own handle_exception would send ``500 Error: (RuntimeError) <text>``."""

    async def broken(*_args: object) -> None:
        raise RuntimeError(f"connection to db-primary.internal refused: {SECRET}")

    caplog.set_level(logging.INFO)
    monkeypatch.setattr(escrow.services.staff, "get", broken)

    def converse() -> tuple[tuple[int, bytes], tuple[int, bytes]]:
        client = signed_in(escrow.port, escrow.cafile)
        try:
            mail = client.mail(STAFF_EMAIL)
            noop = client.noop()
        finally:
            client.quit()
        return mail, noop

    (code, message), (noop_code, _) = await in_thread(converse)
    assert code == 421
    reply = message.decode()
    assert not any(t.lower() in reply.lower() for t in (*TELLTALES, "RuntimeError", "db-primary"))
    assert noop_code == 250  # the session is still usable
    assert SECRET not in caplog.text
    assert await count_rows(escrow.services, "message") == 0
