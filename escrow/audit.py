"""The tamper-evident audit log: an append-only SHA-256 hash chain.

Each event stores the hash of the event before it and its own hash over a
canonical encoding (sorted-key JSON of every field). Editing, deleting or
reordering any row breaks the chain, and :meth:`Audit.verify` names the
first bad sequence number.

Appends are serialised: on PostgreSQL by a transaction-scoped advisory lock,
on SQLite by the ``BEGIN IMMEDIATE`` write transaction. An event is written in
the caller's transaction, so it commits (or not) with the action it records.
Events carry ids, masked addresses and outcomes, never health information.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Table, select, text
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from escrow.db import Database
from escrow.errors import AuditChainBroken
from escrow.models import AuditEvent, utcnow

GENESIS = "0" * 64
# Any constant: the advisory lock that serialises appends on PostgreSQL.
_PG_LOCK_KEY = 0x657363726F77  # "escrow"
EXPORT_FIELDS = (
    "seq",
    "at",
    "actor_type",
    "actor_id",
    "action",
    "message_id",
    "delivery_id",
    "remote_addr",
    "user_agent",
    "outcome",
    "detail",
    "prev_hash",
    "hash",
)

DetailValue = str | int | bool | None
_TABLE = cast(Table, AuditEvent.__table__)
_CHAIN_END = select(_TABLE.c.seq, _TABLE.c.hash).order_by(_TABLE.c.seq.desc()).limit(1)
_INSERT = _TABLE.insert()


@dataclass(frozen=True)
class Actor:
    """Who did something, and from where."""

    type: str  # staff | recipient | system | smtp
    id: str = ""
    remote_addr: str = ""
    user_agent: str = ""


SYSTEM = Actor("system")


@dataclass(frozen=True)
class EventSpec:
    """An event to append: what happened, who did it, to what, with what outcome."""

    action: str
    actor: Actor
    message_id: str | None = None
    delivery_id: str | None = None
    outcome: str = "ok"
    detail: Mapping[str, DetailValue] | None = None


def _iso(at: datetime) -> str:
    return at.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def event_hash(event: AuditEvent) -> str:
    """SHA-256 over the canonical encoding of every field but ``hash`` itself."""
    canonical = export_row(event)
    del canonical["hash"]
    return _canonical_hash(canonical)


def _canonical_hash(fields: Mapping[str, Any]) -> str:
    """The hash of an event's exported fields, ``hash`` left out (see :func:`event_hash`)."""
    encoded = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(encoded.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Verified:
    events: int
    last_seq: int


class Audit:
    """Appends, verifies and exports audit events."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def record(
        self,
        session: AsyncSession,
        action: str,
        actor: Actor,
        *,
        message_id: str | None = None,
        delivery_id: str | None = None,
        outcome: str = "ok",
        detail: Mapping[str, DetailValue] | None = None,
    ) -> AuditEvent:
        """Append an event inside ``session``'s write transaction (it commits with the caller)."""
        spec = EventSpec(action, actor, message_id, delivery_id, outcome, detail)
        return (await self.record_many(session, [spec]))[0]

    async def record_many(
        self, session: AsyncSession, specs: Sequence[EventSpec]
    ) -> list[AuditEvent]:
        """Append several events, in order, with one lock and one look-up of the chain's end."""
        if not specs:
            return []
        rows = await session.run_sync(self.append, specs)
        return [AuditEvent(**row) for row in rows]

    def append(self, session: Session, specs: Sequence[EventSpec]) -> list[dict[str, Any]]:
        """:meth:`record_many` for a synchronous session (:meth:`Database.run_write`).

        Returns the rows written, as column mappings: the hot paths (intake,
        the outbox) ignore them, and building ORM objects only to hash and
        insert them cost more than the rest of the append.
        """
        if not specs:
            return []
        if self._db.dialect == "postgresql":
            session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_LOCK_KEY})
        session.flush()
        connection = session.connection()
        last = connection.execute(_CHAIN_END).first()
        seq, prev_hash = (0, GENESIS) if last is None else (last.seq, last.hash)
        now = utcnow()
        at = _iso(now)
        rows = []
        for spec in specs:
            seq += 1
            row: dict[str, Any] = {
                "seq": seq,
                "at": at,
                "actor_type": spec.actor.type,
                "actor_id": spec.actor.id,
                "action": spec.action,
                "message_id": spec.message_id,
                "delivery_id": spec.delivery_id,
                "remote_addr": spec.actor.remote_addr[:64],
                "user_agent": spec.actor.user_agent[:300],
                "outcome": spec.outcome,
                "detail": json.dumps(
                    dict(spec.detail or {}), sort_keys=True, separators=(",", ":")
                ),
                "prev_hash": prev_hash,
            }
            row["hash"] = prev_hash = _canonical_hash(row)
            row["at"] = now
            rows.append(row)
        # A Core insert on the connection: the ORM's unit of work costs more than the
        # rest of an intake.
        connection.execute(_INSERT, rows)
        return rows

    async def log(self, action: str, actor: Actor, **fields: Any) -> AuditEvent:
        """Append an event in a transaction of its own."""
        async with self._db.write() as session:
            return await self.record(session, action, actor, **fields)

    async def _stream(
        self, *, since: datetime | None = None, message_id: str | None = None, batch: int = 1000
    ) -> AsyncIterator[AuditEvent]:
        after = 0
        while True:
            query = select(AuditEvent).where(AuditEvent.seq > after)
            if since is not None:
                query = query.where(AuditEvent.at >= since)
            if message_id is not None:
                query = query.where(AuditEvent.message_id == message_id)
            async with self._db.read() as session:
                rows = (await session.scalars(query.order_by(AuditEvent.seq).limit(batch))).all()
            for row in rows:
                yield row
            if len(rows) < batch:
                return
            after = rows[-1].seq

    async def verify(self, *, batch: int = 1000) -> Verified:
        """Walk the whole chain in batches; raise :class:`AuditChainBroken` at the first bad event."""
        expected_seq, prev_hash, count = 1, GENESIS, 0
        async for event in self._stream(batch=batch):
            if event.seq != expected_seq:
                bad = expected_seq if event.seq > expected_seq else event.seq
                raise AuditChainBroken(
                    bad, f"sequence gap: expected {expected_seq}, found {event.seq}"
                )
            if event.prev_hash != prev_hash:
                raise AuditChainBroken(event.seq, "previous-hash link does not match")
            if event_hash(event) != event.hash:
                raise AuditChainBroken(event.seq, "content does not match its hash")
            prev_hash, expected_seq, count = event.hash, expected_seq + 1, count + 1
        return Verified(events=count, last_seq=expected_seq - 1)

    async def export(
        self, fmt: str = "jsonl", *, since: datetime | None = None, message_id: str | None = None
    ) -> AsyncIterator[str]:
        """Events as JSON Lines or CSV text chunks, oldest first, streamed in batches."""
        writer_buffer = io.StringIO()
        writer = csv.writer(writer_buffer, lineterminator="\n")
        if fmt == "csv":
            writer.writerow(EXPORT_FIELDS)
            yield writer_buffer.getvalue()
        async for event in self._stream(since=since, message_id=message_id):
            row = export_row(event)
            if fmt == "csv":
                writer_buffer.seek(0)
                writer_buffer.truncate()
                writer.writerow([row[f] if row[f] is not None else "" for f in EXPORT_FIELDS])
                yield writer_buffer.getvalue()
            else:
                yield json.dumps(row, ensure_ascii=False, separators=(",", ":")) + "\n"


def export_row(event: AuditEvent) -> dict[str, Any]:
    """One event as a plain mapping, in :data:`EXPORT_FIELDS` order."""
    return {
        "seq": event.seq,
        "at": _iso(event.at),
        "actor_type": event.actor_type,
        "actor_id": event.actor_id,
        "action": event.action,
        "message_id": event.message_id,
        "delivery_id": event.delivery_id,
        "remote_addr": event.remote_addr,
        "user_agent": event.user_agent,
        "outcome": event.outcome,
        "detail": event.detail,
        "prev_hash": event.prev_hash,
        "hash": event.hash,
    }
