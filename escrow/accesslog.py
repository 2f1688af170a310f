"""Recording reads with group commit: audited before shown, without one fsync per page.

Every message view and download must be in the audit log before the
content goes out. One write transaction (and, on SQLite, one fsync under
the single-writer lock) per page view caps a server at a few dozen pages a
second under load, so :class:`AccessRecorder` commits reads in groups:

* :meth:`AccessRecorder.record` returns only after the caller's event (and
  its delivery's "read" mark) is committed; if the commit fails it raises,
  and the caller shows nothing.
* Events that arrive while a commit is running wait for the next one and
  share it; one transaction carries up to :data:`MAX_BATCH` of them, in
  arrival order, appended with :meth:`escrow.audit.Audit.record_many`.
* Session "last seen" refreshes (:meth:`AccessRecorder.touch`) ride along
  in the same transactions and are not waited for: losing one only makes a
  session time out a little sooner. Without this, every session touched in
  the same half-minute would queue its own write behind the others.
* A delivery's first read mark also queues its read receipt, in the same
  transaction, when receipts are on (:mod:`escrow.receipts`).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from sqlalchemy import case, func, update
from sqlalchemy.orm import Session

from escrow.audit import Audit, EventSpec
from escrow.db import Database
from escrow.models import Delivery, WebSession, utcnow
from escrow.receipts import ReadReceipts

log = logging.getLogger(__name__)

MAX_BATCH = 200
_UNREAD = ("queued", "notified", "opened")


@dataclass(frozen=True)
class _Pending:
    spec: EventSpec
    mark_read: str | None
    future: asyncio.Future[None]


class AccessRecorder:
    """Group-commits read events (see the module promises)."""

    def __init__(self, db: Database, audit: Audit, receipts: ReadReceipts | None = None) -> None:
        self._db = db
        self._audit = audit
        self._receipts = receipts
        self._queue: list[_Pending] = []
        self._touches: set[str] = set()
        self._committer: asyncio.Task[None] | None = None

    def _wake(self) -> None:
        if self._committer is None or self._committer.done():
            self._committer = asyncio.create_task(self._commit_queued())

    def touch(self, session_id: str) -> None:
        """Refresh a session's ``last_seen_at`` with the next commit (not waited for)."""
        self._touches.add(session_id)
        self._wake()

    async def record(self, spec: EventSpec, *, mark_read: str | None = None) -> None:
        """Append ``spec`` (and mark delivery ``mark_read`` read); return once committed."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(spec, mark_read, future))
        self._wake()
        await asyncio.shield(future)

    async def _commit_queued(self) -> None:
        while self._queue or self._touches:
            batch, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
            touches, self._touches = sorted(self._touches), set()
            try:
                await self._commit(batch, touches)
            except Exception as exc:
                if not batch:
                    log.warning("session refresh not stored (%s)", type(exc).__name__)
                for pending in batch:
                    if not pending.future.done():
                        pending.future.set_exception(exc)
            else:
                for pending in batch:
                    if not pending.future.done():
                        pending.future.set_result(None)

    async def _commit(self, batch: list[_Pending], touches: list[str]) -> None:
        now = utcnow()
        deliveries = sorted({p.mark_read for p in batch if p.mark_read is not None})
        specs = [p.spec for p in batch]

        def commit(session: Session) -> int:
            receipts = 0
            if touches:
                session.execute(
                    update(WebSession)
                    .where(WebSession.id.in_(touches), WebSession.ended_at.is_(None))
                    .values(last_seen_at=now)
                    .execution_options(synchronize_session=False)
                )
            if deliveries:
                if self._receipts is not None:
                    receipts = self._receipts.mark_first_reads(session, deliveries, now)
                session.execute(
                    update(Delivery)
                    .where(Delivery.id.in_(deliveries))
                    .values(
                        read_at=func.coalesce(Delivery.read_at, now),
                        opened_at=func.coalesce(Delivery.opened_at, now),
                        status=case((Delivery.status.in_(_UNREAD), "read"), else_=Delivery.status),
                    )
                    .execution_options(synchronize_session=False)
                )
            self._audit.append(session, specs)
            return receipts

        if await self._db.run_write(commit) and self._receipts is not None:
            self._receipts.wake()
