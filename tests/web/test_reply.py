"""Replying: sealed into the vault, queued for the therapist, delivered or announced."""

from __future__ import annotations

from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from email.utils import parseaddr
from pathlib import Path

from sqlalchemy import select

from escrow.models import AuditEvent, Delivery, Message, OutboxJob, VaultItem
from escrow.replies import reply_notice_payload
from smtp import compose
from smtp.worker import OutboxWorker
from tests.web.conftest import MakePortal
from tests.web.helpers import CLIENT, PDF, THERAPIST, Portal, csrf_of, mime_message

REPLY_TEXT = "Thank you. The Tuesday appointment works for me."


def parse(data: bytes) -> EmailMessage:
    message = BytesParser(policy=policy.default).parsebytes(data)
    assert isinstance(message, EmailMessage)
    return message


async def send_reply(portal: Portal, message_id: str, page_text: str, **extra: object) -> object:
    return await portal.client.post(
        f"/messages/{message_id}/reply",
        data={"csrf": csrf_of_text(page_text), "text": REPLY_TEXT},
        files=[("files", ("my diary \u2013 week 3.pdf", PDF, "application/pdf"))],
        **extra,  # type: ignore[arg-type]
    )


def csrf_of_text(text: str) -> str:
    import re

    found = re.search(r'name="csrf" value="([0-9a-f]{64})"', text)
    assert found
    return found.group(1)


async def captured(portal: Portal) -> list[EmailMessage]:
    """Run the real outbox worker once (capture transport) and parse what it wrote."""
    await OutboxWorker(portal.services).run_once()
    directory = Path(portal.services.settings.mail_capture_dir)
    return [parse(path.read_bytes()) for path in sorted(directory.glob("*.eml"))]


async def test_reply_is_sealed_and_delivered_to_the_therapist_threaded(portal: Portal) -> None:
    sent = await portal.send(mime_message(subject="Notes from our session"))
    page = await portal.set_up(sent)
    await captured(portal)  # the notification goes first

    response = await send_reply(portal, sent.message_id, page.text)

    assert response.status_code == 303  # type: ignore[attr-defined]
    location = response.headers["location"]  # type: ignore[attr-defined]
    assert location == f"/messages/{sent.message_id}/replied"
    confirmation = await portal.client.get(location)
    assert "Your reply was sent" in confirmation.text

    async with portal.services.db.read() as session:
        reply = (await session.scalars(select(Message).where(Message.direction == "reply"))).one()
        original = await session.get(Message, sent.message_id)
        item = (
            await session.scalars(select(VaultItem).where(VaultItem.message_id == reply.id))
        ).one()
        job = (await session.scalars(select(OutboxJob).where(OutboxJob.kind == "reply"))).one()
        delivery = await session.get(Delivery, sent.delivery_id)
    assert original is not None and delivery is not None
    assert reply.thread_id == original.thread_id
    assert reply.parent_id == original.id
    assert reply.sender == CLIENT
    assert reply.rfc_message_id.startswith("<") and reply.rfc_message_id.endswith(">")
    assert item.ciphertext is not None and REPLY_TEXT.encode() not in item.ciphertext
    assert job.payload is not None and REPLY_TEXT.encode() not in job.payload
    assert job.message_id == reply.id
    assert delivery.status == "replied" and delivery.replied_at is not None

    stored = parse(await portal.services.vault.open_item(item))
    assert stored.get_body(("plain",)).get_content().strip() == REPLY_TEXT  # type: ignore[union-attr]

    mails = await captured(portal)
    delivered = [m for m in mails if m["Message-ID"] == reply.rfc_message_id]
    assert len(delivered) == 1
    mail = delivered[0]
    assert mail["X-Escrow-Envelope-To"] == THERAPIST
    assert mail["X-Escrow-Envelope-From"] == portal.services.settings.notify_from
    name, address = parseaddr(str(mail["From"]))
    assert address == portal.services.settings.notify_from
    assert name == CLIENT
    assert parseaddr(str(mail["Reply-To"]))[1] == CLIENT
    assert parseaddr(str(mail["To"]))[1] == THERAPIST
    assert mail["In-Reply-To"] == sent.rfc_message_id
    assert sent.rfc_message_id in str(mail["References"])
    assert str(mail["Subject"]) == "Re: Notes from our session"
    assert mail.get_body(("plain",)).get_content().strip() == REPLY_TEXT  # type: ignore[union-attr]
    attachments = list(mail.iter_attachments())
    assert [a.get_filename() for a in attachments] == ["my diary \u2013 week 3.pdf"]
    assert attachments[0].get_content() == PDF

    async with portal.services.db.read() as session:
        actions = [
            (e.action, e.message_id)
            for e in (await session.scalars(select(AuditEvent).order_by(AuditEvent.seq))).all()
        ]
    assert ("reply.sent", reply.id) in actions
    assert ("reply.delivered", reply.id) in actions


async def test_notify_mode_tells_the_therapist_without_any_content(
    make_portal: MakePortal,
) -> None:
    portal = await make_portal(ESCROW_REPLY_MODE="notify")
    sent = await portal.send(mime_message(subject="Notes from our session"))
    page = await portal.set_up(sent)
    await captured(portal)

    response = await send_reply(portal, sent.message_id, page.text)
    assert response.status_code == 303  # type: ignore[attr-defined]

    async with portal.services.db.read() as session:
        reply = (await session.scalars(select(Message).where(Message.direction == "reply"))).one()
    mails = [m for m in await captured(portal) if m["Subject"] == "New secure reply"]
    assert len(mails) == 1
    notice = mails[0]
    raw = notice.as_bytes()
    assert notice["X-Escrow-Envelope-To"] == THERAPIST
    assert notice["In-Reply-To"] == sent.rfc_message_id
    for secret in (REPLY_TEXT, "Notes from our session", "diary", CLIENT, "sam"):
        assert secret.encode() not in raw, secret
    assert not list(notice.iter_attachments())
    body = notice.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    assert f"/staff/messages/{sent.message_id}" in body
    # The reply itself is safe in the vault for the console to show.
    async with portal.services.db.read() as session:
        item = (
            await session.scalars(select(VaultItem).where(VaultItem.message_id == reply.id))
        ).one()
    assert REPLY_TEXT.encode() in await portal.services.vault.open_item(item)


def test_a_notice_payload_is_recognised_and_a_message_is_not() -> None:
    notice = reply_notice_payload(reply_id="r" * 32, parent_id="p" * 32, in_reply_to="<a@b>")
    assert compose.is_reply_notice(notice)
    assert not compose.is_reply_notice(mime_message())


async def test_reply_over_the_size_limit_is_refused_and_the_text_kept(
    make_portal: MakePortal,
) -> None:
    portal = await make_portal(ESCROW_MAX_MESSAGE_MB="1")
    sent = await portal.send()
    page = await portal.set_up(sent)

    response = await portal.client.post(
        f"/messages/{sent.message_id}/reply",
        data={"csrf": csrf_of(page), "text": "my words stay"},
        files=[("files", ("big.bin", b"\0" * (1024 * 1024 + 10), "application/octet-stream"))],
    )

    assert response.status_code == 413
    assert "larger than 1 MB" in response.text
    async with portal.services.db.read() as session:
        assert (
            await session.scalars(select(OutboxJob).where(OutboxJob.kind == "reply"))
        ).first() is None


async def test_empty_reply_and_bad_token_are_refused(portal: Portal) -> None:
    sent = await portal.send()
    page = await portal.set_up(sent)

    empty = await portal.client.post(
        f"/messages/{sent.message_id}/reply",
        data={"csrf": csrf_of(page), "text": "   "},
        files=[("files", ("", b"", "application/octet-stream"))],
    )
    forged = await portal.client.post(
        f"/messages/{sent.message_id}/reply", data={"csrf": "0" * 64, "text": "forged words"}
    )
    missing = await portal.client.post(
        f"/messages/{sent.message_id}/reply", data={"text": "forged words"}
    )

    assert empty.status_code == 400
    assert "Please write a reply" in empty.text
    for response in (forged, missing):
        assert response.status_code == 400
        assert "did not act on it" in response.text
        assert "forged words" in response.text  # redrawn with what was typed
    async with portal.services.db.read() as session:
        assert (
            await session.scalars(select(OutboxJob).where(OutboxJob.kind == "reply"))
        ).first() is None
        csrf_events = (
            await session.scalars(select(AuditEvent).where(AuditEvent.action == "csrf.failed"))
        ).all()
    assert len(csrf_events) == 2


async def test_reply_to_a_withdrawn_message_is_refused(portal: Portal) -> None:
    from sqlalchemy import update

    from escrow.models import utcnow

    sent = await portal.send()
    page = await portal.set_up(sent)
    async with portal.services.db.write() as session:
        await session.execute(
            update(Message).where(Message.id == sent.message_id).values(revoked_at=utcnow())
        )

    response = await send_reply(portal, sent.message_id, page.text)

    assert response.status_code == 410  # type: ignore[attr-defined]
