"""What the staff console reads: sent messages, their deliveries and trail, recipients, settings.

Promises:

* Scope: a staff member sees only messages they sent (``message.staff_id``);
  an admin sees every message. Anything out of scope is
  :class:`~escrow.errors.NotFound`, exactly like a message that does not
  exist, so ids are never confirmed.
* Cost: listings use keyset pagination over indexed columns
  (``message.created_at``/``staff_id``, ``recipient.email``) and a fixed
  number of statements per page, whatever the vault holds.
* Health information: a subject is opened from the vault only for the
  message's own sender (admins see that a message exists, not what it is
  about); a reply's text and attachments only for the staff member it was
  addressed to. Opening a reply audits ``message.viewed`` and a download
  ``attachment.downloaded`` (never a file name). Nothing here logs content.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import re
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Table, and_, bindparam, exists, func, or_, select, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from escrow import mime
from escrow.accesslog import AccessRecorder
from escrow.activity import mask_ip
from escrow.audit import Actor, Audit, EventSpec
from escrow.availability import availability
from escrow.db import Database
from escrow.errors import NotFound
from escrow.models import (
    AuditEvent,
    Delivery,
    Message,
    Recipient,
    Staff,
    VaultItem,
    utcnow,
)
from escrow.settings import Secret, Settings
from escrow.vault import Vault

PAGE_SIZE = 25
TRAIL_LIMIT = 200
HISTORY_LIMIT = 100
STATUSES = ("queued", "notified", "opened", "read", "replied", "revoked", "expired")
_ID = re.compile(r"[0-9a-f]{32}")


# ---------------------------------------------------------------- value objects


@dataclass(frozen=True)
class Viewer:
    """Who is looking: a staff member's id, and whether they are an admin."""

    staff_id: str
    admin: bool


@dataclass(frozen=True)
class DeliveryState:
    """One message to one recipient, with its effective state and times."""

    delivery_id: str
    recipient_id: str
    recipient_email: str
    status: str
    created_at: datetime
    notified_at: datetime | None
    opened_at: datetime | None
    read_at: datetime | None
    replied_at: datetime | None


@dataclass(frozen=True)
class SentMessage:
    """A sent message as the console lists it; ``subject`` is None when not shown."""

    id: str
    sender: str
    staff_id: str | None
    own: bool
    created_at: datetime
    expires_at: datetime
    revoked_at: datetime | None
    expired_at: datetime | None
    purged_at: datetime | None
    legal_hold: bool
    size: int
    subject: str | None
    deliveries: tuple[DeliveryState, ...]


@dataclass(frozen=True)
class SentPage:
    messages: tuple[SentMessage, ...]
    next_cursor: str | None


@dataclass(frozen=True)
class ReplySummary:
    id: str
    sender: str
    created_at: datetime
    addressed_to_viewer: bool


@dataclass(frozen=True)
class TrailEvent:
    seq: int
    at: datetime
    actor_type: str
    actor_id: str
    action: str
    outcome: str
    place: str


@dataclass(frozen=True)
class MessageDetail:
    message: SentMessage
    direction: str
    parent_id: str | None
    replies: tuple[ReplySummary, ...]
    trail: tuple[TrailEvent, ...]


@dataclass(frozen=True)
class OpenedReply:
    """A client's reply, opened for the staff member it was addressed to."""

    id: str
    parent_id: str | None
    sender: str
    created_at: datetime
    content: mime.ParsedMessage | None  # None when withdrawn, expired or purged


@dataclass(frozen=True)
class RecipientRow:
    id: str
    email: str
    display_name: str
    has_passphrase: bool
    needs_code: bool
    locked_until: datetime | None
    failed_attempts: int
    created_at: datetime


@dataclass(frozen=True)
class RecipientPage:
    recipients: tuple[RecipientRow, ...]
    next_cursor: str | None


# ---------------------------------------------------------------- cursors


def encode_cursor(created_at: datetime, row_id: str) -> str:
    raw = f"{created_at.isoformat()}|{row_id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str | None) -> tuple[datetime, str] | None:
    """The (time, id) a cursor names, or None for a missing or malformed one."""
    if not cursor or len(cursor) > 200:
        return None
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        when, _, row_id = raw.partition("|")
        moment = datetime.fromisoformat(when)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        return None
    if moment.tzinfo is None or not _ID.fullmatch(row_id):
        return None
    return moment, row_id


def _text_cursor_encode(value: str) -> str:
    return base64.urlsafe_b64encode(value.encode()).decode().rstrip("=")


def _text_cursor_decode(cursor: str | None) -> str | None:
    if not cursor or len(cursor) > 600:
        return None
    try:
        return base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (ValueError, binascii.Error, UnicodeDecodeError):
        return None


# ---------------------------------------------------------------- state rules


def delivery_status(delivery: Delivery, message: Message, now: datetime) -> str:
    """The state the console shows: withdrawn and expired override the delivery's progress."""
    state = availability(delivery, message, now)
    if state == "withdrawn":
        return "revoked"
    if state == "expired":
        return "expired"
    return delivery.status


def _status_clause(status: str, now: datetime) -> Any:
    """A condition on (Delivery, Message) matching :func:`delivery_status` == ``status``."""
    revoked = or_(Message.revoked_at.is_not(None), Delivery.status == "revoked")
    expired = or_(
        Message.expires_at <= now,
        Message.expired_at.is_not(None),
        Message.purged_at.is_not(None),
        Delivery.status == "expired",
    )
    if status == "revoked":
        return revoked
    if status == "expired":
        return and_(~revoked, expired)
    return and_(Delivery.status == status, ~revoked, ~expired)


# ---------------------------------------------------------------- the queries


class Console:
    """The console's reads (and the audited opening of replies)."""

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
        self._reads = recorder or AccessRecorder(db, audit)

    # ------------------------------------------------------------ sent messages

    async def sent(
        self,
        viewer: Viewer,
        *,
        recipient: str = "",
        status: str = "",
        cursor: str | None = None,
        per_page: int = PAGE_SIZE,
    ) -> SentPage:
        """One page of sent messages, newest first (keyset on ``created_at``, ``id``).

        ``recipient`` filters by exact address, ``status`` by a delivery state
        in :data:`STATUSES`. A fixed number of statements whatever the page or
        vault size: the page, its deliveries, and (once per message) one read and
        one batched write that seal missing subjects.
        """
        now = utcnow()
        query = select(Message).where(Message.direction == "outbound")
        if not viewer.admin:
            query = query.where(Message.staff_id == viewer.staff_id)
        after = decode_cursor(cursor)
        if after is not None:
            moment, last_id = after
            query = query.where(
                or_(
                    Message.created_at < moment,
                    and_(Message.created_at == moment, Message.id < last_id),
                )
            )
        conditions = []
        address = recipient.strip().lower()
        if address:
            conditions.append(Delivery.recipient_id == Recipient.id)
            conditions.append(Recipient.email == address)
        if status in STATUSES:
            conditions.append(_status_clause(status, now))
        if conditions:
            matching = select(Delivery.id).where(Delivery.message_id == Message.id, *conditions)
            if address:
                matching = matching.join(Recipient, Recipient.id == Delivery.recipient_id)
            query = query.where(exists(matching.correlate(Message)))
        query = query.order_by(Message.created_at.desc(), Message.id.desc()).limit(per_page + 1)
        async with self._db.read() as session:
            rows = list((await session.scalars(query)).all())
            page = rows[:per_page]
            deliveries = await self._deliveries(session, [m.id for m in page])
        subjects = await self._subjects(viewer, page, now)
        messages = tuple(
            self._sent(viewer, m, deliveries.get(m.id, []), subjects.get(m.id), now) for m in page
        )
        next_cursor = None
        if len(rows) > per_page and page:
            next_cursor = encode_cursor(page[-1].created_at, page[-1].id)
        return SentPage(messages, next_cursor)

    async def _deliveries(
        self, session: Any, message_ids: list[str]
    ) -> dict[str, list[tuple[Delivery, str]]]:
        found: dict[str, list[tuple[Delivery, str]]] = {}
        if not message_ids:
            return found
        result = await session.execute(
            select(Delivery, Recipient.email)
            .join(Recipient, Recipient.id == Delivery.recipient_id)
            .where(Delivery.message_id.in_(message_ids))
            .order_by(Recipient.email)
        )
        for delivery, email in result:
            found.setdefault(delivery.message_id, []).append((delivery, email))
        return found

    def _sent(
        self,
        viewer: Viewer,
        message: Message,
        deliveries: list[tuple[Delivery, str]],
        subject: str | None,
        now: datetime,
    ) -> SentMessage:
        return SentMessage(
            id=message.id,
            sender=message.sender,
            staff_id=message.staff_id,
            own=message.staff_id == viewer.staff_id,
            created_at=message.created_at,
            expires_at=message.expires_at,
            revoked_at=message.revoked_at,
            expired_at=message.expired_at,
            purged_at=message.purged_at,
            legal_hold=message.legal_hold,
            size=message.size,
            subject=subject,
            deliveries=tuple(
                DeliveryState(
                    delivery_id=d.id,
                    recipient_id=d.recipient_id,
                    recipient_email=email,
                    status=delivery_status(d, message, now),
                    created_at=d.created_at,
                    notified_at=d.notified_at,
                    opened_at=d.opened_at,
                    read_at=d.read_at,
                    replied_at=d.replied_at,
                )
                for d, email in deliveries
            ),
        )

    async def _subjects(
        self, viewer: Viewer, messages: list[Message], now: datetime
    ) -> dict[str, str]:
        """Subjects of the viewer's own messages; unsealed ones are sealed once, in one batch."""
        own = [
            m
            for m in messages
            if m.direction == "outbound" and m.staff_id == viewer.staff_id and m.purged_at is None
        ]
        subjects: dict[str, str] = {}
        sealed = [m for m in own if m.subject_sealed is not None]
        opened = await asyncio.gather(
            *(self._vault.open(cast(bytes, m.subject_sealed)) for m in sealed)
        )
        for message, plain in zip(sealed, opened, strict=True):
            subjects[message.id] = plain.decode("utf-8", "replace")
        missing = [m.id for m in own if m.subject_sealed is None]
        if not missing:
            return subjects
        async with self._db.read() as session:
            items = (
                await session.execute(
                    select(VaultItem.message_id, VaultItem.ciphertext, VaultItem.sha256).where(
                        VaultItem.message_id.in_(missing), VaultItem.ciphertext.is_not(None)
                    )
                )
            ).all()
        if not items:
            return subjects
        plaintexts = await asyncio.gather(
            *(self._vault.open(cast(bytes, ciphertext), sha) for _, ciphertext, sha in items)
        )
        found: dict[str, str] = {
            str(mid): mime.subject_of(plain)
            for (mid, _, _), plain in zip(items, plaintexts, strict=True)
        }
        sealed_subjects = await asyncio.gather(
            *(self._vault.seal(subject.encode("utf-8")) for subject in found.values())
        )
        table = cast(Table, Message.__table__)
        async with self._db.write() as session:
            await session.execute(
                update(table)
                .where(table.c.id == bindparam("b_id"), table.c.subject_sealed.is_(None))
                .values(subject_sealed=bindparam("b_sealed")),
                [
                    {"b_id": mid, "b_sealed": s.ciphertext}
                    for mid, s in zip(found, sealed_subjects, strict=True)
                ],
            )
        subjects.update(found)
        return subjects

    async def _scoped(self, session: Any, viewer: Viewer, message_id: str) -> Message:
        if not _ID.fullmatch(message_id):
            raise NotFound("no such message")
        message = await session.get(Message, message_id)
        if message is None or not (viewer.admin or message.staff_id == viewer.staff_id):
            raise NotFound("no such message")
        return cast(Message, message)

    async def message(self, viewer: Viewer, message_id: str) -> MessageDetail:
        """One message in scope: its deliveries, replies and audit trail. NotFound otherwise."""
        now = utcnow()
        async with self._db.read() as session:
            message = await self._scoped(session, viewer, message_id)
            deliveries = await self._deliveries(session, [message.id])
            replies = (
                await session.scalars(
                    select(Message)
                    .where(
                        Message.thread_id == message.thread_id,
                        Message.parent_id == message.id,
                        Message.direction == "reply",
                    )
                    .order_by(Message.created_at)
                    .limit(TRAIL_LIMIT)
                )
            ).all()
            trail = (
                await session.scalars(
                    select(AuditEvent)
                    .where(AuditEvent.message_id == message.id)
                    .order_by(AuditEvent.seq)
                    .limit(TRAIL_LIMIT)
                )
            ).all()
        subjects = await self._subjects(viewer, [message], now)
        return MessageDetail(
            message=self._sent(
                viewer, message, deliveries.get(message.id, []), subjects.get(message.id), now
            ),
            direction=message.direction,
            parent_id=message.parent_id,
            replies=tuple(
                ReplySummary(r.id, r.sender, r.created_at, r.staff_id == viewer.staff_id)
                for r in replies
            ),
            trail=tuple(
                TrailEvent(
                    e.seq,
                    e.at,
                    e.actor_type,
                    e.actor_id,
                    e.action,
                    e.outcome,
                    mask_ip(e.remote_addr),
                )
                for e in trail
            ),
        )

    async def _reply(
        self, viewer: Viewer, reply_id: str
    ) -> tuple[Message, bytes | None, str | None]:
        """A reply addressed to the viewer, with its ciphertext; NotFound for anyone else."""
        if not _ID.fullmatch(reply_id):
            raise NotFound("no such reply")
        async with self._db.read() as session:
            found = (
                await session.execute(
                    select(Message, VaultItem.ciphertext, VaultItem.sha256)
                    .outerjoin(VaultItem, VaultItem.message_id == Message.id)
                    .where(Message.id == reply_id, Message.direction == "reply")
                )
            ).first()
        if found is None or found[0].staff_id != viewer.staff_id:
            raise NotFound("no such reply")
        return found[0], found[1], found[2]

    async def _open_reply(self, viewer: Viewer, reply_id: str) -> OpenedReply:
        reply, ciphertext, sha256 = await self._reply(viewer, reply_id)
        content = None
        usable = (
            reply.revoked_at is None and reply.purged_at is None and reply.expires_at > utcnow()
        )
        if usable and ciphertext is not None:
            plaintext = await self._vault.open(ciphertext, sha256)
            content = await asyncio.to_thread(mime.parse, plaintext)
        return OpenedReply(reply.id, reply.parent_id, reply.sender, reply.created_at, content)

    async def open_reply(self, viewer: Viewer, reply_id: str, actor: Actor) -> OpenedReply:
        """A reply's text and attachments, for the staff member it was addressed to (audited)."""
        opened = await self._open_reply(viewer, reply_id)
        await self._reads.record(
            EventSpec(
                "message.viewed",
                actor,
                message_id=reply_id,
                outcome="ok" if opened.content is not None else "unavailable",
                detail={"console": True},
            )
        )
        return opened

    async def reply_attachment(
        self, viewer: Viewer, reply_id: str, index: int, actor: Actor
    ) -> mime.Part:
        """Attachment ``index`` (1-based) of a reply to the viewer; audited. NotFound otherwise."""
        opened = await self._open_reply(viewer, reply_id)
        if opened.content is None or not 1 <= index <= len(opened.content.attachments):
            raise NotFound("no such attachment")
        part = opened.content.attachments[index - 1]
        await self._reads.record(
            EventSpec(
                "attachment.downloaded",
                actor,
                message_id=reply_id,
                detail={"attachment": index, "size": part.size, "console": True},
            )
        )
        return part

    # ------------------------------------------------------------ recipients

    async def recipients(
        self, *, prefix: str = "", cursor: str | None = None, per_page: int = PAGE_SIZE
    ) -> RecipientPage:
        """Recipients whose address starts with ``prefix``, by address (keyset; one statement)."""
        query = select(Recipient)
        wanted = prefix.strip().lower()
        if wanted:
            # A range on the unique address index, plus the exact prefix test.
            query = query.where(
                Recipient.email >= wanted, Recipient.email.startswith(wanted, autoescape=True)
            )
        after = _text_cursor_decode(cursor)
        if after is not None:
            query = query.where(Recipient.email > after)
        async with self._db.read() as session:
            rows = list(
                (await session.scalars(query.order_by(Recipient.email).limit(per_page + 1))).all()
            )
        page = rows[:per_page]
        next_cursor = _text_cursor_encode(page[-1].email) if len(rows) > per_page and page else None
        return RecipientPage(tuple(_recipient_row(r) for r in page), next_cursor)

    async def recipient(self, recipient_id: str) -> tuple[RecipientRow, tuple[TrailEvent, ...]]:
        """One recipient and their access history (their own audited actions, newest first)."""
        if not _ID.fullmatch(recipient_id):
            raise NotFound("no such recipient")
        async with self._db.read() as session:
            row = await session.get(Recipient, recipient_id)
            if row is None:
                raise NotFound("no such recipient")
            events = (
                await session.scalars(
                    select(AuditEvent)
                    .where(
                        AuditEvent.actor_type == "recipient", AuditEvent.actor_id == recipient_id
                    )
                    .order_by(AuditEvent.seq.desc())
                    .limit(HISTORY_LIMIT)
                )
            ).all()
        return _recipient_row(row), tuple(
            TrailEvent(
                e.seq, e.at, e.actor_type, e.actor_id, e.action, e.outcome, mask_ip(e.remote_addr)
            )
            for e in events
        )

    # ------------------------------------------------------------ staff and settings

    async def staff_accounts(self) -> list[Staff]:
        async with self._db.read() as session:
            return list((await session.scalars(select(Staff).order_by(Staff.email))).all())

    async def staff_names(self, ids: set[str]) -> dict[str, str]:
        """Addresses of the given staff ids (for showing who acted)."""
        if not ids:
            return {}
        async with self._db.read() as session:
            rows = (
                await session.execute(select(Staff.id, Staff.email).where(Staff.id.in_(ids)))
            ).all()
        return {i: e for i, e in rows}

    async def count_messages(self) -> int:
        async with self._db.read() as session:
            return int(await session.scalar(select(func.count()).select_from(Message)) or 0)


def _recipient_row(row: Recipient) -> RecipientRow:
    return RecipientRow(
        id=row.id,
        email=row.email,
        display_name=row.display_name,
        has_passphrase=row.passphrase_hash is not None,
        needs_code=row.access_code_hash is not None,
        locked_until=row.locked_until,
        failed_attempts=row.failed_attempts,
        created_at=row.created_at,
    )


MASKED = "set (hidden)"


def effective_settings(settings: Settings) -> list[tuple[str, str]]:
    """Every setting as (``ESCROW_`` name, shown value), secrets masked.

    Secrets show only whether they are set; the database URL loses its password.
    """
    shown: list[tuple[str, str]] = []
    for item in fields(settings):
        value = getattr(settings, item.name)
        name = f"ESCROW_{item.name.upper()}"
        if isinstance(value, Secret):
            text = MASKED if value else "not set"
        elif value is None:
            text = "not set"
        elif item.name == "database_url":
            try:
                text = make_url(value).render_as_string(hide_password=True)
            except ArgumentError:
                text = MASKED
        elif item.name == "smarthost":
            text = f"{value[0]}:{value[1]}"
        elif isinstance(value, frozenset | tuple):
            text = ", ".join(str(v) for v in sorted(value, key=str)) or "(empty)"
        else:
            text = str(value)
        shown.append((name, text))
    return shown
