"""A message's life after intake: withdrawal, legal hold, expiry and purge.

Promises:

* :meth:`Lifecycle.revoke` lets the sender of a message, or an admin,
  withdraw it. In one transaction: ``revoked_at``/``revoked_by`` set, every
  delivery ``revoked``, notifications not yet sent cancelled (outcome
  ``cancelled``; one already handed to the smarthost cannot be recalled, and
  its link then shows the withdrawal notice), ``message.revoked`` audited.
  Revoking again changes nothing. Anyone else, and any unknown id, gets the
  same :class:`~escrow.errors.LifecycleError`.
* :meth:`Lifecycle.set_legal_hold` (admins only) sets or lifts a hold,
  audited as ``message.legal_hold_set`` / ``message.legal_hold_released``.
  A hold on any message of a conversation keeps the whole conversation (the
  original and the client's replies) from being purged; it does not keep a
  message readable past its TTL.
* :meth:`Lifecycle.apply_retention`:

  - *expiry*: a message whose ``expires_at`` (intake time plus
    ``ESCROW_MESSAGE_TTL_DAYS``) has passed gets ``expired_at``; its
    deliveries become ``expired`` (a ``revoked`` one stays ``revoked``), its
    unsent notifications are cancelled, and ``message.expired`` is audited
    (system actor). The portal refuses it from then on.
  - *purge*: once an expired message is older than
    ``ESCROW_VAULT_RETENTION_DAYS`` and no message of its conversation is on
    legal hold, its ciphertext is erased: ``vault_item.ciphertext`` and the
    sealed subject are set to NULL, and any outbox payload still held for it
    is dropped (a job not yet done is closed with outcome ``purged``). The
    vault item row stays, with its fingerprint, SHA-256 and size, so the
    audit trail can still show what was held and that it was destroyed;
    ``message.purged`` is audited with that SHA-256. Audit events are never
    purged, and the chain verifies afterwards.
  - Work goes in batches of :data:`BATCH` messages, one transaction each.
    Each batch updates only rows still in the state it selected, so
    replicas running retention together neither double-count nor
    double-audit.
* On SQLite, the purge transaction turns on ``secure_delete``, so freed
  pages are overwritten rather than left holding old ciphertext. On
  PostgreSQL the space is reclaimed by (auto)vacuum. Backups keep what they
  hold until they are rotated.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import ColumnElement, exists, select, text, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import InstrumentedAttribute, aliased

from escrow.audit import SYSTEM, Actor, Audit, EventSpec
from escrow.db import Database
from escrow.errors import LifecycleError
from escrow.models import Delivery, Message, OutboxJob, Staff, VaultItem, utcnow
from escrow.settings import Settings

log = logging.getLogger(__name__)

BATCH = 500
RETENTION_INTERVAL_SECONDS = 3600.0
_REFUSED = "no such message, or you may not change it"
# A batch action: ``await step(ids, now)`` returns how many messages it changed.
_Step = Callable[[Sequence[str], datetime], Awaitable[int]]


@dataclass(frozen=True)
class RetentionReport:
    """How many messages one retention run expired and purged."""

    expired: int
    purged: int


def _unfinished_notifications(message_ids: Sequence[str]) -> ColumnElement[bool]:
    return (
        OutboxJob.message_id.in_(message_ids)
        & (OutboxJob.kind == "notification")
        & OutboxJob.done_at.is_(None)
    )


def _no_hold_in_thread() -> ColumnElement[bool]:
    """True for a message none of whose conversation is on legal hold."""
    other = aliased(Message)
    return ~exists().where(other.thread_id == Message.thread_id, other.legal_hold.is_(True))


class Lifecycle:
    """Revocation, legal hold, expiry and purge (see the module promises)."""

    def __init__(
        self, settings: Settings, db: Database, audit: Audit, *, batch: int = BATCH
    ) -> None:
        self._settings = settings
        self._db = db
        self._audit = audit
        self._batch = batch

    # ------------------------------------------------------------ staff actions

    async def _message_for_update(self, session: AsyncSession, message_id: str) -> Message | None:
        if not message_id or len(message_id) > 32:
            return None
        return await session.get(Message, message_id, with_for_update=True)

    async def revoke(self, message_id: str, *, staff: Staff, actor: Actor) -> None:
        """Withdraw a message (its sender or an admin); idempotent; raises LifecycleError."""
        now = utcnow()
        async with self._db.write() as session:
            message = await self._message_for_update(session, message_id)
            allowed = (
                message is not None
                and message.direction == "outbound"
                and not staff.disabled
                and (staff.role == "admin" or message.staff_id == staff.id)
            )
            if message is None or not allowed:
                raise LifecycleError(_REFUSED)
            if message.revoked_at is not None:
                return
            message.revoked_at = now
            message.revoked_by = staff.id
            deliveries = (
                await session.scalars(
                    update(Delivery)
                    .where(Delivery.message_id == message.id)
                    .values(status="revoked")
                    .returning(Delivery.id)
                    .execution_options(synchronize_session=False)
                )
            ).all()
            cancelled = await self._cancel_notifications(session, [message.id], now)
            await self._audit.record(
                session,
                "message.revoked",
                actor,
                message_id=message.id,
                detail={
                    "by": staff.id,
                    "role": staff.role,
                    "deliveries": len(deliveries),
                    "notifications_cancelled": cancelled,
                },
            )

    async def set_legal_hold(
        self, message_id: str, hold: bool, *, staff: Staff, actor: Actor
    ) -> None:
        """Set or lift a legal hold (admins only); audited on change; raises LifecycleError."""
        async with self._db.write() as session:
            message = await self._message_for_update(session, message_id)
            if message is None or staff.role != "admin" or staff.disabled:
                raise LifecycleError(_REFUSED)
            if message.legal_hold == hold:
                return
            message.legal_hold = hold
            await self._audit.record(
                session,
                "message.legal_hold_set" if hold else "message.legal_hold_released",
                actor,
                message_id=message.id,
                detail={"by": staff.id, "purged": message.purged_at is not None},
            )

    @staticmethod
    async def _cancel_notifications(
        session: AsyncSession, message_ids: Sequence[str], now: datetime
    ) -> int:
        cancelled = (
            await session.scalars(
                update(OutboxJob)
                .where(_unfinished_notifications(message_ids))
                .values(done_at=now, outcome="cancelled", payload=None, claimed_until=None)
                .returning(OutboxJob.id)
                .execution_options(synchronize_session=False)
            )
        ).all()
        return len(cancelled)

    # ------------------------------------------------------------ retention

    async def apply_retention(self, now: datetime | None = None) -> RetentionReport:
        """Expire messages past their TTL, then purge expired ones past retention (see above)."""
        return await self._retention(now or utcnow(), None)

    async def _retention(self, now: datetime, stop: asyncio.Event | None) -> RetentionReport:
        expired = await self._in_batches(
            self._expirable(now), Message.expires_at, self._expire, now, stop
        )
        cutoff = now - timedelta(days=self._settings.vault_retention_days)
        purged = await self._in_batches(
            self._purgeable(cutoff), Message.created_at, self._purge, now, stop
        )
        return RetentionReport(expired=expired, purged=purged)

    async def _in_batches(
        self,
        condition: ColumnElement[bool],
        order: InstrumentedAttribute[datetime],
        step: _Step,
        now: datetime,
        stop: asyncio.Event | None,
    ) -> int:
        done = 0
        while stop is None or not stop.is_set():
            async with self._db.read() as session:
                ids = (
                    await session.scalars(
                        select(Message.id)
                        .where(condition)
                        # In the order of the partial index the condition matches.
                        .order_by(order)
                        .limit(self._batch)
                    )
                ).all()
            if ids:
                done += await step(ids, now)
            if len(ids) < self._batch:
                break
        return done

    @staticmethod
    def _expirable(now: datetime) -> ColumnElement[bool]:
        return (Message.expires_at <= now) & Message.expired_at.is_(None)

    @staticmethod
    def _purgeable(cutoff: datetime) -> ColumnElement[bool]:
        return (
            Message.purged_at.is_(None)
            & Message.expired_at.is_not(None)
            & (Message.created_at <= cutoff)
            & Message.legal_hold.is_(False)
            & _no_hold_in_thread()
        )

    async def _expire(self, ids: Sequence[str], now: datetime) -> int:
        async with self._db.write() as session:
            expired = (
                await session.scalars(
                    update(Message)
                    .where(Message.id.in_(ids), self._expirable(now))
                    .values(expired_at=now)
                    .returning(Message.id)
                    .execution_options(synchronize_session=False)
                )
            ).all()
            if not expired:
                return 0
            await session.execute(
                update(Delivery)
                .where(Delivery.message_id.in_(expired), Delivery.status != "revoked")
                .values(status="expired")
                .execution_options(synchronize_session=False)
            )
            await self._cancel_notifications(session, expired, now)
            await self._audit.record_many(
                session, [EventSpec("message.expired", SYSTEM, message_id=m) for m in expired]
            )
        return len(expired)

    async def _purge(self, ids: Sequence[str], now: datetime) -> int:
        cutoff = now - timedelta(days=self._settings.vault_retention_days)
        async with self._db.write() as session:
            secure_delete = await self._secure_delete(session, None)
            purged = (
                await session.scalars(
                    update(Message)
                    .where(Message.id.in_(ids), self._purgeable(cutoff))
                    .values(purged_at=now, subject_sealed=None)
                    .returning(Message.id)
                    .execution_options(synchronize_session=False)
                )
            ).all()
            if not purged:
                await self._secure_delete(session, secure_delete)
                return 0
            items = {
                row.message_id: row.sha256
                for row in await session.execute(
                    update(VaultItem)
                    .where(VaultItem.message_id.in_(purged))
                    .values(ciphertext=None)
                    .returning(VaultItem.message_id, VaultItem.sha256)
                    .execution_options(synchronize_session=False)
                )
            }
            await session.execute(
                update(OutboxJob)
                .where(OutboxJob.message_id.in_(purged), OutboxJob.done_at.is_(None))
                .values(done_at=now, outcome="purged", payload=None, claimed_until=None)
                .execution_options(synchronize_session=False)
            )
            await session.execute(
                update(OutboxJob)
                .where(OutboxJob.message_id.in_(purged), OutboxJob.payload.is_not(None))
                .values(payload=None)
                .execution_options(synchronize_session=False)
            )
            await self._audit.record_many(
                session,
                [
                    EventSpec(
                        "message.purged",
                        SYSTEM,
                        message_id=m,
                        detail={"vault_sha256": items.get(m)},
                    )
                    for m in purged
                ],
            )
            await self._secure_delete(session, secure_delete)
        return len(purged)

    async def _secure_delete(self, session: AsyncSession, restore: int | None) -> int | None:
        """SQLite: overwrite freed pages while purging, so erased ciphertext does not linger.

        Turns ``secure_delete`` on and returns its previous value, or (given
        ``restore``) puts that value back, so other writers keep their setting.
        The pages are zeroed when freed, inside the transaction.
        """
        if self._db.dialect != "sqlite":
            return None
        if restore is not None:
            await session.execute(text(f"PRAGMA secure_delete={int(restore)}"))
            return restore
        previous = int((await session.execute(text("PRAGMA secure_delete"))).scalar_one())
        await session.execute(text("PRAGMA secure_delete=ON"))
        return previous

    async def run_periodically(
        self, stop: asyncio.Event, interval: float = RETENTION_INTERVAL_SECONDS
    ) -> None:
        """Apply retention now and then every ``interval`` seconds until ``stop`` is set.

        A failed run is logged (error class only) and tried again next time;
        a long run stops between batches when ``stop`` is set.
        """
        while not stop.is_set():
            try:
                report = await self._retention(utcnow(), stop)
            except Exception as exc:
                log.error("retention run failed (%s); trying again later", type(exc).__name__)
            else:
                if report.expired or report.purged:
                    log.info(
                        "retention: %d messages expired, %d purged", report.expired, report.purged
                    )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)
