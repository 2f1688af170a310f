"""The outbox: durable mail jobs, claimed by workers, retried with back-off.

Promises:

* A job is written in the same transaction as whatever caused it, so it
  survives a crash the moment the cause is acknowledged.
* Its payload, when it has one, is sealed to the vault key. Notifications
  carry none: their link token is recomputed from the delivery id.
* :meth:`Outbox.claim_due` leases due jobs to one worker: ``FOR UPDATE SKIP
  LOCKED`` on PostgreSQL, the ``BEGIN IMMEDIATE`` write lock on SQLite. A
  lease that runs out (worker crashed) makes the job due again: delivery is
  at least once, and senders use a Message-ID derived from the job id, so a
  job finished twice is harmless.
* Failures back off from ``ESCROW_OUTBOX_RETRY_SECONDS``, doubling to one
  hour; after ``ESCROW_OUTBOX_GIVE_UP_DAYS`` the job gives up and, for a
  notification, the sender gets a bounce notice (no content).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import Table, bindparam, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from escrow.audit import SYSTEM, Audit, EventSpec
from escrow.db import Database
from escrow.models import Delivery, Message, OutboxJob, new_id, utcnow
from escrow.settings import Settings
from escrow.vault import Vault

MAX_RETRY_SECONDS = 3600
LEASE = timedelta(minutes=5)


# The worker's statements, built once, on the tables (Core): each batch then costs
# neither statement construction nor the ORM's bulk-update machinery.
_JOBS_TABLE = cast(Table, OutboxJob.__table__)
_DELIVERY_TABLE = cast(Table, Delivery.__table__)
_JOBS = _JOBS_TABLE.c
_DUE = (
    select(
        _JOBS.id,
        _JOBS.kind,
        _JOBS.mail_from,
        _JOBS.rcpt_to,
        _JOBS.payload,
        _JOBS.message_id,
        _JOBS.delivery_id,
        _JOBS.attempts,
        _JOBS.created_at,
    )
    .where(
        _JOBS.done_at.is_(None),
        _JOBS.next_attempt_at <= bindparam("now"),
        or_(_JOBS.claimed_until.is_(None), _JOBS.claimed_until < bindparam("now")),
    )
    .order_by(_JOBS.next_attempt_at)
)
_CLAIM = (
    update(_JOBS_TABLE)
    .where(_JOBS.id.in_(bindparam("ids", expanding=True)))
    .values(claimed_until=bindparam("until"), claimed_by=bindparam("claim"))
)
_HELD = select(_JOBS.id).where(
    _JOBS.id.in_(bindparam("ids", expanding=True)),
    _JOBS.claimed_by.in_(bindparam("claims", expanding=True)),
    _JOBS.done_at.is_(None),
)
_SENT = (
    update(_JOBS_TABLE)
    .where(_JOBS.id.in_(bindparam("ids", expanding=True)))
    .values(done_at=bindparam("now"), outcome="sent", payload=None, claimed_until=None)
)
_DELIVERIES = _DELIVERY_TABLE.c
_NOTIFIED = (
    update(_DELIVERY_TABLE)
    .where(_DELIVERIES.id.in_(bindparam("ids", expanding=True)), _DELIVERIES.status == "queued")
    .values(status="notified", notified_at=bindparam("now"))
)


@dataclass(frozen=True)
class Job:
    """A claimed job, detached from the database session."""

    id: str
    kind: str
    mail_from: str
    rcpt_to: tuple[str, ...]
    payload: bytes
    message_id: str | None
    delivery_id: str | None
    attempts: int
    created_at: datetime
    claim: str


def backoff(settings: Settings, attempts: int) -> timedelta:
    """Delay before the next try after ``attempts`` failures: doubling, capped at one hour."""
    seconds = settings.outbox_retry_seconds * 2 ** max(0, min(attempts - 1, 20))
    return timedelta(seconds=min(seconds, MAX_RETRY_SECONDS))


class Outbox:
    """Enqueues, leases, completes and retries outbox jobs."""

    def __init__(self, settings: Settings, db: Database, vault: Vault, audit: Audit) -> None:
        self._settings = settings
        self._db = db
        self._vault = vault
        self._audit = audit
        self._event: asyncio.Event | None = None

    # ------------------------------------------------------------ producers

    @staticmethod
    def job_row(
        kind: str,
        *,
        mail_from: str,
        rcpt_to: Sequence[str],
        payload: bytes | None,
        message_id: str | None = None,
        delivery_id: str | None = None,
    ) -> dict[str, Any]:
        """Column values of a new job, for a bulk insert. ``payload`` must be sealed."""
        now = utcnow()
        return {
            "id": new_id(),
            "kind": kind,
            "mail_from": mail_from,
            "rcpt_to": json.dumps(list(rcpt_to)),
            "payload": payload,
            "message_id": message_id,
            "delivery_id": delivery_id,
            "attempts": 0,
            "next_attempt_at": now,
            "created_at": now,
        }

    def enqueue(
        self,
        session: AsyncSession,
        kind: str,
        *,
        mail_from: str,
        rcpt_to: Sequence[str],
        payload: bytes | None,
        message_id: str | None = None,
        delivery_id: str | None = None,
    ) -> OutboxJob:
        """Add a job to ``session`` (commits with the caller). ``payload`` must be sealed."""
        job = OutboxJob(
            **self.job_row(
                kind,
                mail_from=mail_from,
                rcpt_to=rcpt_to,
                payload=payload,
                message_id=message_id,
                delivery_id=delivery_id,
            )
        )
        session.add(job)
        return job

    async def enqueue_sealed(
        self,
        session: AsyncSession,
        kind: str,
        *,
        mail_from: str,
        rcpt_to: Sequence[str],
        plaintext: bytes,
        message_id: str | None = None,
        delivery_id: str | None = None,
    ) -> OutboxJob:
        """Seal ``plaintext`` and enqueue it (sealing runs in a worker thread)."""
        sealed = await self._vault.seal(plaintext)
        return self.enqueue(
            session,
            kind,
            mail_from=mail_from,
            rcpt_to=rcpt_to,
            payload=sealed.ciphertext,
            message_id=message_id,
            delivery_id=delivery_id,
        )

    def wake(self) -> None:
        """Tell a worker in this process that there is new work (others poll)."""
        if self._event is not None:
            self._event.set()

    async def wait_for_work(self, seconds: float) -> None:
        """Return when :meth:`wake` is called or after ``seconds``."""
        if self._event is None:
            self._event = asyncio.Event()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._event.wait(), seconds)
        self._event.clear()

    # ------------------------------------------------------------ consumers

    async def claim_due(self, limit: int = 20) -> list[Job]:
        """Lease up to ``limit`` due jobs to the caller for :data:`LEASE`."""
        now = utcnow()
        claim = new_id()
        query = _DUE.limit(limit)
        if self._db.dialect == "postgresql":
            query = query.with_for_update(skip_locked=True)

        def claim_rows(session: Session) -> list[Job]:
            # Core rows and one UPDATE: no ORM objects to track and flush one by one.
            connection = session.connection()
            rows = connection.execute(query, {"now": now}).all()
            if not rows:
                return []
            connection.execute(
                _CLAIM,
                {"ids": [row.id for row in rows], "until": now + LEASE, "claim": claim},
            )
            return [
                Job(
                    id=row.id,
                    kind=row.kind,
                    mail_from=row.mail_from,
                    rcpt_to=tuple(json.loads(row.rcpt_to)),
                    payload=row.payload or b"",
                    message_id=row.message_id,
                    delivery_id=row.delivery_id,
                    attempts=row.attempts,
                    created_at=row.created_at,
                    claim=claim,
                )
                for row in rows
            ]

        return await self._db.run_write(claim_rows)

    async def open_payload(self, job: Job) -> bytes:
        """The job's plaintext payload (decrypted in a worker thread)."""
        return await self._vault.open(job.payload)

    async def complete(self, job: Job) -> bool:
        """Mark ``job`` sent and record its effect. False if our lease was lost."""
        return await self.complete_many([job]) == 1

    async def complete_many(self, jobs: Sequence[Job]) -> int:
        """Mark sent jobs done in one transaction, with their effects; returns how many we still held.

        A job whose lease another worker took over is left alone (it will be
        sent again: at least once, never lost).
        """
        if not jobs:
            return 0
        now = utcnow()

        def complete(session: Session) -> int:
            connection = session.connection()
            held = set(
                connection.scalars(
                    _HELD,
                    {"ids": [j.id for j in jobs], "claims": sorted({j.claim for j in jobs})},
                ).all()
            )
            mine = [j for j in jobs if j.id in held]
            if not mine:
                return 0
            connection.execute(_SENT, {"ids": [j.id for j in mine], "now": now})
            notified = [j for j in mine if j.kind == "notification" and j.delivery_id]
            if notified:
                connection.execute(
                    _NOTIFIED, {"ids": [j.delivery_id for j in notified], "now": now}
                )
            events = [
                EventSpec(
                    "notification.sent", SYSTEM, message_id=j.message_id, delivery_id=j.delivery_id
                )
                for j in notified
            ] + [
                EventSpec("reply.delivered", SYSTEM, message_id=j.message_id)
                for j in mine
                if j.kind == "reply"
            ]
            events += [
                EventSpec(
                    "receipt.sent", SYSTEM, message_id=j.message_id, delivery_id=j.delivery_id
                )
                for j in mine
                if j.kind == "receipt"
            ]
            self._audit.append(session, events)
            return len(mine)

        return await self._db.run_write(complete)

    async def fail(self, job: Job, reason: str, *, permanent: bool = False) -> str:
        """Record a failed attempt; returns ``retry`` or ``gave_up``.

        ``reason`` must be free of content: an error class or an SMTP code. A
        notification or pass-through that gives up sends its sender a bounce
        notice (never for a bounce itself, so bounces cannot loop).
        """
        now = utcnow()
        attempts = job.attempts + 1
        give_up = permanent or now - job.created_at >= timedelta(
            days=self._settings.outbox_give_up_days
        )
        bounce_to: str | None = None
        async with self._db.write() as session:
            row = await session.get(OutboxJob, job.id)
            if row is None or row.claimed_by != job.claim or row.done_at is not None:
                return "lost"
            row.attempts = attempts
            row.last_error = reason[:500]
            row.claimed_until = None
            if give_up:
                row.done_at = now
                row.outcome = "gave_up"
                row.payload = None
            else:
                row.next_attempt_at = now + backoff(self._settings, attempts)
            if job.kind == "notification":
                await self._audit.record(
                    session,
                    "notification.failed",
                    SYSTEM,
                    message_id=job.message_id,
                    delivery_id=job.delivery_id,
                    outcome="gave_up" if give_up else "retry",
                    detail={"attempts": attempts, "reason": reason[:200]},
                )
                if give_up and job.message_id is not None:
                    message = await session.get(Message, job.message_id)
                    bounce_to = message.sender if message is not None else None
            elif job.kind == "passthrough" and give_up and job.mail_from:
                # Mail to a colleague that could not be delivered: tell its sender too.
                bounce_to = job.mail_from
            if bounce_to:
                notice = {
                    "kind": job.kind,
                    "recipients": list(job.rcpt_to),
                    "reason": reason[:200],
                    "message_id": job.message_id,
                }
                await self.enqueue_sealed(
                    session,
                    "bounce",
                    mail_from=self._settings.notify_from,
                    rcpt_to=[bounce_to],
                    plaintext=json.dumps(notice).encode(),
                    message_id=job.message_id,
                )
        return "gave_up" if give_up else "retry"

    async def pending(self) -> int:
        """Jobs not yet done (for metrics and tests)."""
        async with self._db.read() as session:
            count = await session.scalar(
                select(func.count()).select_from(OutboxJob).where(OutboxJob.done_at.is_(None))
            )
        return int(count or 0)
