"""Whether a delivered message may still be shown: one rule for links, inbox and pages.

A message is ``withdrawn`` once the practice revoked it (or its delivery),
``expired`` once its time is up or its ciphertext is purged, and
``available`` otherwise. Withdrawn and expired messages show a neutral
notice, never content; their links show the same page as unknown links.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from escrow.models import Delivery, Message

Availability = Literal["available", "withdrawn", "expired"]


def availability(delivery: Delivery, message: Message, now: datetime) -> Availability:
    """The state of ``message`` as delivered by ``delivery`` at ``now``."""
    if message.revoked_at is not None or delivery.status == "revoked":
        return "withdrawn"
    if (
        message.expires_at <= now
        or message.expired_at is not None
        or message.purged_at is not None
        or delivery.status == "expired"
    ):
        return "expired"
    return "available"
