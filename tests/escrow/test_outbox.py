"""The outbox: leases, completion, back-off, giving up with a bounce, and concurrent claimers."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from datetime import timedelta

import pytest
from sqlalchemy import select, update

from escrow.db import Database
from escrow.intake import Submission
from escrow.models import AuditEvent, Delivery, OutboxJob, utcnow
from escrow.outbox import LEASE, MAX_RETRY_SECONDS, Job, Outbox, backoff
from escrow.services import Services
from escrow.settings import Settings

SENDER = "dr.hale@riverside.example"
CLIENT = "alex.client@example.net"
RAW = (
    b"From: dr.hale@riverside.example\r\nTo: alex.client@example.net\r\n"
    b"Subject: Care plan\r\n\r\nSee you Thursday.\r\n"
)


def with_settings(settings: Settings, **changes: object) -> Settings:
    return dataclasses.replace(settings, **changes)  # type: ignore[arg-type]


def outbox_for(services: Services, settings: Settings) -> Outbox:
    return Outbox(settings, services.db, services.vault, services.audit)


async def accept(services: Services, *recipients: str) -> str:
    accepted = await services.intake.accept(
        Submission(
            mail_from=SENDER,
            recipients=list(recipients or [CLIENT]),
            content=RAW,
            staff_id=None,
            remote_addr="192.0.2.10",
        )
    )
    assert accepted.message_id is not None
    return accepted.message_id


async def rows(services: Services) -> list[OutboxJob]:
    async with services.db.read() as session:
        return list((await session.scalars(select(OutboxJob).order_by(OutboxJob.kind))).all())


async def events(services: Services, action: str) -> list[AuditEvent]:
    async with services.db.read() as session:
        query = select(AuditEvent).where(AuditEvent.action == action).order_by(AuditEvent.seq)
        return list((await session.scalars(query)).all())


async def make_due(services: Services) -> None:
    async with services.db.write() as session:
        await session.execute(update(OutboxJob).values(next_attempt_at=utcnow()))


# ---------------------------------------------------------------- back-off


def test_backoff_doubles_from_the_setting_and_caps_at_an_hour(settings: Settings) -> None:
    minute = with_settings(settings, outbox_retry_seconds=60)
    assert [backoff(minute, n).total_seconds() for n in range(1, 10)] == [
        60, 120, 240, 480, 960, 1920, 3600, 3600, 3600,
    ]  # fmt: skip
    second = with_settings(settings, outbox_retry_seconds=1)
    assert [backoff(second, n).total_seconds() for n in (1, 2, 3, 12, 13, 40)] == [
        1, 2, 4, 2048, 3600, 3600,
    ]  # fmt: skip
    assert backoff(second, 10_000) == timedelta(seconds=MAX_RETRY_SECONDS) == timedelta(hours=1)
    assert backoff(with_settings(settings, outbox_retry_seconds=3600), 1) == timedelta(hours=1)


async def test_each_failure_reschedules_by_the_backoff(services: Services) -> None:
    outbox = outbox_for(services, with_settings(services.settings, outbox_retry_seconds=7))
    await accept(services)
    for attempt in range(1, 6):
        (job,) = await outbox.claim_due()
        before = utcnow()
        assert await outbox.fail(job, "delivery error (ConnectionRefusedError)") == "retry"
        (row,) = await rows(services)
        assert row.attempts == attempt
        assert row.done_at is None and row.claimed_until is None
        assert row.last_error == "delivery error (ConnectionRefusedError)"
        expected = timedelta(seconds=7 * 2 ** (attempt - 1))
        assert before + expected <= row.next_attempt_at <= utcnow() + expected
        assert await outbox.claim_due() == []  # not due yet
        await make_due(services)

    failed = await events(services, "notification.failed")
    assert [(e.outcome, json.loads(e.detail)["attempts"]) for e in failed] == [
        ("retry", n) for n in range(1, 6)
    ]


# ---------------------------------------------------------------- leases and completion


async def test_a_leased_job_is_not_claimed_again_until_the_lease_runs_out(
    services: Services,
) -> None:
    await accept(services)
    other = outbox_for(services, services.settings)
    (job,) = await services.outbox.claim_due()
    (row,) = await rows(services)
    assert row.claimed_until is not None
    assert utcnow() + LEASE - timedelta(seconds=30) < row.claimed_until <= utcnow() + LEASE
    assert await other.claim_due() == []

    # The first worker died: its lease runs out and another worker takes the job over.
    async with services.db.write() as session:
        await session.execute(
            update(OutboxJob).values(claimed_until=utcnow() - timedelta(seconds=1))
        )
    (taken,) = await other.claim_due()
    assert taken.id == job.id and taken.claim != job.claim

    # The first worker's late answers change nothing; the new holder's count.
    assert await services.outbox.complete(job) is False
    assert await services.outbox.fail(job, "late") == "lost"
    assert await other.complete(taken) is True
    (row,) = await rows(services)
    assert row.outcome == "sent" and row.done_at is not None and row.payload is None


async def test_complete_marks_the_delivery_notified_once(services: Services) -> None:
    message_id = await accept(services)
    (job,) = await services.outbox.claim_due()
    assert job.kind == "notification" and job.rcpt_to == (CLIENT,)
    assert job.message_id == message_id
    assert await services.outbox.pending() == 1

    assert await services.outbox.complete(job) is True
    assert await services.outbox.complete(job) is False
    assert await services.outbox.pending() == 0
    assert await services.outbox.claim_due() == []
    async with services.db.read() as session:
        delivery = (await session.scalars(select(Delivery))).one()
    assert delivery.status == "notified" and delivery.notified_at is not None
    sent = await events(services, "notification.sent")
    assert [(e.message_id, e.delivery_id) for e in sent] == [(message_id, delivery.id)]


async def test_sealed_payloads_open_again(services: Services) -> None:
    async with services.db.write() as session:
        await services.outbox.enqueue_sealed(
            session, "passthrough", mail_from=SENDER, rcpt_to=["x@riverside.example"], plaintext=RAW
        )
    (row,) = await rows(services)
    assert row.payload is not None and b"Care plan" not in row.payload
    (job,) = await services.outbox.claim_due()
    assert await services.outbox.open_payload(job) == RAW


# ---------------------------------------------------------------- giving up


async def test_giving_up_bounces_to_the_sender_without_content(services: Services) -> None:
    outbox = outbox_for(services, with_settings(services.settings, outbox_give_up_days=0.0001))
    message_id = await accept(services)
    async with services.db.write() as session:
        for job_row in (await session.scalars(select(OutboxJob))).all():
            job_row.created_at -= timedelta(minutes=1)

    (job,) = await outbox.claim_due()
    assert await outbox.fail(job, "smarthost replied 421") == "gave_up"
    notice, = [r for r in await rows(services) if r.kind == "notification"]  # fmt: skip
    assert (notice.outcome, notice.payload) == ("gave_up", None)
    assert notice.done_at is not None

    (bounce,) = await outbox.claim_due()
    assert bounce.kind == "bounce"
    assert bounce.rcpt_to == (SENDER,)
    assert bounce.mail_from == services.settings.notify_from
    assert b"Care plan" not in bounce.payload and CLIENT.encode() not in bounce.payload
    opened = json.loads(await outbox.open_payload(bounce))
    assert opened["recipients"] == [CLIENT]
    assert opened["message_id"] == message_id
    assert "421" in opened["reason"]
    failed = await events(services, "notification.failed")
    assert [e.outcome for e in failed] == ["gave_up"]


async def test_a_permanent_refusal_gives_up_at_once(services: Services) -> None:
    await accept(services)
    (job,) = await services.outbox.claim_due()
    assert (
        await services.outbox.fail(job, "smarthost refused the recipient (550)", permanent=True)
        == "gave_up"
    )
    kinds = {r.kind: r for r in await rows(services)}
    assert kinds["notification"].outcome == "gave_up"
    assert kinds["notification"].attempts == 1
    assert kinds["bounce"].done_at is None


# ---------------------------------------------------------------- concurrent claimers


async def test_concurrent_claimers_never_share_a_job(services: Services) -> None:
    async with services.db.write() as session:
        for i in range(120):
            services.outbox.enqueue(
                session,
                "passthrough",
                mail_from=SENDER,
                rcpt_to=[f"colleague{i}@riverside.example"],
                payload=b"sealed elsewhere",
            )
    queued = {r.id for r in await rows(services)}
    databases = [Database(services.settings.database_url) for _ in range(4)]
    claimers = [Outbox(services.settings, db, services.vault, services.audit) for db in databases]
    claimed: list[list[str]] = [[] for _ in claimers]

    async def drain(index: int) -> None:
        while True:
            jobs = await claimers[index].claim_due(limit=7)
            if not jobs:
                return
            claimed[index].extend(job.id for job in jobs)
            await asyncio.sleep(0)

    try:
        await asyncio.gather(*(drain(i) for i in range(len(claimers))))
    finally:
        for db in databases:
            await db.dispose()

    everything = [job_id for ids in claimed for job_id in ids]
    assert len(everything) == len(set(everything)), "a job was leased to two workers"
    assert set(everything) == queued
    assert sum(1 for ids in claimed if ids) >= 2, "only one claimer ever got work"


async def test_jobs_survive_a_new_process(services: Services) -> None:
    """What was queued is there for a fresh set of services (a restarted server)."""
    await accept(services, CLIENT, "sam.client@example.org")
    fresh = Database(services.settings.database_url)
    try:
        outbox = Outbox(services.settings, fresh, services.vault, services.audit)
        assert await outbox.pending() == 2
        jobs = await outbox.claim_due()
    finally:
        await fresh.dispose()
    assert sorted(job.rcpt_to[0] for job in jobs) == sorted([CLIENT, "sam.client@example.org"])
    assert all(isinstance(job, Job) for job in jobs)


@pytest.mark.parametrize("kind", ["passthrough", "bounce"])
async def test_failures_of_other_jobs_are_recorded_too(services: Services, kind: str) -> None:
    async with services.db.write() as session:
        services.outbox.enqueue(
            session, kind, mail_from=SENDER, rcpt_to=["x@riverside.example"], payload=b"p"
        )
    (job,) = await services.outbox.claim_due()
    assert await services.outbox.fail(job, "delivery error (TimeoutError)") == "retry"
    (row,) = await rows(services)
    assert (row.attempts, row.last_error, row.done_at) == (1, "delivery error (TimeoutError)", None)
    assert row.next_attempt_at > utcnow()
