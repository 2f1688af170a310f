"""A message's life after intake: revocation, legal hold, expiry, purge, read receipts."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator, Sequence
from datetime import datetime, timedelta
from email import message_from_bytes, policy
from pathlib import Path

import pytest
from sqlalchemy import func, select, update

from escrow.audit import Actor
from escrow.errors import LifecycleError, NotFound
from escrow.intake import Submission
from escrow.lifecycle import Lifecycle, RetentionReport
from escrow.models import AuditEvent, Delivery, Message, OutboxJob, Staff, VaultItem
from escrow.replies import ReplyRefused
from escrow.services import Services, build_services
from escrow.settings import Settings, load_settings
from smtp.worker import OutboxWorker
from tests.conftest import fast_hasher, initialise, make_environ, require
from tests.escrow.test_cli import ESCROW, Instance, assert_one_line_error

OPERATOR = Actor("operator", id="tester", remote_addr="cli")
READER = Actor("recipient", remote_addr="198.51.100.7", user_agent="test browser")
CLIENT = "sam.client@example.org"
SUBJECT = "Notes on the panic attacks"
BODY = "We talked about the medication change."
PASSWORD = "a long enough staff password"
TTL = timedelta(days=90)
RETENTION = timedelta(days=2555)


@dataclasses.dataclass
class World:
    services: Services
    sender: Staff
    colleague: Staff
    admin: Staff

    def actor(self, staff: Staff) -> Actor:
        return Actor("staff", id=staff.id, remote_addr="192.0.2.50", user_agent="console")


async def _world(services: Services) -> World:
    add = services.staff.add
    return World(
        services,
        await add("ada@riverside.example", PASSWORD, actor=OPERATOR),
        await add("ben@riverside.example", PASSWORD, actor=OPERATOR),
        await add("admin@riverside.example", PASSWORD, admin=True, actor=OPERATOR),
    )


@pytest.fixture
async def world(services: Services) -> World:
    return await _world(services)


@pytest.fixture
async def receipts_world(settings: Settings) -> AsyncIterator[World]:
    """The same, with ESCROW_READ_RECEIPTS on."""
    enabled = dataclasses.replace(settings, read_receipts=True)
    await initialise(enabled)
    built = build_services(enabled, hasher=fast_hasher())
    try:
        yield await _world(built)
    finally:
        await built.aclose()


def mime(subject: str = SUBJECT) -> bytes:
    return (
        f"From: ada@riverside.example\r\nTo: {CLIENT}\r\nSubject: {subject}\r\n\r\n{BODY}\r\n"
    ).encode()


async def send(world: World, *recipients: str) -> str:
    accepted = await world.services.intake.accept(
        Submission(
            mail_from=world.sender.email,
            recipients=list(recipients or [CLIENT]),
            content=mime(),
            staff_id=world.sender.id,
            remote_addr="192.0.2.10",
        )
    )
    assert accepted.message_id is not None
    return accepted.message_id


async def message(services: Services, message_id: str) -> Message:
    async with services.db.read() as session:
        row = await session.get(Message, message_id)
    assert row is not None
    return row


async def deliveries(services: Services, message_id: str) -> list[Delivery]:
    async with services.db.read() as session:
        rows = await session.scalars(select(Delivery).where(Delivery.message_id == message_id))
        return list(rows.all())


async def jobs(services: Services, kind: str) -> list[OutboxJob]:
    async with services.db.read() as session:
        return list((await session.scalars(select(OutboxJob).where(OutboxJob.kind == kind))).all())


async def vault_item(services: Services, message_id: str) -> VaultItem:
    async with services.db.read() as session:
        item = (
            await session.scalars(select(VaultItem).where(VaultItem.message_id == message_id))
        ).one()
    return item


async def events(services: Services, action: str) -> list[AuditEvent]:
    async with services.db.read() as session:
        rows = await session.scalars(
            select(AuditEvent).where(AuditEvent.action == action).order_by(AuditEvent.seq)
        )
        return list(rows.all())


async def all_events(services: Services) -> list[tuple[int, str]]:
    async with services.db.read() as session:
        rows = (await session.execute(select(AuditEvent.seq, AuditEvent.hash))).all()
    return [(row.seq, row.hash) for row in rows]


def days_after(moment: datetime, delta: timedelta) -> datetime:
    return moment + delta + timedelta(minutes=1)


# ---------------------------------------------------------------- revocation


async def test_the_sender_revokes_and_pending_notifications_are_cancelled(world: World) -> None:
    services = world.services
    message_id = await send(world, CLIENT, "alex.client@example.net")
    assert await services.outbox.pending() == 2

    await services.lifecycle.revoke(message_id, staff=world.sender, actor=world.actor(world.sender))

    row = await message(services, message_id)
    assert row.revoked_at is not None and row.revoked_by == world.sender.id
    assert {d.status for d in await deliveries(services, message_id)} == {"revoked"}
    notifications = await jobs(services, "notification")
    assert [(j.outcome, j.payload) for j in notifications] == [("cancelled", None)] * 2
    assert all(j.done_at is not None for j in notifications)
    assert await services.outbox.pending() == 0
    assert await services.outbox.claim_due() == []  # nothing left for a worker to send
    (revoked,) = await events(services, "message.revoked")
    assert (revoked.actor_type, revoked.actor_id) == ("staff", world.sender.id)
    assert revoked.message_id == message_id
    detail = json.loads(revoked.detail)
    assert detail["deliveries"] == 2 and detail["notifications_cancelled"] == 2
    assert SUBJECT not in revoked.detail

    # Idempotent: a second revocation (say, a double click) changes and audits nothing.
    await services.lifecycle.revoke(message_id, staff=world.sender, actor=world.actor(world.sender))
    assert len(await events(services, "message.revoked")) == 1
    assert (await message(services, message_id)).revoked_at == row.revoked_at


async def test_an_admin_may_revoke_another_staff_members_message(world: World) -> None:
    services = world.services
    message_id = await send(world)
    # The notification already went out: it stays sent, the link will say "withdrawn".
    (job,) = await services.outbox.claim_due()
    assert await services.outbox.complete(job)

    await services.lifecycle.revoke(message_id, staff=world.admin, actor=world.actor(world.admin))

    assert (await message(services, message_id)).revoked_by == world.admin.id
    (notification,) = await jobs(services, "notification")
    assert notification.outcome == "sent"
    assert {d.status for d in await deliveries(services, message_id)} == {"revoked"}


async def test_anyone_else_gets_the_same_refusal_as_for_an_unknown_message(world: World) -> None:
    services = world.services
    message_id = await send(world)

    with pytest.raises(LifecycleError) as other:
        await services.lifecycle.revoke(
            message_id, staff=world.colleague, actor=world.actor(world.colleague)
        )
    with pytest.raises(LifecycleError) as unknown:
        await services.lifecycle.revoke("0" * 32, staff=world.admin, actor=world.actor(world.admin))
    assert str(other.value) == str(unknown.value)
    with pytest.raises(LifecycleError):
        await services.lifecycle.set_legal_hold(
            message_id, True, staff=world.sender, actor=world.actor(world.sender)
        )
    # A disabled admin is no admin.
    async with services.db.write() as session:
        await session.execute(update(Staff).where(Staff.id == world.admin.id).values(disabled=True))
    async with services.db.read() as session:
        admin = await session.get(Staff, world.admin.id)
    assert admin is not None
    with pytest.raises(LifecycleError):
        await services.lifecycle.revoke(message_id, staff=admin, actor=world.actor(admin))

    row = await message(services, message_id)
    assert row.revoked_at is None and row.legal_hold is False
    assert {d.status for d in await deliveries(services, message_id)} == {"queued"}
    assert await services.outbox.pending() == 1
    assert await events(services, "message.revoked") == []


async def test_a_revoked_message_cannot_be_read_downloaded_or_answered(world: World) -> None:
    services = world.services
    message_id = await send(world)
    (delivery,) = await deliveries(services, message_id)
    mailbox = services.portal.mailbox
    opened = await mailbox.open(delivery.recipient_id, message_id, READER)
    assert opened.content is not None and opened.content.subject == SUBJECT

    await services.lifecycle.revoke(message_id, staff=world.sender, actor=world.actor(world.sender))

    opened = await mailbox.open(delivery.recipient_id, message_id, READER)
    assert opened.content is None and opened.entry.state == "withdrawn"
    with pytest.raises(NotFound):
        await mailbox.attachment(delivery.recipient_id, message_id, 1, READER)
    with pytest.raises(ReplyRefused):
        await services.portal.replies.send(delivery.recipient_id, message_id, "thanks", [], READER)
    inbox = await mailbox.inbox(delivery.recipient_id)
    assert [(e.state, e.subject) for e in inbox.entries] == [("withdrawn", None)]


# ---------------------------------------------------------------- expiry and purge


async def test_expiry_makes_a_message_unreadable_at_its_ttl(world: World) -> None:
    services = world.services
    message_id = await send(world)
    created = (await message(services, message_id)).created_at
    (delivery,) = await deliveries(services, message_id)

    early = await services.lifecycle.apply_retention(created + TTL - timedelta(minutes=1))
    assert early == RetentionReport(expired=0, purged=0)
    assert (await message(services, message_id)).expired_at is None

    report = await services.lifecycle.apply_retention(days_after(created, TTL))

    assert report == RetentionReport(expired=1, purged=0)
    row = await message(services, message_id)
    assert row.expired_at is not None
    assert {d.status for d in await deliveries(services, message_id)} == {"expired"}
    (expired,) = await events(services, "message.expired")
    assert (expired.actor_type, expired.message_id) == ("system", message_id)
    # The unsent notification is not sent any more.
    assert [j.outcome for j in await jobs(services, "notification")] == ["cancelled"]
    # Refused server-side, not merely hidden (the clock of the request is "now": the row decides).
    opened = await services.portal.mailbox.open(delivery.recipient_id, message_id, READER)
    assert opened.content is None and opened.entry.state == "expired"
    with pytest.raises(NotFound):
        await services.portal.mailbox.attachment(delivery.recipient_id, message_id, 1, READER)
    # The ciphertext is still there until retention runs out.
    assert (await vault_item(services, message_id)).ciphertext is not None
    # Running again finds nothing new.
    again = await services.lifecycle.apply_retention(days_after(created, TTL))
    assert again == RetentionReport(expired=0, purged=0)


async def test_purge_erases_ciphertext_after_retention_and_not_before(world: World) -> None:
    services = world.services
    message_id = await send(world)
    created = (await message(services, message_id)).created_at
    (delivery,) = await deliveries(services, message_id)
    await services.portal.mailbox.open(delivery.recipient_id, message_id, READER)  # seals subject
    assert (await message(services, message_id)).subject_sealed is not None
    before = await vault_item(services, message_id)

    not_yet = await services.lifecycle.apply_retention(created + RETENTION - timedelta(minutes=1))
    assert not_yet == RetentionReport(expired=1, purged=0)
    assert (await vault_item(services, message_id)).ciphertext is not None

    report = await services.lifecycle.apply_retention(days_after(created, RETENTION))

    assert report == RetentionReport(expired=0, purged=1)
    item = await vault_item(services, message_id)
    assert item.ciphertext is None
    assert (item.sha256, item.size, item.fingerprint) == (
        before.sha256,
        before.size,
        before.fingerprint,
    )
    row = await message(services, message_id)
    assert row.purged_at is not None and row.subject_sealed is None
    (purged,) = await events(services, "message.purged")
    assert purged.actor_type == "system"
    assert json.loads(purged.detail) == {"vault_sha256": before.sha256}
    opened = await services.portal.mailbox.open(delivery.recipient_id, message_id, READER)
    assert opened.content is None


async def test_audit_events_survive_purge_and_the_chain_verifies(world: World) -> None:
    services = world.services
    message_id = await send(world)
    created = (await message(services, message_id)).created_at
    await services.lifecycle.revoke(message_id, staff=world.sender, actor=world.actor(world.sender))
    before = await all_events(services)

    await services.lifecycle.apply_retention(days_after(created, RETENTION))

    after = await all_events(services)
    assert after[: len(before)] == before
    assert [e.action for e in await events(services, "message.accepted")] == ["message.accepted"]
    assert len(await events(services, "message.purged")) == 1
    verified = await services.audit.verify()
    assert verified.events == len(after)


async def test_legal_hold_stops_purge_for_the_whole_conversation(world: World) -> None:
    services = world.services
    message_id = await send(world)
    created = (await message(services, message_id)).created_at
    (delivery,) = await deliveries(services, message_id)
    await services.portal.mailbox.open(delivery.recipient_id, message_id, READER)
    sent = await services.portal.replies.send(
        delivery.recipient_id, message_id, "Thank you", [], READER
    )
    admin = world.actor(world.admin)

    await services.lifecycle.set_legal_hold(message_id, True, staff=world.admin, actor=admin)
    await services.lifecycle.set_legal_hold(message_id, True, staff=world.admin, actor=admin)
    held = await services.lifecycle.apply_retention(days_after(created, RETENTION * 2))

    assert held == RetentionReport(expired=2, purged=0)
    assert (await vault_item(services, message_id)).ciphertext is not None
    assert (await vault_item(services, sent.reply_id)).ciphertext is not None
    assert len(await events(services, "message.legal_hold_set")) == 1

    await services.lifecycle.set_legal_hold(message_id, False, staff=world.admin, actor=admin)
    released = await services.lifecycle.apply_retention(days_after(created, RETENTION * 2))

    assert released == RetentionReport(expired=0, purged=2)
    assert (await vault_item(services, message_id)).ciphertext is None
    assert (await vault_item(services, sent.reply_id)).ciphertext is None
    (released_event,) = await events(services, "message.legal_hold_released")
    assert released_event.actor_id == world.admin.id
    # The reply's job, never delivered, held the whole reply: its payload is gone too.
    (reply_job,) = await jobs(services, "reply")
    assert reply_job.payload is None and reply_job.outcome == "purged"
    assert await services.audit.verify()


class CountingTransactions(Lifecycle):
    """Lifecycle that notes the size of every batch it commits."""

    sizes: list[tuple[str, int]]

    async def _expire(self, ids: Sequence[str], now: datetime) -> int:
        self.sizes.append(("expire", len(ids)))
        return await super()._expire(ids, now)

    async def _purge(self, ids: Sequence[str], now: datetime) -> int:
        self.sizes.append(("purge", len(ids)))
        return await super()._purge(ids, now)


async def test_retention_works_in_bounded_batches(world: World) -> None:
    services = world.services
    lifecycle = CountingTransactions(services.settings, services.db, services.audit, batch=2)
    lifecycle.sizes = []
    ids = [await send(world) for _ in range(5)]
    created = max([(await message(services, m)).created_at for m in ids])

    report = await lifecycle.apply_retention(days_after(created, RETENTION))

    assert report == RetentionReport(expired=5, purged=5)
    expected = [("expire", 2), ("expire", 2), ("expire", 1), ("purge", 2), ("purge", 2)]
    assert lifecycle.sizes == [*expected, ("purge", 1)]
    assert len(await events(services, "message.expired")) == 5
    assert len(await events(services, "message.purged")) == 5


async def test_the_timer_applies_retention_at_start_and_stops_cleanly(world: World) -> None:
    services = world.services
    message_id = await send(world)
    created = (await message(services, message_id)).created_at
    async with services.db.write() as session:
        await session.execute(
            update(Message)
            .where(Message.id == message_id)
            .values(expires_at=created - timedelta(days=1))
        )
    ran = asyncio.Event()
    original = services.lifecycle._retention

    async def observed(now: datetime, stop: asyncio.Event | None) -> RetentionReport:
        report = await original(now, stop)
        ran.set()
        return report

    services.lifecycle._retention = observed  # type: ignore[method-assign]
    stop = asyncio.Event()
    task = asyncio.create_task(services.lifecycle.run_periodically(stop, interval=3600))
    await asyncio.wait_for(ran.wait(), 30)
    stop.set()
    await asyncio.wait_for(task, 10)

    assert (await message(services, message_id)).expired_at is not None


# ---------------------------------------------------------------- read receipts


async def read_receipt_mails(services: Services) -> list[bytes]:
    directory: Path = services.settings.mail_capture_dir
    found = []
    for path in sorted(directory.glob("*.eml")) if directory.is_dir() else []:
        data = path.read_bytes()
        if b"Secure message opened" in data:
            found.append(data)
    return found


async def test_a_read_receipt_is_sent_once_and_carries_no_content(receipts_world: World) -> None:
    world = receipts_world
    services = world.services
    message_id = await send(world)
    (delivery,) = await deliveries(services, message_id)
    worker = OutboxWorker(services)
    assert await worker.run_once() == 1  # the notification
    assert await read_receipt_mails(services) == []

    await services.portal.mailbox.open(delivery.recipient_id, message_id, READER)
    await asyncio.gather(
        *(services.portal.mailbox.open(delivery.recipient_id, message_id, READER) for _ in range(3))
    )
    await services.portal.mailbox.open(delivery.recipient_id, message_id, READER)

    (job,) = await jobs(services, "receipt")
    assert job.rcpt_to == json.dumps([world.sender.email]) and job.payload is None
    assert await worker.run_once() == 1
    assert await worker.run_once() == 0
    (mail,) = await read_receipt_mails(services)
    parsed = message_from_bytes(mail, policy=policy.default)
    text = parsed.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    (read,) = await deliveries(services, message_id)
    assert read.read_at is not None
    assert f"Your secure message to {CLIENT} was opened on {read.read_at.day} " in text
    assert "Riverside Counselling" in text
    assert parsed["To"] == world.sender.email
    assert parsed["In-Reply-To"] == (await message(services, message_id)).rfc_message_id
    for secret in (SUBJECT, BODY, "panic", "medication"):
        assert secret.encode() not in mail
    assert len(await events(services, "receipt.sent")) == 1


async def test_no_read_receipt_when_they_are_off(world: World) -> None:
    services = world.services
    assert services.settings.read_receipts is False
    message_id = await send(world)
    (delivery,) = await deliveries(services, message_id)

    await services.portal.mailbox.open(delivery.recipient_id, message_id, READER)

    assert await jobs(services, "receipt") == []
    (read,) = await deliveries(services, message_id)
    assert read.read_at is not None and read.status == "read"
    worker = OutboxWorker(services)
    await worker.run_once()
    assert await read_receipt_mails(services) == []


async def test_no_read_receipt_for_a_withdrawn_message(receipts_world: World) -> None:
    world = receipts_world
    services = world.services
    message_id = await send(world)
    (delivery,) = await deliveries(services, message_id)
    await services.lifecycle.revoke(message_id, staff=world.sender, actor=world.actor(world.sender))

    await services.portal.mailbox.open(delivery.recipient_id, message_id, READER)

    assert await jobs(services, "receipt") == []


# ---------------------------------------------------------------- the command


def test_retention_shorter_than_the_ttl_is_a_configuration_error(tmp_path: Path) -> None:
    require(ESCROW.is_file(), f"the escrow console script is not installed at {ESCROW}")
    done = Instance(tmp_path, ESCROW_MESSAGE_TTL_DAYS="90", ESCROW_VAULT_RETENTION_DAYS="30").run(
        "purge"
    )
    line = assert_one_line_error(done, 2)
    assert "ESCROW_VAULT_RETENTION_DAYS" in line and "ESCROW_MESSAGE_TTL_DAYS" in line


async def test_escrow_purge_applies_retention_and_prints_counts(tmp_path: Path) -> None:
    require(ESCROW.is_file(), f"the escrow console script is not installed at {ESCROW}")
    instance = Instance(tmp_path)
    instance.ok("init")
    master = (instance.var / "master.secret").read_text().strip()
    settings = load_settings(
        make_environ(instance.var, instance.sqlite_url, ESCROW_MASTER_PASSPHRASE=master),
        dotenv_path=tmp_path / "no.env",
    )
    services = build_services(settings, hasher=fast_hasher())
    try:
        world = await _world(services)
        old, recent = await send(world), await send(world)
        row = await message(services, old)
        async with services.db.write() as session:
            await session.execute(
                update(Message)
                .where(Message.id == old)
                .values(
                    created_at=row.created_at - RETENTION * 2,
                    expires_at=row.expires_at - RETENTION * 2,
                )
            )
    finally:
        await services.aclose()

    out = await asyncio.to_thread(instance.ok, "purge")

    assert "expired 1 messages; purged the content of 1 messages" in out
    services = build_services(settings, hasher=fast_hasher())
    try:
        assert (await vault_item(services, old)).ciphertext is None
        assert (await vault_item(services, recent)).ciphertext is not None
        async with services.db.read() as session:
            purged = await session.scalar(
                select(func.count())
                .select_from(AuditEvent)
                .where(AuditEvent.action == "message.purged")
            )
        assert purged == 1
    finally:
        await services.aclose()
