"""Read receipts: the sender learns that a client opened a secure message.

Promises, when ``ESCROW_READ_RECEIPTS`` is on (it is off by default):

* The first time a delivery is marked read, one outbox job of kind
  ``receipt`` is written in the same transaction, to the message's sender.
  "First" is decided by the database (an update of ``read_at`` from NULL),
  so concurrent readers and replicas still yield exactly one job per
  delivery.
* The job carries no payload: the worker looks up the facts it needs
  (:meth:`ReadReceipts.facts`: the client's address, the time of reading and
  the original's Message-ID for threading) and :mod:`smtp.compose` writes a
  notice that names neither the subject nor any content.
* Receipts are never sent for messages that were not read by their
  client, and a job finished twice sends the same Message-ID (harmless).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Table, select, update
from sqlalchemy.orm import Session

from escrow.db import Database
from escrow.models import Delivery, Message, OutboxJob, Recipient
from escrow.outbox import Outbox
from escrow.settings import Settings

KIND = "receipt"


@dataclass(frozen=True)
class ReceiptFacts:
    """What a read receipt says: who opened which message (by Message-ID only), and when."""

    recipient: str
    read_at: datetime
    original_message_id: str


class ReadReceipts:
    """Queues read receipts on first read and tells the worker what to put in them."""

    def __init__(self, settings: Settings, db: Database, outbox: Outbox) -> None:
        self._settings = settings
        self._db = db
        self._outbox = outbox

    @property
    def enabled(self) -> bool:
        return self._settings.read_receipts

    def mark_first_reads(self, session: Session, delivery_ids: Sequence[str], now: datetime) -> int:
        """Set ``read_at`` on the deliveries not read before and queue their receipts.

        Runs inside the caller's write transaction (it commits with the read
        marks and the ``message.viewed`` events). Returns how many receipts
        were queued. Does nothing when receipts are off.
        """
        if not self.enabled or not delivery_ids:
            return 0
        first = session.scalars(
            update(Delivery)
            .where(Delivery.id.in_(delivery_ids), Delivery.read_at.is_(None))
            .values(read_at=now)
            .returning(Delivery.id)
            .execution_options(synchronize_session=False)
        ).all()
        if not first:
            return 0
        rows = session.execute(
            select(Delivery.id, Delivery.message_id, Message.sender)
            .join(Message, Message.id == Delivery.message_id)
            .where(Delivery.id.in_(first), Message.direction == "outbound")
        ).all()
        jobs = [
            Outbox.job_row(
                KIND,
                mail_from=self._settings.notify_from,
                rcpt_to=[row.sender],
                payload=None,
                message_id=row.message_id,
                delivery_id=row.id,
            )
            for row in rows
            if row.sender
        ]
        if jobs:
            table = OutboxJob.__table__
            assert isinstance(table, Table)
            session.execute(table.insert(), jobs)
        return len(jobs)

    def wake(self) -> None:
        """Tell a worker in this process that receipts are waiting."""
        self._outbox.wake()

    async def facts(self, delivery_id: str) -> ReceiptFacts | None:
        """The facts for a receipt job, or None if the delivery is gone or was never read."""
        async with self._db.read() as session:
            row = (
                await session.execute(
                    select(Recipient.email, Delivery.read_at, Message.rfc_message_id)
                    .select_from(Delivery)
                    .join(Recipient, Recipient.id == Delivery.recipient_id)
                    .join(Message, Message.id == Delivery.message_id)
                    .where(Delivery.id == delivery_id)
                )
            ).first()
        if row is None or row.read_at is None:
            return None
        return ReceiptFacts(row.email, row.read_at, row.rfc_message_id)
