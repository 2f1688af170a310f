"""What a client sees of withdrawal, expiry and purge, over HTTP; and the read receipt."""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import select, update

from escrow.audit import Actor
from escrow.models import Message, OutboxJob, Staff
from tests.web.conftest import MakePortal
from tests.web.helpers import PDF, PNG, THERAPIST, Portal, Sent, csrf_of, mime_message

OPERATOR = Actor("operator", id="tester", remote_addr="cli")
SUBJECT = "Your assessment results"
TEXT = "Hello Sam,\nthe results are attached.\n"


async def rich(portal: Portal) -> Sent:
    """A message with a subject, a body, an inline image and an attachment, sent by a staff member."""
    sent = await portal.send(
        mime_message(
            subject=SUBJECT,
            text=TEXT,
            html="<p>Hello Sam<img src='cid:logo@riverside'></p>",
            inline_png=True,
            attachments=(("results.pdf", "application/pdf", PDF),),
        )
    )
    staff = await therapist(portal)
    async with portal.services.db.write() as session:
        await session.execute(
            update(Message).where(Message.id == sent.message_id).values(staff_id=staff.id)
        )
    return sent


async def therapist(portal: Portal) -> Staff:
    async with portal.services.db.read() as session:
        found = (await session.scalars(select(Staff).where(Staff.email == THERAPIST))).first()
    if found is not None:
        return found
    return await portal.services.staff.add(
        THERAPIST, "a long enough staff password", name="Ada Lovelace", actor=OPERATOR
    )


async def revoke(portal: Portal, sent: Sent) -> None:
    staff = await therapist(portal)
    await portal.services.lifecycle.revoke(
        sent.message_id, staff=staff, actor=Actor("staff", id=staff.id)
    )


async def created_at(portal: Portal, sent: Sent) -> datetime:
    async with portal.services.db.read() as session:
        row = await session.get(Message, sent.message_id)
    assert row is not None
    return row.created_at


def assert_no_content(*pages: str) -> None:
    for page in pages:
        for secret in (SUBJECT, "Hello Sam", "results.pdf", "Ada Lovelace"):
            assert secret not in page, secret


async def refused_everywhere(portal: Portal, sent: Sent) -> None:
    """Reading, downloading, images and replying are all refused by the server."""
    base = f"/messages/{sent.message_id}"
    attachment = await portal.client.get(f"{base}/attachments/1")
    image = await portal.client.get(f"{base}/images/1")
    assert attachment.status_code == 404 and image.status_code == 404
    assert PDF not in attachment.content and PNG not in image.content
    inbox = await portal.client.get("/inbox")
    reply = await portal.client.post(
        f"{base}/reply", data={"csrf": csrf_of(inbox), "text": "Thank you"}
    )
    assert reply.status_code == 410
    async with portal.services.db.read() as session:
        replies = (await session.scalars(select(Message).where(Message.direction == "reply"))).all()
    assert replies == []


# ---------------------------------------------------------------- withdrawal


async def test_a_withdrawn_message_disappears_at_once_for_a_signed_in_client(
    portal: Portal,
) -> None:
    sent = await rich(portal)
    page = await portal.set_up(sent)
    assert SUBJECT in page.text
    assert (await portal.client.get(f"/messages/{sent.message_id}/attachments/1")).content == PDF

    await revoke(portal, sent)

    page = await portal.client.get(f"/messages/{sent.message_id}")
    inbox = await portal.client.get("/inbox")
    assert page.status_code == 410
    assert "This message was withdrawn" in page.text
    assert "Riverside Counselling has withdrawn this message" in page.text
    assert "Withdrawn by Riverside Counselling" in inbox.text
    assert_no_content(page.text, inbox.text)
    await refused_everywhere(portal, sent)


async def test_a_withdrawn_messages_link_says_so_and_nothing_else(portal: Portal) -> None:
    sent = await rich(portal)
    await revoke(portal, sent)

    link = await portal.client.get(f"/m/{sent.token}")

    assert link.status_code == 410
    assert "This message was withdrawn" in link.text
    assert "Riverside Counselling has withdrawn this message" in link.text
    assert "set-cookie" not in link.headers
    assert_no_content(link.text)
    assert str((await created_at(portal, sent)).year) not in link.text
    assert sent.message_id not in link.text
    # Not a way in: no session, nothing to sign in to.
    assert (await portal.client.get("/inbox")).status_code == 401


# ---------------------------------------------------------------- expiry and purge


async def test_an_expired_message_is_no_longer_available(portal: Portal) -> None:
    sent = await rich(portal)
    await portal.set_up(sent)
    expiry = await created_at(portal, sent) + timedelta(days=90, minutes=1)

    report = await portal.services.lifecycle.apply_retention(expiry)

    assert report.expired == 1
    page = await portal.client.get(f"/messages/{sent.message_id}")
    inbox = await portal.client.get("/inbox")
    assert page.status_code == 410
    assert "This message is no longer available" in page.text
    assert "No longer available" in inbox.text
    assert_no_content(page.text, inbox.text)
    await refused_everywhere(portal, sent)
    # Its link gets the neutral page of unknown links, byte for byte.
    await portal.client.post("/logout", data={"csrf": csrf_of(inbox)})
    link = await portal.client.get(f"/m/{sent.token}")
    unknown = await portal.client.get(f"/m/{portal.services.links.token_for('0' * 32)}")
    assert link.status_code == 404 and link.content == unknown.content
    assert "set-cookie" not in link.headers


async def test_a_purged_message_is_refused_too(portal: Portal) -> None:
    sent = await rich(portal)
    await portal.set_up(sent)
    much_later = await created_at(portal, sent) + timedelta(days=2555, minutes=1)

    report = await portal.services.lifecycle.apply_retention(much_later)

    assert (report.expired, report.purged) == (1, 1)
    page = await portal.client.get(f"/messages/{sent.message_id}")
    assert page.status_code == 410
    assert "no longer available" in page.text
    assert_no_content(page.text, (await portal.client.get("/inbox")).text)
    await refused_everywhere(portal, sent)


# ---------------------------------------------------------------- read receipts


async def receipts(portal: Portal) -> list[OutboxJob]:
    async with portal.services.db.read() as session:
        return list(
            (await session.scalars(select(OutboxJob).where(OutboxJob.kind == "receipt"))).all()
        )


async def test_reading_queues_one_read_receipt_when_they_are_on(make_portal: MakePortal) -> None:
    portal = await make_portal(ESCROW_READ_RECEIPTS="true")
    sent = await rich(portal)

    await portal.set_up(sent)  # reads the message
    await portal.client.get(f"/messages/{sent.message_id}")
    await portal.client.get(f"/messages/{sent.message_id}/attachments/1")

    (job,) = await receipts(portal)
    assert job.delivery_id == sent.delivery_id and THERAPIST in job.rcpt_to


async def test_reading_queues_no_read_receipt_by_default(portal: Portal) -> None:
    sent = await rich(portal)

    page = await portal.set_up(sent)

    assert SUBJECT in page.text
    assert await receipts(portal) == []
