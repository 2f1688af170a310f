"""Your recent activity: the client's own events, with masked addresses, and nobody else's."""

from __future__ import annotations

from sqlalchemy import select

from escrow.audit import Actor
from escrow.models import Recipient
from tests.web.helpers import Portal, mime_message


async def test_activity_lists_own_events_only_with_masked_addresses(portal: Portal) -> None:
    sent = await portal.send()
    await portal.set_up(sent)
    await portal.client.get(f"/messages/{sent.message_id}")
    other = await portal.send(mime_message(to="other@example.org"), to="other@example.org")
    async with portal.services.db.read() as session:
        other_id = (
            await session.scalars(
                select(Recipient.id).where(Recipient.email == "other@example.org")
            )
        ).one()
    await portal.services.audit.log(
        "login.ok",
        Actor("recipient", other_id, "203.0.113.99", "Other/1.0"),
        delivery_id=other.delivery_id,
    )

    page = await portal.client.get("/activity")

    assert page.status_code == 200
    text = page.text
    assert text.count("Opened a message") == 2
    assert "Signed in" in text and "Passphrase chosen" in text
    assert "198.51.100.x" in text
    assert "198.51.100.7" not in text
    assert "203.0.113" not in text
    assert text.index("Opened a message") < text.index("Passphrase chosen")  # newest first
