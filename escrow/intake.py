"""Intake: what happens to a submitted message before the SMTP server says ``250``.

:meth:`Intake.accept` seals the original MIME once into the vault, makes a
delivery (whose link token, derived by :mod:`escrow.links`, is stored only as
a SHA-256) and a notification job for every external recipient, a pass-through
job for internal recipients, and the audit events, all in one transaction.
If anything fails nothing is stored and the caller answers ``451``; content
never leaves in clear because of a failure.
"""

from __future__ import annotations

import asyncio
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from email.parser import BytesHeaderParser
from email.policy import compat32
from typing import Any, cast

from sqlalchemy import Table, bindparam, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from escrow.audit import Actor, Audit, EventSpec
from escrow.db import Database
from escrow.links import LinkTokens, token_hash
from escrow.models import Delivery, Message, OutboxJob, Recipient, VaultItem, new_id, utcnow
from escrow.outbox import Outbox
from escrow.settings import Settings
from escrow.vault import Sealed, Vault

_MSGID = re.compile(r"<[^<>\s]{1,900}>")
# How many In-Reply-To/References ids are looked up to find a thread.
_MAX_THREAD_REFS = 20


def domain_of(address: str) -> str:
    return address.rpartition("@")[2].strip().lower()


@dataclass(frozen=True)
class Submission:
    """A message as the SMTP edge received it. ``content`` is the raw MIME."""

    mail_from: str
    recipients: Sequence[str]
    content: bytes
    staff_id: str | None
    remote_addr: str


@dataclass(frozen=True)
class Accepted:
    message_id: str | None  # None when every recipient was internal
    escrowed: int
    passed_through: int


@dataclass(frozen=True)
class Headers:
    """The few header fields intake reads; never the subject."""

    message_id: str | None
    references: tuple[str, ...]


def read_headers(content: bytes) -> Headers:
    """Message-ID and thread references from the header block only (cheap, tolerant)."""
    head = content.split(b"\r\n\r\n", 1)[0].split(b"\n\n", 1)[0]
    parsed = BytesHeaderParser(policy=compat32).parsebytes(head + b"\r\n\r\n")
    own = _MSGID.findall(str(parsed.get("Message-ID", "")))
    refs = _MSGID.findall(str(parsed.get("In-Reply-To", ""))) + _MSGID.findall(
        str(parsed.get("References", ""))
    )
    return Headers(message_id=own[0] if own else None, references=tuple(reversed(refs)))


@dataclass
class _Prepared:
    """A submission with its crypto done, waiting for the batch commit."""

    submission: Submission
    external: list[str]
    internal: list[str]
    sealed: Sealed
    headers: Headers
    future: asyncio.Future[Accepted]


# At most this many submissions share one transaction.
MAX_BATCH = 64

# Intake's statements, built once on the tables and run on the connection (Core):
# the ORM session's own execution layer cost more than the rows themselves.
_INSERTS = tuple(
    cast(Table, model.__table__).insert() for model in (Message, VaultItem, Delivery, OutboxJob)
)
_MESSAGES = cast(Table, Message.__table__).c
_RECIPIENTS = cast(Table, Recipient.__table__)
_THREADS = select(_MESSAGES.rfc_message_id, _MESSAGES.thread_id).where(
    _MESSAGES.rfc_message_id.in_(bindparam("refs", expanding=True))
)
_RECIPIENT_IDS = select(_RECIPIENTS.c.email, _RECIPIENTS.c.id).where(
    _RECIPIENTS.c.email.in_(bindparam("emails", expanding=True))
)


class Intake:
    """Turns submissions into vault items, deliveries and outbox jobs.

    Submissions that arrive while a commit is in flight are committed
    together in the next transaction (group commit): each caller still gets
    its answer only after the transaction holding its message committed.
    """

    def __init__(
        self,
        settings: Settings,
        db: Database,
        vault: Vault,
        audit: Audit,
        outbox: Outbox,
        links: LinkTokens,
    ) -> None:
        self._settings = settings
        self._links = links
        self._db = db
        self._vault = vault
        self._audit = audit
        self._outbox = outbox
        self._queue: list[_Prepared] = []
        self._committer: asyncio.Task[None] | None = None

    def is_internal(self, address: str) -> bool:
        """Mail to internal domains passes through unchanged; all else is escrowed."""
        return domain_of(address) in self._settings.internal_domains

    async def accept(self, submission: Submission) -> Accepted:
        """Store ``submission`` durably, or raise and store nothing.

        Promise: when this returns, the message, its deliveries, its outbox
        jobs and its audit events are committed together.
        """
        internal = [r for r in submission.recipients if self.is_internal(r)]
        external = list(
            dict.fromkeys(r.lower() for r in submission.recipients if not self.is_internal(r))
        )
        # Crypto before the transaction: the write lock is held only for the writes.
        sealed = await self._vault.seal(submission.content)
        prepared = _Prepared(
            submission,
            external,
            internal,
            sealed,
            read_headers(submission.content),
            asyncio.get_running_loop().create_future(),
        )
        self._queue.append(prepared)
        if self._committer is None or self._committer.done():
            self._committer = asyncio.create_task(self._commit_queued())
        return await asyncio.shield(prepared.future)

    async def _commit_queued(self) -> None:
        while self._queue:
            batch, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
            try:
                results = await self._commit(batch)
            except Exception:
                if len(batch) == 1:
                    raise_into(batch[0].future)
                    continue
                # One bad submission must not fail the others: commit each alone.
                for item in batch:
                    try:
                        (result,) = await self._commit([item])
                    except Exception:
                        raise_into(item.future)
                    else:
                        settle(item.future, result)
            else:
                for item, result in zip(batch, results, strict=True):
                    settle(item.future, result)
            self._outbox.wake()

    async def _commit(self, batch: Sequence[_Prepared]) -> list[Accepted]:
        return await self._db.run_write(lambda session: self._write(session, batch))

    def _write(self, session: Session, batch: Sequence[_Prepared]) -> list[Accepted]:
        """The rows of ``batch`` and their audit events, in the caller's write transaction."""
        now = utcnow()
        expires = now + timedelta(days=self._settings.message_ttl_days)
        messages: list[dict[str, Any]] = []
        items: list[dict[str, Any]] = []
        deliveries: list[dict[str, Any]] = []
        jobs: list[dict[str, Any]] = []
        events: list[EventSpec] = []
        results: list[Accepted] = []
        threads = self._threads(session, [r for p in batch for r in p.headers.references])
        recipients = self._recipient_ids(session, {a for p in batch for a in p.external})
        for p in batch:
            sub = p.submission
            actor = Actor(
                "staff" if sub.staff_id else "smtp",
                id=sub.staff_id or "trusted-network",
                remote_addr=sub.remote_addr,
            )
            message_id = new_id() if p.external else None
            detail = {"size": len(sub.content)}
            if message_id is not None:
                thread = next((threads[r] for r in p.headers.references if r in threads), new_id())
                messages.append(
                    {
                        "id": message_id,
                        "thread_id": thread,
                        "direction": "outbound",
                        "sender": sub.mail_from,
                        "staff_id": sub.staff_id,
                        "rfc_message_id": p.headers.message_id or f"<{new_id()}@escrow.invalid>",
                        "size": len(sub.content),
                        "created_at": now,
                        "expires_at": expires,
                    }
                )
                items.append(
                    {
                        "id": new_id(),
                        "message_id": message_id,
                        "fingerprint": p.sealed.fingerprint,
                        "sha256": p.sealed.sha256,
                        "size": len(sub.content),
                        "ciphertext": p.sealed.ciphertext,
                        "created_at": now,
                    }
                )
                for address in p.external:
                    delivery_id = new_id()
                    deliveries.append(
                        {
                            "id": delivery_id,
                            "message_id": message_id,
                            "recipient_id": recipients[address],
                            "token_hash": token_hash(self._links.token_for(delivery_id)),
                            "status": "queued",
                            "created_at": now,
                        }
                    )
                    jobs.append(
                        self._outbox.job_row(
                            "notification",
                            mail_from=self._settings.notify_from,
                            rcpt_to=[address],
                            payload=None,
                            message_id=message_id,
                            delivery_id=delivery_id,
                        )
                    )
                events.append(
                    EventSpec(
                        "message.accepted",
                        actor,
                        message_id=message_id,
                        detail={**detail, "recipients": len(p.external)},
                    )
                )
            if p.internal:
                jobs.append(
                    self._outbox.job_row(
                        "passthrough",
                        mail_from=sub.mail_from,
                        rcpt_to=p.internal,
                        payload=p.sealed.ciphertext,
                        message_id=message_id,
                    )
                )
                events.append(
                    EventSpec(
                        "message.passed_through",
                        actor,
                        message_id=message_id,
                        detail={**detail, "recipients": len(p.internal)},
                    )
                )
            results.append(Accepted(message_id, len(p.external), len(p.internal)))
        connection = session.connection()
        for insert, rows in zip(_INSERTS, (messages, items, deliveries, jobs), strict=True):
            if rows:
                connection.execute(insert, rows)
        self._audit.append(session, events)
        return results

    def _threads(self, session: Session, references: Sequence[str]) -> dict[str, str]:
        """Thread ids of earlier messages named in In-Reply-To/References."""
        refs = list(dict.fromkeys(references))[: _MAX_THREAD_REFS * MAX_BATCH]
        if not refs:
            return {}
        rows = session.connection().execute(_THREADS, {"refs": refs})
        return {rfc: thread for rfc, thread in rows.all()}

    def _recipient_ids(self, session: Session, addresses: set[str]) -> dict[str, str]:
        """Recipient rows for ``addresses``, created if new (safe under concurrent intake)."""
        if not addresses:
            return {}
        dialect = postgresql if self._db.dialect == "postgresql" else sqlite
        now = utcnow()
        connection = session.connection()
        connection.execute(
            dialect.insert(_RECIPIENTS).on_conflict_do_nothing(index_elements=["email"]),
            [
                {
                    "id": new_id(),
                    "email": a,
                    "display_name": "",
                    "failed_attempts": 0,
                    "created_at": now,
                }
                for a in sorted(addresses)
            ],
        )
        rows = connection.execute(_RECIPIENT_IDS, {"emails": sorted(addresses)})
        return {email: rid for email, rid in rows.all()}


def settle(future: asyncio.Future[Accepted], result: Accepted) -> None:
    if not future.done():
        future.set_result(result)


def raise_into(future: asyncio.Future[Accepted]) -> None:
    """Pass the exception being handled to the waiting caller."""
    exc = sys.exc_info()[1]
    if not future.done() and exc is not None:
        future.set_exception(exc)
