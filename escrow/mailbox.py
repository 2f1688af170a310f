"""A signed-in recipient's mailbox: the inbox, one message, its parts.

Promises:

* Everything is scoped to one recipient: a message is reachable only
  through a delivery to that recipient; anything else is
  :class:`~escrow.errors.NotFound`, indistinguishable from a message that
  does not exist.
* Withdrawn and expired messages (:mod:`escrow.availability`) are listed
  with that state and never decrypted or shown.
* Content is decrypted in worker threads, held in memory for the request,
  and never written anywhere in clear. The inbox decrypts only subjects: a
  subject is sealed on its own the first time its message is decrypted
  (:attr:`Message.subject_sealed`), so later inbox pages open a few bytes
  per row instead of whole messages.
* Viewing marks the delivery read (``read_at``, status ``read``, never
  downgrading ``replied``) and audits ``message.viewed``; downloading
  audits ``attachment.downloaded`` with the attachment's number and size
  (never its name). Both are committed before the content is returned,
  in groups (:mod:`escrow.accesslog`).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace
from datetime import datetime

from sqlalchemy import bindparam, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from escrow import mime
from escrow.accesslog import AccessRecorder
from escrow.audit import Actor, Audit, EventSpec
from escrow.availability import Availability, availability
from escrow.db import Database
from escrow.errors import NotFound
from escrow.models import Delivery, Message, Staff, VaultItem, utcnow
from escrow.settings import Settings
from escrow.vault import Vault

PAGE_SIZE = 20
# Opening a message for its subject is bounded, so one inbox page cannot hog the crypto threads.
_SUBJECT_BACKFILL_LIMIT = 4
# Messages up to this size are parsed on the event loop (well under a millisecond).
_PARSE_INLINE_BYTES = 64 * 1024
# A message page's one query, built once (building it per request cost more than running it).
_LOAD = (
    select(Delivery, Message, Staff.name, VaultItem.ciphertext, VaultItem.sha256)
    .join(Message, Message.id == Delivery.message_id)
    .outerjoin(Staff, Staff.id == Message.staff_id)
    .outerjoin(VaultItem, VaultItem.message_id == Message.id)
    .where(
        Delivery.recipient_id == bindparam("recipient_id"),
        Delivery.message_id == bindparam("message_id"),
    )
)


@dataclass(frozen=True)
class Entry:
    """One delivered message as the recipient sees it, without content."""

    message_id: str
    delivery_id: str
    received_at: datetime
    sender_name: str
    state: Availability
    read: bool
    replied: bool
    subject: str | None = None


@dataclass(frozen=True)
class InboxPage:
    entries: tuple[Entry, ...]
    page: int
    has_next: bool
    total: int


@dataclass(frozen=True)
class Opened:
    """A message page: its entry, and its parsed content when it is available."""

    entry: Entry
    content: mime.ParsedMessage | None


@dataclass(frozen=True)
class _Row:
    delivery: Delivery
    message: Message
    staff_name: str | None


class Mailbox:
    """Lists, opens and serves parts of the messages delivered to one recipient."""

    def __init__(
        self,
        settings: Settings,
        db: Database,
        vault: Vault,
        audit: Audit,
        recorder: AccessRecorder | None = None,
    ) -> None:
        self._settings = settings
        self._db = db
        self._vault = vault
        self._audit = audit
        self._backfill = asyncio.Semaphore(_SUBJECT_BACKFILL_LIMIT)
        self._reads = recorder or AccessRecorder(db, audit)

    def _entry(self, row: _Row, now: datetime, subject: str | None = None) -> Entry:
        delivery, message = row.delivery, row.message
        return Entry(
            message_id=message.id,
            delivery_id=delivery.id,
            received_at=message.created_at,
            sender_name=row.staff_name or self._settings.practice_name,
            state=availability(delivery, message, now),
            read=delivery.read_at is not None,
            replied=delivery.replied_at is not None,
            subject=subject,
        )

    @staticmethod
    def _query(recipient_id: str):  # type: ignore[no-untyped-def]
        return (
            select(Delivery, Message, Staff.name)
            .join(Message, Message.id == Delivery.message_id)
            .outerjoin(Staff, Staff.id == Message.staff_id)
            .where(Delivery.recipient_id == recipient_id)
        )

    async def inbox(self, recipient_id: str, page: int = 1, per_page: int = PAGE_SIZE) -> InboxPage:
        """Page ``page`` (1-based) of the recipient's messages, newest first, subjects decrypted."""
        page = max(1, page)
        async with self._db.read() as session:
            total = await session.scalar(
                select(func.count())
                .select_from(Delivery)
                .where(Delivery.recipient_id == recipient_id)
            )
            result = await session.execute(
                self._query(recipient_id)
                .order_by(Delivery.created_at.desc(), Delivery.id.desc())
                .offset((page - 1) * per_page)
                .limit(per_page + 1)
            )
            rows = [_Row(d, m, n) for d, m, n in result]
        now = utcnow()
        subjects = await asyncio.gather(*(self._subject(row, now) for row in rows[:per_page]))
        entries = tuple(
            self._entry(row, now, subject) for row, subject in zip(rows, subjects, strict=False)
        )
        return InboxPage(entries, page, len(rows) > per_page, int(total or 0))

    async def _subject(self, row: _Row, now: datetime) -> str | None:
        if availability(row.delivery, row.message, now) != "available":
            return None
        if row.message.subject_sealed is not None:
            return (await self._vault.open(row.message.subject_sealed)).decode("utf-8", "replace")
        async with self._backfill:
            content = await self._content(row.message.id)
        if content is None:
            return None
        subject = mime.subject_of(content)
        await self._remember_subject(row.message.id, subject)
        return subject

    async def _remember_subject(self, message_id: str, subject: str) -> None:
        sealed = await self._vault.seal(subject.encode("utf-8"))
        async with self._db.write() as session:
            await session.execute(
                update(Message)
                .where(Message.id == message_id, Message.subject_sealed.is_(None))
                .values(subject_sealed=sealed.ciphertext)
            )

    async def _content(self, message_id: str) -> bytes | None:
        async with self._db.read() as session:
            item = (
                await session.scalars(select(VaultItem).where(VaultItem.message_id == message_id))
            ).first()
        if item is None or item.ciphertext is None:
            return None
        return await self._vault.open_item(item)

    async def _row(self, session: AsyncSession, recipient_id: str, message_id: str) -> _Row:
        found = (
            await session.execute(
                self._query(recipient_id).where(Delivery.message_id == message_id)
            )
        ).first()
        if found is None:
            raise NotFound("no such message")
        delivery, message, staff_name = found
        return _Row(delivery, message, staff_name)

    async def _available(self, recipient_id: str, message_id: str) -> tuple[_Row, Entry]:
        async with self._db.read() as session:
            row = await self._row(session, recipient_id, message_id)
        return row, self._entry(row, utcnow())

    async def _load(
        self, recipient_id: str, message_id: str
    ) -> tuple[_Row, Entry, mime.ParsedMessage | None]:
        """The row, its entry and (when available) the parsed content, in one query."""
        params = {"recipient_id": recipient_id, "message_id": message_id}
        found = await self._db.run_read(lambda session: session.execute(_LOAD, params).first())
        if found is None:
            raise NotFound("no such message")
        delivery, message, staff_name, ciphertext, sha256 = found
        row = _Row(delivery, message, staff_name)
        entry = self._entry(row, utcnow())
        if entry.state != "available":
            return row, entry, None
        if ciphertext is None:  # purged under us: treat as expired
            return row, replace(entry, state="expired"), None
        plaintext = await self._vault.open(ciphertext, sha256)
        if len(plaintext) <= _PARSE_INLINE_BYTES:  # a fraction of a millisecond: no thread hop
            return row, entry, mime.parse(plaintext)
        return row, entry, await asyncio.to_thread(mime.parse, plaintext)

    async def open(self, recipient_id: str, message_id: str, actor: Actor) -> Opened:
        """A message page. Marks the delivery read and audits ``message.viewed``."""
        row, entry, content = await self._load(recipient_id, message_id)
        await self._reads.record(
            EventSpec(
                "message.viewed",
                actor,
                message_id=message_id,
                delivery_id=entry.delivery_id,
                outcome="ok" if content is not None else entry.state,
            ),
            mark_read=entry.delivery_id if content is not None else None,
        )
        if content is not None and row.message.subject_sealed is None:
            await self._remember_subject(message_id, content.subject)
        return Opened(entry, content)

    async def attachment(
        self, recipient_id: str, message_id: str, index: int, actor: Actor
    ) -> mime.Part:
        """Attachment ``index`` (1-based); audits ``attachment.downloaded``. NotFound otherwise."""
        _row, entry, content = await self._load(recipient_id, message_id)
        if content is None or not 1 <= index <= len(content.attachments):
            raise NotFound("no such attachment")
        part = content.attachments[index - 1]
        await self._reads.record(
            EventSpec(
                "attachment.downloaded",
                actor,
                message_id=message_id,
                delivery_id=entry.delivery_id,
                detail={"attachment": index, "size": part.size},
            )
        )
        return part

    async def inline(self, recipient_id: str, message_id: str, index: int) -> mime.Part:
        """Inline image ``index`` (1-based) of an available message; part of viewing, not audited."""
        _row, _entry, content = await self._load(recipient_id, message_id)
        if content is None or not 1 <= index <= len(content.inline):
            raise NotFound("no such image")
        return content.inline[index - 1]

    async def peek(self, recipient_id: str, message_id: str) -> Opened:
        """A message page again (to redraw a form): nothing marked, nothing audited."""
        _row, entry, content = await self._load(recipient_id, message_id)
        return Opened(entry, content)

    async def message_for(self, recipient_id: str, delivery_id: str) -> str | None:
        """The message of one of the recipient's deliveries (where a link leads after sign-in)."""
        async with self._db.read() as session:
            return (
                await session.scalars(
                    select(Delivery.message_id).where(
                        Delivery.id == delivery_id, Delivery.recipient_id == recipient_id
                    )
                )
            ).first()

    async def entry(self, recipient_id: str, message_id: str) -> Entry:
        """The entry for one of the recipient's messages, without content."""
        _row, entry = await self._available(recipient_id, message_id)
        return entry
