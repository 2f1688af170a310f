"""A recipient's own recent activity, read from the audit log.

Promises: only events whose actor is this recipient (``actor_type``
``recipient`` and ``actor_id`` the recipient's id) and whose action is in
:data:`SHOWN` are returned, newest first, at most ``limit`` of them. Remote
addresses are masked (:func:`mask_ip`): enough to notice "that was not me",
not a full address.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select

from escrow.db import Database
from escrow.models import AuditEvent

SHOWN = (
    "login.ok",
    "login.failed",
    "recipient.locked",
    "passphrase.set",
    "consent.given",
    "message.viewed",
    "attachment.downloaded",
    "reply.sent",
    "logout",
    "session.expired",
)


def mask_ip(address: str) -> str:
    """``203.0.113.42`` -> ``203.0.113.x``; IPv6 keeps its first three groups."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return "unknown" if not address else "hidden"
    if isinstance(ip, ipaddress.IPv4Address):
        return ".".join(address.split(".")[:3]) + ".x"
    if ip.ipv4_mapped is not None:
        return mask_ip(str(ip.ipv4_mapped))
    groups = ip.exploded.split(":")[:3]
    return ":".join(g.lstrip("0") or "0" for g in groups) + ":…"


@dataclass(frozen=True)
class Activity:
    at: datetime
    action: str
    outcome: str
    place: str
    message_id: str | None


class ActivityLog:
    """Reads one recipient's own events."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def recent(self, recipient_id: str, limit: int = 50) -> list[Activity]:
        """The recipient's latest ``limit`` events of the kinds in :data:`SHOWN`."""
        async with self._db.read() as session:
            rows = (
                await session.scalars(
                    select(AuditEvent)
                    .where(
                        AuditEvent.actor_type == "recipient",
                        AuditEvent.actor_id == recipient_id,
                        AuditEvent.action.in_(SHOWN),
                    )
                    .order_by(AuditEvent.seq.desc())
                    .limit(limit)
                )
            ).all()
        return [
            Activity(r.at, r.action, r.outcome, mask_ip(r.remote_addr), r.message_id) for r in rows
        ]
