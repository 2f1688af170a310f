"""The outbox worker against a real smarthost: outages, back-off, give-up, bounces, replicas."""

from __future__ import annotations

import asyncio
import json
import re
import secrets
from collections.abc import Sequence
from datetime import timedelta

import pytest
from sqlalchemy import select, update

from escrow.intake import Submission
from escrow.models import Delivery, OutboxJob, utcnow
from escrow.outbox import Job, Outbox
from escrow.services import Services
from smtp import worker as worker_module
from smtp.worker import SmarthostTransport
from tests.smtp.conftest import (
    INTERNAL_DOMAIN,
    NOTIFY_FROM,
    STAFF_EMAIL,
    EscrowServer,
    MakeEscrow,
    Sink,
    audit_events,
    eventually,
    in_thread,
    simple_message,
    submit,
)

CLIENT_A = "alex.client@example.net"
CLIENT_B = "sam.client@example.org"


class Holding(SmarthostTransport):
    """The smarthost transport, holding mail to ``address`` until ``release`` is set."""

    def __init__(self, services: Services, address: str, release: asyncio.Event) -> None:
        super().__init__(services)
        self._address = address
        self._release = release

    async def send(self, mail_from: str, rcpt_to: Sequence[str], data: bytes, job_id: str) -> None:
        if self._address in rcpt_to:
            await self._release.wait()
        await super().send(mail_from, rcpt_to, data, job_id)


async def jobs(escrow: EscrowServer, kind: str | None = None) -> list[OutboxJob]:
    async with escrow.services.db.read() as session:
        query = select(OutboxJob).order_by(OutboxJob.created_at)
        if kind is not None:
            query = query.where(OutboxJob.kind == kind)
        return list((await session.scalars(query)).all())


async def make_due(escrow: EscrowServer) -> None:
    """Skip the back-off wait: every unfinished job is due now."""
    async with escrow.services.db.write() as session:
        await session.execute(
            update(OutboxJob).where(OutboxJob.done_at.is_(None)).values(next_attempt_at=utcnow())
        )


async def send_marked(escrow: EscrowServer, recipients: list[str]) -> str:
    """Submit over SMTP a message whose subject and body carry a fresh marker; returns it."""
    marker = f"plan{secrets.token_hex(8)}"
    data = simple_message(
        STAFF_EMAIL, recipients, subject=f"Plan {marker}", body=f"Details {marker}\n"
    )
    reply = await in_thread(submit, escrow.port, escrow.cafile, STAFF_EMAIL, recipients, data)
    assert reply.code == 250, reply
    return marker


async def test_outage_backs_off_doubling_to_an_hour_then_delivers(
    make_escrow: MakeEscrow, sink: Sink
) -> None:
    escrow = await make_escrow(worker=False, ESCROW_OUTBOX_RETRY_SECONDS="45")
    await escrow.add_staff()
    sink.stop()
    marker = await send_marked(escrow, [CLIENT_A, CLIENT_B])

    delays = []
    for attempt in range(1, 10):
        before = utcnow()
        assert await escrow.worker.run_once() == 2
        after = utcnow()
        pending = await jobs(escrow, "notification")
        assert [j.attempts for j in pending] == [attempt, attempt]
        assert all(j.done_at is None and j.claimed_until is None for j in pending)
        for job in pending:
            assert before + timedelta(seconds=1) < job.next_attempt_at
            assert job.last_error is not None and marker not in job.last_error
        delay = min(j.next_attempt_at for j in pending) - after
        delays.append(round(delay.total_seconds() / 5) * 5)
        # Not due yet: nothing is claimed.
        assert await escrow.worker.run_once() == 0
        await make_due(escrow)
    assert delays == [45, 90, 180, 360, 720, 1440, 2880, 3600, 3600]

    failed = await audit_events(escrow.services, "notification.failed")
    assert len(failed) == 18
    assert {e.outcome for e in failed} == {"retry"}
    assert all(marker not in e.detail for e in failed)
    assert json.loads(failed[-1].detail)["attempts"] == 9
    async with escrow.services.db.read() as session:
        assert set((await session.scalars(select(Delivery.status))).all()) == {"queued"}

    # The smarthost is back, and the retry is due: the notifications go out.
    sink.start()
    await make_due(escrow)
    assert await escrow.worker.run_once() == 2
    arrived = await sink.wait_for_count(2)
    assert sorted(r for m in arrived for r in m.rcpt_tos) == [CLIENT_A, CLIENT_B]
    done = await jobs(escrow, "notification")
    assert [(j.outcome, j.payload) for j in done] == [("sent", None)] * 2
    assert all(j.done_at is not None for j in done)
    async with escrow.services.db.read() as session:
        assert set((await session.scalars(select(Delivery.status))).all()) == {"notified"}
    assert len(await audit_events(escrow.services, "notification.sent")) == 2


async def test_retry_after_outage_with_the_worker_running(
    make_escrow: MakeEscrow, sink: Sink
) -> None:
    """With a one-second retry the running worker finds the due job by itself."""
    escrow = await make_escrow(ESCROW_OUTBOX_RETRY_SECONDS="1")
    await escrow.add_staff()
    sink.stop()
    await send_marked(escrow, [CLIENT_A])
    await eventually(
        lambda: audit_events(escrow.services, "notification.failed"), what="a failed attempt"
    )
    sink.start()
    notices = await eventually(lambda: sink.to(CLIENT_A), what="the notification", timeout=30)
    assert len(notices) == 1


async def test_giving_up_sends_the_sender_a_bounce_without_content(
    make_escrow: MakeEscrow, sink: Sink
) -> None:
    escrow = await make_escrow(worker=False, ESCROW_OUTBOX_GIVE_UP_DAYS="0.0001")
    await escrow.add_staff()
    sink.stop()
    marker = await send_marked(escrow, [CLIENT_A])

    # The job has been failing longer than the give-up time (0.0001 days, under 9 s).
    async with escrow.services.db.write() as session:
        for job in (await session.scalars(select(OutboxJob))).all():
            job.created_at -= timedelta(minutes=1)
    assert await escrow.worker.run_once() == 1
    (notice_job,) = await jobs(escrow, "notification")
    assert (notice_job.outcome, notice_job.attempts, notice_job.payload) == ("gave_up", 1, None)
    assert notice_job.done_at is not None
    (bounce_job,) = await jobs(escrow, "bounce")
    assert json.loads(bounce_job.rcpt_to) == [STAFF_EMAIL]
    assert bounce_job.payload is not None and CLIENT_A.encode() not in bounce_job.payload
    failed = await audit_events(escrow.services, "notification.failed")
    assert [e.outcome for e in failed] == ["gave_up"]

    sink.start()
    assert await escrow.worker.run_once() == 1
    (bounce,) = await sink.wait_for_count(1)
    assert bounce.rcpt_tos == (STAFF_EMAIL,)
    assert bounce.mail_from == NOTIFY_FROM
    parsed = bounce.parsed()
    assert parsed["To"].addresses[0].addr_spec == STAFF_EMAIL
    assert parsed["Date"] is not None and parsed["Message-ID"] is not None
    text = parsed.get_body(preferencelist=("plain",)).get_content()
    assert CLIENT_A in text
    assert marker not in bounce.data.decode() and marker not in text
    async with escrow.services.db.read() as session:
        assert (await session.scalars(select(Delivery.status))).one() == "queued"
    # Giving up is final: nothing is left to retry.
    await make_due(escrow)
    assert await escrow.worker.run_once() == 0


async def test_smarthost_5xx_gives_up_at_once_and_bounces(
    make_escrow: MakeEscrow, sink: Sink
) -> None:
    escrow = await make_escrow(worker=False)
    await escrow.add_staff()
    sink.refuse.add(CLIENT_B)
    marker = await send_marked(escrow, [CLIENT_A, CLIENT_B])

    assert await escrow.worker.run_once() == 2
    refused = [j for j in await jobs(escrow, "notification") if json.loads(j.rcpt_to) == [CLIENT_B]]
    assert [(j.outcome, j.attempts) for j in refused] == [("gave_up", 1)]
    assert refused[0].last_error is not None and "550" in refused[0].last_error
    failed = await audit_events(escrow.services, "notification.failed")
    assert [e.outcome for e in failed] == ["gave_up"]

    assert await escrow.worker.run_once() == 1  # the bounce
    await sink.wait_for_count(2)
    assert len(sink.to(CLIENT_A)) == 1
    assert sink.to(CLIENT_B) == []
    (bounce,) = sink.to(STAFF_EMAIL)
    text = bounce.parsed().get_body(preferencelist=("plain",)).get_content()
    assert CLIENT_B in text and CLIENT_A not in text
    assert marker not in bounce.data.decode()


async def test_undeliverable_mail_to_a_colleague_bounces_to_its_sender(
    make_escrow: MakeEscrow, sink: Sink
) -> None:
    colleague = f"pat@{INTERNAL_DOMAIN}"
    escrow = await make_escrow(worker=False, ESCROW_INTERNAL_DOMAINS=INTERNAL_DOMAIN)
    await escrow.add_staff()
    sink.refuse.add(colleague)
    marker = await send_marked(escrow, [colleague])

    assert await escrow.worker.run_once() == 1
    (passthrough,) = await jobs(escrow, "passthrough")
    assert passthrough.outcome == "gave_up"
    assert await escrow.worker.run_once() == 1  # the bounce
    (bounce,) = await sink.wait_for_count(1)
    assert bounce.rcpt_tos == (STAFF_EMAIL,)
    text = bounce.parsed().get_body(preferencelist=("plain",)).get_content()
    assert colleague in text and "could not be delivered" in text
    assert marker not in bounce.data.decode()


async def test_two_replicas_deliver_every_job_exactly_once(
    make_escrow: MakeEscrow, sink: Sink
) -> None:
    first = await make_escrow(worker=False)
    second = await make_escrow(worker=False)
    recipients = [f"client{i:02d}.{j}@example.net" for i in range(20) for j in range(3)]
    for i in range(20):
        batch = recipients[i * 3 : i * 3 + 3]
        await first.services.intake.accept(
            Submission(
                mail_from=STAFF_EMAIL,
                recipients=batch,
                content=simple_message(STAFF_EMAIL, batch),
                staff_id=None,
                remote_addr="127.0.0.1",
            )
        )
    queued = {j.id for j in await jobs(first)}
    assert len(queued) == 60

    claimed: dict[str, list[str]] = {"first": [], "second": []}

    def record(name: str, outbox: Outbox) -> None:
        original = outbox.claim_due

        async def claim_due(limit: int = 20) -> list[Job]:
            got = await original(limit)
            claimed[name].extend(job.id for job in got)
            return got

        outbox.claim_due = claim_due  # type: ignore[method-assign]

    record("first", first.services.outbox)
    record("second", second.services.outbox)
    first.start_worker()
    second.start_worker()
    await sink.wait_for_count(60, timeout=60)
    await eventually(lambda: _all_done(first), what="every job marked done", timeout=30)
    await first.stop_worker()
    await second.stop_worker()

    assert not set(claimed["first"]) & set(claimed["second"])
    assert sorted(claimed["first"] + claimed["second"]) == sorted(queued)
    arrived = sink.received()
    assert len(arrived) == 60
    assert sorted(r for m in arrived for r in m.rcpt_tos) == sorted(recipients)
    message_ids = {str(m.parsed()["Message-ID"]) for m in arrived}
    assert {re.sub(r"^<([0-9a-f]{32})\..*$", r"\1", m) for m in message_ids} == queued
    assert {j.outcome for j in await jobs(first)} == {"sent"}


async def _all_done(escrow: EscrowServer) -> bool:
    return await escrow.services.outbox.pending() == 0


async def test_a_failing_lane_leaves_the_other_lanes_sent_jobs_completed(
    make_escrow: MakeEscrow, sink: Sink, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The batch completes in one transaction once every lane has finished: a lane that
    # raises (here: recording a refusal while the database is away) must not leave the
    # jobs other lanes sent uncompleted, or they would go out again.
    escrow = await make_escrow(worker=False)
    await escrow.add_staff()
    sink.refuse.add(CLIENT_B)
    await send_marked(escrow, [CLIENT_A, CLIENT_B])

    refused = asyncio.Event()

    async def database_away(*args: object, **kwargs: object) -> str:
        refused.set()
        raise RuntimeError("database unavailable")

    monkeypatch.setattr(escrow.services.outbox, "fail", database_away)
    # CLIENT_A's mail goes out only once the other lane has failed: the order that lost it.
    lanes = [Holding(escrow.services, CLIENT_A, refused) for _ in range(2)]
    try:
        with pytest.raises(RuntimeError):
            await escrow.worker.run_once(lanes)
    finally:
        for lane in lanes:
            await lane.close()
    notifications = await jobs(escrow, "notification")
    assert [json.loads(j.rcpt_to) for j in notifications if j.done_at is not None] == [[CLIENT_A]]
    assert len(sink.to(CLIENT_A)) == 1


async def test_a_slow_lane_does_not_hold_back_the_others_completions(
    make_escrow: MakeEscrow, sink: Sink, monkeypatch: pytest.MonkeyPatch
) -> None:
    # While one lane waits on a slow smarthost, what the other lanes sent is completed
    # every COMPLETE_EVERY_SECONDS, not only when the batch ends: else a long wait could
    # outlast the lease and another worker would send those notifications again.
    escrow = await make_escrow(worker=False)
    await escrow.add_staff()
    await send_marked(escrow, [CLIENT_A, CLIENT_B])
    monkeypatch.setattr(worker_module, "COMPLETE_EVERY_SECONDS", 0.05)
    release = asyncio.Event()

    async def completed() -> list[list[str]]:
        return [json.loads(j.rcpt_to) for j in await jobs(escrow, "notification") if j.done_at]

    # The first interim completion fails (the database is away for a moment): what it
    # held is completed by a later one, not lost.
    complete_many = escrow.services.outbox.complete_many
    calls: list[int] = []

    async def failing_once(sent: Sequence[Job]) -> int:
        calls.append(len(sent))
        if len(calls) == 1:
            raise RuntimeError("database unavailable")
        return await complete_many(sent)

    monkeypatch.setattr(escrow.services.outbox, "complete_many", failing_once)
    lanes = [Holding(escrow.services, CLIENT_B, release) for _ in range(2)]
    batch = asyncio.ensure_future(escrow.worker.run_once(lanes))
    try:
        assert await eventually(completed, what="CLIENT_A's job completed") == [[CLIENT_A]]
        assert calls[:2] == [1, 1]
        assert not batch.done()
        release.set()
        assert await batch == 2
    finally:
        release.set()
        await asyncio.gather(batch, return_exceptions=True)
        for lane in lanes:
            await lane.close()
    assert sorted(map(tuple, await completed())) == [(CLIENT_A,), (CLIENT_B,)]


async def test_a_send_cancelled_mid_transaction_drops_the_connection(
    make_escrow: MakeEscrow, sink: Sink, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A lane cancelled while the smarthost has not answered leaves that SMTP transaction
    # half done: the next job must start on a new connection, not inherit the state.
    escrow = await make_escrow(worker=False)
    lane = SmarthostTransport(escrow.services)
    await lane.send(NOTIFY_FROM, [CLIENT_A], simple_message(NOTIFY_FROM, [CLIENT_A]), "j1")
    client = lane._client
    assert client is not None and client.is_connected
    waiting = asyncio.Event()

    async def no_answer(*args: object, **kwargs: object) -> None:
        waiting.set()
        await asyncio.Event().wait()

    monkeypatch.setattr(client, "sendmail", no_answer)
    send = asyncio.ensure_future(
        lane.send(NOTIFY_FROM, [CLIENT_B], simple_message(NOTIFY_FROM, [CLIENT_B]), "j2")
    )
    await waiting.wait()
    send.cancel()
    with pytest.raises(asyncio.CancelledError):
        await send
    assert lane._client is None and not client.is_connected
    await lane.send(NOTIFY_FROM, [CLIENT_B], simple_message(NOTIFY_FROM, [CLIENT_B]), "j3")
    await lane.close()
    assert len(sink.to(CLIENT_B)) == 1
