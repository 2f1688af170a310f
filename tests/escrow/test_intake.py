"""Intake: what a submission becomes (vault item, deliveries, jobs, audit), all or nothing."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator
from datetime import timedelta

import pytest
from sqlalchemy import func, select, text

from escrow.intake import Submission, read_headers
from escrow.models import AuditEvent, Delivery, Message, OutboxJob, Recipient, VaultItem
from escrow.services import Services, build_services
from escrow.settings import Settings
from tests.conftest import fast_hasher, initialise

SENDER = "dr.hale@riverside.example"
STAFF_ID = "0123456789abcdef0123456789abcdef"
POISON = "poison@example.net"


def mime(
    *,
    to: str = "alex.client@example.net",
    message_id: str | None = None,
    subject: str = "Care plan for next month",
    **headers: str,
) -> bytes:
    lines = [f"From: {SENDER}", f"To: {to}", f"Subject: {subject}"]
    if message_id:
        lines.append(f"Message-ID: {message_id}")
    lines += [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\nWe agreed on weekly sessions.\r\n").encode()


def submission(*recipients: str, content: bytes | None = None, staff: bool = True) -> Submission:
    return Submission(
        mail_from=SENDER,
        recipients=list(recipients),
        content=content or mime(),
        staff_id=STAFF_ID if staff else None,
        remote_addr="192.0.2.10",
    )


@pytest.fixture
async def intake_services(settings: Settings) -> AsyncIterator[Services]:
    """Services with riverside.example as the internal domain, and a staff row to point at."""
    internal = dataclasses.replace(settings, internal_domains=frozenset({"riverside.example"}))
    await initialise(internal)
    built = build_services(internal, hasher=fast_hasher())
    async with built.db.write() as session:
        await session.execute(
            text(
                "INSERT INTO staff (id, email, name, role, password_hash, disabled, "
                "failed_logins, created_at) VALUES (:id, :email, '', 'staff', 'x', false, 0, "
                "CURRENT_TIMESTAMP)"
            ),
            {"id": STAFF_ID, "email": SENDER},
        )
    try:
        yield built
    finally:
        await built.aclose()


async def table(services: Services, model: type) -> list:  # type: ignore[type-arg]
    async with services.db.read() as session:
        return list((await session.scalars(select(model))).all())


async def counts(services: Services) -> dict[str, int]:
    result = {}
    async with services.db.read() as session:
        for model in (Message, VaultItem, Delivery, Recipient, OutboxJob):
            result[model.__tablename__] = int(
                await session.scalar(select(func.count()).select_from(model)) or 0
            )
        result["audit:message"] = int(
            await session.scalar(
                select(func.count())
                .select_from(AuditEvent)
                .where(AuditEvent.action.in_(["message.accepted", "message.passed_through"]))
            )
            or 0
        )
    return result


NOTHING = {
    "message": 0,
    "vault_item": 0,
    "delivery": 0,
    "recipient": 0,
    "outbox": 0,
    "audit:message": 0,
}


# ---------------------------------------------------------------- what is stored


async def test_external_recipients_are_escrowed_and_internal_ones_pass_through(
    intake_services: Services,
) -> None:
    services = intake_services
    content = mime(message_id="<plan.1@riverside.example>")
    accepted = await services.intake.accept(
        submission(
            "Alex.Client@Example.net",
            "alex.client@example.net",
            "sam.client@example.org",
            "colleague@riverside.example",
            content=content,
        )
    )
    assert (accepted.escrowed, accepted.passed_through) == (2, 1)

    (message,) = await table(services, Message)
    assert message.id == accepted.message_id
    assert (message.sender, message.staff_id, message.direction) == (SENDER, STAFF_ID, "outbound")
    assert message.rfc_message_id == "<plan.1@riverside.example>"
    assert message.size == len(content)
    assert message.expires_at - message.created_at == timedelta(
        days=services.settings.message_ttl_days
    )

    (item,) = await table(services, VaultItem)
    assert item.message_id == message.id
    assert item.ciphertext is not None and b"Care plan" not in item.ciphertext
    assert item.fingerprint == services.keyring.active_fingerprint
    assert await services.vault.open_item(item) == content

    recipients = {r.id: r.email for r in await table(services, Recipient)}
    assert sorted(recipients.values()) == ["alex.client@example.net", "sam.client@example.org"]
    deliveries = await table(services, Delivery)
    assert sorted(recipients[d.recipient_id] for d in deliveries) == sorted(recipients.values())
    assert {d.status for d in deliveries} == {"queued"}
    hashes = {d.token_hash for d in deliveries}
    assert len(hashes) == 2 and all(len(h) == 64 and int(h, 16) >= 0 for h in hashes)

    jobs = await table(services, OutboxJob)
    notices = sorted((j for j in jobs if j.kind == "notification"), key=lambda j: j.rcpt_to)
    assert [json.loads(j.rcpt_to) for j in notices] == [
        ["alex.client@example.net"],
        ["sam.client@example.org"],
    ]
    assert {j.delivery_id for j in notices} == {d.id for d in deliveries}
    assert {j.mail_from for j in notices} == {services.settings.notify_from}
    (passthrough,) = [j for j in jobs if j.kind == "passthrough"]
    assert json.loads(passthrough.rcpt_to) == ["colleague@riverside.example"]
    assert passthrough.mail_from == SENDER
    assert passthrough.payload is not None and b"Care plan" not in passthrough.payload
    assert await services.vault.open(passthrough.payload) == content

    async with services.db.read() as session:
        audited = (
            await session.scalars(
                select(AuditEvent)
                .where(AuditEvent.action.like("message.%"))
                .order_by(AuditEvent.seq)
            )
        ).all()
    assert [(e.action, e.actor_type, e.actor_id, e.remote_addr, e.message_id) for e in audited] == [
        ("message.accepted", "staff", STAFF_ID, "192.0.2.10", message.id),
        ("message.passed_through", "staff", STAFF_ID, "192.0.2.10", message.id),
    ]
    assert all("Care plan" not in e.detail for e in audited)


async def test_mail_only_to_colleagues_is_not_escrowed(intake_services: Services) -> None:
    services = intake_services
    accepted = await services.intake.accept(
        submission("a@riverside.example", "b@RIVERSIDE.example", staff=False)
    )
    assert (accepted.message_id, accepted.escrowed, accepted.passed_through) == (None, 0, 2)
    assert await table(services, Message) == []
    assert await table(services, VaultItem) == []
    (job,) = await table(services, OutboxJob)
    assert (job.kind, json.loads(job.rcpt_to)) == (
        "passthrough",
        ["a@riverside.example", "b@RIVERSIDE.example"],
    )
    async with services.db.read() as session:
        event = (
            await session.scalars(
                select(AuditEvent).where(AuditEvent.action == "message.passed_through")
            )
        ).one()
    assert (event.actor_type, event.actor_id, event.message_id) == ("smtp", "trusted-network", None)


async def test_a_recipient_row_is_shared_by_every_message_to_that_address(
    intake_services: Services,
) -> None:
    services = intake_services
    await asyncio.gather(
        *(services.intake.accept(submission("new.client@example.net")) for _ in range(6))
    )
    await services.intake.accept(submission("NEW.client@example.net"))
    assert len(await table(services, Recipient)) == 1
    deliveries = await table(services, Delivery)
    assert len(deliveries) == 7
    assert len({d.message_id for d in deliveries}) == 7
    assert len({d.token_hash for d in deliveries}) == 7


# ---------------------------------------------------------------- all or nothing


async def poison_recipient(services: Services) -> None:
    """The database refuses to store one particular recipient (a fault on the write path)."""
    if services.db.dialect == "sqlite":
        statements = [
            "CREATE TRIGGER poison BEFORE INSERT ON recipient WHEN NEW.email = "
            f"'{POISON}' BEGIN SELECT RAISE(ABORT, 'refused'); END"
        ]
    else:
        statements = [
            "CREATE FUNCTION poison() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            f"IF NEW.email = '{POISON}' THEN RAISE EXCEPTION 'refused'; END IF; "
            "RETURN NEW; END $$",
            "CREATE TRIGGER poison BEFORE INSERT ON recipient FOR EACH ROW EXECUTE FUNCTION poison()",
        ]
    async with services.db.write() as session:
        for statement in statements:
            await session.execute(text(statement))


async def test_a_failed_write_stores_nothing(intake_services: Services) -> None:
    services = intake_services
    await poison_recipient(services)
    with pytest.raises(Exception):  # noqa: B017 - whatever the driver raises; nothing is stored
        await services.intake.accept(
            submission("alex.client@example.net", POISON, "colleague@riverside.example")
        )
    assert await counts(services) == NOTHING


async def test_one_failing_submission_does_not_sink_the_others(intake_services: Services) -> None:
    services = intake_services
    await poison_recipient(services)
    good = [submission(f"client{i}@example.net") for i in range(8)]
    bad = submission("alex.client@example.net", POISON)
    results = await asyncio.gather(
        *(services.intake.accept(s) for s in [*good[:4], bad, *good[4:]]), return_exceptions=True
    )
    assert isinstance(results[4], Exception)
    assert all(not isinstance(r, BaseException) for i, r in enumerate(results) if i != 4)
    stored = await counts(services)
    assert stored["message"] == stored["vault_item"] == stored["delivery"] == 8
    assert stored["outbox"] == 8 and stored["audit:message"] == 8
    recipients = {r.email for r in await table(services, Recipient)}
    assert recipients == {f"client{i}@example.net" for i in range(8)}


# ---------------------------------------------------------------- threads


async def thread_of(services: Services, content: bytes) -> str:
    accepted = await services.intake.accept(submission("alex.client@example.net", content=content))
    async with services.db.read() as session:
        message = await session.get(Message, accepted.message_id)
    assert message is not None
    return message.thread_id


async def test_replies_join_the_thread_they_refer_to(intake_services: Services) -> None:
    services = intake_services
    first = await thread_of(services, mime(message_id="<a.1@riverside.example>"))
    reply = await thread_of(
        services, mime(message_id="<a.2@riverside.example>", In_Reply_To="<a.1@riverside.example>")
    )
    deep = await thread_of(
        services,
        mime(
            message_id="<a.3@riverside.example>",
            References="<a.1@riverside.example> <other@example.com> <a.2@riverside.example>",
        ),
    )
    stranger = await thread_of(
        services, mime(message_id="<b.1@riverside.example>", In_Reply_To="<nobody@example.com>")
    )
    fresh = await thread_of(services, mime(message_id="<c.1@riverside.example>"))
    assert reply == first and deep == first
    assert len({first, stranger, fresh}) == 3


async def test_a_message_without_message_id_gets_one(intake_services: Services) -> None:
    services = intake_services
    await services.intake.accept(submission("alex.client@example.net", content=mime()))
    (message,) = await table(services, Message)
    assert message.rfc_message_id.startswith("<") and message.rfc_message_id.endswith(">")
    assert "@" in message.rfc_message_id


def test_read_headers_looks_only_at_the_header_block() -> None:
    content = (
        b"From: a@riverside.example\r\nMessage-ID: <own@riverside.example>\r\n"
        b"In-Reply-To: <parent@riverside.example>\r\n"
        b"References: <root@riverside.example>\r\n <parent@riverside.example>\r\n"
        b"\r\nMessage-ID: <in-body@example.com>\r\nReferences: <body@example.com>\r\n"
    )
    headers = read_headers(content)
    assert headers.message_id == "<own@riverside.example>"
    assert "<in-body@example.com>" not in headers.references
    assert "<body@example.com>" not in headers.references
    assert set(headers.references) == {"<parent@riverside.example>", "<root@riverside.example>"}
    assert read_headers(b"Subject: no ids\n\nbody").message_id is None
    assert read_headers(b"Subject: bare LF\nMessage-ID: <lf@x>\n\nbody").message_id == "<lf@x>"


async def test_internal_domains_match_whole_domains_without_case(
    intake_services: Services,
) -> None:
    intake = intake_services.intake
    assert intake.is_internal("x@Riverside.Example")
    assert not intake.is_internal("x@riverside.example.net")
    assert not intake.is_internal("x@mail.riverside.example")
    assert not intake.is_internal("riverside.example@example.net")
