"""A client's secure reply: sealed into the vault and queued for the therapist.

Promises:

* :meth:`Replies.send` stores the reply as a new :class:`Message`
  (direction ``reply``, same thread, ``parent_id`` the original), its
  sealed MIME as a :class:`VaultItem`, one outbox job of kind ``reply``,
  the delivery's ``replied`` status and the ``reply.sent`` audit event in
  one transaction: all or nothing.
* ``ESCROW_REPLY_MODE=deliver``: the job's payload is the complete reply
  (From ``ESCROW_NOTIFY_FROM`` under the client's name, Reply-To the
  client, In-Reply-To/References the original, the attachments), sent to
  the original sender. Its Message-ID is the reply's ``rfc_message_id``,
  so a retried job is the same mail. ``notify``: the payload only names
  the reply; :mod:`smtp.compose` turns it into a content-free notice.
* Refusals raise :class:`ReplyRefused` before anything is stored: nothing
  to send, too large (text and attachments together above
  ``ESCROW_MAX_MESSAGE_MB``), too many files, or a withdrawn or expired
  original.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import select, update

from escrow import mime
from escrow.audit import Actor, Audit
from escrow.availability import availability
from escrow.db import Database
from escrow.errors import EscrowError, NotFound
from escrow.models import Delivery, Message, Recipient, VaultItem, new_id, utcnow
from escrow.outbox import Outbox
from escrow.settings import Settings
from escrow.vault import Vault

MAX_TEXT_CHARS = 100_000
MAX_FILES = 20
NOTICE_MARKER = "reply-notice"


class ReplyRefused(EscrowError):
    """A reply that cannot be sent; ``reason`` is one of the codes below (no content)."""

    REASONS = ("empty", "too_large", "too_many_files", "too_long", "unavailable")

    def __init__(self, reason: str) -> None:
        super().__init__(f"reply refused: {reason}")
        self.reason = reason


@dataclass(frozen=True)
class Sent:
    reply_id: str
    rfc_message_id: str
    mode: str


def reply_notice_payload(*, reply_id: str, parent_id: str, in_reply_to: str) -> bytes:
    """The payload of a ``notify``-mode reply job: ids only, never content."""
    return json.dumps(
        {
            "notice": NOTICE_MARKER,
            "reply_id": reply_id,
            "parent_id": parent_id,
            "in_reply_to": in_reply_to,
        }
    ).encode("utf-8")


class Replies:
    """Seals and queues replies from recipients."""

    def __init__(
        self, settings: Settings, db: Database, vault: Vault, audit: Audit, outbox: Outbox
    ) -> None:
        self._settings = settings
        self._db = db
        self._vault = vault
        self._audit = audit
        self._outbox = outbox

    def check_size(self, text: str, uploads: Sequence[mime.Upload]) -> None:
        """Raise :class:`ReplyRefused` if the reply breaks a limit (cheap; before any crypto)."""
        if not text.strip() and not uploads:
            raise ReplyRefused("empty")
        if len(text) > MAX_TEXT_CHARS:
            raise ReplyRefused("too_long")
        if len(uploads) > MAX_FILES:
            raise ReplyRefused("too_many_files")
        total = len(text.encode("utf-8")) + sum(len(u.data) for u in uploads)
        if total > self._settings.max_message_bytes:
            raise ReplyRefused("too_large")

    async def send(
        self,
        recipient_id: str,
        message_id: str,
        text: str,
        uploads: Sequence[mime.Upload],
        actor: Actor,
    ) -> Sent:
        """Store and queue a reply to ``message_id`` (see the module promises)."""
        self.check_size(text, uploads)
        async with self._db.read() as session:
            found = (
                await session.execute(
                    select(Delivery, Message, Recipient, VaultItem)
                    .join(Message, Message.id == Delivery.message_id)
                    .join(Recipient, Recipient.id == Delivery.recipient_id)
                    .outerjoin(VaultItem, VaultItem.message_id == Message.id)
                    .where(Delivery.recipient_id == recipient_id, Delivery.message_id == message_id)
                )
            ).first()
        if found is None:
            raise NotFound("no such message")
        delivery, original, recipient, item = found
        now = utcnow()
        if availability(delivery, original, now) != "available" or item is None:
            raise ReplyRefused("unavailable")
        if item.ciphertext is None:
            raise ReplyRefused("unavailable")
        parsed = await asyncio.to_thread(mime.parse, await self._vault.open_item(item))

        reply_id = new_id()
        domain = self._settings.notify_from.rpartition("@")[2]
        rfc_id = f"<{reply_id}.reply@{domain}>"
        in_reply_to = original.rfc_message_id
        content = mime.build_reply(
            from_name=recipient.display_name or recipient.email,
            from_address=self._settings.notify_from,
            reply_to=recipient.email,
            to=original.sender,
            subject=parsed.subject,
            message_id=rfc_id,
            in_reply_to=in_reply_to,
            references=parsed.references,
            text=text,
            uploads=uploads,
            date=now,
        )
        sealed = await self._vault.seal(content)
        mode = self._settings.reply_mode
        if mode == "deliver":
            payload = sealed.ciphertext
        else:
            notice = reply_notice_payload(
                reply_id=reply_id, parent_id=original.id, in_reply_to=in_reply_to
            )
            payload = (await self._vault.seal(notice)).ciphertext

        async with self._db.write() as session:
            reply = Message(
                id=reply_id,
                thread_id=original.thread_id,
                direction="reply",
                sender=recipient.email,
                staff_id=original.staff_id,
                recipient_id=recipient.id,
                parent_id=original.id,
                rfc_message_id=rfc_id,
                size=len(content),
                created_at=now,
                expires_at=now + timedelta(days=self._settings.message_ttl_days),
            )
            session.add(reply)
            await session.flush()
            self._vault.store_sealed(session, sealed, len(content), reply_id)
            self._outbox.enqueue(
                session,
                "reply",
                mail_from=self._settings.notify_from,
                rcpt_to=[original.sender],
                payload=payload,
                message_id=reply_id,
                delivery_id=delivery.id,
            )
            await session.execute(
                update(Delivery)
                .where(Delivery.id == delivery.id)
                .values(
                    status="replied",
                    replied_at=now,
                    read_at=delivery.read_at or now,
                    opened_at=delivery.opened_at or now,
                )
            )
            await self._audit.record(
                session,
                "reply.sent",
                actor,
                message_id=reply_id,
                delivery_id=delivery.id,
                detail={
                    "parent_id": original.id,
                    "attachments": len(uploads),
                    "size": len(content),
                    "mode": mode,
                },
            )
        self._outbox.wake()
        return Sent(reply_id, rfc_id, mode)
